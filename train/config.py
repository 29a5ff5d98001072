"""The training run's configuration: one frozen dataclass tree, read from a Python config file
(`train/configs/*.py`, each with `get_config()`) and overridden from the command line with `a.b=value`. A config file
may also define `finalize(cfg) -> TrainConfig`, applied after the overrides: a recipe's values that follow others
(the voice recipes cap their warm-up by `steps`).

Every value is checked against its field's type and range (`validate`) before anything is built, so a mistake
is one sentence naming the fix instead of an error deep in a compiled step.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
import os
import traceback
import types
import typing
from pathlib import Path
from typing import Any

from csm_jax.core.config import CsmConfig
from csm_jax.core.errors import UserError
from csm_jax.core.numbers import is_finite_number
from train.data import DataConfig
from train.lora import LoraConfig
from train.trainer import OptimConfig

EXAMPLE_CONFIG = "train/configs/smoke.py"
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("constant", "cosine")
LOSS_ON = ("target", "all")
DEFAULT_MODEL = "csm_1b"  # the preset of a run from scratch that names none


class TrainConfigError(UserError):
    """A config file, override or config value that cannot make a training run."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str | None = None  # a CsmConfig preset for a run from scratch; None = init's config, else csm_1b
    init: str | None = None  # an inference checkpoint (python -m convert output) to start from; None = random
    workdir: str = "runs/default"  # checkpoints/, metrics.jsonl, tensorboard/ and export/ go here
    steps: int = 1000  # optimizer steps of the run; the cosine schedule decays over them
    mesh: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
    compute_dtype: str = "bfloat16"
    remat: str = "none"  # activation rematerialisation per block: none | full | dots (see Trainer)
    mimi: str | None = None  # Mimi weights (file or hub id); "random" for smoke runs without downloads
    tokenizer: str | None = None  # None = the offline Llama-3 tokenizer from llama-models
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 0  # 0 = no eval
    eval_source: str = ""  # held-out data; empty = data.eval_fraction of data.source, split by example id
    eval_batches: int = 4
    eval_optional: bool = False  # held-out data too small for one eval batch: train without eval (a notice), not stop
    sample_every: int = 0  # speak sample_text with the current weights every N steps (and at step 0); 0 = off
    sample_text: str = "Hello! This is how my voice sounds after fine-tuning."
    sample_speaker: int = 0
    sample_context: str = ""  # optional: a clip (wav, flac, ...) of the voice, said before sample_text
    sample_context_text: str = ""  # what is said in sample_context
    sample_max_frames: int = 125  # 80 ms frames: 10 s
    sample_seed: int = 0
    seed: int = 0
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    lora: LoraConfig = LoraConfig()  # lora.rank > 0: train LoRA adapters over a frozen base (see train/lora.py)


# ---- reading -------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The config file's `get_config()` (or the defaults) with `key=value` overrides applied and type-checked."""
    cfg, finalize = (TrainConfig(), None) if path is None else _run_config_file(Path(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TrainConfigError(f"override {item!r} is not of the form key=value (e.g. optim.learning_rate=1e-4)")
        cfg = _replace(cfg, key.split("."), value, key)
    check_types(cfg)
    if finalize is not None:
        cfg = _returned(path, "finalize", _in_config_file(path, finalize, cfg))
        check_types(cfg)
    return cfg


def _run_config_file(path: Path):
    """(`get_config()`, the `finalize` function or None) of the config file `path`."""
    what = (f"a config file is a Python file whose get_config() returns a train.config.TrainConfig "
            f"(e.g. {EXAMPLE_CONFIG}); single fields are set on the command line as key=value")
    if path.suffix != ".py":
        raise TrainConfigError(f"--config {path} is not a Python config file: {what}")
    if not path.is_file():
        raise TrainConfigError(f"config file {path} does not exist; {what}")
    try:
        source = path.read_text()
        code = compile(source, str(path), "exec")
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes
        line = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
        raise TrainConfigError(f"config file {path} has a syntax error at{line}: {getattr(e, 'msg', e)}; fix the "
                               f"file (compare with {EXAMPLE_CONFIG})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TrainConfigError(f"config file {path} cannot be read ({e}); {what}") from None
    module = types.ModuleType("csm_train_config")
    module.__file__ = str(path)
    _in_config_file(path, exec, code, module.__dict__)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise TrainConfigError(f"config file {path} defines no get_config(); {what}")
    finalize = getattr(module, "finalize", None)
    return _returned(path, "get_config", _in_config_file(path, get_config)), finalize if callable(finalize) else None


def _in_config_file(path: Path, function, *args):
    """`function(*args)` of the config file `path`: a mistake in the file is a `TrainConfigError` naming its line."""
    try:
        return function(*args)
    except TrainConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a mistake in the user's file: name the line, not our stack
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
        where = f" (line {lines[-1]})" if lines else ""
        raise TrainConfigError(f"config file {path} failed{where}: {type(e).__name__}: {e}; fix the file "
                               f"(compare with {EXAMPLE_CONFIG})") from None


def _returned(path: Path, name: str, cfg) -> TrainConfig:
    if not isinstance(cfg, TrainConfig):
        raise TrainConfigError(f"{name}() in {path} returned {type(cfg).__name__}, not a TrainConfig; a config file "
                               f"is a Python file whose get_config() returns a train.config.TrainConfig (e.g. "
                               f"{EXAMPLE_CONFIG})")
    return cfg


def _replace(obj: Any, path: list[str], value: str, key: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    if path[0] not in hints:
        raise TrainConfigError(f"override {key}=...: {type(obj).__name__} has no field {path[0]!r}; fields: "
                               f"{', '.join(sorted(hints))}")
    current, hint = getattr(obj, path[0]), hints[path[0]]
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            single = key.rsplit(".", len(path) - 1)[0]
            raise TrainConfigError(f"override {key}=...: {single} is a single value, not a group; set it as "
                                   f"{single}=VALUE")
        return dataclasses.replace(obj, **{path[0]: _replace(current, path[1:], value, key)})
    if dataclasses.is_dataclass(current):
        fields = ", ".join(f"{key}.{f.name}" for f in dataclasses.fields(current))
        raise TrainConfigError(f"{key} is a group of settings; set its fields one by one ({fields})")
    return dataclasses.replace(obj, **{path[0]: parse_value(value, hint, key)})


def parse_value(text: str, hint: Any, key: str) -> Any:
    """A command-line string as a value of the field type `hint` (str, int, float, bool, X | None, tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip() in ("None", "none", "null"):
            return None
        return parse_value(text, next(a for a in args if a is not type(None)), key)
    if origin is tuple:
        return _parse_tuple(text, args, key)
    if hint is str:
        return text
    if hint is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise TrainConfigError(f"{key}={text}: expected true or false")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if math.isfinite(number) and number.is_integer():
                return int(number)
        raise TrainConfigError(f"{key}={text}: expected a whole number (e.g. {key}=100)")
    if hint is float:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not is_finite_number(number):
            raise TrainConfigError(f"{key}={text}: expected a finite number (e.g. {key}=1e-4)")
        return number
    raise AssertionError(f"no parser for the field type {hint!r} of {key}")


def _parse_tuple(text: str, args: tuple, key: str) -> tuple:
    try:
        literal = ast.literal_eval(text)
        items = list(literal) if isinstance(literal, (list, tuple)) else [literal]
    except (ValueError, SyntaxError):
        items = [s.strip() for s in text.strip().strip("()[]").split(",") if s.strip()]
    variadic = len(args) == 2 and args[1] is Ellipsis
    if not variadic and len(items) != len(args):
        raise TrainConfigError(f"{key}={text}: expected {len(args)} values, e.g. {key}=\"(-1,1,1)\"")
    element_types = [args[0]] * len(items) if variadic else list(args)
    return tuple(parse_value(str(item), t, key) for item, t in zip(items, element_types))


# ---- checking ------------------------------------------------------------------------------------------------


def check_types(obj: Any, prefix: str = "") -> None:
    """Every field of the config tree holds a value of its declared type (a config file may set anything)."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        key, value = prefix + name, getattr(obj, name)
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise TrainConfigError(f"{key} must be a {hint.__name__}, not {value!r}; build it with "
                                       f"{hint.__name__}(...) in the config file")
            check_types(value, key + ".")
        elif not _is_instance(value, hint):
            raise TrainConfigError(f"{key}={value!r} is not a valid {_type_name(hint)}; set {key} to a "
                                   f"{_type_name(hint)} (in the config file or as {key}=VALUE)")


def _is_instance(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_is_instance(v, args[0]) for v in value)
        return len(value) == len(args) and all(_is_instance(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is float:
        return is_finite_number(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    names = {str: "string", int: "whole number", float: "finite number", bool: "true/false", type(None): "None"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "tuple such as (-1,1,1)" if Ellipsis not in typing.get_args(hint) else "tuple such as (\"EN\",\"ZH\")"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


POSITIVE = ("steps", "log_every", "save_every", "keep_checkpoints", "eval_batches", "sample_max_frames",
            "data.max_frames", "data.batch_size", "data.shuffle_window", "data.interleave", "data.packing_bins",
            "optim.learning_rate", "optim.clip_norm", "optim.accumulation")
NON_NEGATIVE = ("eval_every", "sample_every", "sample_speaker", "sample_seed", "seed", "data.min_duration",
                "data.max_duration", "data.min_dnsmos", "data.speaker", "data.seed", "data.context_turns",
                "optim.warmup_steps", "optim.weight_decay", "optim.depth_weight")


def validate(cfg: TrainConfig) -> None:
    """Types, ranges, the model preset and the paths of `cfg`: everything that can be checked before building."""
    from csm_jax.core.config import preset
    from csm_jax.io.hub import is_checkpoint

    check_types(cfg)
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise TrainConfigError(f"{key}={_get(cfg, key)} must be positive; set {key} to a value above 0")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise TrainConfigError(f"{key}={_get(cfg, key)} must not be negative; set {key} to 0 or more")
    if any(size == 0 or size < -1 for size in cfg.mesh) or cfg.mesh.count(-1) > 1:
        raise TrainConfigError(f"mesh={cfg.mesh}: each of (data, fsdp, tensor) is a positive device count, and at "
                               f"most one may be -1 (the remaining devices); e.g. mesh=\"(-1,1,1)\"")
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise TrainConfigError(f"compute_dtype={cfg.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    if cfg.optim.schedule not in SCHEDULES:
        raise TrainConfigError(f"optim.schedule={cfg.optim.schedule!r} is not one of {', '.join(SCHEDULES)}")
    for key in ("optim.b1", "optim.b2"):
        if not 0 <= _get(cfg, key) < 1:
            raise TrainConfigError(f"{key}={_get(cfg, key)} must be in [0, 1) (e.g. {key}=0.9)")
    if not 0 < cfg.optim.depth_fraction <= 1:
        raise TrainConfigError(f"optim.depth_fraction={cfg.optim.depth_fraction} must be in (0, 1] (e.g. 0.0625)")
    if cfg.optim.warmup_steps >= cfg.steps:
        raise TrainConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} is not shorter than steps={cfg.steps}: "
                               f"the learning rate would never reach optim.learning_rate; lower optim.warmup_steps")
    if cfg.data.min_duration > cfg.data.max_duration:
        raise TrainConfigError(f"data.min_duration={cfg.data.min_duration} is above data.max_duration="
                               f"{cfg.data.max_duration}; no utterance could pass, swap or widen them")
    from train.sources import FORMATS

    if cfg.data.format not in FORMATS:
        raise TrainConfigError(f"data.format={cfg.data.format!r} is not one of {', '.join(FORMATS)}")
    if cfg.data.loss_on not in LOSS_ON:
        raise TrainConfigError(f"data.loss_on={cfg.data.loss_on!r} is not one of {', '.join(LOSS_ON)} (the target "
                               f"turn's audio, or every turn's)")
    shortest, longest = cfg.data.clip_seconds
    if not 0 < shortest < longest:
        raise TrainConfigError(f"data.clip_seconds={cfg.data.clip_seconds} must be (shortest, longest) seconds with "
                               f"0 < shortest < longest, e.g. data.clip_seconds=\"(3,15)\"")
    if not 0 <= cfg.data.eval_fraction < 1:
        raise TrainConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1) (e.g. 0.02)")
    if cfg.model is not None:
        preset(cfg.model)  # ConfigError listing the presets
    workdir = Path(cfg.workdir).absolute()
    existing = next(p for p in (workdir, *workdir.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == workdir else f"is inside the file {existing}"
        raise TrainConfigError(f"workdir={cfg.workdir} {where}; give a directory (new or of an earlier run) for "
                               f"checkpoints, metrics and the export")
    if not os.access(existing, os.W_OK):
        raise TrainConfigError(f"workdir={cfg.workdir} cannot be written ({existing} is read-only for you); give a "
                               f"directory you can write")
    _check_source("data.source", cfg.data.source, "no training data")
    if cfg.eval_every and (cfg.eval_source.strip() or not cfg.data.eval_fraction):
        _check_source("eval_source", cfg.eval_source, f"eval_every={cfg.eval_every} needs held-out data",
                      " (or data.eval_fraction above 0, or eval_every=0 for no eval)")
    if cfg.sample_every:
        _check_samples(cfg)
    if cfg.init is not None and not is_checkpoint(cfg.init):
        raise TrainConfigError(f"init={cfg.init} is not a csm-jax checkpoint directory (params/ and metadata.json); "
                               f"convert PyTorch weights first (python -m convert SRC OUT, then init=OUT) or give an "
                               f"earlier run's workdir/export")


def resolve_model(cfg: TrainConfig) -> CsmConfig:
    """The model a run trains: init's own config.json (the one the converter recorded) when init is set, else the
    preset `model` (csm_1b when unset). A preset given beside init must have the checkpoint's weight shapes; where
    it differs otherwise (norm eps, RoPE), the checkpoint's numbers are the ones its weights were trained with."""
    from csm_jax.core.config import preset
    from csm_jax.io.checkpoint import read_config

    if cfg.init is None:
        return preset(cfg.model or DEFAULT_MODEL)
    config = read_config(cfg.init)
    if cfg.model is None:
        return config
    shapes = preset(cfg.model).differences(config, shapes_only=True)
    if shapes:
        raise TrainConfigError(f"model={cfg.model} is another model than init={cfg.init} (preset != checkpoint: "
                               f"{'; '.join(shapes)}); the checkpoint's config.json gives the model, so leave "
                               f"model unset (model=none), or give init a checkpoint of the {cfg.model} model")
    numbers = preset(cfg.model).differences(config)
    if numbers:
        logging.getLogger(__name__).warning("model=%s differs from init=%s in %s: training with the checkpoint's "
                                            "config", cfg.model, cfg.init, "; ".join(numbers))
    return config


def _check_samples(cfg: TrainConfig) -> None:
    """The sample prompt's settings (its length against the model is checked when the prompt is built)."""
    if not cfg.sample_text.strip():
        raise TrainConfigError("sample_text is empty; give the sentence the samples say, or sample_every=0 for none")
    if cfg.sample_seed >= 2**32:
        raise TrainConfigError(f"sample_seed={cfg.sample_seed} is not below 2**32; give a seed such as 0")
    context = cfg.sample_context.strip()
    if context and not Path(context).is_file():
        raise TrainConfigError(f"sample_context={cfg.sample_context} is not a file; give an audio clip of the voice "
                               f"(with sample_context_text, what it says), or leave sample_context empty")
    if context and not cfg.sample_context_text.strip():
        raise TrainConfigError(f"sample_context={cfg.sample_context} needs sample_context_text=\"...\", what is said "
                               f"in it")
    if cfg.sample_context_text.strip() and not context:
        raise TrainConfigError("sample_context_text is set without sample_context; give the clip it transcribes as "
                               "sample_context=PATH, or leave both empty")


def _check_source(key: str, source: str, missing: str, alternative: str = "") -> None:
    from csm_jax.io.hub import looks_like_hub_id

    if not source.strip():
        raise TrainConfigError(f"{missing}: set {key}=DIR, a directory of Emilia .tar shards (or of "
                               f"python -m train.prepare output), or a hub dataset id{alternative}")
    if not Path(source).exists() and not looks_like_hub_id(source):
        raise TrainConfigError(f"{key}={source} does not exist; give a directory of Emilia .tar shards (or of "
                               f"python -m train.prepare output), or a hub dataset id such as owner/name")


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
