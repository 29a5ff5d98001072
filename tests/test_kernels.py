"""The CPU kernels. The matvec (bfloat16 or float32 weights): exact against a float32 matmul of the widened
weights, differentiable, and the same greedy frames as a float32 model holding the same (bfloat16-representable)
weights. The sampler: the same draws as the jnp sampler, filters and ties included."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from csm_jax.inference import kernels
from csm_jax.core.config import preset
from csm_jax.inference.loop import FrameGenerator
from csm_jax.core.model import Csm
from csm_jax.inference.sampling import GREEDY, FrameSampling, SamplerConfig, inverse_cdf_sample, sample
from tests.helpers import assert_close_to_scale, random_prompt

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler to build the kernel")


@pytest.mark.parametrize("weights", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("rows, k, n", [(1, 64, 2051), (3, 33, 300), (8, 128, 1024), (16, 40, 17), (40, 64, 96),
                                        (1, 512, 128), (2, 128, 64)])
def test_kernel_matches_float32_matmul(rows, k, n, weights):
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), weights)
    out = jax.jit(kernels.matvec)(x, w)
    expect = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    assert out.dtype == jnp.float32 and out.shape == (rows, n)
    assert_close_to_scale(out, expect, 1e-5)  # float32 sums vs float64: measured <= 7.3e-7 of the largest


def test_kernel_gradients_match_the_plain_matmul():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 24)), jnp.bfloat16)
    ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(kernels.matvec(x, w))), argnums=(0, 1))(x, w)
    plain = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w.astype(jnp.float32))), argnums=(0, 1))(x, w)
    assert_close_to_scale(ours[0], plain[0], 1e-5)  # float32 gradients: measured <= 7.3e-7 of the largest
    assert_close_to_scale(np.asarray(ours[1], np.float32), np.asarray(plain[1], np.float32), 1e-2)  # bfloat16: 0 seen


def test_bfloat16_weights_generate_the_frames_of_float32_weights():
    config = preset("tiny")
    half = Csm(config, dtype=jnp.float32, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    full = Csm(config, rngs=nnx.Rngs(0))
    nnx.update(full, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(half, nnx.Param)))
    prompt = random_prompt(config, 0, context_text=6, context_audio=4, target_text=0)
    sampling = FrameSampling.same(GREEDY)
    ours = FrameGenerator(half).generate([prompt, prompt], 12, sampling)
    expect = FrameGenerator(full).generate([prompt, prompt], 12, sampling)
    for a, b in zip(ours, expect):
        np.testing.assert_array_equal(a, b)


def test_kernel_switch_changes_the_path_not_the_frames(monkeypatch):
    """The decode layout's switch: explicit argument first, then $CSM_JAX_CPU_KERNELS, then on for the CPU."""
    from csm_jax.inference.decode_model import KERNELS_ENV, decode_model, use_cpu_kernels

    model = Csm(preset("tiny"), dtype=jnp.float32, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    monkeypatch.setenv(KERNELS_ENV, "0")
    assert not use_cpu_kernels() and use_cpu_kernels(True)
    monkeypatch.setenv(KERNELS_ENV, "maybe")
    with pytest.raises(ValueError, match="set it to 1 or 0"):
        use_cpu_kernels()
    monkeypatch.delenv(KERNELS_ENV)
    assert use_cpu_kernels() and not use_cpu_kernels(False)
    prompt = random_prompt(model.config, 1, context_text=6, context_audio=4, target_text=0)
    off, on = decode_model(model, cpu_kernels=False), decode_model(model, cpu_kernels=True)
    assert (off.cpu_kernels, on.cpu_kernels) == (False, True)
    sampling = FrameSampling.same(SamplerConfig(temperature=0.8, top_k=20))
    for a, b in zip(FrameGenerator(off).generate([prompt], 10, sampling, [5]),
                    FrameGenerator(on).generate([prompt], 10, sampling, [5])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p",
                         [(0.9, 50, 1.0, 0.0), (1.3, 0, 1.0, 0.0), (0.7, 7, 0.9, 0.0), (1.0, 0, 0.3, 0.1),
                          (0.5, 1, 1.0, 0.0), (1.0, 50, 0.95, 0.05)])
def test_sampling_kernel_draws_what_the_jnp_sampler_draws(temperature, top_k, top_p, min_p):
    logits = jax.random.normal(jax.random.key(1), (256, 2051)) * 3
    logits = logits.at[:, :5].set(logits[:, 5:6]).at[:, 2048:].set(-jnp.inf)  # ties, and ids Mimi cannot decode
    uniforms = jax.random.uniform(jax.random.key(2), (256,))
    config = SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = jax.jit(functools.partial(sample, config=config, cpu_kernel=True))(uniforms, logits)
    expect = jax.jit(functools.partial(inverse_cdf_sample, config=config))(uniforms, logits)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expect))
