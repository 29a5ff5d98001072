"""Teacher-forced scoring against transformers' training loss on the same codes; batching with padding; best-of-N."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from csm_jax.core.config import preset
from csm_jax.inference.loop import FrameGenerator
from csm_jax.inference.score import score_codes
from csm_jax.inference.sampling import FrameSampling, SamplerConfig
from tests.references import csm_from_transformers, transformers_model
from tests.helpers import assert_close_to_scale, random_prompt

CONFIG = preset("tiny")


@pytest.fixture(scope="module")
def models():
    hf = transformers_model(CONFIG, seed=2)
    return hf, csm_from_transformers(hf, CONFIG)


def transformers_losses(hf, model, prompt, codes):
    """transformers' (backbone_loss, depth_decoder_loss) with labels = the codes on their frames, -100 elsewhere."""
    n = CONFIG.num_codebooks
    tokens = np.concatenate([prompt.tokens, np.pad(codes.T, ((0, 0), (0, 1)))])
    mask = np.concatenate([prompt.mask, np.pad(np.ones(codes.T.shape, bool), ((0, 0), (0, 1)))])
    embeds = np.asarray(model.embed_frames(jnp.asarray(tokens[None]), jnp.asarray(mask[None])))
    labels = torch.full((1, len(tokens), n), -100, dtype=torch.long)
    labels[0, len(prompt):] = torch.tensor(codes.T, dtype=torch.long)
    with torch.no_grad():
        out = hf(inputs_embeds=torch.tensor(embeds), labels=labels)
    return out.backbone_loss.item(), out.depth_decoder_loss.item()


def test_scores_match_transformers_loss_alone_and_in_a_padded_batch(models, rng):
    hf, model = models
    prompts = [random_prompt(CONFIG, 0, context_text=5, context_audio=3), random_prompt(CONFIG, 1, context_text=11, context_audio=7)]
    codes = [rng.integers(0, CONFIG.audio_vocab_size, (32, f)).astype(np.int32) for f in (9, 4)]
    batch = score_codes(model, prompts, codes)
    for prompt, c, logp in zip(prompts, codes, batch):
        assert logp.shape == (c.shape[1], 32) and (logp < 0).all()
        c0_loss, depth_loss = transformers_losses(hf, model, prompt, c)
        np.testing.assert_allclose(-logp[:, 0].mean(), c0_loss, rtol=1e-5)  # float32
        np.testing.assert_allclose(-logp[:, 1:].mean(), depth_loss, rtol=1e-5)
        assert_close_to_scale(score_codes(model, [prompt], [c])[0], logp, 1e-5)  # measured 1.5e-7


def test_score_is_highest_for_the_greedy_continuation(models, rng):
    model = models[1]
    prompt = random_prompt(CONFIG, 3)
    greedy = FrameGenerator(model).generate([prompt], 6, FrameSampling.same(SamplerConfig(temperature=0.0)))[0]
    assert greedy.shape[1] > 0
    other = rng.integers(0, CONFIG.audio_vocab_size, greedy.shape).astype(np.int32)
    best, worse = score_codes(model, [prompt, prompt], [greedy, other])
    # each greedy code is the argmax given what came before, so its log-prob is >= every alternative's
    assert best.mean() > worse.mean()


def test_bad_codes_are_refused_with_the_fix(models):
    model = models[1]
    with pytest.raises(ValueError, match="give Mimi codes of shape"):
        score_codes(model, [random_prompt(CONFIG, 0)], [np.zeros((8, 3), np.int32)])
    with pytest.raises(ValueError, match="exceed the model's 256 frames"):
        score_codes(model, [random_prompt(CONFIG, 0)], [np.zeros((32, 250), np.int32)])
