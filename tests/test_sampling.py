"""The filters keep exactly the tokens they should, on crafted logits; draws respect them and the seed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csm_jax.inference.sampling import (GREEDY, SamplerConfig, blocked_cumsum, filter_logits, min_p_mask, sample, top_k_mask,
                              top_k_bisection, top_k_sorted, top_p_mask)


def kept(logits):
    return set(np.flatnonzero(np.isfinite(np.asarray(logits[0]))).tolist())


def test_top_k_keeps_the_k_largest_and_ties_at_the_kth():
    logits = jnp.array([[1.0, 5.0, 3.0, 3.0, 0.0, 4.0]])
    assert kept(top_k_mask(logits, 2)) == {1, 5}
    assert kept(top_k_mask(logits, 3)) == {1, 5, 2, 3}  # 3.0 ties at the third place: both stay
    assert kept(top_k_mask(logits, 0)) == set(range(6))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.5, 0.05, 0.3, 0.15]])
    logits = jnp.log(jnp.asarray(probs))
    assert kept(top_p_mask(logits, 0.5)) == {0}
    assert kept(top_p_mask(logits, 0.6)) == {0, 2}
    assert kept(top_p_mask(logits, 0.8)) == {0, 2}  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p_mask(logits, 0.81)) == {0, 2, 3}
    assert kept(top_p_mask(logits, 0.01)) == {0}  # the most likely token always stays


def test_min_p_keeps_tokens_above_a_fraction_of_the_best():
    logits = jnp.log(jnp.array([[0.4, 0.2, 0.1, 0.3]]))
    assert kept(min_p_mask(logits, 0.5)) == {0, 1, 3}  # 0.2 >= 0.5 * 0.4
    assert kept(min_p_mask(logits, 0.6)) == {0, 3}


def test_filters_compose_after_temperature():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0, -2.0]])
    config = SamplerConfig(temperature=0.5, top_k=4, top_p=0.99, min_p=0.05)
    out = filter_logits(logits, config)
    # temperature 0.5 doubles the gaps; top-k drops index 4; min-p 0.05 keeps p >= e^-3 of the best: 0, 1
    assert kept(out) == {0, 1}
    np.testing.assert_allclose(np.asarray(out[0, :2]), [4.0, 2.0])


def test_draws_stay_in_the_kept_set_follow_the_probabilities_and_the_seed():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    uniforms = jax.random.uniform(jax.random.key(0), (4000,))
    draws = np.asarray(sample(uniforms, logits, SamplerConfig(temperature=1.0, top_k=3)))
    assert set(draws.tolist()) == {0, 1, 2}
    np.testing.assert_allclose(np.bincount(draws, minlength=4)[:3] / 4000, np.array([0.5, 0.3, 0.15]) / 0.95,
                               atol=0.03)
    again = np.asarray(sample(uniforms, logits, SamplerConfig(temperature=1.0, top_k=3)))
    np.testing.assert_array_equal(draws, again)


def test_inverse_cdf_picks_the_token_whose_interval_holds_the_uniform():
    logits = jnp.log(jnp.array([[0.0, 0.25, 0.0, 0.5, 0.25]] * 5))
    uniforms = jnp.array([0.0, 0.2499, 0.25, 0.7499, 0.9999])
    picked = sample(uniforms, logits, SamplerConfig(temperature=1.0, top_k=0))
    np.testing.assert_array_equal(np.asarray(picked), [1, 1, 3, 3, 4])  # zero-probability tokens never


def test_threshold_filters_agree_with_sorting_on_random_rows():
    logits = jax.random.normal(jax.random.key(1), (64, 2051)) * 3
    logits = logits.at[:, :5].set(logits[:, 5:6])  # ties
    order = np.sort(np.asarray(logits), axis=-1)[:, ::-1]
    for k in (1, 7, 50):
        expect = np.asarray(logits) >= order[:, k - 1:k]
        np.testing.assert_array_equal(np.isfinite(np.asarray(top_k_mask(logits, k))), expect)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(order), axis=-1))
    for p in (0.3, 0.9):
        before = np.cumsum(probs, axis=-1) - probs
        threshold = np.where(before < p, order, np.inf).min(axis=-1, keepdims=True)
        np.testing.assert_array_equal(np.isfinite(np.asarray(top_p_mask(logits, p))),
                                      np.asarray(logits) >= threshold)


@pytest.mark.parametrize("width", [1, 63, 64, 2051])
def test_blocked_cumsum_equals_cumsum(width):
    x = jax.random.uniform(jax.random.key(width), (3, width))
    # per element: partial sums of positive terms, where nothing cancels, so each is its own scale
    np.testing.assert_allclose(np.asarray(blocked_cumsum(x)), np.cumsum(np.asarray(x, np.float64), axis=-1),
                               rtol=1e-6)


def test_greedy_is_argmax():
    logits = jnp.array([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    np.testing.assert_array_equal(np.asarray(sample(None, logits, GREEDY)), [1, 0])


def test_bad_settings_say_what_is_allowed():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplerConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplerConfig(temperature=-1)


def test_top_k_threshold_is_the_same_from_the_bisection_and_from_lax_top_k():
    """The CPU (bisection) and GPU (`lax.top_k`) paths of `top_k_mask` keep the same set, ties and -inf included."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((6, 2051)).astype(np.float32)
    logits[1, :60] = 1.5  # a tie across the k-th place
    logits[2, 10:] = -np.inf  # fewer finite values than k
    logits[3] = np.round(logits[3], 1)  # many ties
    for k in (1, 50, 2050):
        np.testing.assert_array_equal(top_k_bisection(jnp.asarray(logits), k), top_k_sorted(jnp.asarray(logits), k))
