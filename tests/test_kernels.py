"""The CPU kernels. The matvec (bfloat16 or float32 weights): exact against a float32 matmul of the widened
weights, differentiable, and the same greedy frames as a float32 model holding the same (bfloat16-representable)
weights. The sampler: the same draws as the jnp sampler, filters and ties included."""

import functools
import json

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
    assert (off.kernel_kinds, on.kernel_kinds) == (frozenset(), {"bfloat16"})
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


@pytest.fixture
def calibration_cache(tmp_path, monkeypatch):
    """An empty cache directory for the calibration (the kernels stay loaded from the real one)."""
    monkeypatch.setenv("CSM_JAX_CACHE", str(tmp_path))
    return tmp_path


def test_calibration_measures_both_paths_once_per_cpu_and_keeps_the_faster(calibration_cache, monkeypatch):
    from csm_jax.inference import products

    timings = {"float32": (2.0, 1.0), "bfloat16": (1.0, 3.0), "int8": (1.0, 1.5), "int4": (5.0, 4.0)}
    calls = []

    def fake(kind, weights=None):
        calls.append(kind)
        return dict(zip(("kernel", "xla"), timings[kind]))

    monkeypatch.setattr(products, "calibrate", fake)
    assert products.faster_kinds(["bfloat16", "float32"]) == {"bfloat16"}
    assert products.faster_kinds() == {"bfloat16", "int8"}
    assert products.faster_kinds(["int8"]) == {"int8"}
    assert calls == ["bfloat16", "float32", "int8", "int4"]  # each kind measured once, then read from the cache
    path = products.calibration_path()
    assert path.parent == calibration_cache / "kernels" and path.name.startswith(kernels.library_path().stem)
    assert json.loads(path.read_text())["kinds"]["int4"] == {"kernel": 5.0, "xla": 4.0}
    path.write_text("{not json")  # a damaged cache is measured again
    assert products.faster_kinds(["int4"]) == frozenset() and calls[-1] == "int4"


def test_the_switch_forces_either_path_and_auto_takes_the_measured_kinds(calibration_cache, monkeypatch):
    from csm_jax.inference import decode_model as dm

    monkeypatch.setattr(dm, "faster_kinds", lambda kinds, params=None: frozenset(kinds) & {"int8"})
    monkeypatch.delenv(dm.KERNELS_ENV, raising=False)
    assert dm.kernel_kinds(None, ["int8", "bfloat16"]) == {"int8"}
    assert dm.kernel_kinds(True, ["int8", "bfloat16"]) == {"int8", "bfloat16"}
    assert dm.kernel_kinds(False, ["int8"]) == frozenset()
    monkeypatch.setenv(dm.KERNELS_ENV, "1")
    assert dm.kernel_kinds(None, ["bfloat16"]) == {"bfloat16"}
    monkeypatch.setenv(dm.KERNELS_ENV, "0")
    assert dm.kernel_kinds(None, ["int8"]) == frozenset()
    monkeypatch.delenv(dm.KERNELS_ENV)
    model = Csm(preset("tiny"), dtype=jnp.float32, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    auto = dm.decode_model(model)  # bfloat16 weights: measured slower here (the stand-in), so XLA's product
    assert auto.cpu_kernels and auto.kernel_kinds == frozenset()


def test_calibration_times_both_real_paths():
    """The real measurement, on the weights it builds (no bound on the times: which path wins is the CPU's)."""
    from csm_jax.inference import products

    t = products.calibrate("int4")
    assert set(t) == {"kernel", "xla"} and all(v > 0 for v in t.values())


def test_a_decode_layout_measures_its_own_products_once(calibration_cache, monkeypatch):
    from csm_jax.inference import products
    from csm_jax.inference.decode_model import KERNELS_ENV, decode_model

    seen = []

    def fake(kind, weights=None):
        seen.append((kind, weights))
        return {"kernel": 1.0, "xla": 2.0}

    monkeypatch.setattr(products, "calibrate", fake)
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    model = Csm(preset("tiny"), rngs=nnx.Rngs(0))
    assert decode_model(model, weights_dtype="int4").kernel_kinds == {"int4", "int8"}
    c = model.config
    counts = {kind: len(weights) for kind, weights in seen}
    # int4: the four matrices of every block of both stacks and the projection; int8: the codebook heads
    assert counts == {"int4": 4 * (c.backbone.num_layers + c.decoder.num_layers) + 1, "int8": c.num_codebooks}
    keys = json.loads(products.calibration_path().read_text())["kinds"]
    assert sorted(key.split()[0] for key in keys) == ["int4", "int8"]  # each kind under its shapes' hash
    decode_model(model, weights_dtype="int4")
    assert len(seen) == 2  # the second layout of the same shapes reads the cache
