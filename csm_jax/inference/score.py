"""Teacher-forced scoring: the log-probability of given Mimi codes under the model, and best-of-N by that score.

Frame j of the codes sits at position P + j after a prompt of P frames. Codebook 0's log-probs come from the
backbone's logits at position P + j - 1; codebooks 1..n-1 from the depth decoder fed that position's hidden state
and the frame's own lower codebooks (as `Csm.depth_logits`, as in training). Log-probs are over the model's whole
audio vocabulary (as transformers' loss), so scores compare with training losses.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csm_jax.core.errors import UserError
from csm_jax.inference.prompt import PROMPT_BUCKET
from csm_jax.inference.sampler_protocol import SamplerError
from csm_jax.io.frames import Frames


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, params, tokens, mask, segment_ids, starts, codes):
    """tokens/mask (B, S, n+1), segment_ids (B, S), starts (B,) = P_r, codes (B, F, n) -> log-probs (B, F, n) f32."""
    model = nnx.merge(graphdef, params)
    b, f, n = codes.shape
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32)
    hidden, _ = model.backbone(model.embed_frames(tokens, mask), positions, segment_ids)
    # the hidden state before frame j predicts it (clamped for padded frames past a row's end, masked later)
    before = jnp.clip(starts[:, None] + jnp.arange(f)[None] - 1, 0, tokens.shape[1] - 1)
    h = jnp.take_along_axis(hidden, before[..., None], axis=1)  # (B, F, D)
    c0 = model.codebook0_logits(h)  # (B, F, V)
    depth = _depth_logits(model, h.reshape(b * f, -1), codes.reshape(b * f, n)).reshape(b, f, n - 1, -1)
    logits = jnp.concatenate([c0[:, :, None], depth], axis=2)  # (B, F, n, V)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, codes[..., None], axis=-1)[..., 0]


def _depth_logits(model, hidden, codes):
    """`Csm.depth_logits` through `decoder_forward` and `audio_logits`, which the decode layout has too:
    hidden (B, D), codes (B, n) -> logits (B, n-1, V) float32 for codebooks 1..n-1."""
    n = codes.shape[1]
    inputs = jnp.concatenate([hidden[:, None].astype(model.dtype),
                              model.embed_audio(codes[:, : n - 1], jnp.arange(n - 1))], axis=1)
    h, _ = model.decoder_forward(inputs, jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), codes.shape))
    return jnp.stack([model.audio_logits(h[:, i], i) for i in range(1, n)], axis=1)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def score_codes(model, prompts: Sequence[Frames], codes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Log-probabilities (F_r, n) float32 of codes (n, F_r) after each prompt, all rows in one jitted call.

    `model` is a `Csm` (or `DecodeCsm`). Rows are right-padded to a length rounded up to 64 frames, so few shapes
    compile. The prompt plus the codes must fit the backbone's sequence length.
    """
    n = model.config.num_codebooks
    if len(prompts) != len(codes):
        raise UserError(f"got {len(prompts)} prompts but {len(codes)} code arrays; give one (prompt, codes) pair each")
    codes = [np.asarray(c, np.int32) for c in codes]
    for i, (p, c) in enumerate(zip(prompts, codes)):
        if c.ndim != 2 or c.shape[0] != n:
            raise UserError(f"codes {i} have shape {c.shape}; give Mimi codes of shape ({n}, frames)")
        if c.size and (c.min() < 0 or c.max() >= model.config.audio_vocab_size):
            raise UserError(f"codes {i} hold ids outside [0, {model.config.audio_vocab_size}); give Mimi codes")
        if len(p) + c.shape[1] > model.config.backbone.max_seq_len:
            raise UserError(f"pair {i}: the prompt ({len(p)} frames) and the codes ({c.shape[1]} frames) exceed the "
                            f"model's {model.config.backbone.max_seq_len} frames; score shorter audio or context")
    length = min(_round_up(max(len(p) + c.shape[1] for p, c in zip(prompts, codes)), PROMPT_BUCKET),
                 model.config.backbone.max_seq_len)
    longest = _round_up(max(max(c.shape[1] for c in codes), 1), PROMPT_BUCKET)
    b = len(prompts)
    tokens = np.zeros((b, length, n + 1), np.int32)
    mask = np.zeros(tokens.shape, bool)
    segment_ids = np.zeros((b, length), np.int32)
    padded = np.zeros((b, longest, n), np.int32)
    for r, (p, c) in enumerate(zip(prompts, codes)):
        end = len(p) + c.shape[1]
        tokens[r, :len(p)], mask[r, :len(p)] = p.tokens, p.mask
        tokens[r, len(p):end, :n], mask[r, len(p):end, :n] = c.T, True
        segment_ids[r, :end] = 1
        padded[r, :c.shape[1]] = c.T
    graphdef, params = nnx.split(model)
    logp = np.asarray(_score(graphdef, params, tokens, mask, segment_ids,
                             np.asarray([len(p) for p in prompts], np.int32), padded))
    return [logp[r, :c.shape[1]] for r, c in enumerate(codes)]


def best_of_n(generator, request, n: int, max_audio_length_ms: float = 90_000, *, seed: int = 0,
              return_sampler_state: bool = False,
              **generate_kwargs) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, Any]:
    """Generates `n` candidates of one request in one batch (seeds seed..seed+n-1) and returns the codes of the
    one with the highest mean log-probability per frame and codebook, with every candidate's mean (n,).

    With `return_sampler_state`, (codes, means, the chosen candidate's final sampler state): its row of every
    leaf, kept as a batch of one, which is what `generate` returns for that candidate's seed and initial row. So
    the sampler state must be per candidate: every leaf with a leading axis of n.
    """
    if n < 1:
        raise UserError(f"best-of-N needs n >= 1 candidates, got {n}")
    if return_sampler_state:
        _check_rows(generate_kwargs.get("sampler_state"), n)
    candidates, state = generator.generate_codes([request] * n, max_audio_length_ms, seeds=range(seed, seed + n),
                                                 return_sampler_state=True, **generate_kwargs)
    scores = generator.score([request] * n, candidates)
    means = np.array([s.mean() if s.size else -np.inf for s in scores], np.float32)
    best = int(np.argmax(means))
    if not return_sampler_state:
        return candidates[best], means
    return candidates[best], means, jax.tree.map(lambda leaf: leaf[best:best + 1], state)


def _check_rows(state, n: int) -> None:
    """Refuses a sampler state best-of-N cannot split into candidates: a leaf without a leading axis of n."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        shape = tuple(jnp.shape(leaf))
        if shape[:1] != (n,):
            where = jax.tree_util.keystr(path) or "the state"
            raise SamplerError(f"best_of_n returns the chosen candidate's sampler state, so every leaf needs one row "
                               f"per candidate, a leading axis of {n}; {where} has shape {shape}. Give per-candidate "
                               f"state, or call without return_sampler_state")
