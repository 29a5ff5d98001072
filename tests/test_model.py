"""Behaviour of the NNX model itself: caches, packing, padding, dtypes, checkpoints (parity with the references
lives in tests/test_model_parity.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from csm_jax.io.checkpoint import CheckpointError, load_model, read_metadata, save_model
from csm_jax.core.config import CsmConfig, preset
from csm_jax.core.layers import KVCache
from csm_jax.core.model import Csm, segment_positions
from tests.helpers import assert_close_to_scale, random_frames

# float32 logits of one model by two paths (cache or not, packed or not), summed in other orders: max |diff| /
# max |logit| measured at most 7.3e-7 (AMD EPYC, AVX2); the bound is 1e-5.
LOGITS_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model():
    return Csm(preset("tiny"), rngs=nnx.Rngs(0))


def test_config_presets_count_parameters():
    assert preset("csm_1b").num_params == 1_552_791_552  # the published figure
    for config in (preset("tiny"), preset("tiny_odd")):
        model = Csm(config, rngs=nnx.Rngs(0))
        assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == config.num_params


def test_config_json_families_round_trip(tmp_path):
    import json
    for cfg in (preset("tiny"), preset("tiny_odd"), preset("csm_1b")):
        assert CsmConfig.from_transformers(cfg.to_transformers()) == cfg
        assert CsmConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert CsmConfig.from_original(preset("csm_1b").to_original()) == preset("csm_1b")
    assert preset("csm_1b").to_original()["backbone_flavor"] == "llama-1B"
    tiny = preset("tiny")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny.to_original()))
    assert CsmConfig.from_json_file(path) == tiny


def test_config_errors_say_what_is_wrong(tmp_path):
    from csm_jax.core.config import ConfigError
    with pytest.raises(ConfigError, match="head_dim == dim // num_heads"):
        preset("tiny_odd").to_original()
    with pytest.raises(ConfigError, match="unknown flavor 'llama-7B'"):
        CsmConfig.from_original({"backbone_flavor": "llama-7B", "decoder_flavor": "llama-100M"})
    (tmp_path / "c.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="neither a transformers CSM config"):
        CsmConfig.from_json_file(tmp_path / "c.json")


def test_segment_positions_restart_per_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_incremental_decoding_matches_full_forward(model, rng):
    """Prefill part of a sequence into the KV cache, then feed the rest one frame at a time."""
    cfg = model.config
    tokens, mask = random_frames(rng, cfg, 2, 12)
    full_logits, full_hidden = model(tokens, mask)
    cache = KVCache.empty(cfg.backbone, 2, 16, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    seg = jnp.ones((2, 12), jnp.int32)
    logits, _, cache = model.backbone_forward(tokens[:, :7], mask[:, :7], pos[:, :7], seg[:, :7], cache, 0)
    steps = [logits]
    for t in range(7, 12):
        logits, _, cache = model.backbone_forward(tokens[:, t:t + 1], mask[:, t:t + 1], pos[:, t:t + 1],
                                                  seg[:, t:t + 1], cache, t)
        steps.append(logits)
    assert_close_to_scale(jnp.concatenate(steps, 1), full_logits, LOGITS_TOLERANCE)


def test_depth_decoder_step_by_step_matches_teacher_forced(model, rng):
    cfg = model.config
    n = cfg.num_codebooks
    hidden = jnp.asarray(rng.normal(size=(3, cfg.backbone.dim)), jnp.float32)
    codes = jnp.asarray(rng.integers(0, cfg.audio_vocab_size, (3, n)), jnp.int32)
    teacher = model.depth_logits(hidden, codes)
    cache = KVCache.empty(cfg.decoder, 3, n, jnp.float32)
    inputs = jnp.stack([hidden, model.embed_audio(codes[:, 0], 0)], 1)
    h, cache = model.decoder_forward(inputs, jnp.broadcast_to(jnp.arange(2), (3, 2)), cache, 0)
    stepped = [model.audio_logits(h[:, -1], 1)]
    for i in range(2, n):
        x = model.embed_audio(codes[:, i - 1:i], i - 1)
        h, cache = model.decoder_forward(x, jnp.full((3, 1), i), cache, i)
        stepped.append(model.audio_logits(h[:, -1], i))
    assert_close_to_scale(jnp.stack(stepped, 1), teacher, LOGITS_TOLERANCE)


def test_packed_segments_do_not_see_each_other(model, rng):
    cfg = model.config
    a_tok, a_mask = random_frames(rng, cfg, 1, 5)
    b_tok, b_mask = random_frames(rng, cfg, 1, 7)
    packed_tok = jnp.concatenate([a_tok, b_tok, jnp.zeros_like(a_tok[:, :2])], 1)
    packed_mask = jnp.concatenate([a_mask, b_mask, jnp.zeros_like(a_mask[:, :2])], 1)
    seg = jnp.array([[1] * 5 + [2] * 7 + [0] * 2])
    packed, _ = model(packed_tok, packed_mask, seg)
    assert np.isfinite(np.asarray(packed)).all()
    assert_close_to_scale(packed[:, :5], model(a_tok, a_mask)[0], LOGITS_TOLERANCE)
    assert_close_to_scale(packed[:, 5:12], model(b_tok, b_mask)[0], LOGITS_TOLERANCE)


def test_left_padding_leaves_rows_unchanged(model, rng):
    """A row left-padded in a batch (segment 0 on the pads) gives the logits it gives alone."""
    cfg = model.config
    tok, mask = random_frames(rng, cfg, 1, 6)
    padded_tok = jnp.concatenate([jnp.zeros_like(tok[:, :3]), tok], 1)
    padded_mask = jnp.concatenate([jnp.zeros_like(mask[:, :3]), mask], 1)
    seg = jnp.array([[0, 0, 0] + [1] * 6])
    pos = jnp.array([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    logits, _, _ = model.backbone_forward(padded_tok, padded_mask, pos, seg)
    assert_close_to_scale(logits[:, 3:], model(tok, mask)[0], LOGITS_TOLERANCE)


def test_bfloat16_compute_keeps_float32_logits(rng):
    ref = Csm(preset("tiny"), rngs=nnx.Rngs(0))
    model = Csm(preset("tiny"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(ref, nnx.Param)))
    tokens, mask = random_frames(rng, model.config, 2, 8)
    logits, hidden = model(tokens, mask)
    assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ref_logits = ref(tokens, mask)[0]
    scale = float(jnp.abs(ref_logits).max())
    assert float(jnp.abs(logits - ref_logits).max()) < 0.05 * scale  # bf16 has 8 mantissa bits


def test_checkpoint_round_trip_is_exact(model, tmp_path, rng):
    save_model(model, tmp_path / "ckpt", {"source": "random"})
    assert read_metadata(tmp_path / "ckpt")["source"] == "random"
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    tokens, mask = random_frames(rng, model.config, 1, 4)
    np.testing.assert_array_equal(loaded(tokens, mask)[0], model(tokens, mask)[0])
    as_bf16 = load_model(tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(as_bf16, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}


def test_interrupted_save_leaves_nothing(model, tmp_path, monkeypatch):
    import csm_jax.io.checkpoint as ckpt

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "write_config_and_metadata", fail)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="python -m convert"):
        load_model(tmp_path / "ckpt")
