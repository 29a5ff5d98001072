"""Reference CSM implementations in PyTorch for parity tests, both written by others:

* transformers' `CsmForConditionalGeneration` (random weights, saved with `save_pretrained`);
* the original Sesame model, assembled as Sesame's `models.py` does it from torchtune's `llama3_2` decoders
  (token embeddings and output replaced by identity), with its forward written the same way: embed every column,
  multiply by the mask, sum, run the backbone with explicit positions and a boolean causal mask, then the
  projection, the depth decoder and `audio_head` per codebook.

Weights are redrawn so that every logit is of order 1 and norm scales differ from 1 (a swapped norm would show).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from csm_jax.core.config import CsmConfig


def redraw_weights(module: nn.Module, seed: int, skip: str = "codec_model.") -> None:
    """Norm scales ~ 1 + 0.2 N(0,1); embeddings ~ N(0,1); other matrices N(0, 1/fan_in) with fan_in = the input
    dimension (the last one of a torch Linear weight, the middle one of a (n-1, D, V) codebook head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(skip):
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1:
                p.copy_(1 + 0.2 * noise)
            elif "embed" in name and "projector" not in name:
                p.copy_(noise)
            else:
                fan_in = p.shape[1] if p.ndim == 3 else p.shape[-1]
                p.copy_(noise / fan_in ** 0.5)


# ---- transformers --------------------------------------------------------------------------------------------

def small_mimi_config() -> dict:
    """A Mimi codec a few hundred kB big: CsmForConditionalGeneration always builds one, and the default is 96 M."""
    from transformers import MimiConfig

    return MimiConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      head_dim=8, intermediate_size=32, codebook_dim=8, codebook_size=16, num_filters=8,
                      upsample_groups=32, vector_quantization_hidden_dimension=8).to_dict()


def transformers_model(config: CsmConfig, seed: int = 0):
    from transformers import CsmConfig as HfCsmConfig, CsmForConditionalGeneration

    d = {k: v for k, v in config.to_transformers().items() if k not in ("architectures", "model_type")}
    model = CsmForConditionalGeneration(HfCsmConfig(**d, codec_config=small_mimi_config()))
    redraw_weights(model, seed)
    return model.eval()


@torch.no_grad()
def transformers_logits(model, tokens: np.ndarray, mask: np.ndarray, codes: np.ndarray):
    """c0 logits (B, S, V) of the backbone over frames, and depth logits (B, n-1, V) for each row's `codes` (B, n)
    predicted from the backbone's last hidden state."""
    n = model.config.num_codebooks
    tokens = torch.tensor(np.asarray(tokens), dtype=torch.long)
    is_audio = torch.tensor(np.asarray(mask))[..., 0]
    embeds = torch.where(is_audio[..., None], model.backbone_model.embed_tokens(tokens[..., :n]),
                         model.embed_text_tokens(tokens[..., n]))
    out = model(inputs_embeds=embeds, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -1]  # transformers' last hidden state is after the final norm
    codes = torch.tensor(np.asarray(codes), dtype=torch.long)
    depth = model.depth_decoder(input_ids=nn.functional.pad(codes[:, : n - 1], (1, 0)),
                                backbone_last_hidden_state=hidden).logits
    return out.logits.numpy(), depth.numpy(), hidden.numpy()


# ---- the original (torchtune) --------------------------------------------------------------------------------

def _torchtune_decoder(flavor: dict) -> nn.Module:
    from torchtune.models.llama3_2 import llama3_2

    decoder = llama3_2(vocab_size=1, attn_dropout=0.0, **flavor)
    decoder.tok_embeddings = nn.Identity()
    decoder.output = nn.Identity()
    return decoder


class OriginalCsm(nn.Module):
    """Sesame's CSM: parameter names and forward as in the original `models.py`."""

    def __init__(self, config: CsmConfig):
        super().__init__()
        original = config.to_original()
        self.config = original
        self.backbone = _torchtune_decoder(original["backbone_flavor"])
        self.decoder = _torchtune_decoder(original["decoder_flavor"])
        b, d = config.backbone.dim, config.decoder.dim
        n, v = config.num_codebooks, config.audio_vocab_size
        self.text_embeddings = nn.Embedding(config.text_vocab_size, b)
        self.audio_embeddings = nn.Embedding(v * n, b)
        self.projection = nn.Linear(b, d, bias=False)
        self.codebook0_head = nn.Linear(b, v, bias=False)
        self.audio_head = nn.Parameter(torch.empty(n - 1, d, v))
        # the original registers these in setup_caches(); a saved state dict can carry them
        self.register_buffer("backbone_causal_mask", torch.tril(torch.ones(8, 8, dtype=torch.bool)))
        self.register_buffer("decoder_causal_mask", torch.tril(torch.ones(n, n, dtype=torch.bool)))

    def _embed_audio(self, codebook: torch.Tensor | int, codes: torch.Tensor) -> torch.Tensor:
        return self.audio_embeddings(codes + codebook * self.config["audio_vocab_size"])

    def _embed_frames(self, tokens: torch.Tensor) -> torch.Tensor:
        n = self.config["audio_num_codebooks"]
        text = self.text_embeddings(tokens[..., -1]).unsqueeze(-2)
        audio = self._embed_audio(torch.arange(n), tokens[..., :-1])
        return torch.cat([audio, text], dim=-2)  # (B, S, n+1, D)

    @staticmethod
    def _causal(batch: int, length: int) -> torch.Tensor:
        return torch.tril(torch.ones(length, length, dtype=torch.bool)).expand(batch, length, length)

    @torch.no_grad()
    def logits(self, tokens: np.ndarray, mask: np.ndarray, codes: np.ndarray):
        """Same outputs as `transformers_logits`."""
        tokens = torch.tensor(np.asarray(tokens), dtype=torch.long)
        mask = torch.tensor(np.asarray(mask))
        b, s, _ = tokens.shape
        h = (self._embed_frames(tokens) * mask.unsqueeze(-1)).sum(dim=2)
        h = self.backbone(h, input_pos=torch.arange(s).expand(b, s), mask=self._causal(b, s))
        c0_logits = self.codebook0_head(h)

        codes = torch.tensor(np.asarray(codes), dtype=torch.long)
        n = codes.shape[1]
        last = h[:, -1]
        inputs = torch.cat([last.unsqueeze(1), self._embed_audio(torch.arange(n - 1), codes[:, : n - 1])], dim=1)
        dec = self.decoder(self.projection(inputs), input_pos=torch.arange(n).expand(b, n), mask=self._causal(b, n))
        depth = torch.stack([dec[:, i] @ self.audio_head[i - 1] for i in range(1, n)], dim=1)
        return c0_logits.numpy(), depth.numpy(), last.numpy()


def original_model(config: CsmConfig, seed: int = 0) -> OriginalCsm:
    model = OriginalCsm(config)
    redraw_weights(model, seed)
    return model.eval()


def save_original(model: OriginalCsm, directory: Path, fmt: str) -> Path:
    """Writes the model as Sesame published it: fmt "pt" (ckpt.pt, a flat state dict) or "safetensors"
    (model.safetensors + config.json, as PyTorchModelHubMixin saves it). Returns the directory."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if fmt == "pt":
        torch.save(state, directory / "ckpt.pt")
    else:
        params = {k: v.contiguous() for k, v in state.items() if not k.endswith("causal_mask")}
        save_file(params, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(model.config))
    return directory
