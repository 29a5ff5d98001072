"""Step correctness (tiny configs, on the card): float32 and bf16 logits against transformers on the same device,
greedy frames against JAX's CPU backend and transformers' greedy generate, int8 weights against float32 weights.
Each check builds what it needs inside its own guard, so a failure of the shared reference fails each check alone
and is recorded with each."""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.gpu_check.record import guard_attention, once, torch_device


def compare(got, want, bound: float, min_agree: float | None = None) -> dict:
    import numpy as np

    err = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    agree = float(np.mean(np.argmax(got[0], -1) == np.argmax(want[0], -1)))
    ok = err <= bound and (min_agree is None or agree >= min_agree)
    return {"max_abs": err, "bound": bound, "c0_argmax_agree": agree, "largest_logit": float(np.abs(want[0]).max()),
            "pass": bool(ok)}


def step(rec, size: dict, out: Path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from csm_jax.core.config import preset
    from csm_jax.io.checkpoint import load_model
    from tests.helpers import random_frames
    from tests.references import transformers_logits

    dev = torch_device()
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity: no reduced-precision passes on either side
    torch.backends.cudnn.allow_tf32 = False
    config = preset(size["tiny"])
    rng = np.random.default_rng(0)
    tokens, mask = random_frames(rng, config, 4, 10)
    codes = rng.integers(0, config.audio_vocab_size, (4, config.num_codebooks))

    @once
    def reference():
        """transformers' tiny CSM (logits of order 1), saved and converted: (model, converted checkpoint)."""
        from convert import convert_to_orbax
        from tests.references import transformers_model

        model = transformers_model(config, seed=1)
        tmp = Path(tempfile.mkdtemp())
        model.save_pretrained(tmp / "hf")
        return model, convert_to_orbax(tmp / "hf", tmp / "orbax")

    def ours(dtype):
        model = load_model(reference()[1], dtype=dtype)
        c0, hidden = model(tokens, mask)
        return np.asarray(c0, np.float32), np.asarray(model.depth_logits(hidden[:, -1], jnp.asarray(codes)),
                                                      np.float32)

    def parity_f32():
        want = transformers_logits(reference()[0].to(dev).float(), tokens, mask, codes)[:2]
        with jax.default_matmul_precision("highest"):
            return compare(ours(jnp.float32), want, 1e-4)

    def parity_bf16():
        """bf16 parameters and activations on both sides, against transformers in float32 on the same device (the
        CPU test's bound: 0.15 absolute, codebook-0 argmax equal at >= 90% of positions)."""
        hf = reference()[0]
        want = transformers_logits(hf.to(dev).float(), tokens, mask, codes)[:2]
        theirs = transformers_logits(hf.to(dev).to(torch.bfloat16), tokens, mask, codes)[:2]
        result = compare(ours(jnp.bfloat16), want, 0.15, 0.9)
        transformers_own = compare(theirs, want, 0.15, 0.9)  # for scale only: not a check of ours
        result["transformers_bf16_vs_f32"] = {k: v for k, v in transformers_own.items() if k != "pass"}
        return result

    rec.guard("parity_float32", parity_f32)
    guard_attention(rec, "parity_bfloat16", parity_bf16)
    rec.guard("greedy", greedy, dev)

    def int8():
        """Codebook-0 logits through the decode layout, int8 weights against the same float32 weights."""
        from csm_jax.inference.decode_model import decode_model

        model = load_model(reference()[1], dtype=jnp.float32)
        toks, msk = random_frames(rng, config, 8, 16)
        with jax.default_matmul_precision("highest"):
            want = np.asarray(decode_model(model, cpu_kernels=False)(toks, msk)[0])
            got = np.asarray(decode_model(model, cpu_kernels=False, weights_dtype="int8")(toks, msk)[0])
        agree = float(np.mean(np.argmax(got, -1) == np.argmax(want, -1)))
        err = float(np.abs(got - want).max())
        return {"c0_argmax_agree": agree, "max_abs": err, "largest_logit": float(np.abs(want).max()),
                "pass": agree >= 0.9 and err <= 0.15}

    rec.guard("int8", int8)


def greedy(dev: str) -> dict:
    """Greedy frames on the device, on JAX's CPU backend, and transformers' greedy generate (the tiny config of
    tests/test_generation.py)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from csm_jax.core.config import preset
    from csm_jax.inference.loop import FrameGenerator
    from csm_jax.inference.sampling import GREEDY, FrameSampling
    from tests.helpers import random_prompt
    from tests.references import csm_from_transformers, transformers_model

    cfg = preset("tiny")
    hf = transformers_model(cfg, seed=0)
    model = csm_from_transformers(hf, cfg)
    prompts = [random_prompt(cfg, 0), random_prompt(cfg, 1, context_text=3, context_audio=2)]
    sampling = FrameSampling.same(GREEDY)
    with jax.default_matmul_precision("highest"):
        on_device = FrameGenerator(model).generate(prompts, 24, sampling)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        graphdef, state = nnx.split(model)
        model_cpu = nnx.merge(graphdef, jax.device_put(state, cpu))
        on_cpu = FrameGenerator(model_cpu, cpu_kernels=False).generate(prompts, 24, sampling)
    embeds = np.asarray(model.embed_frames(jnp.asarray(prompts[0].tokens[None]), jnp.asarray(prompts[0].mask[None])))
    hf = hf.to(dev)
    with torch.no_grad():
        theirs = hf.generate(inputs_embeds=torch.tensor(embeds, device=dev),
                             attention_mask=torch.ones(1, len(prompts[0]), device=dev), max_new_tokens=24,
                             do_sample=False, depth_decoder_do_sample=False)[0].cpu().numpy().T
    same_cpu = all(a.shape == b.shape and (a == b).all() for a, b in zip(on_device, on_cpu))
    same_hf = on_device[0].shape == theirs.shape and bool((on_device[0] == theirs).all())
    return {"device_equals_cpu_backend": bool(same_cpu), "device_equals_transformers": same_hf,
            "frames": [c.shape[1] for c in on_device], "pass": bool(same_cpu and same_hf)}
