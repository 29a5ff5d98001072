"""The training run's configuration: one frozen dataclass tree, read from a Python config file
(`train/configs/*.py`, each with `get_config()`) and overridden from the command line with `a.b=value`."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from train.data import DataConfig
from train.trainer import OptimConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "csm_1b"  # a CsmConfig preset name
    init: str | None = None  # an inference checkpoint (python -m convert output) to start from; None = random
    workdir: str = "runs/default"  # checkpoints/, metrics.jsonl, tensorboard/ and export/ go here
    steps: int = 1000
    mesh: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
    compute_dtype: str = "bfloat16"
    remat: str = "none"  # activation rematerialisation per block: none | full | dots (see Trainer)
    mimi: str | None = None  # Mimi weights (file or hub id); "random" for smoke runs without downloads
    tokenizer: str | None = None  # None = the offline Llama-3 tokenizer from llama-models
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 0  # 0 = no eval
    eval_source: str = ""  # held-out shards
    eval_batches: int = 4
    seed: int = 0
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    cfg = TrainConfig()
    if path is not None:
        spec = importlib.util.spec_from_file_location("csm_train_config", path)
        if spec is None:
            raise FileNotFoundError(f"config file {path} not found")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = module.get_config()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. optim.learning_rate=1e-4)")
        cfg = _replace(cfg, key.split("."), value, item)
    return cfg


def _replace(obj: Any, path: list[str], value: str, item: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise ValueError(f"override {item!r}: {type(obj).__name__} has no field {path[0]!r}; fields: "
                         f"{', '.join(sorted(names))}")
    current = getattr(obj, path[0])
    if len(path) > 1:
        return dataclasses.replace(obj, **{path[0]: _replace(current, path[1:], value, item)})
    return dataclasses.replace(obj, **{path[0]: _parse(value, current)})


def _parse(value: str, current: Any) -> Any:
    if isinstance(current, str) or (current is None and not value[:1].isdigit() and value != "None"):
        return value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    return tuple(parsed) if isinstance(current, tuple) and isinstance(parsed, (list, tuple)) else parsed
