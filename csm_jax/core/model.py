"""The CSM model: frame embeddings, the backbone, the depth decoder and their heads.

A frame is 33 tokens (columns 0..31: Mimi codebooks, column 32: a text token) with a 33-wide mask; the backbone
input at a position is the sum of the unmasked columns' embeddings. The backbone's final-norm hidden state H_t
at the position before frame t predicts codebook 0 (`codebook0_head`); the depth decoder, over the 32 inputs
[H_t, emb(c0), emb(c1), ..., emb(c30)] projected to its width, predicts codebook i at its position i.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from csm_jax.core.config import CsmConfig
from csm_jax.core.layers import DType, KVCache, Matmul, Transformer, dense, param


class Csm(nnx.Module):
    """CSM with its layer parameters stacked (the layout of checkpoints and training).

    `matmul` is how every weight product is computed (`dense`: a plain `jnp.dot`); `stack` builds the two
    transformers. `csm_jax.inference.decode_model` builds a decoding variant through both.
    """

    def __init__(self, config: CsmConfig, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs, matmul: Matmul = dense, stack=Transformer):
        c = config
        self.config = config
        self.dtype, self.matmul = dtype, matmul
        b, d, v, n = c.backbone.dim, c.decoder.dim, c.audio_vocab_size, c.num_codebooks
        self.text_embeddings = param(rngs, (c.text_vocab_size, b), ("vocab", "embed"), param_dtype)
        self.audio_embeddings = param(rngs, (n * v, b), ("vocab", "embed"), param_dtype)
        self.backbone = stack(c.backbone, dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul=matmul)
        self.codebook0_head = param(rngs, (b, v), ("embed", "vocab"), param_dtype)
        self.projection = param(rngs, (b, d), ("embed", "decoder_embed"), param_dtype)
        self.decoder = stack(c.decoder, dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul=matmul)
        self.audio_head = self.make_audio_head(rngs, param_dtype)

    def make_audio_head(self, rngs: nnx.Rngs, param_dtype: DType):
        c = self.config
        return param(rngs, (c.num_codebooks - 1, c.decoder.dim, c.audio_vocab_size), ("codebooks", "embed", "vocab"),
                     param_dtype)

    # ---- embeddings ----------------------------------------------------------------------------------------

    def embed_audio(self, codes: jax.Array, codebooks: jax.Array) -> jax.Array:
        """codes (...), codebook indices broadcastable to codes -> (..., D_backbone) in the compute dtype."""
        rows = codes + codebooks * self.config.audio_vocab_size
        return jnp.take(self.audio_embeddings[...], rows, axis=0).astype(self.dtype)

    def embed_frames(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens (B, S, 33) int32, mask (B, S, 33) bool -> (B, S, D): the sum of the unmasked columns' embeddings."""
        n = self.config.num_codebooks
        audio = self.embed_audio(tokens[..., :n], jnp.arange(n))  # (B, S, n, D)
        text = jnp.take(self.text_embeddings[...], tokens[..., n], axis=0).astype(self.dtype)[..., None, :]
        columns = jnp.concatenate([audio, text], axis=-2) * mask[..., None].astype(self.dtype)
        return columns.sum(axis=-2)

    # ---- backbone ------------------------------------------------------------------------------------------

    def backbone_forward(self, tokens: jax.Array, mask: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                         cache: KVCache | None = None, cache_index: jax.Array | int = 0):
        """Backbone over frames; see `Transformer.__call__` for positions, segment_ids and the cache.

        Returns (codebook-0 logits (B, S, audio_vocab) float32, hidden (B, S, D), updated cache or None).
        """
        hidden, cache = self.backbone(self.embed_frames(tokens, mask), positions, segment_ids, cache, cache_index)
        return self.codebook0_logits(hidden), hidden, cache

    def codebook0_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden (..., D) -> (..., audio_vocab) float32."""
        return self.matmul(hidden, self.codebook0_head[...], self.dtype, jnp.float32)

    def __call__(self, tokens: jax.Array, mask: jax.Array, segment_ids: jax.Array | None = None):
        """Teacher-forced backbone: tokens (B, S, 33) int32, mask (B, S, 33) bool.

        Returns (codebook-0 logits (B, S, audio_vocab) float32, final-norm hidden states (B, S, D)); the logits at
        position t predict codebook 0 of frame t+1. `segment_ids` (B, S) (default all ones) restricts attention to
        equal ids (packing); 0 marks padding. Positions restart at 0 in every segment.
        """
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape[:2], jnp.int32)
        positions = segment_positions(segment_ids)
        logits, hidden, _ = self.backbone_forward(tokens, mask, positions, segment_ids)
        return logits, hidden

    # ---- depth decoder -------------------------------------------------------------------------------------

    def decoder_forward(self, inputs: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                        cache_index: jax.Array | int = 0, mask: jax.Array | None = None):
        """inputs (B, T, D_backbone) in backbone space -> (decoder hidden (B, T, D_decoder), updated cache).
        `mask` (B, T, S): a precomputed attention mask (see `layer_inputs`)."""
        x = self.matmul(inputs.astype(self.dtype), self.projection[...], self.dtype)
        return self.decoder(x, positions, jnp.ones(positions.shape, jnp.int32), cache, cache_index, mask)

    def audio_logits(self, hidden: jax.Array, codebook: jax.Array | int) -> jax.Array:
        """Decoder hidden (B, D_decoder) at position i -> logits (B, audio_vocab) float32 of codebook i (1..n-1)."""
        head = jnp.take(self.audio_head[...], jnp.asarray(codebook) - 1, axis=0)
        return self.matmul(hidden, head, self.dtype, jnp.float32)

    def depth_logits(self, hidden: jax.Array, codes: jax.Array) -> jax.Array:
        """Teacher-forced depth decoder for one frame per row.

        hidden (B, D): the backbone hidden state that predicts the frame; codes (B, n) int32: the frame's codes.
        Returns logits (B, n-1, audio_vocab) float32 for codebooks 1..n-1 (codebook i is predicted from codes <i).
        """
        n = self.config.num_codebooks
        inputs = jnp.concatenate([hidden[:, None].astype(self.dtype),
                                  self.embed_audio(codes[:, : n - 1], jnp.arange(n - 1))], axis=1)
        positions = jnp.broadcast_to(jnp.arange(n), codes.shape)
        h, _ = self.decoder_forward(inputs, positions)
        heads = self.audio_head[...].astype(self.dtype)  # (n-1, Dd, V)
        # codebook-major operands: XLA CPU (jax 0.10) has no bf16 x bf16 -> f32 kernel for "bnd,ndv->bnv"
        logits = jnp.einsum("nbd,ndv->nbv", h[:, 1:].swapaxes(0, 1), heads, preferred_element_type=jnp.float32)
        return logits.swapaxes(0, 1)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """(B, S) segment ids -> (B, S) int32 positions that count from 0 at the start of each run of equal ids."""
    s = segment_ids.shape[1]
    idx = jnp.arange(s)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return (idx - start_idx).astype(jnp.int32)
