"""The fine-tuning guide's flows (docs/guides/fine-tuning.md), as command lines, over checkpoints whose config is
none of our presets: transformers' own `CsmConfig` defaults changed only in their sizes (so its depth decoder says
max_position_embeddings=33) and Sesame's original layout (torchtune flavors, max_seq_len 2048 in both stacks).
`init=` alone gives the model; every artifact records the base's config; exports carry the base's Mimi codec back
to transformers; adapters load on the base they were trained on, in csm-jax (`generate --adapter`) and in PEFT."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from csm_jax.core.config import CsmConfig
from csm_jax.io.adapters import load_adapter, merged_params
from csm_jax.io.checkpoint import load_model, read_config, read_metadata
from tests.helpers import ROOT, logits_inputs, our_logits
from tests.references import (OriginalCsm, original_model, redraw_weights, save_original, small_mimi_config,
                              transformers_logits)

# transformers' CsmConfig with every size made tiny and nothing else changed (vocabularies, rope, eps, cache
# lengths stay its defaults); head_dim is a size too (its default is 64)
BACKBONE_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16)
DEPTH_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, backbone_hidden_size=64)
# Sesame's original config.json with torchtune llama3_2 flavors of the same sizes (its defaults elsewhere)
ORIGINAL = {"backbone_flavor": dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128),
            "decoder_flavor": dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64),
            "text_vocab_size": 128_256, "audio_vocab_size": 2051, "audio_num_codebooks": 32}
# the fine-tuning guide's own-voice recipes, shrunk to two offline steps on the test shards' Mimi codes
SHORT_RUN = ["mimi=random", "steps=2", "save_every=2", "log_every=1", "eval_every=0", "sample_every=0",
             "compute_dtype=float32", "optim.warmup_steps=0", "data.max_frames=128", "data.batch_size=2",
             "data.shuffle_window=4", "data.packing_bins=2"]
# float32 logits of the adapted model, ours against PEFT + transformers (or torchtune): bound 1e-5 of the largest
# logit, as in tests/test_lora.py
RELATIVE = 1e-5


def run(*args: str) -> subprocess.CompletedProcess:
    """`python -m ...` from the repository root; asserts exit 0."""
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def train(recipe: str, init, data, workdir, *overrides: str):
    run("train", "--config", f"train/configs/{recipe}.py", f"init={init}", f"data.source={data}",
        f"workdir={workdir}", *SHORT_RUN, *overrides)
    return workdir


def assert_close_to_scale(got, want):
    for g, w in zip(got, want):
        scale = np.abs(w).max()
        assert scale > 1, "reference logits should be of order 1 for the bound to mean anything"
        np.testing.assert_allclose(g, w, rtol=0, atol=RELATIVE * scale)


def params_of(model) -> dict:
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_adapter(base, adapter):
    from flax import nnx

    state = nnx.state(base, nnx.Param)
    nnx.replace_by_pure_dict(state, merged_params(params_of(base), adapter))
    return nnx.merge(nnx.graphdef(base), state)


def assert_records(workdir, config: CsmConfig):
    """The export's config.json and the training checkpoints' meta are the base's config, exactly."""
    import orbax.checkpoint as ocp

    assert read_config(workdir / "export") == config
    meta = ocp.JsonCheckpointHandler().restore(workdir / "checkpoints" / "2" / "meta")
    assert CsmConfig.from_dict(meta["model"]) == config


def test_model_differences_leave_out_cache_lengths_and_compare_rope_maps(tmp_path):
    import dataclasses

    import jax
    from flax import nnx

    from csm_jax.core.config import RopeScaling, preset
    from csm_jax.core.lora import LoraSpec, init_adapters
    from csm_jax.io.adapters import save_adapter
    from csm_jax.io.checkpoint import abstract_model

    ours = preset("tiny_full_vocab")
    transformers_spelling = dataclasses.replace(  # transformers' llama3 numbers for the same frequencies
        ours, decoder=dataclasses.replace(ours.decoder, max_seq_len=33,
                                          rope_scaling=RopeScaling(32.0, 0.125, 0.5, 1024)))
    assert ours.differences(transformers_spelling) == []
    no_scaling = dataclasses.replace(ours, decoder=dataclasses.replace(ours.decoder, rope_scaling=None, dim=64))
    assert ours.differences(no_scaling, shapes_only=True) == ["decoder.dim: 32 != 64"]
    assert ours.differences(no_scaling)[1].startswith("decoder.rope_scaling: {'factor': 32.0")

    spec = LoraSpec(rank=2)
    weights = init_adapters(jax.random.key(0), nnx.to_pure_dict(nnx.state(abstract_model(ours), nnx.Param)), spec)
    adapter = save_adapter(tmp_path / "a", weights, spec, ours)
    assert load_adapter(adapter, transformers_spelling).config == ours  # a cache length is no other model


@pytest.fixture(scope="module")
def prepared(shards, tmp_path_factory):
    """The test shards' Mimi codes (random Mimi), computed once for every run here."""
    from train.prepare import main

    out = tmp_path_factory.mktemp("prepared")
    assert main([str(shards), str(out), "--mimi", "random"]) == 0
    return out


@pytest.fixture(scope="module")
def hf_default(tmp_path_factory):
    """transformers' default CSM at tiny sizes, randomly initialised (weights redrawn to order-1 logits) and saved
    with save_pretrained; its Mimi codec is tiny too."""
    from transformers import CsmConfig as HfCsmConfig
    from transformers import CsmForConditionalGeneration

    torch.manual_seed(0)
    model = CsmForConditionalGeneration(HfCsmConfig(**BACKBONE_SIZES, depth_decoder_config=DEPTH_SIZES,
                                                    codec_config=small_mimi_config()))
    redraw_weights(model, seed=0)
    path = tmp_path_factory.mktemp("hf_default") / "hf"
    model.save_pretrained(path)
    return path, model.eval()


@pytest.fixture(scope="module")
def hf_ckpt(hf_default):
    out = hf_default[0].parent / "ckpt"
    run("convert", str(hf_default[0]), str(out))
    return out


def test_init_gives_the_model_and_a_preset_that_disagrees_is_named(hf_ckpt, tmp_path):
    from train.config import TrainConfigError, load_config, resolve_model

    config = read_config(hf_ckpt)
    assert (config.backbone.max_seq_len, config.decoder.max_seq_len) == (2048, 33)  # transformers' defaults
    assert config.backbone.rope_scaling is None and config.text_vocab_size == 128_256
    common = [f"init={hf_ckpt}", f"data.source={tmp_path}", f"workdir={tmp_path}"]
    assert resolve_model(load_config("train/configs/lora_voice.py", common)) == config
    with pytest.raises(TrainConfigError, match=r"model=tiny is another model than init=.* \(preset != checkpoint: "
                                               r"backbone.num_layers: 3 != 2; .*text_vocab_size: 300 != 128256"):
        resolve_model(load_config("train/configs/lora_voice.py", [*common, "model=tiny"]))


def test_full_fine_tune_goes_back_to_transformers_with_the_base_codec(hf_default, hf_ckpt, prepared, tmp_path):
    from transformers import CsmForConditionalGeneration

    work = train("full_voice", hf_ckpt, prepared, tmp_path / "run")
    assert_records(work, read_config(hf_ckpt))
    assert read_metadata(work / "export")["codec"] == "codec"
    run("convert", str(work / "export"), str(tmp_path / "hf"), "--to", "transformers")

    loaded, info = CsmForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    base = hf_default[1].codec_model.state_dict()
    got = loaded.codec_model.state_dict()
    assert set(got) == set(base)
    for key, value in base.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    inputs = logits_inputs(np.random.default_rng(0), read_config(hf_ckpt), 2, 6)
    want = transformers_logits(loaded.eval(), *inputs)[:2]
    assert np.abs(want[0] - transformers_logits(hf_default[1], *inputs)[0]).max() > 1e-3  # the steps changed it
    assert_close_to_scale(our_logits(load_model(work / "export"), *inputs), want)


def test_lora_adapter_generates_on_its_base_and_loads_in_peft(hf_default, hf_ckpt, prepared, tmp_path):
    import peft

    config = read_config(hf_ckpt)
    work = train("lora_voice", hf_ckpt, prepared, tmp_path / "run", "lora.rank=4", "lora.alpha=8",
                 "optim.learning_rate=3e-2")
    assert_records(work, config)
    adapter = load_adapter(work / "adapter", config)
    assert adapter.config == config  # max_seq_len 33 included: the base's, not a preset's
    assert (work / "export" / "codec" / "model.safetensors").read_bytes() == \
        (hf_ckpt / "codec" / "model.safetensors").read_bytes()
    wav = tmp_path / "out.wav"
    run("csm_jax.generate", "--checkpoint", str(hf_ckpt), "--adapter", str(work / "adapter"), "--mimi", "random",
        "--text", "Hi.", "--max-audio-length-ms", "160", "--no-watermark", "--out", str(wav))
    assert wav.stat().st_size > 44

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_default[1]), str(work / "adapter"))
    inputs = logits_inputs(np.random.default_rng(0), config, 2, 6)
    want = transformers_logits(peft_model.eval().get_base_model(), *inputs)[:2]
    assert np.abs(want[0] - transformers_logits(hf_default[1], *inputs)[0]).max() > 1e-3  # the adapter matters
    assert_close_to_scale(our_logits(with_adapter(load_model(hf_ckpt), adapter), *inputs), want)


def test_original_layout_lora_and_export_back(prepared, tmp_path):
    config = CsmConfig.from_original(ORIGINAL)
    src = save_original(original_model(config, seed=1), tmp_path / "original", "safetensors")
    ckpt = tmp_path / "ckpt"
    run("convert", str(src), str(ckpt))
    assert read_config(ckpt) == config and config.decoder.max_seq_len == 2048  # the flavors' default

    work = train("lora_voice", ckpt, prepared, tmp_path / "run", "lora.rank=4", "lora.alpha=8",
                 "optim.learning_rate=3e-2")
    assert_records(work, config)
    adapter = load_adapter(work / "adapter", config)  # what generate --adapter does over ckpt
    run("convert", str(work / "export"), str(tmp_path / "back"), "--to", "original")
    assert CsmConfig.from_json_file(tmp_path / "back" / "config.json") == config

    reference = OriginalCsm(config)
    missing, unexpected = reference.load_state_dict(load_file(tmp_path / "back" / "model.safetensors"), strict=False)
    assert not unexpected and all(k.endswith("causal_mask") for k in missing)
    inputs = logits_inputs(np.random.default_rng(0), config, 2, 6)
    want = reference.eval().logits(*inputs)[:2]
    assert np.abs(want[0] - original_model(config, seed=1).logits(*inputs)[0]).max() > 1e-3  # the adapter matters
    assert_close_to_scale(our_logits(with_adapter(load_model(ckpt), adapter), *inputs), want)
