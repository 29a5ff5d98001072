"""The converter: key tables, bit-exact round trips through Orbax, other layouts' exports loaded by their own
libraries, and every way a checkpoint can be broken (parity of the converted models: test_model_parity.py)."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from convert import ConversionError, LayoutError, convert_to_orbax, export_checkpoint
from convert.__main__ import main
from convert.layouts import LAYOUTS, TRANSFORMS, stack_config
from csm_jax.io.checkpoint import CheckpointError, abstract_model, load_model, read_metadata
from csm_jax.core.config import ConfigError, preset
from tests.helpers import assert_close_to_scale, logits_inputs
from tests.references import original_model, save_original, transformers_logits, transformers_model


def leaves(model) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


def assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.fixture
def original_tiny(tmp_path):
    model = original_model(preset("tiny"), seed=4)
    return save_original(model, tmp_path / "original", "safetensors"), model


# ---- the key tables ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", ["tiny", "tiny_odd"])
def test_layout_fills_every_parameter_once_and_transforms_invert(layout, name, rng):
    config = preset(name)
    skeleton = leaves_of_abstract(config)
    filled = {}
    for key, rule, layer in LAYOUTS[layout].expected_keys(config):
        path = "".join(f"['{p}']" for p in rule.target)
        filled.setdefault(path, []).append(layer)
        shape = skeleton[path][1:] if rule.stack else skeleton[path]
        transform, stack = TRANSFORMS[rule.transform], stack_config(config, rule.stack)
        torch_side = rng.normal(size=transform.torch_shape(shape)).astype(np.float32)
        ours = transform.to_nnx(torch_side, stack)
        assert ours.shape == shape, key
        np.testing.assert_array_equal(transform.to_torch(ours, stack), torch_side)
    assert sorted(filled) == sorted(skeleton)
    for path, layers in filled.items():
        assert sorted(layers, key=str) == ([None] if layers == [None] else list(range(skeleton[path][0]))), path


def leaves_of_abstract(config):
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param)))[0]
    return {jax.tree_util.keystr(path): tuple(x.shape) for path, x in flat}


# ---- round trips -----------------------------------------------------------------------------------------------

def test_transformers_round_trip_is_bit_exact_and_loads_in_transformers(hf_tiny, hf_tiny_orbax, tmp_path, rng):
    from transformers import CsmForConditionalGeneration, MimiModel

    src, reference = hf_tiny
    out = export_checkpoint(hf_tiny_orbax, tmp_path / "hf", "transformers")
    assert_same_tensors(load_file(out / "model.safetensors"), load_file(src / "model.safetensors"))
    assert read_metadata(hf_tiny_orbax)["codec"] == "codec"
    assert not MimiModel.from_pretrained(hf_tiny_orbax / "codec", output_loading_info=True)[1]["missing_keys"]

    loaded, info = CsmForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens, mask, codes = logits_inputs(rng, preset("tiny"), 2, 6)
    for got, want in zip(transformers_logits(loaded.eval(), tokens, mask, codes),
                         transformers_logits(reference, tokens, mask, codes)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_original_round_trip_is_bit_exact(fmt, tmp_path):
    model = original_model(preset("tiny"), seed=5)
    src = save_original(model, tmp_path / "src", fmt)
    out = export_checkpoint(convert_to_orbax(src, tmp_path / "orbax"), tmp_path / "back", "original")
    want = {k: v for k, v in model.state_dict().items() if not k.endswith("causal_mask")}
    assert_same_tensors(load_file(out / "model.safetensors"), want)
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_bfloat16_source_round_trips_and_dtype_casts(tmp_path):
    model = transformers_model(preset("tiny_odd"), seed=6).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    kept = convert_to_orbax(tmp_path / "src", tmp_path / "kept")
    assert read_metadata(kept)["dtype"] == "bfloat16"
    out = export_checkpoint(kept, tmp_path / "back", "transformers")
    assert_same_tensors(load_file(out / "model.safetensors"), load_file(tmp_path / "src" / "model.safetensors"))

    as_f32 = leaves(load_model(convert_to_orbax(tmp_path / "src", tmp_path / "f32", dtype="float32")))
    assert {x.dtype for x in as_f32.values()} == {np.dtype(np.float32)}
    for key, x in leaves(load_model(kept, dtype=ml_dtypes.bfloat16)).items():
        np.testing.assert_array_equal(x.astype(np.float32), as_f32[key])  # bf16 -> f32 is exact


def test_float32_to_bfloat16_rounds_like_ml_dtypes(hf_tiny, hf_tiny_orbax, tmp_path):
    f32 = leaves(load_model(hf_tiny_orbax))
    bf16 = convert_to_orbax(hf_tiny[0], tmp_path / "bf16", dtype="bfloat16")
    assert read_metadata(bf16)["dtype"] == "bfloat16"
    for key, x in leaves(load_model(bf16, dtype=ml_dtypes.bfloat16)).items():
        np.testing.assert_array_equal(x, f32[key].astype(ml_dtypes.bfloat16))


def test_sharded_checkpoint_converts_like_a_single_file(hf_tiny, hf_tiny_orbax, tmp_path):
    hf_tiny[1].save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = leaves(load_model(convert_to_orbax(tmp_path / "sharded", tmp_path / "orbax")))
    single = leaves(load_model(hf_tiny_orbax))
    assert sorted(sharded) == sorted(single)
    for key in single:
        np.testing.assert_array_equal(sharded[key], single[key])


def test_original_exported_to_transformers_matches_the_torchtune_reference(original_tiny, tmp_path, rng):
    """Across layouts: torchtune reference -> Orbax -> transformers layout -> transformers' own model. Without a
    codec in the source, transformers initialises `codec_model` itself and reports only those keys missing."""
    from transformers import CsmForConditionalGeneration

    src, reference = original_tiny
    out = export_checkpoint(convert_to_orbax(src, tmp_path / "orbax"), tmp_path / "hf", "transformers")
    loaded, info = CsmForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] and all(k.startswith("codec_model.") for k in info["missing_keys"])
    assert not info["unexpected_keys"]
    tokens, mask, codes = logits_inputs(rng, preset("tiny"), 2, 6)
    for got, want in zip(transformers_logits(loaded.eval(), tokens, mask, codes)[:2],
                         reference.logits(tokens, mask, codes)[:2]):
        assert_close_to_scale(got, want, 2e-5)  # float32, two implementations: measured 4.6e-7 of the largest


# ---- broken checkpoints --------------------------------------------------------------------------------------

def rewrite(src, dst, edit) -> None:
    """Copies a checkpoint directory, passing its tensors through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    save_file(edit(load_file(src / "model.safetensors")), dst / "model.safetensors")


def test_every_problem_is_reported_at_once(hf_tiny, tmp_path):
    def edit(t):
        del t["backbone_model.layers.1.mlp.up_proj.weight"]
        t["lm_head.weight"] = t["lm_head.weight"][:, :-1].contiguous()
        t["backbone_model.layers.7.mlp.up_proj.weight"] = t["backbone_model.layers.0.mlp.up_proj.weight"].clone()
        return t

    rewrite(hf_tiny[0], tmp_path / "bad", edit)
    with pytest.raises(ConversionError) as e:
        convert_to_orbax(tmp_path / "bad", tmp_path / "out")
    message = str(e.value)
    assert "1 missing tensor(s): backbone_model.layers.1.mlp.up_proj.weight" in message
    assert "lm_head.weight: shape (67, 63), expected (67, 64)" in message
    assert ("1 unexpected tensor(s): backbone_model.layers.7.mlp.up_proj.weight (the config's backbone has 3 "
            "layers)") in message
    assert "--config" in message and not (tmp_path / "out").exists()


def test_config_that_does_not_fit_the_weights(hf_tiny, tmp_path):
    (tmp_path / "odd.json").write_text(json.dumps(preset("tiny_odd").to_dict()))
    with pytest.raises(ConversionError, match=r"(?s)missing tensor.*wrong shape.*unexpected tensor"):
        convert_to_orbax(hf_tiny[0], tmp_path / "out", config=tmp_path / "odd.json")


def test_unknown_layout_is_named(tmp_path):
    (tmp_path / "src").mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text(json.dumps(preset("tiny").to_original()))
    with pytest.raises(LayoutError, match=r"not a CSM checkpoint.*found model\.embed_tokens\.weight.*prefix"):
        convert_to_orbax(tmp_path / "src", tmp_path / "out")


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_truncated_file_is_called_truncated(fmt, tmp_path):
    src = save_original(original_model(preset("tiny"), seed=7), tmp_path / "src", fmt)
    weights = src / ("ckpt.pt" if fmt == "pt" else "model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConversionError, match=rf"could not read .*{weights.name}.*truncated or corrupt"):
        convert_to_orbax(src, tmp_path / "out")


def test_tied_copies_must_agree(hf_tiny, tmp_path):
    def edit(t):
        t["backbone_model.embed_tokens.embed_audio_tokens.weight"] = t["depth_decoder.model.embed_tokens.weight"] + 1
        return t

    rewrite(hf_tiny[0], tmp_path / "bad", edit)
    with pytest.raises(ConversionError, match="should be one tied tensor but differ"):
        convert_to_orbax(tmp_path / "bad", tmp_path / "out")


def test_missing_config_and_bad_requests_explain_the_fix(original_tiny, hf_tiny_orbax, tmp_path):
    src, _ = original_tiny
    (src / "config.json").unlink()
    with pytest.raises(ConversionError, match="no config.json.*--config"):
        convert_to_orbax(src, tmp_path / "out")
    assert read_metadata(convert_to_orbax(src, tmp_path / "out", config="tiny"))["layout"] == "original"
    with pytest.raises(ConversionError, match="does not exist"):
        convert_to_orbax(tmp_path / "nowhere", tmp_path / "out2")
    with pytest.raises(CheckpointError, match="not a csm-jax checkpoint.*python -m convert"):
        export_checkpoint(src, tmp_path / "out3", "transformers")
    odd = tmp_path / "odd"
    shutil.copytree(hf_tiny_orbax, odd)
    (odd / "config.json").write_text(json.dumps(preset("tiny_odd").to_dict()))
    with pytest.raises(ConfigError, match="cannot be written in the original layout"):
        export_checkpoint(odd, tmp_path / "out4", "original")


def test_interrupted_conversion_leaves_no_checkpoint(hf_tiny, hf_tiny_orbax, tmp_path, monkeypatch):
    import convert.from_torch

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.from_torch, "write_config_and_metadata", fail)
    with pytest.raises(KeyboardInterrupt):
        convert_to_orbax(hf_tiny[0], tmp_path / "new")
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "existing"
    shutil.copytree(hf_tiny_orbax, existing)
    with pytest.raises(KeyboardInterrupt):
        convert_to_orbax(hf_tiny[0], existing, dtype="bfloat16", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert read_metadata(existing)["dtype"] == "float32"  # the old checkpoint is untouched


# ---- sources and the command line ----------------------------------------------------------------------------

def test_hub_repo_id_downloads_then_takes_the_local_path(hf_tiny, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(hf_tiny[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    out = convert_to_orbax("sesame/csm-1b", tmp_path / "out")
    assert read_metadata(out)["source"] == "sesame/csm-1b"
    assert calls[0][0] == "sesame/csm-1b"
    assert {"config.json", "*.safetensors", "model.safetensors.index.json", "ckpt.pt"} <= set(calls[0][1])


def test_command_line(hf_tiny, tmp_path, capsys):
    assert main([str(hf_tiny[0]), str(tmp_path / "orbax"), "--dtype", "bfloat16"]) == 0
    assert "transformers layout, float32 -> bfloat16" in capsys.readouterr().out
    assert main([str(tmp_path / "orbax"), str(tmp_path / "orig"), "--to", "original"]) == 0
    assert {v.dtype for v in load_file(tmp_path / "orig" / "model.safetensors").values()} == {torch.bfloat16}
    assert main([str(tmp_path / "orig"), str(tmp_path / "again"), "--to", "transformers"]) == 2
    assert "not a csm-jax checkpoint" in capsys.readouterr().err
