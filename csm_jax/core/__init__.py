"""The model itself: configuration, Flax NNX layers and model, sharding rules. Imports nothing else of csm_jax."""
