"""Reference CSM implementations in PyTorch for parity tests and benchmarks, both written by others:

* transformers' `CsmForConditionalGeneration` (random weights, saved with `save_pretrained`);
* the original Sesame model, assembled as Sesame's `models.py` does it from torchtune's `llama3_2` decoders
  (token embeddings and output replaced by identity), with its forward written the same way: embed every column,
  multiply by the mask, sum, run the backbone with explicit positions and a boolean causal mask, then the
  projection, the depth decoder and `audio_head` per codebook.

Weights are redrawn so that every logit is of order 1 and norm scales differ from 1 (a swapped norm would show).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as nn

from convert import convert_to_orbax
from csm_jax.core.config import CsmConfig
from csm_jax.core.model import Csm
from csm_jax.io.checkpoint import load_model


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


def transformers_config(config: CsmConfig, **overrides):
    """Our config as transformers' `CsmConfig` (`overrides` are passed on, e.g. `attn_implementation`)."""
    from transformers import CsmConfig as HfCsmConfig

    fields = {k: v for k, v in config.to_transformers().items() if k not in ("architectures", "model_type")}
    return HfCsmConfig(**fields, **overrides)


def tied_transformers(hf_config):
    """`CsmForConditionalGeneration(hf_config)` with the depth decoder's codebook embeddings tied to the backbone's
    (one tensor, as in the published checkpoint and as the converter expects), on every transformers version:
    5.21 and later tie them, while earlier 5.x releases force `tie_word_embeddings=False` and build them apart."""
    from transformers import CsmForConditionalGeneration

    model = CsmForConditionalGeneration(hf_config)
    model.depth_decoder.model.embed_tokens.weight = model.backbone_model.embed_tokens.embed_audio_tokens.weight
    return model


def transformers_model(config: CsmConfig, seed: int = 0):
    """transformers' CSM with redrawn weights (see `redraw_weights`) and a small Mimi codec, in eval mode."""
    model = tied_transformers(transformers_config(config, codec_config=small_mimi_config()))
    redraw_weights(model, seed)
    return model.eval()


def csm_from_transformers(model, config: CsmConfig, dtype=jnp.float32) -> Csm:
    """The same weights in our `Csm` through the production path: save_pretrained -> the converter -> load_model."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "hf")
        convert_to_orbax(Path(tmp) / "hf", Path(tmp) / "orbax")
        ours = load_model(Path(tmp) / "orbax", dtype=dtype)
    assert ours.config == config
    return ours


def transformers_embeds(model, tokens, mask) -> torch.Tensor:
    """transformers' embedding of our frames (tokens, mask: (B, S, n+1)) -> (B, S, D). Its 3-D `input_ids` path
    embeds audio frames only, so mixed text/audio inputs go in as `inputs_embeds`."""
    n = model.config.num_codebooks
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=model.device)
    is_audio = torch.as_tensor(np.asarray(mask), device=model.device)[..., 0]
    return torch.where(is_audio[..., None], model.backbone_model.embed_tokens(tokens[..., :n]),
                       model.embed_text_tokens(tokens[..., n]))


def transformers_loss(model, tokens, mask, depth_frames):
    """transformers' CSM training loss over our frames; returns its output (loss, backbone_loss,
    depth_decoder_loss). Labels (B, S, n) are the codes on audio frames and -100 elsewhere; outside `depth_frames`
    (B, S) codebooks 1.. are -100 too, which is what transformers makes of its -101 (backbone-only) label."""
    n = model.config.num_codebooks
    codes = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=model.device)[..., :n]
    is_audio = torch.as_tensor(np.asarray(mask), device=model.device)[..., 0]
    labels = torch.where(is_audio[..., None], codes, torch.full_like(codes, -100))
    labels[..., 1:][torch.as_tensor(~np.asarray(depth_frames), device=model.device)] = -100
    return model(inputs_embeds=transformers_embeds(model, tokens, mask), labels=labels)


@torch.no_grad()
def transformers_logits(model, tokens: np.ndarray, mask: np.ndarray, codes: np.ndarray):
    """c0 logits (B, S, V) of the backbone over frames, and depth logits (B, n-1, V) for each row's `codes` (B, n)
    predicted from the backbone's last hidden state, as float32 numpy arrays (the model on any device and dtype)."""
    n = model.config.num_codebooks
    out = model(inputs_embeds=transformers_embeds(model, tokens, mask), output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -1]  # transformers' last hidden state is after the final norm
    codes = torch.tensor(np.asarray(codes), dtype=torch.long, device=model.device)
    depth = model.depth_decoder(input_ids=nn.functional.pad(codes[:, : n - 1], (1, 0)),
                                backbone_last_hidden_state=hidden).logits
    return tuple(t.float().cpu().numpy() for t in (out.logits, depth, hidden))


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
