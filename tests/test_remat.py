"""Activation rematerialisation changes memory, not results: the training loss and its gradients are the same under
every remat policy, and an unknown policy name fails when the trainer is built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csm_jax.core.config import preset
from csm_jax.core.sharding import make_mesh
from tests.helpers import assert_close_to_scale, utterance_batch
from train.trainer import OptimConfig, Trainer


def loss_and_grads(remat: str, batch: dict, params: dict):
    trainer = Trainer(preset("tiny"), OptimConfig(), make_mesh(-1, 1, 1), compute_dtype=jnp.float32, remat=remat)
    micro = {k: v[0] for k, v in batch.items()}
    loss, grads = jax.jit(jax.value_and_grad(lambda p: trainer._loss(p, micro, jax.random.key(0))[0]))(params)
    return float(loss), grads


def test_remat_policies_give_the_same_loss_and_gradients():
    config = preset("tiny")
    tokens, mask = utterance_batch(np.random.default_rng(0), config, 2, 4, 12)
    batch = {"tokens": jnp.asarray(tokens[None], jnp.int32), "mask": jnp.asarray(mask[None]),
             "segment_ids": jnp.ones((1, 2, 16), jnp.int32)}
    params = Trainer(config, OptimConfig(), make_mesh(-1, 1, 1), compute_dtype=jnp.float32).random_params(0)
    loss, grads = loss_and_grads("none", batch, params)
    for remat in ("full", "dots"):
        other_loss, other_grads = loss_and_grads(remat, batch, params)
        assert other_loss == pytest.approx(loss, rel=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads)):
            assert_close_to_scale(b, a, 1e-5)  # float32 gradients, other order: measured <= 7.3e-7 of the largest


def test_unknown_remat_policy_names_the_choices():
    with pytest.raises(ValueError, match="choose one of none, full, dots"):
        Trainer(preset("tiny"), OptimConfig(), make_mesh(-1, 1, 1), remat="some")
