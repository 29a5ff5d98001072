"""transformers' CSM as a reference: a randomly initialised model, and the same weights in our `Csm` through the
production path (save_pretrained -> the converter -> load_model)."""

import tempfile
from pathlib import Path

import jax.numpy as jnp
import torch

from csm_jax.io.checkpoint import load_model
from csm_jax.core.config import CsmConfig
from csm_jax.core.model import Csm
from convert import convert_to_orbax


def transformers_csm(config: CsmConfig, seed: int = 0):
    from transformers import CsmConfig as HfConfig, CsmForConditionalGeneration

    torch.manual_seed(seed)
    hf = CsmForConditionalGeneration(HfConfig(**config.to_transformers())).eval()
    with torch.no_grad():  # random init leaves the tied decoder copy of the audio embeddings independent
        hf.depth_decoder.model.embed_tokens.weight.copy_(hf.backbone_model.embed_tokens.embed_audio_tokens.weight)
    return hf


def csm_from_transformers(hf, config: CsmConfig, dtype=jnp.float32) -> Csm:
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp) / "hf")
        convert_to_orbax(Path(tmp) / "hf", Path(tmp) / "orbax")
        model = load_model(Path(tmp) / "orbax", dtype=dtype)
    assert model.config == config
    return model
