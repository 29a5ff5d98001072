"""The steps of benchmarks/gpu_check.sh (run that, not this): correctness and speed of csm-jax on one GPU.

    python benchmarks/gpu_check.py OUT_DIR [--smoke]          # all steps, each in its own process
    python benchmarks/gpu_check.py --step NAME WORK [--smoke]  # one step (what the driver runs)

Every step runs in its own process under its own time budget (so a crash, an out-of-memory or a hang costs one
step, and each step starts with the card's memory free) and writes its results as it goes; the driver collects
them into OUT_DIR/gpu_check.json and gpu_check.md and prints the table last. --smoke: the same steps on the CPU
with tiny sizes.

Steps, in the order they run (their order of importance): env (versions; device-to-device copy bandwidth and bf16
matmul rate, measured); correctness (tiny configs: float32 and bf16 logits against transformers on the same device,
greedy frames against JAX's CPU backend and transformers' greedy generate, int8 against float32 weights); mimi
(random Mimi encode/decode on the device); decode_bf16 / decode_int8 (full-size CSM-1B at random weights: ms/frame at
batch 1, 8, 64 and time to first audio); train (one CSM-1B step, bf16 compute over float32 master weights, batch 8 x
512 frames: frames/s and MFU); serve (benchmarks/bench_serve.py's load test, small config, Mimi on the card: 1, 4
and 16 streaming clients over loopback against one-at-a-time serving, and the goals' ratios); lora (one LoRA step,
rank 32 on all seven projections of both stacks, ours against transformers + PEFT on the same weights and batch:
small config 4 x 128 frames in float32, CSM-1B 2 x 256 frames in bf16 compute); transformers (its `generate` on the
same weights as decode_bf16, static cache + torch.compile, eager if that fails).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.timing import median_time  # noqa: E402 (after the path is set)

PEAK_BF16_FLOPS = 790e12  # H100/H200 dense bf16 matmul, measured on this workplace's cards (about 790 TFLOP/s)
SIZES = {
    "gpu": dict(full="csm_1b", tiny="tiny", batches=(1, 8, 64), frames=16, train_batch=8, train_frames=512,
                copy_mib=1024, matmul=8192, repeats=5, mimi_seconds=4.0,
                serve=dict(config="small", slots=16, clients=(1, 4, 16), frames=24, requests=2, chunk_frames=2,
                           max_seconds=20),
                lora=(("small", 4, 128, "float32"), ("csm_1b", 2, 256, "bfloat16"))),
    "smoke": dict(full="tiny", tiny="tiny", batches=(1,), frames=6, train_batch=2, train_frames=32,
                  copy_mib=16, matmul=256, repeats=2, mimi_seconds=0.5,
                  serve=dict(config="tiny_full_vocab", slots=2, clients=(1, 2), frames=4, requests=1, chunk_frames=2,
                             max_seconds=60),
                  lora=(("tiny", 2, 16, "bfloat16"),)),  # one compile of each step (bf16: the autocast path)
}
LORA = dict(rank=32, alpha=32.0, depth_fraction=1 / 16, lr=2e-4)  # all 7 projections of both stacks
BUDGET_SCALE = {"gpu": 1, "smoke": 10}  # a shared CPU runs the smoke sizes slowly; its budgets only catch hangs
# (step, time budget in seconds on the GPU), in order of importance: a step gets its budget or what is left of
# TOTAL_BUDGET, whichever is less (the budgets add up to more, as most steps end early); with the start-up and the
# wheels the run stays under 8 minutes
STEPS = [("env", 30), ("correctness", 60), ("mimi", 25), ("decode_bf16", 90), ("decode_int8", 70),
         ("train", 60), ("serve", 75), ("lora", 60), ("transformers", 115)]
TOTAL_BUDGET = 450


# ---- shared helpers ------------------------------------------------------------------------------------------

class Recorder:
    """A step's results, rewritten to WORK/<step>.json after every update (a timeout keeps what was measured)."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def __setitem__(self, key, value):
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def guard(self, key, fn, *args, **kwargs):
        """Runs one sub-check; its exception is recorded under `key` and does not stop the step."""
        try:
            self[key] = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (every failure is a result here)
            self[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
            traceback.print_exc()
        return self.data[key]


def guard_attention(rec: Recorder, key: str, fn, *args):
    """`rec.guard`, and when the cuDNN attention path fails, the error is kept under `<key>_cudnn_error` and the
    check is run again with XLA's attention ($CSM_JAX_ATTENTION=xla for the rest of the step)."""
    import jax

    result = rec.guard(key, fn, *args)
    if "cudnn" in str(result.get("error", "")).lower() and os.environ.get("CSM_JAX_ATTENTION") != "xla":
        rec[f"{key}_cudnn_error"] = result["error"]
        os.environ["CSM_JAX_ATTENTION"] = "xla"
        jax.clear_caches()
        result = rec.guard(key, fn, *args)
        if "error" not in result:
            rec[key] = {**result, "attention": "xla (cuDNN failed)"}
    return rec.data[key]


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def read_step(work: Path, name: str) -> dict:
    path = work / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


# ---- env -----------------------------------------------------------------------------------------------------

def step_env(rec: Recorder, size: dict, work: Path) -> None:
    import importlib.metadata as md

    import jax
    import jax.numpy as jnp

    versions = {}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers", "moshi", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "missing"
    rec["versions"] = versions
    rec["python"] = sys.version.split()[0]
    device = jax.devices()[0]
    rec["device"] = {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        rec["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        rec["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    rec["memory_split"] = {k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_PREALLOCATE",
                                                          "XLA_PYTHON_CLIENT_MEM_FRACTION")}

    def copy_bandwidth():
        """A jitted elementwise pass over a random float32 array: reads it once and writes it once."""
        x = jax.random.normal(jax.random.key(0), (size["copy_mib"] << 18,), jnp.float32)
        f = jax.jit(lambda x: x * 1.0001)
        seconds = median_time(lambda: f(x).block_until_ready(), size["repeats"] * 2, warmup=1)
        return {"bytes_per_s": 2 * x.nbytes / seconds, "bytes": 2 * x.nbytes, "seconds": seconds}

    def matmul_rate():
        m = size["matmul"]
        a, b = (jax.random.normal(jax.random.key(i), (m, m), jnp.bfloat16) for i in (1, 2))
        f = jax.jit(lambda a, b: a @ b)
        seconds = median_time(lambda: f(a, b).block_until_ready(), size["repeats"] * 2, warmup=1)
        return {"flops_per_s": 2 * m ** 3 / seconds, "size": m}

    rec.guard("copy", copy_bandwidth)
    rec.guard("matmul_bf16", matmul_rate)


# ---- correctness (tiny configs) ------------------------------------------------------------------------------

def transformers_logits_on(model, tokens, mask, codes, device: str):
    """tests/torch_references.transformers_logits, on `device`: (c0 logits, depth logits) as float32 numpy."""
    import numpy as np
    import torch

    n = model.config.num_codebooks
    tokens = torch.tensor(np.asarray(tokens), dtype=torch.long, device=device)
    is_audio = torch.tensor(np.asarray(mask), device=device)[..., 0]
    with torch.no_grad():
        embeds = torch.where(is_audio[..., None], model.backbone_model.embed_tokens(tokens[..., :n]),
                             model.embed_text_tokens(tokens[..., n]))
        out = model(inputs_embeds=embeds, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, -1]
        codes = torch.tensor(np.asarray(codes), dtype=torch.long, device=device)
        depth = model.depth_decoder(input_ids=torch.nn.functional.pad(codes[:, : n - 1], (1, 0)),
                                    backbone_last_hidden_state=hidden).logits
    return out.logits.float().cpu().numpy(), depth.float().cpu().numpy()


def step_correctness(rec: Recorder, size: dict, work: Path) -> None:
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from convert import convert_to_orbax
    from csm_jax.core.config import preset
    from csm_jax.inference.decode_model import decode_model
    from csm_jax.inference.loop import FrameGenerator
    from csm_jax.inference.sampling import GREEDY, FrameSampling
    from csm_jax.io.checkpoint import load_model
    from tests.helpers import random_frames, random_prompt
    from tests.references import csm_from_transformers, transformers_model

    dev = torch_device()
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity: no reduced-precision passes on either side
    torch.backends.cudnn.allow_tf32 = False
    rng = np.random.default_rng(0)
    config = preset(size["tiny"])
    reference = transformers_model(config, seed=1)  # logits of order 1
    tmp = Path(tempfile.mkdtemp())
    reference.save_pretrained(tmp / "hf")
    converted = convert_to_orbax(tmp / "hf", tmp / "orbax")
    tokens, mask = random_frames(rng, config, 4, 10)
    codes = rng.integers(0, config.audio_vocab_size, (4, config.num_codebooks))

    def ours(dtype):
        model = load_model(converted, dtype=dtype)
        c0, hidden = model(tokens, mask)
        return np.asarray(c0, np.float32), np.asarray(model.depth_logits(hidden[:, -1], jnp.asarray(codes)),
                                                      np.float32)

    def compare(got, want, bound, min_agree=None):
        err = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
        agree = float(np.mean(np.argmax(got[0], -1) == np.argmax(want[0], -1)))
        ok = err <= bound and (min_agree is None or agree >= min_agree)
        return {"max_abs": err, "bound": bound, "c0_argmax_agree": agree, "largest_logit":
                float(np.abs(want[0]).max()), "pass": bool(ok)}

    def parity_f32():
        want = transformers_logits_on(reference.to(dev), tokens, mask, codes, dev)
        with jax.default_matmul_precision("highest"):
            return compare(ours(jnp.float32), want, 1e-4)

    def parity_bf16():
        """bf16 parameters and activations on both sides, against transformers in float32 on the same device (the
        CPU test's bound: 0.15 absolute, codebook-0 argmax equal at >= 90% of positions)."""
        want = transformers_logits_on(reference.to(dev).float(), tokens, mask, codes, dev)
        theirs = transformers_logits_on(reference.to(dev).to(torch.bfloat16), tokens, mask, codes, dev)
        got = ours(jnp.bfloat16)
        out = compare(got, want, 0.15, 0.9)
        out["transformers_bf16_vs_f32"] = compare(theirs, want, 0.15, 0.9)
        return out

    rec.guard("parity_float32", parity_f32)
    guard_attention(rec, "parity_bfloat16", parity_bf16)

    def greedy():
        """Greedy frames on the device, on JAX's CPU backend, and transformers' greedy generate (the tiny config of
        tests/test_generation.py)."""
        cfg = preset("tiny")
        hf = transformers_model(cfg, seed=0)
        model = csm_from_transformers(hf, cfg)
        prompts = [random_prompt(preset("tiny"), 0), random_prompt(preset("tiny"), 1, context_text=3, context_audio=2)]
        sampling = FrameSampling.same(GREEDY)
        with jax.default_matmul_precision("highest"):
            on_device = FrameGenerator(model).generate(prompts, 24, sampling)
        cpu = jax.devices("cpu")[0]
        with jax.default_device(cpu):
            graphdef, state = nnx.split(model)
            model_cpu = nnx.merge(graphdef, jax.device_put(state, cpu))
            on_cpu = FrameGenerator(model_cpu, cpu_kernels=False).generate(prompts, 24, sampling)
        embeds = np.asarray(model.embed_frames(jnp.asarray(prompts[0].tokens[None]),
                                               jnp.asarray(prompts[0].mask[None])))
        hf = hf.to(dev)
        with torch.no_grad():
            theirs = hf.generate(inputs_embeds=torch.tensor(embeds, device=dev),
                                 attention_mask=torch.ones(1, len(prompts[0]), device=dev), max_new_tokens=24,
                                 do_sample=False, depth_decoder_do_sample=False)[0].cpu().numpy().T
        same_cpu = all(a.shape == b.shape and (a == b).all() for a, b in zip(on_device, on_cpu))
        same_hf = on_device[0].shape == theirs.shape and bool((on_device[0] == theirs).all())
        return {"device_equals_cpu_backend": same_cpu, "device_equals_transformers": same_hf,
                "frames": [c.shape[1] for c in on_device], "pass": same_cpu and same_hf}

    rec.guard("greedy", greedy)

    def int8():
        """Codebook-0 logits through the decode layout, int8 weights against the same float32 weights."""
        model = load_model(converted, dtype=jnp.float32)
        toks, msk = random_frames(rng, config, 8, 16)
        with jax.default_matmul_precision("highest"):
            want = np.asarray(decode_model(model, cpu_kernels=False)(toks, msk)[0])
            got = np.asarray(decode_model(model, cpu_kernels=False, weights_dtype="int8")(toks, msk)[0])
        agree = float(np.mean(np.argmax(got, -1) == np.argmax(want, -1)))
        err = float(np.abs(got - want).max())
        return {"c0_argmax_agree": agree, "max_abs": err, "largest_logit": float(np.abs(want).max()),
                "pass": agree >= 0.9 and err <= 0.15}

    rec.guard("int8", int8)


# ---- Mimi ----------------------------------------------------------------------------------------------------

def step_mimi(rec: Recorder, size: dict, work: Path) -> None:
    import numpy as np
    import torch

    from csm_jax.core.codec import FRAME_SAMPLES, SAMPLE_RATE
    from csm_jax.io import audio

    dev = torch_device()
    rec["device"] = dev
    mimi = audio.random_mimi(0, device=dev)
    t = np.arange(int(size["mimi_seconds"] * SAMPLE_RATE)) / SAMPLE_RATE
    wave = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)
            + 0.05 * np.random.default_rng(0).standard_normal(t.shape)).astype(np.float32)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def encode():
        codes = audio.encode(mimi, wave)
        sync()
        return codes

    codes = encode()
    rec["codes_shape"] = list(codes.shape)
    rec["codes_in_range"] = bool((codes >= 0).all() and (codes < 2048).all())
    rec["distinct_codes"] = int(len(np.unique(codes)))
    rec["encode_ms"] = 1e3 * median_time(encode, size["repeats"], warmup=1)
    decoded = audio.decode(mimi, codes[None])
    rec["decoded_samples"] = int(decoded.shape[-1])
    rec["decoded_finite"] = bool(np.isfinite(decoded).all())
    rec["decode_ms"] = 1e3 * median_time(lambda: (audio.decode(mimi, codes[None]), sync()), size["repeats"], warmup=1)

    def one_streamed_frame():
        with audio.streaming_decoder(mimi):
            start = time.perf_counter()
            chunk = audio.decode(mimi, codes[None, :, :1])
            sync()
            return time.perf_counter() - start, chunk.shape[-1]

    one_streamed_frame()
    seconds, samples = one_streamed_frame()
    rec["stream_first_frame_ms"] = 1e3 * seconds
    rec["pass"] = bool(rec.data["codes_in_range"] and rec.data["decoded_finite"]
                       and rec.data["decoded_samples"] == codes.shape[1] * FRAME_SAMPLES and samples == FRAME_SAMPLES)


# ---- full-size decoding --------------------------------------------------------------------------------------

def full_size_transformers(config, dtype: str, seed: int = 0):
    """transformers' CSM with random weights, initialised on the device (the same weights for the same seed)."""
    import torch
    from transformers import CsmConfig as HfConfig, CsmForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(torch_device()):
        hf = CsmForConditionalGeneration(HfConfig(**config.to_transformers()))
    return hf.eval().to(getattr(torch, dtype))


def full_size_ours(config, weights_dtype: str):
    """Our decode layout with the weights of `full_size_transformers(config, "bfloat16")`, bf16 compute; int8
    quantizes them."""
    import gc

    import torch

    from benchmarks.bench_generate import build_ours, ours_from_transformers
    from csm_jax.inference.loop import FrameGenerator

    params = ours_from_transformers(full_size_transformers(config, "bfloat16"), config, "bfloat16")
    gc.collect()  # the transformers model is gone: free its memory before ours is placed
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model = build_ours(params, config, "bfloat16")
    del params
    return FrameGenerator(model, weights_dtype="int8" if weights_dtype == "int8" else None)


def step_decode(rec: Recorder, size: dict, work: Path, weights_dtype: str) -> None:
    import jax

    from benchmarks.bench_generate import per_frame, prompt, weight_bytes_per_frame
    from csm_jax.core.config import preset
    from csm_jax.inference.sampling import FrameSampling

    config = preset(size["full"])
    start = time.perf_counter()
    gen = full_size_ours(config, weights_dtype)
    jax.block_until_ready(gen.params)
    rec["build_s"] = time.perf_counter() - start
    bytes_per_frame = weight_bytes_per_frame(config, 1 if weights_dtype == "int8" else 2)
    bandwidth = read_step(work, "env").get("copy", {}).get("bytes_per_s")
    rec["weight_bytes_per_frame"] = bytes_per_frame
    rec["floor_ms_per_frame"] = 1e3 * bytes_per_frame / bandwidth if bandwidth else None
    sampling = FrameSampling()

    def batch_figures(batch):
        prompts = [prompt(config, seed) for seed in range(batch)]

        def run(n):
            return min(c.shape[1] for c in gen.generate(prompts, n, sampling, list(range(batch))))

        t0 = time.perf_counter()
        run(size["frames"])
        compile_s = time.perf_counter() - t0
        run(2 * size["frames"])
        step, prefill = per_frame(run, size["frames"])
        out = {"ms_per_frame": 1e3 * step, "frames_per_s": batch / step, "prefill_s": prefill,
               "first_call_s": compile_s}
        if bandwidth and batch == 1:
            out["share_of_bandwidth_floor"] = bytes_per_frame / bandwidth / step
        return out

    for batch in size["batches"]:
        guard_attention(rec, f"batch_{batch}", batch_figures, batch)

    def time_to_first_audio():
        """Request -> first frame's codes, and -> its audio through Mimi's streaming decoder on the same device."""
        import torch

        from csm_jax.io import audio

        p = prompt(config, 0)
        max_frames = 4 * size["frames"]

        def first_codes():
            t0 = time.perf_counter()
            codes = next(gen.stream(p, max_frames, sampling, seed=0, first_chunk=1))
            return time.perf_counter() - t0, codes

        first_codes()  # compile
        codes_s, codes = first_codes()
        out = {"codes_ms": 1e3 * codes_s}
        mimi = audio.random_mimi(0, device=torch_device())
        for _ in range(2):  # the first decode warms Mimi up
            with audio.streaming_decoder(mimi):
                t0 = time.perf_counter()
                audio.decode(mimi, codes[None])
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                mimi_s = time.perf_counter() - t0
        out["mimi_first_frame_ms"] = 1e3 * mimi_s
        out["audio_ms"] = 1e3 * (codes_s + mimi_s)
        return out

    rec.guard("time_to_first_audio", time_to_first_audio)


# ---- transformers' generate ----------------------------------------------------------------------------------

def step_transformers(rec: Recorder, size: dict, work: Path) -> None:
    import torch

    from benchmarks.bench_generate import per_frame, prompt
    from csm_jax.core.config import preset
    from tests.references import transformers_embeds

    config = preset(size["full"])
    dev = torch_device()
    hf = full_size_transformers(config, "bfloat16")

    def embed(p):
        return transformers_embeds(hf, p.tokens[None], p.mask[None]).float()
    kwargs = dict(do_sample=True, temperature=0.9, top_k=50, depth_decoder_do_sample=True,
                  depth_decoder_temperature=0.9, depth_decoder_top_k=50)

    def runner(batch, static: bool):
        with torch.no_grad():
            embeds = torch.cat([embed(prompt(config, seed)) for seed in range(batch)]).to(dev, torch.bfloat16)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=dev)
        extra = {"cache_implementation": "static"} if static else {"disable_compile": True}

        def run(n):
            with torch.inference_mode():
                out = hf.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, **kwargs, **extra)
            if dev == "cuda":
                torch.cuda.synchronize()
            return out.shape[1]

        return run

    def figures(batch, static: bool):
        hf.depth_decoder.generation_config.cache_implementation = "static" if static else None
        run = runner(batch, static)
        t0 = time.perf_counter()
        run(size["frames"]), run(2 * size["frames"])  # warm up (and compile) both lengths
        warm_s = time.perf_counter() - t0
        step, prefill = per_frame(run, size["frames"])
        return {"ms_per_frame": 1e3 * step, "frames_per_s": batch / step, "prefill_s": prefill, "warm_up_s": warm_s}

    # eager first (quick, and the fallback), then transformers' fastest documented mode: static caches for both
    # stacks, with which generate compiles the forward with torch.compile on CUDA (on CPU it stays eager)
    ours = read_step(work, "decode_bf16")
    static_mode = "static cache + torch.compile" if dev == "cuda" else "static cache, eager (no auto-compile on CPU)"
    for batch in size["batches"][:2]:
        eager = rec.guard(f"eager_batch_{batch}", figures, batch, False)
        fast = rec.guard(f"static_batch_{batch}", figures, batch, True)
        best, mode = (fast, static_mode) if "ms_per_frame" in fast else (eager, "eager (static cache failed)")
        if "ms_per_frame" in eager and "ms_per_frame" in best and eager["ms_per_frame"] < best["ms_per_frame"]:
            best, mode = eager, "eager (faster than " + static_mode + ")"
        result = {**best, "mode": mode}
        if "ms_per_frame" in best and ours.get(f"batch_{batch}", {}).get("ms_per_frame"):
            result["ours_speedup"] = best["ms_per_frame"] / ours[f"batch_{batch}"]["ms_per_frame"]
        rec[f"batch_{batch}"] = result


# ---- training ------------------------------------------------------------------------------------------------

def train_step_flops(config, batch: int, frames: int, depth_frames: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward): 2 per multiply-add of every weight
    product (backbone, codebook-0 head; the projection, depth decoder and audio heads over the depth frames' 32
    positions), plus attention's two products over the full (unmasked) square; embeddings are lookups."""
    b, d, v, n = config.backbone, config.decoder, config.audio_vocab_size, config.num_codebooks

    def weights(stack):  # matmul parameters of a stack (its norms excluded)
        return stack.num_params - stack.num_layers * 2 * stack.dim - stack.dim

    def attention(stack, length):
        return stack.num_layers * 2 * 2 * length * length * stack.num_heads * stack.head_dim

    backbone = 2 * batch * frames * (weights(b) + b.dim * v) + batch * attention(b, frames)
    depth = depth_frames * (2 * n * (weights(d) + b.dim * d.dim) + 2 * (n - 1) * d.dim * v + attention(d, n))
    return 3.0 * (backbone + depth)


def step_train(rec: Recorder, size: dict, work: Path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from csm_jax.core.config import preset
    from csm_jax.core.sharding import make_mesh
    from tests.helpers import utterance_batch
    from train.loss import depth_frame_count
    from train.trainer import OptimConfig, Trainer

    config = preset(size["full"])
    batch, frames = size["train_batch"], size["train_frames"]
    optim = OptimConfig(learning_rate=1e-5, warmup_steps=0)
    tokens, mask = utterance_batch(np.random.default_rng(0), config, batch, frames // 8, frames - frames // 8)
    flops = train_step_flops(config, batch, frames, depth_frame_count(batch, frames, optim.depth_fraction))
    measured = read_step(work, "env").get("matmul_bf16", {}).get("flops_per_s")

    def measure(remat: str) -> dict:
        trainer = Trainer(config, optim, make_mesh(-1, 1, 1), compute_dtype=jnp.bfloat16, remat=remat)
        state = trainer.init_state(0)
        data = trainer.put_batch({"tokens": tokens[None].astype(np.int32), "mask": mask[None],
                                  "segment_ids": np.ones((1, batch, frames), np.int32)})

        def step():
            nonlocal state
            state, metrics = trainer._step(state, data)
            jax.block_until_ready(metrics)
            return metrics

        t0 = time.perf_counter()
        loss = float(step()["loss"])
        out = {"remat": remat, "first_step_s": time.perf_counter() - t0, "loss": loss,
               "loss_finite": bool(np.isfinite(loss))}
        seconds = median_time(step, size["repeats"], warmup=1)
        out.update(step_s=seconds, frames_per_s=batch * frames / seconds, flops_per_step=flops,
                   mfu_vs_790=flops / seconds / PEAK_BF16_FLOPS)
        if measured:
            out["mfu_vs_measured_matmul"] = flops / seconds / measured
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["peak_memory_gb"] = stats["peak_bytes_in_use"] / 1e9
        return out

    rec["shape"] = {"batch": batch, "frames": frames, "compute": "bfloat16", "master": "float32"}
    result = guard_attention(rec, "remat_none", measure, "none")
    if "error" in result:  # out of memory, say: the same step with every block rematerialised
        result = guard_attention(rec, "remat_full", measure, "full")
    for key, value in result.items():
        rec[key] = value


# ---- serving ---------------------------------------------------------------------------------------------------

def step_serve(rec: Recorder, size: dict, work: Path) -> None:
    """benchmarks/bench_serve.py's load test: streaming clients over loopback against one-at-a-time serving, Mimi
    beside the model (on the card)."""
    if missing := not_installed("benchmarks.bench_serve"):  # the server (starlette, uvicorn) and httpx
        rec["error"] = f"error: {missing} not installed (carry its wheel: bash benchmarks/gpu_wheels.sh .whl)"
        return
    from benchmarks.bench_serve import against, load_test, parts, random_generator

    s = size["serve"]
    rec["setup"] = s
    generator = random_generator(s["config"])
    rec["mimi_device"] = str(next(generator.mimi.parameters()).device)
    rec.guard("halves", parts, generator, s["slots"], s["frames"], s["chunk_frames"])
    base = None
    for row in load_test(generator, s["slots"], s["clients"], s["frames"], s["requests"], s["chunk_frames"],
                         s["max_seconds"]):
        if base is None:
            base = rec["one_at_a_time"] = row
        else:
            rec[f"clients_{row['clients']}"] = {**row, **against(row, base)}


# ---- LoRA training step --------------------------------------------------------------------------------------

def step_lora(rec: Recorder, size: dict, work: Path) -> None:
    """One LoRA step (rank 32, alpha 32, q/k/v/o/gate/up/down of both stacks), ours against transformers + PEFT on
    the same config, weights and batch (benchmarks/bench_lora.py), on the card: each config and batch of
    size["lora"] in turn, float32 or bf16 compute over float32 weights."""
    import torch

    from benchmarks.bench_train import bench_batch
    from csm_jax.core.config import preset

    # float32 products in TF32 on both sides: JAX's default on the GPU, and torch's with "high"
    torch.set_float32_matmul_precision("high")
    rec["float32_matmuls"] = "TF32 on both sides on a GPU (JAX's default; torch set_float32_matmul_precision('high'))"
    for name, batch, frames, dtype in size["lora"]:
        config = preset(name)
        tokens, mask, depth_mask = bench_batch(config, batch, frames, LORA["depth_fraction"])
        hf = full_size_transformers(config, "float32")
        key, out = f"{name}_{dtype}", {"batch": batch, "frames": frames, "compute": dtype, "weights": "float32"}
        for side, fn, args in (("ours_ms", lora_ours_ms, (hf, config, tokens, mask, dtype, size["repeats"])),
                               ("transformers_peft_ms", lora_peft_ms,
                                (hf, config, tokens, mask, depth_mask, dtype, size["repeats"]))):
            try:
                out[side] = fn(*args)
            except Exception as e:  # noqa: BLE001 (a failure is a result; the other side still runs)
                out[f"{side}_error"] = f"{type(e).__name__}: {e}"[:500]
                traceback.print_exc()
            free_device_memory()
            rec[key] = out
        if "ours_ms" in out and "transformers_peft_ms" in out:
            rec[key] = {**out, "transformers_over_ours": out["transformers_peft_ms"] / out["ours_ms"]}


def lora_ours_ms(hf, config, tokens, mask, dtype: str, repeats: int) -> float:
    """Median ms of our LoRA step on `hf`'s weights."""
    import jax.numpy as jnp

    from benchmarks.bench_generate import ours_from_transformers
    from benchmarks.bench_train import our_step
    from train.lora import LoraConfig

    step = our_step(config, tokens, mask, LORA["depth_fraction"], LORA["lr"], jnp.dtype(dtype),
                    LoraConfig(rank=LORA["rank"], alpha=LORA["alpha"]), ours_from_transformers(hf, config, "float32"))
    return 1e3 * median_time(step, repeats)


def lora_peft_ms(hf, config, tokens, mask, depth_mask, dtype: str, repeats: int) -> float:
    """Median ms of transformers' step with PEFT's LoRA wrapped around `hf` (in place)."""
    import torch

    if missing := not_installed("peft"):
        raise ModuleNotFoundError(f"{missing} not installed")
    from benchmarks.bench_lora import peft_model
    from benchmarks.bench_train import transformers_step

    step = transformers_step(config, tokens, mask, depth_mask, LORA["lr"], peft_model(hf, LORA["rank"], LORA["alpha"]),
                             None if dtype == "float32" else getattr(torch, dtype))
    return 1e3 * median_time(step, repeats)


def free_device_memory() -> None:
    """Drops JAX's compiled steps and what torch's allocator keeps, once a measurement's objects are gone."""
    import gc

    import jax
    import torch

    jax.clear_caches()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def not_installed(module: str) -> str:
    """The first package that `module` (or what it imports) lacks here, or "" when it imports."""
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        return e.name or module
    return ""


STEP_FUNCTIONS = {"env": step_env, "correctness": step_correctness, "mimi": step_mimi,
                  "decode_bf16": lambda r, s, w: step_decode(r, s, w, "bfloat16"),
                  "decode_int8": lambda r, s, w: step_decode(r, s, w, "int8"),
                  "transformers": step_transformers, "train": step_train, "serve": step_serve,
                  "lora": step_lora}


# ---- the driver and the table --------------------------------------------------------------------------------

def _fmt(x, spec=".1f", unit=""):
    return "not measured" if x is None else f"{x:{spec}}{unit}"


def _get(results, *path):
    node = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def table(results: dict, size: dict) -> str:
    r = results
    env = r.get("env", {})
    rows = [("device", f"{_get(env, 'device', 'kind')} ({_get(env, 'nvidia_smi')})"),
            ("versions", ", ".join(f"{k} {v}" for k, v in (_get(env, "versions") or {}).items())),
            ("copy bandwidth (read + write)", _fmt((_get(env, "copy", "bytes_per_s") or 0) / 1e9 or None, ".4g",
                                                   " GB/s")),
            ("bf16 matmul", _fmt((_get(env, "matmul_bf16", "flops_per_s") or 0) / 1e12 or None, ".4g",
                                 " TFLOP/s"))]
    c = r.get("correctness", {})
    for key, label in (("parity_float32", "float32 logits vs transformers"),
                       ("parity_bfloat16", "bf16 logits vs transformers f32")):
        v = c.get(key, {})
        rows.append((label, v.get("error") or f"max abs {_fmt(v.get('max_abs'), '.2e')} (bound {v.get('bound')}), "
                     f"c0 argmax {_fmt(v.get('c0_argmax_agree'), '.0%')}: {'PASS' if v.get('pass') else 'FAIL'}"))
    g = c.get("greedy", {})
    rows.append(("greedy frames: device = CPU backend = transformers", g.get("error") or
                 f"{g.get('device_equals_cpu_backend')} / {g.get('device_equals_transformers')}: "
                 f"{'PASS' if g.get('pass') else 'FAIL'}"))
    q = c.get("int8", {})
    rows.append(("int8 vs float32 weights (c0 logits)", q.get("error") or
                 f"argmax {_fmt(q.get('c0_argmax_agree'), '.1%')}, max abs {_fmt(q.get('max_abs'), '.3f')}: "
                 f"{'PASS' if q.get('pass') else 'FAIL'}"))
    m = r.get("mimi", {})
    rows.append(("Mimi encode / decode (random weights)", m.get("error") or
                 f"{_fmt(m.get('encode_ms'))} / {_fmt(m.get('decode_ms'))} ms for {size['mimi_seconds']} s; "
                 f"{'PASS' if m.get('pass') else 'FAIL'}"))
    full = size["full"]
    for step, label in (("decode_bf16", "bf16"), ("decode_int8", "int8")):
        d = r.get(step, {})
        for batch in size["batches"]:
            b = d.get(f"batch_{batch}", {})
            detail = b.get("error") or (f"{_fmt(b.get('ms_per_frame'), '.2f')} ms/frame, "
                                        f"{_fmt(b.get('frames_per_s'), '.0f')} frames/s")
            if b.get("share_of_bandwidth_floor") is not None:
                detail += (f", {b['share_of_bandwidth_floor']:.0%} of the bandwidth floor "
                           f"({d.get('floor_ms_per_frame'):.2f} ms)")
            rows.append((f"{full} decode, {label} weights, batch {batch}", detail or "not measured"))
        t = d.get("time_to_first_audio", {})
        rows.append((f"{full} time to first audio, {label}", t.get("error") or
                     f"{_fmt(t.get('audio_ms'))} ms (codes {_fmt(t.get('codes_ms'))} + Mimi "
                     f"{_fmt(t.get('mimi_first_frame_ms'))})"))
    h = r.get("transformers", {})
    for batch in size["batches"][:2]:
        b = h.get(f"batch_{batch}", {})
        rows.append((f"transformers generate, bf16, batch {batch}", b.get("error") or
                     f"{_fmt(b.get('ms_per_frame'), '.2f')} ms/frame ({b.get('mode', h.get('mode'))}); csm-jax "
                     f"{_fmt(b.get('ours_speedup'), '.2f')}x faster"))
    t = r.get("train", {})
    rows.append((f"{full} train step, batch {size['train_batch']} x {size['train_frames']}", t.get("error") or
                 f"{_fmt(t.get('step_s'), '.3f')} s, {_fmt(t.get('frames_per_s'), '.0f')} frames/s, MFU "
                 f"{_fmt(t.get('mfu_vs_790'), '.1%')} of 790 TFLOP/s"
                 + ("" if t.get("peak_memory_gb") is None else f", peak {t['peak_memory_gb']:.1f} GB")))  # no CPU peak
    rows += serve_rows(r.get("serve", {}), size["serve"])
    lo = r.get("lora", {})
    for name, batch, frames, dtype in size["lora"]:
        v = lo.get(f"{name}_{dtype}", {})
        errors = "; ".join(v[k] for k in ("ours_ms_error", "transformers_peft_ms_error") if k in v)
        rows.append((f"{name} LoRA step r={LORA['rank']}, batch {batch} x {frames}, {dtype} compute",
                     f"ours {_fmt(v.get('ours_ms'), '.1f', ' ms')}, transformers + PEFT "
                     f"{_fmt(v.get('transformers_peft_ms'), '.1f', ' ms')}: ratio transformers/ours "
                     f"{_fmt(v.get('transformers_over_ours'), '.2f')}" + (f" ({errors})" if errors else "")))
    for name, _ in STEPS:
        status = r.get(name, {}).get("_status")
        if status and status != "ok":
            rows.append((f"step {name}", status))
    lines = ["| check | result |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def serve_rows(v: dict, s: dict) -> list[tuple[str, str]]:
    """The load test's rows: the halves, each level, and the goals (the most clients against one at a time)."""
    label = f"serving {s['config']}, {s['frames']} frames a request"

    def level(row):
        if not row:
            return "not measured"
        return (f"{_fmt(row.get('fps'), '.1f', ' frames/s')}, time to first audio p50 "
                f"{_fmt(_ms(row.get('ttfa_p50')), '.0f', ' ms')} / p95 {_fmt(_ms(row.get('ttfa_p95')), '.0f', ' ms')}, "
                f"latency p95 {_fmt(row.get('latency_p95'), '.2f', ' s')}")

    if v.get("error"):
        return [(label, v["error"])]
    h = v.get("halves", {})
    slots, most = s["slots"], s["clients"][-1]
    rows = [(f"{label}: the halves (Mimi on {v.get('mimi_device', '?')})", h.get("error") or
             f"decode batch alone {_fmt(h.get('batch1_fps'), '.0f')} / {_fmt(h.get(f'batch{slots}_fps'), '.0f')} "
             f"frames/s with 1 / {slots} busy slots; Mimi {_fmt(h.get('mimi1_ms_per_frame'), '.2f')} / "
             f"{_fmt(h.get(f'mimi{slots}_ms_per_frame'), '.2f')} ms per frame of 1 / {slots} streams"),
            (f"{label}, one at a time (1 slot, 1 client)", level(v.get("one_at_a_time", {})))]
    rows += [(f"{label}, {slots} slots, {n} client{'s' if n > 1 else ''}", level(v.get(f"clients_{n}", {})))
             for n in s["clients"]]
    top = v.get(f"clients_{most}", {})
    rows.append((f"serving goals, {most} clients against one at a time",
                 f"throughput {_fmt(top.get('fps_x'), '.2f', 'x')} (goal >= 6x), p95 time to first audio "
                 f"{_fmt(top.get('ttfa_p95_x'), '.2f', 'x')} (goal <= 2x)"))
    return rows


def _ms(seconds):
    return None if seconds is None else 1e3 * seconds


def run_all(out: Path, smoke: bool) -> int:
    import tempfile

    size = SIZES["smoke" if smoke else "gpu"]
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    log = (out / "gpu_check.log").open("w")
    results, start = {"smoke": smoke, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}, time.time()
    scale = BUDGET_SCALE["smoke" if smoke else "gpu"]
    for name, budget in STEPS:
        budget *= scale
        left = TOTAL_BUDGET * scale - (time.time() - start)
        if left < 15 * scale:
            results[name] = {"_status": "skipped: the run's time budget was spent"}
            continue
        budget = min(budget, left)
        t0 = time.time()
        cmd = [sys.executable, __file__, "--step", name, str(work)] + (["--smoke"] if smoke else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status = f"stopped at its {budget:.0f} s budget (results so far kept)"
            output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        log.write(f"==== {name}: {status} ({time.time() - t0:.1f} s)\n{output}\n")
        log.flush()
        results[name] = {**read_step(work, name), "_status": status, "_seconds": round(time.time() - t0, 1)}
        print(f"{name}: {status} in {time.time() - t0:.1f} s", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    results["total_seconds"] = round(time.time() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    text = table(results, size)
    (out / "gpu_check.md").write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str]) -> int:
    smoke = "--smoke" in argv
    args = [a for a in argv if a != "--smoke"]
    size = SIZES["smoke" if smoke else "gpu"]
    if args[:1] == ["--step"]:
        name, work = args[1], Path(args[2])
        STEP_FUNCTIONS[name](Recorder(work / f"{name}.json"), size, work)
        return 0
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    return run_all(Path(args[0]), smoke)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
