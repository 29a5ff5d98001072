"""LoRA: the merge math, PEFT interop both ways against PEFT + transformers (code nobody here wrote), adapters that
do not fit, switching adapters in a Generator, and the training command line (adapters only in checkpoints,
resume, export, generation with --adapter)."""

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from convert import convert_to_orbax
from csm_jax.core.config import preset
from csm_jax.core.errors import UserError
from csm_jax.core.lora import TARGETS, LoraSpec, delta, init_adapters, input_axes, merge
from csm_jax.core.quant import quantize_int8
from csm_jax.io.adapters import AdapterError, load_adapter, merged_params, save_adapter
from csm_jax.io.checkpoint import abstract_model, load_model, save_model
from tests.helpers import HANG_SECONDS, assert_close_to_scale, logits_inputs, our_logits
from tests.references import transformers_logits, transformers_model

ROOT = Path(__file__).resolve().parents[1]
# float32 logits through the adapted backbone and depth decoder: measured max |diff| / max |logit| of
# 0.9e-6 (export) and 1.3e-6 (import); the bound is 1e-5 of the largest logit.
RELATIVE = 1e-5
# float32 adapter gradients of the two forms, which sum in different orders: max |diff| / max |gradient| of each
# tensor measured at most 4.1e-6 (AMD EPYC, AVX2) and 2.8e-6 (another machine); the bound is 5e-5.
GRADIENT_TOLERANCE = 5e-5
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_params(model, params: dict):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(nnx.graphdef(model), state)


def assert_relative_close(got, want):
    for g, w in zip(got, want):
        assert np.abs(w).max() > 1, "reference logits should be of order 1 for the tolerance to mean anything"
        assert_close_to_scale(g, w, RELATIVE)


def random_adapter(params: dict, spec: LoraSpec, seed: int = 0) -> dict:
    """PEFT's init for a, and a random non-zero b (a trained adapter, not the zero one training starts from)."""
    weights = init_adapters(jax.random.key(seed), params, spec)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) if x.any() else rng.normal(0, 0.2, x.shape).astype(np.float32),
                        weights)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(transformers CSM, our model converted from its checkpoint, config, inputs) at random float32 weights."""
    config = preset("tiny")
    hf = transformers_model(config, seed=3)
    src = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(src)
    ours = load_model(convert_to_orbax(src, src.parent / f"{src.name}_orbax"))
    return hf, ours, config, logits_inputs(np.random.default_rng(0), config)


def test_merge_is_w_plus_scaled_product_and_int8_is_per_channel():
    rng = np.random.default_rng(0)
    params = params_of(abstract_model(preset("tiny")))
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    spec = LoraSpec(rank=3, alpha=6.0, targets=("q", "o"), stacks=("decoder",))
    weights = random_adapter(params, spec)
    merged = merge(params, weights, spec)
    a, b = weights["decoder"]["o"]["a"], weights["decoder"]["o"]["b"]  # (L, H, hd, r), (L, r, D)
    want = params["decoder"]["blocks"]["attn"]["wo"] + 2.0 * np.einsum("lhdr,lre->lhde", a, b)
    assert_close_to_scale(merged["decoder"]["blocks"]["attn"]["wo"], want, 1e-6)  # float32, measured 3.2e-8
    assert merged["backbone"]["blocks"]["attn"]["wq"] is params["backbone"]["blocks"]["attn"]["wq"]
    assert delta(weights["decoder"]["q"]["a"], weights["decoder"]["q"]["b"]).shape == \
        params["decoder"]["blocks"]["attn"]["wq"].shape

    w = params["backbone"]["blocks"]["attn"]["wo"]  # (L, H, hd, D): input axes H, hd
    q = quantize_int8(jnp.asarray(w), input_axes("o"))
    assert q.values.dtype == jnp.int8 and q.scale.shape == (w.shape[0], 1, 1, w.shape[-1])
    err = np.abs(np.asarray(q.dequantize()) - w).max(axis=(1, 2), keepdims=True)
    assert (err <= np.asarray(q.scale) / 2 + 1e-6).all()  # rounding error at most half a step per channel


@pytest.mark.parametrize("base_dtype", ["float32", "int8", "int4"])
def test_training_form_equals_the_merged_weights_and_skips_the_full_weight_gradient(base_dtype):
    """The step's `LoraWeight` form (x @ W + scale * (x @ a) @ b) gives the loss and adapter gradients of the merged
    W + scale * a @ b, and its compiled gradient does fewer FLOPs, because no full-size dW = x^T dy is formed."""
    from csm_jax.core.sharding import make_mesh
    from tests.helpers import utterance_batch
    from train.lora import LoraConfig, LoraTrainer
    from train.trainer import OptimConfig

    config = preset("tiny")
    trainer = LoraTrainer(config, OptimConfig(), make_mesh(-1, 1, 1), LoraConfig(rank=2, alpha=4.0,
                          base_dtype=base_dtype), compute_dtype=jnp.float32)
    trainer.init_state(0)
    adapters = random_adapter(params_of(abstract_model(config)), trainer.spec)
    tokens, mask = utterance_batch(np.random.default_rng(0), config, 2, 4, 12)
    micro = {"tokens": jnp.asarray(tokens, jnp.int32), "mask": jnp.asarray(mask),
             "segment_ids": jnp.ones((2, 16), jnp.int32)}
    key = jax.random.key(0)

    def loss(form):
        def f(adapters):  # the form is chosen when traced
            trainer.model_params = lambda p, frozen, k: form(frozen, p, trainer.spec)
            return trainer._loss(adapters, micro, key, trainer.frozen)[0]
        return jax.jit(jax.value_and_grad(f))

    from csm_jax.core.lora import adapted
    by_form = {form: loss(form) for form in (adapted, merge)}
    (l_adapted, g_adapted), (l_merged, g_merged) = (f(adapters) for f in by_form.values())
    assert float(l_adapted) == pytest.approx(float(l_merged), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g_adapted), jax.tree.leaves(g_merged)):
        assert_close_to_scale(a, b, GRADIENT_TOLERANCE)
    flops = {form: f.lower(adapters).compile().cost_analysis()["flops"] for form, f in by_form.items()}
    assert flops[adapted] < flops[merge], flops


def test_exported_adapter_loads_in_peft_and_matches_our_merged_model(reference, tmp_path):
    hf, ours, config, (tokens, mask, codes) = reference
    spec = LoraSpec(rank=4, alpha=8.0, targets=tuple(TARGETS))  # both stacks, every projection
    weights = random_adapter(params_of(ours), spec, seed=1)
    path = save_adapter(tmp_path / "adapter", weights, spec, config)
    assert json.loads((path / "adapter_config.json").read_text())["target_modules"].startswith("(backbone_model|")

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(path)).eval()
    adapted = peft_model.get_base_model()
    lora_layers = [n for n, _ in adapted.named_modules() if n.endswith("lora_A.default")]
    assert len(lora_layers) == 7 * (config.backbone.num_layers + config.decoder.num_layers)
    assert not any("codec_model" in n for n in lora_layers)
    want = transformers_logits(adapted, tokens, mask, codes)[:2]
    base = transformers_logits(hf, tokens, mask, codes)[:2]
    assert np.abs(want[0] - base[0]).max() > 0.1  # the adapter changes the model: the comparison means something

    merged = with_params(ours, merged_params(params_of(ours), load_adapter(path, config)))
    assert_relative_close(our_logits(merged, tokens, mask, codes), want)


def test_peft_adapter_imports_and_matches_peft(reference, tmp_path, caplog):
    """An adapter trained with PEFT in PyTorch, with the plain module names people use (so it also wraps the Mimi
    codec, whose LoRA keys we skip with a warning), rsLoRA scaling and non-zero B."""
    hf, ours, config, (tokens, mask, codes) = reference
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, use_rslora=True)
    peft_model = peft.get_peft_model(copy.deepcopy(hf), lora)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "peft")
    adapted = peft_model.eval().get_base_model()
    want = transformers_logits(adapted, tokens, mask, codes)[:2]
    assert np.abs(want[1] - transformers_logits(hf, tokens, mask, codes)[1]).max() > 0.1

    with caplog.at_level(logging.WARNING):
        adapter = load_adapter(tmp_path / "peft", config)
    assert "Mimi codec" in caplog.text
    assert adapter.spec.rslora and adapter.spec.scale == 4.0 and adapter.config is None
    merged = with_params(ours, merged_params(params_of(ours), adapter))
    assert_relative_close(our_logits(merged, tokens, mask, codes), want)

    with pytest.raises(AdapterError, match="does not fit the base model"):
        load_adapter(tmp_path / "peft", preset("tiny_odd"))


def test_adapter_for_another_model_is_a_user_error(tmp_path):
    config = preset("tiny")
    spec = LoraSpec(rank=2)
    weights = init_adapters(jax.random.key(0), params_of(abstract_model(config)), spec)
    path = save_adapter(tmp_path / "a", weights, spec, config)
    with pytest.raises(AdapterError, match="trained for another model"):
        load_adapter(path, preset("tiny_odd"))
    with pytest.raises(AdapterError, match="not a LoRA adapter directory"):
        load_adapter(tmp_path, config)
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        load_adapter(path, config)
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    with pytest.raises(AdapterError, match="adapter_config.json .JSONDecodeError.*export or download the adapter"):
        load_adapter(path, config)


def test_generator_switches_adapters_over_its_kept_base(tmp_path):
    from csm_jax.core.model import Csm
    from csm_jax.inference.decode_model import decode_model
    from csm_jax.inference.generator import Generator
    from csm_jax.io.text import load_tokenizer

    config = preset("tiny_full_vocab")
    model = Csm(config, rngs=nnx.Rngs(0))
    spec = LoraSpec(rank=2, targets=("q", "down"))
    path = save_adapter(tmp_path / "a", random_adapter(params_of(model), spec), spec, config)
    tokenizer = load_tokenizer()

    def decoded(m):
        return jax.tree.leaves(nnx.state(decode_model(m), nnx.Param))

    def assert_decodes_with(generator, m):
        for got, want in zip(jax.tree.leaves(nnx.state(generator.frames.model, nnx.Param)), decoded(m)):
            np.testing.assert_array_equal(got, want)

    generator = Generator(model, tokenizer, mimi=None, adapter=path)
    merged = with_params(model, merged_params(params_of(model), load_adapter(path, config)))
    assert_decodes_with(generator, merged)
    generator.use_adapter(None)
    assert_decodes_with(generator, model)
    generator.use_adapter(path)
    assert_decodes_with(generator, merged)
    with pytest.raises(AdapterError, match="keep_base=True"):
        Generator(model, tokenizer, mimi=None).use_adapter(path)


def test_cli_trains_adapters_only_resumes_exports_and_generates(shards, tmp_path):
    from csm_jax.core.model import Csm
    from tests.helpers import run_train

    config = preset("tiny_full_vocab")
    base = save_model(Csm(config, rngs=nnx.Rngs(0)), tmp_path / "base")
    work = tmp_path / "run"
    common = [f"data.source={shards}", f"init={base}", f"workdir={work}", "log_every=1", "save_every=2",
              "lora.rank=4", "lora.alpha=8", "lora.targets=q,v,down"]
    run_train(*common, "steps=2")
    run_train(*common, "steps=4")  # resumes from the step-2 checkpoint
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    import orbax.checkpoint as ocp
    tree = ocp.PyTreeCheckpointer().metadata(work / "checkpoints" / "4" / "state").item_metadata.tree
    assert {s: set(t) for s, t in tree["params"].items()} == {"backbone": {"q", "v", "down"},
                                                             "decoder": {"q", "v", "down"}}

    adapter = load_adapter(work / "adapter", config)
    assert adapter.metadata["step"] == 4 and adapter.metadata["base"]["path"] == str(base.absolute())
    assert max(np.abs(t["b"]).max() for s in adapter.weights.values() for t in s.values()) > 0
    base_params = params_of(load_model(base))
    want = jax.tree.leaves(merged_params(base_params, adapter))
    for got, w in zip(jax.tree.leaves(params_of(load_model(work / "export"))), want):
        assert_close_to_scale(got, w, 1e-5)  # the same float32 merge: measured equal

    other = save_model(Csm(config, rngs=nnx.Rngs(1)), tmp_path / "other")
    out = subprocess.run([sys.executable, "-m", "train", "--config", "train/configs/smoke.py", *common,
                          f"init={other}", "steps=6"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert out.returncode == 2 and "error: the checkpoints were trained over the base" in out.stderr, out.stderr[-2000:]

    wav = tmp_path / "out.wav"
    out = subprocess.run([sys.executable, "-m", "csm_jax.generate", "--checkpoint", str(base), "--adapter",
                          str(work / "adapter"), "--mimi", "random", "--text", "Hi.", "--max-audio-length-ms", "160",
                          "--no-watermark", "--out", str(wav)], cwd=ROOT, capture_output=True, text=True,
                         timeout=HANG_SECONDS)
    assert out.returncode == 0 and wav.exists(), out.stderr[-3000:]
