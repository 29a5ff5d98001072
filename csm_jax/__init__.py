"""csm-jax: Sesame's CSM-1B in JAX / Flax NNX. See README.md."""

from csm_jax.checkpoint import load_model, save_model
from csm_jax.config import CsmConfig, TransformerConfig
from csm_jax.generation import Generator, Segment, load_csm_1b
from csm_jax.model import Csm

__all__ = ["Csm", "CsmConfig", "Generator", "Segment", "TransformerConfig", "load_csm_1b", "load_model",
           "save_model"]
