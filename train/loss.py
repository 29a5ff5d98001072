"""The CSM training loss: codebook-0 cross-entropy on every audio frame, plus the depth decoder's cross-entropy on
codebooks 1..n-1 for a random subset of the audio frames ("compute amortization").

The backbone hidden state at position t-1 predicts frame t, so a frame is a target only when it is an audio
frame, position t-1 belongs to the same sample (segment), and the sample's `loss_mask` marks it: a sample with
conversation context conditions on the earlier turns but, by default, learns only the target turn's audio. To
keep shapes fixed under `jit`, the depth decoder runs on exactly `depth_frames` frames per batch, drawn uniformly
without replacement from the targets; draws that land on no target (a batch with fewer targets than that) get
weight zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from csm_jax.core.model import Csm


def target_frames(mask: jax.Array, segment_ids: jax.Array, loss_mask: jax.Array | None = None) -> jax.Array:
    """(B, S) bool: frame t is an audio frame predictable from position t-1 (same, non-padding segment) and, with
    `loss_mask` (B, S), one whose prediction counts."""
    is_audio = mask[..., 0] if loss_mask is None else mask[..., 0] & loss_mask.astype(bool)
    same_segment = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return jnp.pad(is_audio[:, 1:] & same_segment, ((0, 0), (1, 0)))


def depth_frame_count(batch: int, length: int, fraction: float) -> int:
    """How many frames of a (batch, length) batch the depth decoder trains on: ceil(fraction * frame slots)."""
    return max(1, math.ceil(fraction * batch * length))


def choose_depth_frames(key: jax.Array, targets: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """`count` distinct flat frame indices into (B*S), uniformly among `targets`; returns (indices, weights)."""
    flat = targets.reshape(-1)
    scores = jnp.where(flat, jax.random.uniform(key, flat.shape), -1.0)
    _, indices = jax.lax.top_k(scores, count)
    return indices, flat[indices].astype(jnp.float32)


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def csm_loss(model: Csm, tokens: jax.Array, mask: jax.Array, segment_ids: jax.Array, depth_indices: jax.Array,
             depth_weights: jax.Array, depth_weight: float = 1.0, loss_mask: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """tokens (B, S, n+1), mask (B, S, n+1), segment_ids (B, S), optional loss_mask (B, S); depth_indices/weights
    (K,) from `choose_depth_frames` over the same targets. Returns (c0_loss + depth_weight * depth_loss, metrics)."""
    n = model.config.num_codebooks
    logits, hidden = model(tokens, mask, segment_ids)
    targets = target_frames(mask, segment_ids, loss_mask)
    c0_ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:, 0])
    c0_loss = masked_mean(c0_ce, targets[:, 1:].astype(jnp.float32))

    b, s = targets.shape
    rows, cols = depth_indices // s, depth_indices % s
    codes = tokens[rows, cols, :n]  # (K, n)
    depth = model.depth_logits(hidden[rows, cols - 1], codes)  # (K, n-1, V)
    depth_ce = optax.softmax_cross_entropy_with_integer_labels(depth, codes[:, 1:]).mean(axis=-1)
    depth_loss = masked_mean(depth_ce, depth_weights)
    total = c0_loss + depth_weight * depth_loss
    return total, {"loss": total, "c0_loss": c0_loss, "depth_loss": depth_loss,
                   "audio_frames": targets.sum(), "depth_frames": depth_weights.sum()}
