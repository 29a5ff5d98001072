"""transformers' CSM as a reference: a randomly initialised model and the same weights loaded into our `Csm`.

(The converter's key table is the production path; this test helper maps the transformers layout directly so the
sampler tests do not depend on it. Both use the rotate-half RoPE layout, so no q/k permutation is needed.)
"""

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from csm_jax.config import CsmConfig
from csm_jax.model import Csm


def transformers_csm(config: CsmConfig, seed: int = 0):
    from transformers import CsmConfig as HfConfig, CsmForConditionalGeneration

    torch.manual_seed(seed)
    hf = CsmForConditionalGeneration(HfConfig(**config.to_transformers())).eval()
    with torch.no_grad():  # random init leaves the tied decoder copy of the audio embeddings independent
        hf.depth_decoder.model.embed_tokens.weight.copy_(hf.backbone_model.embed_tokens.embed_audio_tokens.weight)
    return hf


def csm_from_transformers(hf, config: CsmConfig, dtype=jnp.float32) -> Csm:
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    model = Csm(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))

    def stack(prefix, cfg, blocks):
        def layers(name):
            return np.stack([sd[f"{prefix}.layers.{i}.{name}"] for i in range(cfg.num_layers)])

        d, h, k, hd = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        n = cfg.num_layers
        blocks.attn.wq[...] = jnp.asarray(layers("self_attn.q_proj.weight").transpose(0, 2, 1).reshape(n, d, h, hd), dtype)
        blocks.attn.wk[...] = jnp.asarray(layers("self_attn.k_proj.weight").transpose(0, 2, 1).reshape(n, d, k, hd), dtype)
        blocks.attn.wv[...] = jnp.asarray(layers("self_attn.v_proj.weight").transpose(0, 2, 1).reshape(n, d, k, hd), dtype)
        blocks.attn.wo[...] = jnp.asarray(layers("self_attn.o_proj.weight").transpose(0, 2, 1).reshape(n, h, hd, d), dtype)
        blocks.mlp.w_gate[...] = jnp.asarray(layers("mlp.gate_proj.weight").transpose(0, 2, 1), dtype)
        blocks.mlp.w_up[...] = jnp.asarray(layers("mlp.up_proj.weight").transpose(0, 2, 1), dtype)
        blocks.mlp.w_down[...] = jnp.asarray(layers("mlp.down_proj.weight").transpose(0, 2, 1), dtype)
        blocks.attn_norm.scale[...] = jnp.asarray(layers("input_layernorm.weight"), dtype)
        blocks.mlp_norm.scale[...] = jnp.asarray(layers("post_attention_layernorm.weight"), dtype)

    stack("backbone_model", config.backbone, model.backbone.blocks)
    stack("depth_decoder.model", config.decoder, model.decoder.blocks)
    model.backbone.norm.scale[...] = jnp.asarray(sd["backbone_model.norm.weight"], dtype)
    model.decoder.norm.scale[...] = jnp.asarray(sd["depth_decoder.model.norm.weight"], dtype)
    model.text_embeddings[...] = jnp.asarray(sd["embed_text_tokens.weight"], dtype)
    model.audio_embeddings[...] = jnp.asarray(sd["backbone_model.embed_tokens.embed_audio_tokens.weight"], dtype)
    model.codebook0_head[...] = jnp.asarray(sd["lm_head.weight"].T, dtype)
    model.projection[...] = jnp.asarray(sd["depth_decoder.model.inputs_embeds_projector.weight"].T, dtype)
    model.audio_head[...] = jnp.asarray(sd["depth_decoder.codebooks_head.weight"], dtype)
    return model
