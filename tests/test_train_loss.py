"""Our training loss against transformers' CSM training loss (labels with -101 marking backbone-only frames)."""

import jax.numpy as jnp
import numpy as np
import torch

from csm_jax.core.config import CsmConfig, preset
from train.loss import choose_depth_frames, csm_loss, target_frames
from tests.hf_reference import csm_from_transformers, transformers_csm


def utterance_batch(rng, config: CsmConfig, batch: int, text_len: int, audio_len: int):
    """Each row: text frames, then audio frames ending with the all-zero end frame (as training data is built)."""
    n = config.num_codebooks
    s = text_len + audio_len
    tokens = np.zeros((batch, s, n + 1), np.int64)
    mask = np.zeros((batch, s, n + 1), bool)
    tokens[:, :text_len, n] = rng.integers(0, config.text_vocab_size, (batch, text_len))
    mask[:, :text_len, n] = True
    tokens[:, text_len:-1, :n] = rng.integers(0, config.audio_vocab_size, (batch, audio_len - 1, n))
    mask[:, text_len:, :n] = True
    return tokens, mask


def test_loss_matches_transformers_training_loss(rng):
    config = preset("tiny")
    hf = transformers_csm(config, seed=3)
    model = csm_from_transformers(hf, config)
    n = config.num_codebooks
    tokens, mask = utterance_batch(rng, config, batch=2, text_len=5, audio_len=9)
    seg = np.ones(tokens.shape[:2], np.int32)
    targets = np.asarray(target_frames(jnp.asarray(mask), jnp.asarray(seg)))
    depth_mask = targets & (rng.random(targets.shape) < 0.4)
    depth_mask[0, 7] = depth_mask[1, -1] = True  # at least one frame each row, the end frame included

    # transformers: labels (B, S, n): codes on audio frames, -100 elsewhere, -101 on backbone-only frames.
    t = torch.tensor(tokens)
    is_audio = torch.tensor(mask[..., 0])
    embeds = torch.where(is_audio[..., None], hf.backbone_model.embed_tokens(t[..., :n]), hf.embed_text_tokens(t[..., n]))
    labels = torch.where(is_audio[..., None], t[..., :n], torch.full_like(t[..., :n], -100))
    backbone_only = torch.tensor(targets & ~depth_mask)
    labels[..., 1:][backbone_only] = -100  # what transformers makes of a -101 frame
    with torch.no_grad():
        out = hf(inputs_embeds=embeds, labels=labels)

    indices, weights = jnp.asarray(np.flatnonzero(depth_mask)), jnp.ones(int(depth_mask.sum()))
    loss, metrics = csm_loss(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), jnp.asarray(seg), indices,
                             weights)
    np.testing.assert_allclose(metrics["c0_loss"], out.backbone_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(metrics["depth_loss"], out.depth_decoder_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(loss, out.loss.item(), rtol=1e-5)


def test_depth_frames_are_distinct_targets_and_cover_shortfalls(rng):
    import jax
    targets = jnp.asarray(rng.random((3, 10)) < 0.5)
    count = int(targets.sum())
    indices, weights = choose_depth_frames(jax.random.key(0), targets, count)
    assert sorted(np.asarray(indices).tolist()) == np.flatnonzero(np.asarray(targets)).tolist()
    assert float(weights.sum()) == count
    indices, weights = choose_depth_frames(jax.random.key(0), targets, count + 4)  # more draws than targets
    assert float(weights.sum()) == count and len(set(np.asarray(indices).tolist())) == count + 4
    picks = {tuple(sorted(np.asarray(choose_depth_frames(jax.random.key(i), targets, 2)[0]).tolist()))
             for i in range(10)}
    assert len(picks) > 1 and all(bool(targets.reshape(-1)[jnp.asarray(p)].all()) for p in picks)


def test_targets_skip_text_padding_and_segment_starts():
    mask = np.zeros((1, 7, 33), bool)
    mask[0, [1, 2, 3, 4, 5], :32] = True  # frame 0 text, 1-5 audio, 6 padding
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(target_frames(jnp.asarray(mask), seg), [[0, 1, 1, 0, 1, 1, 0]])


def test_trainer_eval_loss_is_the_mean_c0_loss_of_its_micro_batches(rng):
    import jax
    from flax import nnx

    from csm_jax.core.sharding import make_mesh
    from train.trainer import OptimConfig, Trainer

    config = preset("tiny")
    trainer = Trainer(config, OptimConfig(), make_mesh(1, 1, 1, devices=jax.devices()[:1]), compute_dtype=jnp.float32)
    state = trainer.init_state(0)
    micro = [utterance_batch(rng, config, batch=2, text_len=4, audio_len=8) for _ in range(2)]
    batch = {"tokens": np.stack([t for t, _ in micro]).astype(np.int32), "mask": np.stack([m for _, m in micro]),
             "segment_ids": np.ones((2, 2, 12), np.int32)}
    metrics = trainer.eval_loss(state, batch)
    model = nnx.merge(trainer.graphdef, state.params)
    expected = []
    for tokens, mask in micro:
        _, m = csm_loss(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), jnp.ones((2, 12), jnp.int32),
                        jnp.zeros(1, jnp.int32), jnp.zeros(1))
        expected.append(float(m["c0_loss"]))
    np.testing.assert_allclose(metrics["c0_loss"], np.mean(expected), rtol=1e-5)
    assert trainer.eval_loss(state, batch)["c0_loss"] == metrics["c0_loss"]
