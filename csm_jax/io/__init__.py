"""Everything that crosses the process boundary: checkpoints, audio and Mimi, text tokenizers, the hub and the
conversion cache, the watermark. Builds on `csm_jax.core`."""
