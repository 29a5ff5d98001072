"""The bfloat16 decode kernel: exact against a float32 matmul of the widened weights, differentiable, and the
same greedy frames as a float32 model holding the same (bfloat16-representable) weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from csm_jax import kernels
from csm_jax.config import CsmConfig
from csm_jax.generation import FrameGenerator, Frames, audio_frames, text_frames
from csm_jax.model import Csm
from csm_jax.sampling import GREEDY, FrameSampling

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler to build the kernel")


@pytest.mark.parametrize("rows, k, n", [(1, 64, 2051), (3, 33, 300), (8, 128, 1024), (16, 40, 17), (40, 64, 96)])
def test_kernel_matches_float32_matmul(rows, k, n):
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    out = jax.jit(kernels.matvec_bf16)(x, w)
    expect = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    assert out.dtype == jnp.float32 and out.shape == (rows, n)
    np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_kernel_gradients_match_the_plain_matmul():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 24)), jnp.bfloat16)
    ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(kernels.matvec_bf16(x, w))), argnums=(0, 1))(x, w)
    plain = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w.astype(jnp.float32))), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(ours[0]), np.asarray(plain[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours[1], np.float32), np.asarray(plain[1], np.float32), rtol=1e-2)


def test_bfloat16_weights_generate_the_frames_of_float32_weights():
    config = CsmConfig.tiny()
    half = Csm(config, dtype=jnp.float32, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    full = Csm(config, rngs=nnx.Rngs(0))
    nnx.update(full, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(half, nnx.Param)))
    rng = np.random.default_rng(0)
    prompt = Frames.concat([text_frames(rng.integers(0, 300, 6)), audio_frames(rng.integers(1, 67, (32, 4)))])
    sampling = FrameSampling.same(GREEDY)
    ours = FrameGenerator(half).generate([prompt, prompt], 12, sampling)
    expect = FrameGenerator(full).generate([prompt, prompt], 12, sampling)
    for a, b in zip(ours, expect):
        np.testing.assert_array_equal(a, b)
