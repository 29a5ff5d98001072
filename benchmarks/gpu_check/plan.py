"""What the check runs: the steps in order of importance with their time budgets, and the sizes on a GPU and in the
CPU smoke run."""

PEAK_BF16_FLOPS = 790e12  # H100/H200 dense bf16 matmul, measured on this workplace's cards (about 790 TFLOP/s)
SIZES = {
    "gpu": dict(full="csm_1b", tiny="tiny", first_batch=1, more_batches=(8, 64), frames=16, transformers_frames=16,
                train_batch=8, train_frames=512, read_mib=1024, matmul=8192, repeats=5, mimi_seconds=4.0,
                serve=dict(config="small", slots=16, clients=(1, 4, 16), frames=24, requests=2, chunk_frames=2,
                           max_seconds=20),
                lora=(("small", 4, 128, "float32"), ("csm_1b", 2, 256, "bfloat16"))),
    "smoke": dict(full="tiny", tiny="tiny", first_batch=1, more_batches=(2,), frames=6, transformers_frames=1,
                  train_batch=2, train_frames=32, read_mib=16, matmul=256, repeats=2, mimi_seconds=0.5,
                  serve=dict(config="tiny_full_vocab", slots=2, clients=(1, 2), frames=4, requests=1, chunk_frames=2,
                             max_seconds=60),
                  lora=(("tiny", 2, 16, "bfloat16"),)),  # one compile of each step (bf16: the autocast path)
}
LORA = dict(rank=32, alpha=32.0, depth_fraction=1 / 16, lr=2e-4)  # all 7 projections of both stacks

# (step, "module:function" under benchmarks.gpu_check, seconds on the GPU), most important figures first. A step gets
# its budget or what is left of TOTAL_BUDGET, whichever is less; the budgets add up to TOTAL_BUDGET, which with the
# machine's start and the wheels keeps the run under 9 minutes.
STEPS = [
    ("env", "env:step", 20),                                        # versions, read bandwidth, matmul rate
    ("decode_bf16", "decode:step_bf16", 60),                        # CSM-1B batch 1 ms/frame, time to first audio
    ("decode_int8", "decode:step_int8", 45),                        # the same, int8 weights, batch 1
    ("transformers_eager", "transformers_generate:step_eager", 35),  # transformers' generate, batch 1, eager
    ("decode_int4", "decode:step_int4", 30),                        # CSM-1B batch 1, int4 weights (XLA unpacks)
    ("correctness", "correctness:step", 40),                        # tiny configs against transformers and the CPU
    ("mimi", "mimi:step", 15),                                      # the codec on the card
    ("decode_batches", "decode:step_batches", 45),                  # batches 8 and 64, bf16 and int8
    ("command_buffer", "command_buffer:step", 60),                  # XLA command-buffer settings, batch 1
    ("train", "train:step", 40),                                    # one CSM-1B training step
    ("serve", "serve:step", 35),                                    # the streaming server's load test
    ("lora", "lora:step", 30),                                      # our LoRA step against transformers + PEFT
    ("transformers_compiled", "transformers_generate:step_compiled", 25),  # static cache + torch.compile
]
TOTAL_BUDGET = 480
BUDGET_SCALE = {"gpu": 1, "smoke": 10}  # a shared CPU runs the smoke sizes slowly; its budgets only catch hangs
