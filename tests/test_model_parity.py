"""Parity with implementations nobody here wrote: transformers' CSM and the original Sesame model built from
torchtune, each saved to disk, converted with `convert`, loaded with `load_model`; plus per-component checks.

Tolerances: float32 logits of order 1 (max |logit| is asserted > 1) must agree to 1e-4 absolute; measured
differences are about 2e-6. bfloat16: see `test_bfloat16_load_stays_close_to_float32_reference`.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import convert_to_orbax
from csm_jax.io.checkpoint import load_model
from csm_jax.core.config import preset
from csm_jax.core.layers import RMSNorm, rope_frequencies
from tests.helpers import assert_close_to_scale, logits_inputs, our_logits
from tests.references import (original_model, save_original, transformers_config, transformers_logits,
                              transformers_model)

# float32 logits against the references (other kernels, other summation order): max |diff| / max |logit| measured
# at most 6.7e-7 (AMD EPYC, AVX2); the bound is 2e-5.
FLOAT32_TOLERANCE = 2e-5


def assert_logits_close(ours, reference, tolerance):
    for got, want in zip(ours, reference):
        assert np.abs(want).max() > 1, "reference logits should be of order 1 for the tolerance to mean anything"
        assert_close_to_scale(got, want, tolerance)


@pytest.fixture(scope="module", params=["tiny", "tiny_odd"])
def transformers_checkpoint(request, tmp_path_factory):
    """(reference model, converted csm-jax checkpoint directory, config) for a random transformers CSM."""
    config = preset(request.param)
    reference = transformers_model(config, seed=1)
    src = tmp_path_factory.mktemp(f"hf_{request.param}")
    reference.save_pretrained(src)
    return reference, convert_to_orbax(src, src.parent / f"{src.name}_orbax"), config


def test_reference_builder_ties_the_codebook_embeddings_where_transformers_does_not(monkeypatch, tmp_path, rng):
    """transformers before 5.21 builds CSM with the depth decoder's codebook embeddings apart from the backbone's
    (its CsmConfig forces tie_word_embeddings=False); the reference builder ties them on every version, as the
    published checkpoint has them and the converter expects. Emulated by switching transformers' own tying off."""
    from transformers import CsmForConditionalGeneration

    monkeypatch.setattr(CsmForConditionalGeneration, "tie_weights", lambda self, *args, **kwargs: None)
    config = preset("tiny")
    reference = transformers_model(config, seed=4)
    assert (reference.depth_decoder.model.embed_tokens.weight
            is reference.backbone_model.embed_tokens.embed_audio_tokens.weight)
    reference.save_pretrained(tmp_path / "hf")
    tokens, mask, codes = logits_inputs(rng, config)
    assert_logits_close(our_logits(load_model(convert_to_orbax(tmp_path / "hf", tmp_path / "orbax")), tokens, mask,
                                   codes), transformers_logits(reference, tokens, mask, codes)[:2], FLOAT32_TOLERANCE)


def test_transformers_checkpoint_matches_transformers_logits(transformers_checkpoint, rng):
    reference, converted, config = transformers_checkpoint
    tokens, mask, codes = logits_inputs(rng, config)
    want = transformers_logits(reference, tokens, mask, codes)[:2]
    assert_logits_close(our_logits(load_model(converted), tokens, mask, codes), want, FLOAT32_TOLERANCE)


def test_bfloat16_load_stays_close_to_float32_reference(transformers_checkpoint, rng):
    """bfloat16 parameters and activations (8 significant bits) against the float32 reference. Measured over
    2 configs x 4 seeds (logits up to about 4.4): max |diff| 0.036-0.089, argmax of codebook 0 equal at 95-100%
    of positions (1.9% of the largest logit at most, remeasured). Bound: 5% of the largest logit, argmax equal at
    >= 90%."""
    reference, converted, config = transformers_checkpoint
    tokens, mask, codes = logits_inputs(rng, config, batch=4)
    want = transformers_logits(reference, tokens, mask, codes)[:2]
    got = our_logits(load_model(converted, dtype=jnp.bfloat16), tokens, mask, codes)
    assert_logits_close(got, want, 0.05)
    agree = np.mean(np.argmax(got[0], -1) == np.argmax(want[0], -1))
    assert agree >= 0.9, f"bfloat16 changed the argmax code at {1 - agree:.0%} of positions"


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_original_checkpoint_matches_torchtune_reference(fmt, tmp_path, rng):
    config = preset("tiny")
    reference = original_model(config, seed=2)
    src = save_original(reference, tmp_path / "src", fmt)
    converted = convert_to_orbax(src, tmp_path / "orbax")
    tokens, mask, codes = logits_inputs(rng, config)
    want = reference.logits(tokens, mask, codes)[:2]
    assert_logits_close(our_logits(load_model(converted), tokens, mask, codes), want, FLOAT32_TOLERANCE)


# ---- components ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stack", ["backbone", "decoder"])
def test_rope_frequencies_match_transformers_and_torchtune(stack):
    """CSM-1B's real RoPE settings: transformers' llama3 init (with its re-expressed factors) and torchtune's
    Llama3ScaledRoPE (the original's) give the same float32 inverse frequencies as ours."""
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = getattr(preset("csm_1b"), stack)
    ours = rope_frequencies(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
    hf_config = transformers_config(preset("csm_1b"))
    hf_config = hf_config if stack == "backbone" else hf_config.depth_decoder_config
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6, atol=0)
    tt = Llama3ScaledRoPE(cfg.head_dim, cfg.max_seq_len, base=cfg.rope_base, scale_factor=32)
    np.testing.assert_allclose(ours, tt.theta.numpy(), rtol=1e-6, atol=0)


def test_rmsnorm_matches_transformers(rng):
    from flax import nnx
    from transformers.models.csm.modeling_csm import CsmRMSNorm

    x = rng.normal(size=(2, 5, 48)).astype(np.float32) * 3
    scale = (1 + 0.2 * rng.normal(size=48)).astype(np.float32)
    ref = CsmRMSNorm(48, eps=1e-6)
    ref.weight.data = torch.from_numpy(scale)
    ours = RMSNorm(48, 1e-6, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ours.scale[...] = jnp.asarray(scale)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    assert_close_to_scale(ours(jnp.asarray(x)), want, 1e-6)  # a sum over 48: measured 1.5e-7 of the largest


@pytest.mark.parametrize("name", ["tiny", "tiny_odd"])
def test_attention_with_gqa_matches_transformers(name, rng):
    """One attention layer of the backbone (tiny: 4 query heads on 2 kv heads, Llama-3 scaled RoPE; tiny_odd:
    head_dim 24 != dim/heads) against transformers' CsmAttention, weights mapped by the converter's table."""
    from flax import nnx
    from transformers.models.csm.modeling_csm import CsmAttention, CsmRotaryEmbedding

    from convert.layouts import TRANSFORMERS, TRANSFORMS
    from csm_jax.core.layers import Attention, AttentionInputs, attention_mask

    cfg = preset(name).backbone
    hf_config = transformers_config(preset(name), attn_implementation="eager")
    reference = CsmAttention(hf_config, layer_idx=0).eval()
    ours = Attention(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    for name, module in [("q_proj", reference.q_proj), ("k_proj", reference.k_proj), ("v_proj", reference.v_proj),
                         ("o_proj", reference.o_proj)]:
        weight = rng.normal(size=module.weight.shape).astype(np.float32) / module.weight.shape[1] ** 0.5
        module.weight.data = torch.from_numpy(weight)
        rule, _ = TRANSFORMERS.match(f"backbone_model.layers.0.self_attn.{name}.weight")
        getattr(ours, rule.target[-1])[...] = jnp.asarray(TRANSFORMS[rule.transform].to_nnx(weight, cfg))

    b, t = 2, 9
    x = rng.normal(size=(b, t, cfg.dim)).astype(np.float32)
    positions = np.broadcast_to(np.arange(t) + 100, (b, t))  # far enough out for the scaled frequencies to matter
    with torch.no_grad():
        cos_sin = CsmRotaryEmbedding(hf_config)(torch.from_numpy(x), torch.from_numpy(positions.copy()))
        causal = torch.full((t, t), torch.finfo(torch.float32).min).triu(1).expand(b, 1, t, t)
        want = reference(torch.from_numpy(x), position_embeddings=cos_sin, attention_mask=causal)[0].numpy()
    segments = jnp.ones((b, t), jnp.int32)
    got, _ = ours(jnp.asarray(x), AttentionInputs(jnp.asarray(positions), attention_mask(segments, segments, 0)))
    assert_close_to_scale(got, want, FLOAT32_TOLERANCE)  # measured 1.8e-7
