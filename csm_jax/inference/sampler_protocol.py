"""Your own sampler inside the compiled loop, for sampling research.

A `Sampler` is a JAX function

    sampler(logits (B, V) float32, keys (B,) PRNG keys, frame () int32, codebook () int32, state) -> (tokens (B,)
    int32, state)

called for every codebook of every frame in place of the built-in draw: its tokens are exactly what the loop emits
(after any `logits_processor`, such as the end bias, has changed the logits; ids Mimi cannot decode are -inf). It
is traced once into the on-device loop, so it is written with jnp (branch on `codebook` with `jnp.where`, not
`if`); keep one function object, since the loop compiles once per sampler function.

`state` is any pytree of arrays (None for a stateless sampler). Its initial value is an argument of the compiled
loop, as the row seeds are: the loop carries it from codebook to codebook and frame to frame (through the
frame `while_loop` and the depth decoder's steps, and across `stream`'s chunks), and hands back the final value
(`return_sampler_state=True`; a stream yields the value after each chunk).
Another seed or another initial value of the same shapes and dtypes reuses the compiled loop. The sampler must
return the state with the shapes and dtypes it was given; for per-row state give it a leading batch axis.

Row r's key at frame t, codebook c is `fold_in(fold_in(key(seed_r), t), c)`, seed_r the row's generation seed:
a seed gives the same draws alone, in a batch, or streamed. The loop calls the sampler for all rows until every row
has ended, so a row that has already emitted its all-zero end frame is still called (its codes are dropped); a
sampler whose per-row state must stop there can see the end frame in the tokens it emitted.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from csm_jax.core.errors import UserError

Sampler = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


class SamplerError(UserError):
    """A sampler that breaks the protocol (tokens or state of the wrong shape), or a state without a sampler."""


def initial_state(state: Any) -> Any:
    """The loop's own copy of a sampler's initial state: fresh arrays (the loop donates its buffers, and yours stay
    yours) with definite dtypes (so 0 and jnp.int32(0) compile the loop once)."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype), state)


def check_sampler(sampler: Sampler | None, state: Any) -> None:
    """Refuses an initial state given without the sampler it belongs to."""
    if sampler is None and state is not None:
        raise SamplerError("sampler_state is the state of a sampler of your own; give sampler= as well")


def _layout(tree: Any) -> tuple:
    leaves, structure = jax.tree.flatten(tree)
    return structure, [(tuple(jnp.shape(x)), str(jnp.asarray(x).dtype)) for x in leaves]


def call_sampler(sampler: Sampler, logits: jax.Array, keys: jax.Array, frame: jax.Array, codebook: jax.Array,
                 state: Any) -> tuple[jax.Array, Any]:
    """One codebook's tokens (B,) int32 and the sampler's next state; keys: the rows' generation keys (B,)."""
    b = logits.shape[0]
    step_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, frame), codebook))(keys)
    tokens, new_state = sampler(logits.astype(jnp.float32), step_keys, frame, codebook, state)
    tokens = jnp.asarray(tokens)
    if tokens.shape != (b,) or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise SamplerError(f"the sampler returned tokens of shape {tokens.shape} and dtype {tokens.dtype}; return "
                           f"one integer token per row, shape ({b},)")
    before, after = _layout(state), _layout(new_state)
    if before != after:
        raise SamplerError(f"the sampler returned a state of {after[1]} ({after[0]}) but was given {before[1]} "
                           f"({before[0]}); return the state with the same structure, shapes and dtypes (the loop "
                           f"carries it from step to step)")
    return tokens.astype(jnp.int32), new_state
