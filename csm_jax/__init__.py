"""csm-jax: Sesame's CSM-1B in JAX / Flax NNX. See README.md and docs/.

Layers, each importing only those before it: `csm_jax.core` (config, layers, model, sharding) <- `csm_jax.io`
(checkpoints, audio and Mimi, text, frames, hub and cache) <- `csm_jax.inference` (prompts, decode layout,
sampling, the loop, `Generator`, CPU kernels); `train/` and `convert/` build on core and io; the command lines
(`csm_jax.generate`, `convert`, `train`) sit on top.
"""

from csm_jax.core.config import CsmConfig, TransformerConfig, preset
from csm_jax.core.model import Csm
from csm_jax.inference.generator import Generator, Request, load_csm_1b
from csm_jax.io.checkpoint import load_model, save_model
from csm_jax.io.frames import Segment

__all__ = ["Csm", "CsmConfig", "Generator", "Request", "Segment", "TransformerConfig", "load_csm_1b", "load_model",
           "preset", "save_model"]
