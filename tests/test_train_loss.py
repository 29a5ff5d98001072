"""Our training loss against transformers' CSM training loss (labels with -101 marking backbone-only frames)."""

import jax.numpy as jnp
import numpy as np
import torch

from csm_jax.core.config import preset
from tests.helpers import utterance_batch
from tests.references import csm_from_transformers, transformers_loss, transformers_model
from train.loss import choose_depth_frames, csm_loss, target_frames


def test_loss_matches_transformers_training_loss(rng):
    config = preset("tiny")
    hf = transformers_model(config, seed=3)
    model = csm_from_transformers(hf, config)
    tokens, mask = utterance_batch(rng, config, batch=2, text_len=5, audio_len=9)
    seg = np.ones(tokens.shape[:2], np.int32)
    targets = np.asarray(target_frames(jnp.asarray(mask), jnp.asarray(seg)))
    depth_mask = targets & (rng.random(targets.shape) < 0.4)
    depth_mask[0, 7] = depth_mask[1, -1] = True  # at least one frame each row, the end frame included

    with torch.no_grad():  # frames outside depth_mask are backbone-only (-101 in transformers' labels)
        out = transformers_loss(hf, tokens, mask, depth_mask)

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
