"""Every compiled program of csm_jax lowers for the accelerators, checked on the CPU: the prefill, the frame loop
(bfloat16 and int8 weights), the training step and the LoRA step of a tiny bfloat16 model are exported with
`jax.export` for CUDA and TPU together, as a GPU or TPU machine would trace them (decode layout without the CPU
kernels, cuDNN attention in the CUDA branch), so that a lowering error shows up here and not on the rare GPU."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import export

from csm_jax.core.config import preset
from csm_jax.core.model import Csm
from csm_jax.core.sharding import make_mesh
from csm_jax.inference import loop
from csm_jax.inference.sampling import FrameSampling

PLATFORMS = ("cuda", "tpu")
CONFIG = preset("tiny")  # head sizes 16 and 8: cuDNN attention takes both
PROMPT, FRAMES = 16, 8
CUDNN_CALL = "__cudnn$fmha"
# cuDNN's attention calls carry no serialization compatibility guarantee; what is checked here is that they lower
CUDNN_TARGETS = [f"__cudnn$fmhaScaleBiasSoftmax{part}" for part in ("", "Backward")]


class CudnnVersions:
    """jaxlib's CUDA plugin version queries, as far as tracing cuDNN attention asks them: a cuDNN 9 (the plugin
    needs one)."""

    @staticmethod
    def cudnn_get_version() -> int:
        return 90800


@pytest.fixture(autouse=True)
def cudnn_traceable(monkeypatch):
    """This jaxlib as one with its CUDA plugin: tracing cuDNN attention asks the plugin for cuDNN's version."""
    from jax._src import lib
    from jax._src.cudnn import fused_attention_stablehlo

    if lib.cuda_versions is None:
        monkeypatch.setattr(lib, "cuda_versions", CudnnVersions)
        monkeypatch.setattr(fused_attention_stablehlo, "cuda_versions", CudnnVersions)


def lowered(fn, *args, **kwargs) -> export.Exported:
    """`fn` (a jitted function) exported for CUDA and TPU; checks that it holds none of the CPU kernels."""
    unstable = [export.DisabledSafetyCheck.custom_call(target) for target in CUDNN_TARGETS]
    exported = export.export(fn, platforms=PLATFORMS, disabled_checks=unstable)(*args, **kwargs)
    text = exported.mlir_module()
    assert exported.platforms == PLATFORMS
    assert "csm_matvec" not in text and "csm_sample" not in text  # CPU-only FFI kernels
    return exported


def decode_layout(dtype=jnp.bfloat16, weights_dtype=None) -> loop.FrameGenerator:
    """The frame generator of a tiny model in the decode layout a GPU or TPU uses (no CPU kernels), abstract:
    shapes and dtypes only, which is all an export needs."""
    from csm_jax.inference.decode_model import decode_model

    layout = nnx.eval_shape(lambda: decode_model(Csm(CONFIG, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)),
                                                 cpu_kernels=False, weights_dtype=weights_dtype))
    return loop.FrameGenerator(layout)


def prefill_args(frames: loop.FrameGenerator):
    n = CONFIG.num_codebooks
    tokens = jax.ShapeDtypeStruct((2, PROMPT, n + 1), jnp.int32)
    mask = jax.ShapeDtypeStruct((2, PROMPT, n + 1), jnp.bool_)
    segment_ids = jax.ShapeDtypeStruct((2, PROMPT), jnp.int32)
    keys = jax.vmap(jax.random.key)(jnp.arange(2, dtype=jnp.uint32))
    return frames.graphdef, frames.params, tokens, mask, segment_ids, keys, FRAMES


def test_the_prefill_lowers_with_cudnn_attention_for_cuda_and_xla_for_tpu():
    frames = decode_layout()
    both = lowered(loop._prefill, *prefill_args(frames), frame_capacity=FRAMES)
    assert CUDNN_CALL in both.mlir_module()
    tpu = export.export(loop._prefill, platforms=["tpu"])(*prefill_args(frames), frame_capacity=FRAMES)
    assert CUDNN_CALL not in tpu.mlir_module()


@pytest.mark.parametrize("weights_dtype", [None, "int8"])
def test_the_frame_loop_lowers(weights_dtype):
    frames = decode_layout(weights_dtype=weights_dtype)
    graphdef, params, *args = prefill_args(frames)
    state = jax.eval_shape(functools.partial(loop._prefill, graphdef, frame_capacity=FRAMES), params, *args)
    exported = lowered(loop._run_until, graphdef, params, state, jnp.int32(FRAMES), FrameSampling(), None)
    assert CUDNN_CALL in exported.mlir_module()  # the depth decoder's first step attends over 2 positions


def train_batch(accumulation: int = 2, rows: int = 2, length: int = 16) -> dict:
    n = CONFIG.num_codebooks
    shape = (accumulation, rows, length)
    return {"tokens": jax.ShapeDtypeStruct((*shape, n + 1), jnp.int32),
            "mask": jax.ShapeDtypeStruct((*shape, n + 1), jnp.bool_),
            "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct(shape, jnp.bool_)}


def test_the_training_step_lowers():
    from train.trainer import OptimConfig, Trainer

    trainer = Trainer(CONFIG, OptimConfig(accumulation=2), make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                      compute_dtype=jnp.bfloat16, remat="dots")
    assert CUDNN_CALL in lowered(trainer._step, trainer.abstract_state, train_batch(), None).mlir_module()


@pytest.mark.parametrize("base_dtype", ["bfloat16", "int8"])
def test_the_lora_step_lowers(base_dtype):
    from train.lora import LoraConfig, LoraTrainer
    from train.trainer import OptimConfig

    trainer = LoraTrainer(CONFIG, OptimConfig(accumulation=2), make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                          LoraConfig(rank=2, alpha=4.0, base_dtype=base_dtype), compute_dtype=jnp.bfloat16)
    params = nnx.to_pure_dict(nnx.state(trainer.abstract, nnx.Param))
    frozen = jax.eval_shape(trainer._freeze, params)
    assert CUDNN_CALL in lowered(trainer._step, trainer.abstract_state, train_batch(), frozen).mlir_module()


def test_float32_attention_stays_with_xla_everywhere():
    frames = decode_layout(jnp.float32)  # cuDNN's flash attention does not take float32
    text = lowered(loop._prefill, *prefill_args(frames), frame_capacity=FRAMES).mlir_module()
    assert CUDNN_CALL not in text
