"""Generation: prompt frames, the decode layout of the model, samplers, the on-device loop, `Generator`, and the CPU
kernels. Builds on `csm_jax.core` and `csm_jax.io`."""
