"""The speech server behind `python -m csm_jax.serve`: the Starlette app (`csm_jax.serving.app.build_app`, its options
in `ServeConfig`), the continuous-batching engine, Mimi streams, audio formats, voices and metrics."""
