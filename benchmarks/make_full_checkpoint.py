"""Writes a random full-size CSM-1B checkpoint (1,552,791,552 parameters) for conversion benchmarks.

    python -m benchmarks.make_full_checkpoint /tmp/csm-full --layout both

Tensors are drawn and streamed into safetensors one at a time (no torch model in memory), in the same key
order and names as the real releases: DIR/original (config.json with flavors + model.safetensors) and/or
DIR/transformers (config.json + model.safetensors, with both tied audio-embedding keys). Float32: 6.2 GB each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from flax import nnx

from convert.io import write_safetensors
from convert.layouts import DTYPES, LAYOUTS, TRANSFORMS, Layout, target_shape
from csm_jax.io.checkpoint import abstract_model
from csm_jax.core.config import CsmConfig, preset


def random_tensor(shape: tuple[int, ...], dtype: np.dtype, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if len(shape) == 1:  # norm scales
        return np.ones(shape, dtype)
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype, copy=False)


def write_layout(directory: Path, layout: Layout, config: CsmConfig, dtype: np.dtype) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    targets = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    specs = []
    for i, (key, rule, _) in enumerate(layout.expected_keys(config)):
        shape = TRANSFORMS[rule.transform].torch_shape(target_shape(targets, rule))
        specs.append((key, shape, dtype, lambda shape=shape, i=i: random_tensor(shape, dtype, i)))
    for alias, primary in layout.tied.items():
        specs.append((alias, *next(s[1:] for s in specs if s[0] == primary)))
    write_safetensors(directory / "model.safetensors", specs)
    config_json = config.to_original() if layout.name == "original" else config.to_transformers()
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layout", choices=[*LAYOUTS, "both"], default="both")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = p.parse_args()
    config = preset("csm_1b")
    for name in LAYOUTS if args.layout == "both" else [args.layout]:
        start = time.perf_counter()
        write_layout(args.out / name, LAYOUTS[name], config, DTYPES[args.dtype])
        size = (args.out / name / "model.safetensors").stat().st_size
        print(f"{args.out / name}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
