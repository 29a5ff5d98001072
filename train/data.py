"""Emilia-format data as Grain datasets: WebDataset tar shards (or `prepare`d ArrayRecord shards) -> fixed-shape
frame batches.

Emilia shards (`{LANG}/{LANG}-B000000.tar`) hold utterances as member pairs with one key: `{key}.mp3` (or .wav,
.flac) and `{key}.json` (`text`, `duration`, `language`, `dnsmos`, `speaker`, ...). Pipeline, per JAX process:
its share of the shards (every process_count-th, in a seeded order) -> shards interleaved -> metadata filters
(language, duration, dnsmos) -> window shuffle -> featurize (decode, resample to 24 kHz, Mimi codes, Llama-3
text) -> frames as the reference builds a segment (text frames, audio frames, the all-zero end frame) ->
padded to `max_frames` (or packed several to a row with `packing`) and batched, in endless passes over the
share. Folders of clips, manifests and `datasets` datasets (train/sources.py) enter the same pipeline as map
sources; where they give conversation order, each target comes after its earlier turns (`with_context`), with a
`loss_mask` that keeps those turns out of the loss by default (held-out turns never serve training targets), and
their Mimi codes are kept by key (`RecentTurns`) so a turn is not encoded again for each later turn. Every stage is
checkpointable (pass, shard and position), so training resumes on the next example.
Corrupt members and shards (unreadable, truncated) are skipped and counted (train/skips.py) with what the filters
rejected, never fatal; a pass that yields no example at all stops with a `DataError` naming the filters and
those counts (it would otherwise repeat forever).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import grain
import numpy as np

from csm_jax.core.codec import SAMPLE_RATE
from csm_jax.io.frames import Frames, Segment, segment_frames
from csm_jax.io.hub import looks_like_hub_id
from train import sources
from train.records import SUFFIX, deserialize, key_of
from train.skips import AUDIO_EXTENSIONS, SKIPPED, SKIPPED_ONCE, DataError, count, first_pass, skip, skip_counts

log = logging.getLogger(__name__)

SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)  # what a broken tar raises while read
CACHED_CODES = 64 << 20  # bytes of Mimi codes kept per pipeline over data encoded on the fly (11 h of int32 codes)
_reported_shards: set[str] = set()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = ""  # a directory of .tar (or .array_record) shards, or a hub dataset id
    languages: tuple[str, ...] = ()  # e.g. ("EN", "ZH"); empty = all
    min_duration: float = 0.0
    max_duration: float = 30.0
    min_dnsmos: float = 0.0
    speaker: int = 0  # CSM speaker id given to every utterance (the published fine-tunes use 0)
    max_frames: int = 512  # sequence length of a batch row; longer utterances are skipped
    batch_size: int = 8  # rows per micro-batch for this process
    shuffle_window: int = 64
    interleave: int = 4  # shards read at once
    seed: int = 0
    format: str = "auto"  # emilia, folder, manifest or hf (see train/sources.py); auto = detected from the source
    audio_column: str = "audio"  # hf: the columns holding the audio, the transcript and (optionally) a speaker id
    text_column: str = "text"
    speaker_column: str = ""
    packing: bool = False  # several utterances per row (segment ids), first-fit within `packing_bins` rows
    packing_bins: int = 8
    eval_fraction: float = 0.02  # share of example ids held out for eval when eval_every is set without eval_source
    context_turns: int = 3  # earlier turns of the conversation before each target (sources with conversation order)
    loss_on: str = "target"  # "target": loss on the target turn's audio frames only; "all": on every turn's audio
    context_column: str = "context"  # manifest: ids of earlier turns
    conversation_column: str = "conversation"  # manifest/hf: the conversation (or session) a turn belongs to
    order_column: str = "turn"  # manifest/hf: the turn's place in its conversation (else `start`, else row order)
    clip_seconds: tuple[float, float] = (3.0, 15.0)  # long recordings with segment/word times: clip lengths


def skip_shard(reason: str, path: str, error: BaseException) -> None:
    """Counts a shard that is unreadable (or the rest of a truncated one); logs each shard once per process."""
    count(reason)
    if path not in _reported_shards:
        _reported_shards.add(path)
        log.warning("skipping %s %s: %s", reason, path, error)


# ---- shards --------------------------------------------------------------------------------------------------


def list_shards(source: str, suffix: str = ".tar") -> list[Path]:
    """All shards under a local directory, or (when `source` is a hub dataset id) after downloading them."""
    path = Path(source)
    if not path.exists():
        if not looks_like_hub_id(source):
            raise DataError(f"data source {source!r} is neither a directory nor a hub dataset id; give a directory "
                            f"of Emilia .tar shards (or of python -m train.prepare output)")
        from huggingface_hub import snapshot_download
        try:
            path = Path(snapshot_download(source, repo_type="dataset", allow_patterns=[f"*{suffix}"]))
        except OSError as e:  # huggingface_hub's not-found, offline and HTTP errors are OSErrors
            raise DataError(f"the hub dataset {source} could not be fetched ({str(e).splitlines()[0]}); check the id "
                            f"and the network, or download its shards and give their directory") from None
    shards = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file()) if path.is_dir() else [path]
    if not shards:
        raise DataError(f"no *{suffix} shards and no audio clips under {source}; give a directory holding Emilia "
                        f".tar shards (EN/EN-B000000.tar, ...), python -m train.prepare output, or a folder of clips "
                        f"with a transcript beside each (speaker/clip.wav and speaker/clip.txt), or a .jsonl/.csv "
                        f"manifest")
    return shards


def process_share(shards: Sequence[Path], process_index: int, process_count: int, seed: int) -> list[Path]:
    """This process's shards: a seeded permutation, then every process_count-th."""
    if len(shards) < process_count:
        raise DataError(f"{len(shards)} shards cannot feed {process_count} processes: every process needs at "
                        f"least one shard (split shards, or use fewer processes)")
    order = np.random.default_rng(seed).permutation(len(shards))
    return [shards[i] for i in order[process_index::process_count]]


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset naming: "dir/abc.mp3" -> ("dir/abc", ".mp3"); the key ends at the basename's first dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), dot + ext


class _TarIterator(grain.DatasetIterator):
    """Utterances (member groups with one key) of one tar shard in order; the state is the members consumed.

    A shard that is not a tar counts as "unreadable shard", one that breaks off as "truncated shard" (after the
    utterances before the break); either ends the shard, never the run.
    """

    def __init__(self, path: str):
        super().__init__()
        self._path, self._consumed = path, 0
        self._open()

    def _open(self):
        self._broken = False
        try:
            self._tar = tarfile.open(self._path)
            self._members = iter(self._tar)
            self._pending: tarfile.TarInfo | None = None
            for _ in range(self._consumed):
                next(self._members)
        except SHARD_ERRORS as e:
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        self._broken = True
        skip_shard("truncated shard" if self._consumed else "unreadable shard", self._path, error)

    def _take(self) -> tarfile.TarInfo | None:
        member, self._pending = self._pending, None
        return member if member is not None else next(self._members, None)

    def __next__(self) -> dict[str, Any]:
        if self._broken:
            raise StopIteration
        try:
            return self._next_utterance()
        except SHARD_ERRORS as e:
            self._fail(e)
            raise StopIteration from None

    def _next_utterance(self) -> dict[str, Any]:
        first = self._take()
        while first is not None and not first.isfile():
            self._consumed += 1
            first = self._take()
        if first is None:
            raise StopIteration
        self._consumed += 1
        key, ext = _split_key(first.name)
        parts = {ext: first}
        while (member := self._take()) is not None:
            if not member.isfile() or _split_key(member.name)[0] != key:
                self._pending = member
                break
            self._consumed += 1
            parts[_split_key(member.name)[1]] = member
        example: dict[str, Any] = {"key": f"{Path(self._path).name}:{key}"}
        for ext, member in parts.items():
            example[ext] = self._tar.extractfile(member).read()
        return example

    def get_state(self):
        return {"consumed": self._consumed}

    def set_state(self, state):
        self._consumed = state["consumed"]
        self._open()


class TarShard(grain.IterDataset):
    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = str(path)

    def __iter__(self):
        return _TarIterator(self.path)


# ---- examples ------------------------------------------------------------------------------------------------


def parse_metadata(example: dict[str, Any]) -> dict[str, Any] | None:
    """Adds the parsed json under "meta"; None (counted) when the json is missing or unreadable."""
    if ".json" not in example:
        return skip("missing json", example["key"])
    try:
        meta = json.loads(example[".json"])
    except (ValueError, UnicodeDecodeError):
        return skip("bad json", example["key"])
    if not isinstance(meta, dict):
        return skip("bad json", example["key"])
    return check_metadata({**example, "meta": meta})


def check_metadata(example: dict[str, Any]) -> dict[str, Any] | None:
    """None (counted) when the text is empty or `duration` / `dnsmos` is present but not a finite number >= 0."""
    meta = example["meta"]
    if not str(meta.get("text") or "").strip():
        return skip("empty text", example["key"])
    for field in ("duration", "dnsmos"):
        if field in meta and _number(meta[field]) is None:
            return skip(f"bad {field}", example["key"])
    return example


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def in_split(key: str, split: str | None, eval_fraction: float) -> bool:
    """Deterministic held-out split by a hash of the example id: "eval" takes `eval_fraction` of the ids, "train" the
    rest, None everything."""
    if split is None:
        return True
    held_out = zlib.crc32(key.encode()) / 2**32 < eval_fraction
    return held_out if split == "eval" else not held_out


def keep(example: dict[str, Any] | None, cfg: DataConfig, split: str | None = None) -> bool:
    """Metadata filters (language, duration, dnsmos), counted per filter; fields that are absent pass. With `split`,
    only the examples of that side of the held-out split (uncounted)."""
    if example is None or not in_split(example["key"], split, cfg.eval_fraction):
        return False
    meta = example["meta"]
    if cfg.languages and str(meta.get("language") or "").upper() not in {x.upper() for x in cfg.languages}:
        reason = "language filter"
    elif not cfg.min_duration <= _number(meta.get("duration", cfg.min_duration)) <= cfg.max_duration:
        reason = "duration filter"
    elif _number(meta.get("dnsmos", 5.0)) < cfg.min_dnsmos:
        reason = "dnsmos filter"
    else:
        return True
    skip(reason, example["key"], warn=False)
    return False


MIN_CLIP_SECONDS = 0.2  # shorter audio holds no word to learn from (and Mimi codes it as 1 or 2 frames)


def decode_audio(example: dict[str, Any]) -> np.ndarray | None:
    """The member's audio as 24 kHz mono float32; None (counted) when it is missing, undecodable, not finite,
    silent or shorter than `MIN_CLIP_SECONDS`."""
    import sphn

    from csm_jax.io.audio import SAMPLE_RATE, resample

    ext = next((e for e in AUDIO_EXTENSIONS if e in example), None)
    if ext is None:
        return skip("missing audio", example["key"])
    with tempfile.NamedTemporaryFile(suffix=ext) as f:  # sphn decodes mp3 (symphonia) from files only
        f.write(example[ext])
        f.flush()
        try:
            audio, rate = sphn.read(f.name)
        except Exception:  # noqa: BLE001 - any decoder failure is a corrupt member
            return skip("bad audio", example["key"])
    if audio.size == 0:
        return skip("bad audio", example["key"])
    mono = audio.mean(axis=0)
    meta = example.get("meta") or {}
    if "start" in meta or "end" in meta:  # a manifest row's span of a longer file
        start, end = _number(meta.get("start", 0)), _number(meta.get("end", len(mono) / rate))
        if start is None or end is None or not start < end <= len(mono) / rate + 0.01:
            return skip("bad start/end", example["key"])
        mono = mono[int(start * rate):int(end * rate)]
    if not np.isfinite(mono).all():
        return skip("non-finite audio", example["key"])
    if not np.abs(mono).max() > 1e-4:
        return skip("silent audio", example["key"])
    if len(mono) < MIN_CLIP_SECONDS * rate:
        return skip(f"shorter than {MIN_CLIP_SECONDS} s", example["key"])
    return resample(mono, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else mono.astype(np.float32)


def keep_duration(example: dict[str, Any], seconds: float, cfg: DataConfig) -> bool:
    """The decoded length in seconds against min/max_duration (for sources whose metadata has no duration): counted,
    never truncated."""
    if "duration" in example["meta"] or cfg.min_duration <= seconds <= cfg.max_duration:
        return True
    skip("duration filter", example["key"], warn=False)
    return False


@dataclasses.dataclass
class Featurizer:
    """Raw example -> {"tokens", "mask"} frames of one utterance (or None when it is skipped)."""

    tokenizer: Any
    mimi: Any
    cfg: DataConfig
    num_codebooks: int = 32

    def encode(self, example: dict[str, Any] | None, filter_duration: bool = True) -> dict[str, Any] | None:
        """Raw example -> {"key", "text", "codes" (n, T), "meta", "seconds" (the decoded length)}: the expensive
        part, which `prepare` does once. Context turns are encoded with `filter_duration=False`: max_frames alone
        decides whether they fit."""
        from csm_jax.io.audio import encode

        audio = decode_audio(example) if example is not None else None
        if audio is None or (filter_duration and not keep_duration(example, len(audio) / SAMPLE_RATE, self.cfg)):
            return None
        codes = encode(self.mimi, audio)[: self.num_codebooks]
        return {"key": example["key"], "text": str(example["meta"]["text"]).strip(), "codes": codes,
                "meta": example["meta"], "seconds": len(audio) / SAMPLE_RATE}

    def segment(self, encoded: dict[str, Any]) -> Frames:
        """One turn's frames, as generation lays out a segment: `[speaker]text`, its audio, the end frame."""
        speaker = encoded.get("meta", {}).get("speaker_id", self.cfg.speaker)
        return segment_frames(self.tokenizer, Segment(speaker, encoded["text"]), encoded["codes"],
                              self.num_codebooks)

    def frames(self, encoded: dict[str, Any] | None, loss_on: str | None = None) -> dict[str, np.ndarray] | None:
        """The encoded target after its encoded `context` turns (oldest dropped first until the sample fits
        max_frames; a target that does not fit alone is skipped). `loss_mask` marks the frames whose prediction
        counts: the target's, or every turn's with `loss_on="all"` (default: the config's)."""
        if encoded is None:
            return None
        target = self.segment(encoded)
        if len(target) > self.cfg.max_frames:
            return skip(f"longer than max_frames={self.cfg.max_frames}", encoded["key"])
        turns = [self.segment(turn) for turn in encoded.get("context", ())]
        while turns and len(target) + sum(map(len, turns)) > self.cfg.max_frames:
            turns.pop(0)
        frames = Frames.concat([*turns, target])
        loss_mask = np.ones(len(frames), bool)
        if (loss_on or self.cfg.loss_on) == "target":
            loss_mask[:len(frames) - len(target)] = False
        return {"tokens": frames.tokens, "mask": frames.mask, "loss_mask": loss_mask}


def with_context(encoded: dict[str, Any] | None, lookup: Callable[[str], dict[str, Any] | None],
                 cfg: DataConfig, split: str | None = None) -> dict[str, Any] | None:
    """Adds `context`: the encoded turns named by the meta's `context` keys (the last `cfg.context_turns`), each
    from `lookup(key)`; a key it cannot find is counted and left out. On the "train" side of the held-out split,
    held-out turns are left out too: training never reads the audio eval scores."""
    if encoded is None or not cfg.context_turns:
        return encoded
    keys = [key for key in encoded.get("meta", {}).get("context") or ()
            if split != "train" or in_split(key, split, cfg.eval_fraction)][-cfg.context_turns:]
    turns = []
    for key in keys:
        turn = lookup(key)
        if turn is None:
            skip("missing context turn", f"{encoded['key']} -> {key}")
        else:
            turns.append(turn)
    return {**encoded, "context": turns}


def sample(encoded: dict[str, Any] | None, featurizer: Featurizer, lookup: Callable[[str], dict[str, Any] | None],
           cfg: DataConfig, split: str | None) -> dict[str, np.ndarray] | None:
    """An encoded target's frames after its context turns. A held-out ("eval") target is scored on its own audio
    alone, whatever `loss_on` says: its context turns may be training data."""
    return featurizer.frames(with_context(encoded, lookup, cfg, split), "target" if split == "eval" else None)


class RecentTurns:
    """Encoded turns by key, the most recently used kept up to `budget` bytes of codes, for data encoded on the
    fly: a turn of a conversation is a target once and context of up to `context_turns` later turns, and is
    encoded about once instead of each time; a data set whose codes fit is encoded once for the whole run."""

    def __init__(self, featurizer: Featurizer, examples, budget: int):
        self.featurizer, self.examples, self.budget = featurizer, examples, budget
        self.turns: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.size = 0

    def target(self, example: dict[str, Any] | None) -> dict[str, Any] | None:
        """`Featurizer.encode` of a raw example (duration filtered)."""
        return None if example is None else self._encoded(example["key"], lambda: example, True)

    def context(self, key: str) -> dict[str, Any] | None:
        """The encoded turn with this key (a context turn; not duration filtered), None when there is none."""
        return self._encoded(key, lambda: self.examples.get(key), False)

    def _encoded(self, key: str, read: Callable[[], dict[str, Any] | None], filter_duration: bool):
        found = self.turns.get(key)
        if found is None:
            found = self.featurizer.encode(read(), filter_duration)
            if found is not None:
                self.turns[key] = found
                self.size += found["codes"].nbytes
                while self.size > self.budget:
                    self.size -= self.turns.popitem(last=False)[1]["codes"].nbytes
        elif filter_duration and not keep_duration(found, found["seconds"], self.featurizer.cfg):
            return None
        else:
            self.turns.move_to_end(key)
        return found


def pad_frames(example: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Pads one sample's frames to `length`; segment_ids mark real frames 1 and padding 0 (padding has no loss)."""
    n = len(example["tokens"])
    pad = ((0, length - n), (0, 0))
    return {"tokens": np.pad(example["tokens"], pad), "mask": np.pad(example["mask"], pad),
            "loss_mask": np.pad(example["loss_mask"], (0, length - n)),
            "segment_ids": np.pad(np.ones(n, np.int32), (0, length - n))}


def pack(frames: grain.IterDataset, cfg: DataConfig) -> grain.IterDataset:
    """Several samples per row: Grain's first-fit packing into `packing_bins` rows at a time (deterministic and
    checkpointable); segment_ids number the samples (a target with its context turns) of a row 1, 2, ... and
    padding 0."""
    packed = grain.experimental.FirstFitPackIterDataset(
        frames, length_struct={k: cfg.max_frames for k in ("tokens", "mask", "loss_mask")},
        num_packing_bins=cfg.packing_bins, shuffle_bins=False)
    return packed.map(lambda x: {"tokens": x["tokens"], "mask": x["mask"], "loss_mask": x["loss_mask"],
                                 "segment_ids": x["tokens_segment_ids"].astype(np.int32)})


def padding_fraction(batch: dict[str, np.ndarray]) -> float:
    """The share of a batch's frames that are padding (segment id 0)."""
    return float(np.mean(batch["segment_ids"] == 0))


def batches(frames: grain.IterDataset, cfg: DataConfig, accumulation: int) -> grain.IterDataset:
    """Frames -> padded (or packed) batches shaped (accumulation, batch_size, max_frames, ...): one shape, no
    recompiles."""
    rows = cfg.batch_size * accumulation
    padded = pack(frames, cfg) if cfg.packing else frames.map(lambda x: pad_frames(x, cfg.max_frames))
    return (padded
            .batch(rows, drop_remainder=True)
            .map(lambda b: {k: v.reshape(accumulation, cfg.batch_size, *v.shape[1:]) for k, v in b.items()}))


class Passes(grain.IterDataset):
    """Passes over this process's shards one after another (`repeat`: endlessly, else one). `one_pass(epoch)` is a
    finite dataset of frames, None where an example was skipped. A pass with no frames at all raises
    `empty(skip counts of that pass)` instead of starting the next one: it would repeat forever."""

    def __init__(self, one_pass: Callable[[int], grain.IterDataset],
                 empty: Callable[[collections.Counter], DataError], repeat: bool):
        super().__init__()
        self.one_pass, self.empty, self.repeat = one_pass, empty, repeat

    def __iter__(self):
        return _PassIterator(self)


class _PassIterator(grain.DatasetIterator):
    """The state is the pass, the frames it yielded so far and the position inside it."""

    def __init__(self, passes: Passes):
        super().__init__()
        self._passes = passes
        self._begin(0, 0)

    def _begin(self, epoch: int, used: int) -> None:
        self._epoch, self._used, self._skipped_before = epoch, used, SKIPPED.copy()
        first_pass(epoch == 0)
        self._frames = iter(self._passes.one_pass(epoch))

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            for frames in self._frames:
                if frames is not None:
                    self._used += 1
                    return frames
            if not self._used:
                raise self._passes.empty(SKIPPED - self._skipped_before)
            if not self._passes.repeat:
                raise StopIteration
            self._begin(self._epoch + 1, 0)

    def get_state(self):
        return {"epoch": self._epoch, "used": self._used, "pass": self._frames.get_state(),
                "skipped_once": dict(SKIPPED_ONCE)}

    def set_state(self, state):
        self._begin(state["epoch"], state["used"])
        self._frames.set_state(state["pass"])
        for reason, n in state.get("skipped_once", {}).items():  # what the run counted before it was resumed
            SKIPPED_ONCE[reason] = max(SKIPPED_ONCE[reason], n)


def _nothing_usable(share: list[Path], cfg: DataConfig) -> Callable[[collections.Counter], DataError]:
    def error(skipped: collections.Counter) -> DataError:
        counts = skip_counts(skipped, "nothing (no members)")
        return DataError(
            f"no usable example in a full pass over this process's {len(share)} shard(s) under "
            f"{os.path.commonpath([str(p) for p in share])}: skipped {counts}; the filters were "
            f"data.languages={cfg.languages or 'all'}, data.min_duration={cfg.min_duration}, "
            f"data.max_duration={cfg.max_duration}, data.min_dnsmos={cfg.min_dnsmos}, "
            f"data.max_frames={cfg.max_frames}; "
            f"widen the filters that rejected everything or point the source at usable shards")
    return error


def _interleaved(share: list[Path], cfg: DataConfig, open_shard) -> grain.IterDataset:
    return grain.experimental.InterleaveIterDataset(grain.MapDataset.source(share).map(open_shard),
                                                    cycle_length=min(cfg.interleave, len(share)))


def _shuffled(examples: grain.IterDataset, cfg: DataConfig, epoch: int) -> grain.IterDataset:
    return grain.experimental.WindowShuffleIterDataset(examples, window_size=cfg.shuffle_window, seed=cfg.seed + epoch)


def tar_dataset(shards: Sequence[Path], cfg: DataConfig, featurizer: Featurizer, accumulation: int = 1,
                repeat: bool = True, process_index: int = 0, process_count: int = 1,
                split: str | None = None) -> grain.IterDataset:
    """The training pipeline over tar shards (Mimi encoding on the fly)."""
    share = process_share(shards, process_index, process_count, cfg.seed)

    def one_pass(epoch: int) -> grain.IterDataset:
        examples = _interleaved(share, cfg, TarShard).map(parse_metadata).filter(lambda x: keep(x, cfg, split))
        return _shuffled(examples, cfg, epoch).map(featurizer.encode).map(featurizer.frames)

    return batches(Passes(one_pass, _nothing_usable(share, cfg), repeat), cfg, accumulation)


def _record_shard(path: Path) -> grain.IterDataset:
    """One prepared shard; an unreadable one (not an ArrayRecord file, or cut short) is skipped and counted."""
    try:
        records = grain.sources.ArrayRecordDataSource([str(path)])
    except (RuntimeError, OSError) as e:
        skip_shard("unreadable shard", str(path), e)
        records = []
    return grain.MapDataset.source(records).to_iter_dataset()


def _read_record(record: bytes) -> dict[str, Any] | None:
    try:
        example = deserialize(record)
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile):
        return skip("bad record", "a prepared record")
    return check_metadata(example)


class RecordIndex:
    """Prepared records by key, for context turns (which may lie in any shard, also other processes'): every
    shard's keys are read once, at the first lookup, so data without context never pays for it."""

    def __init__(self, shards: Sequence[Path]):
        self.shards = [str(s) for s in shards]
        self.where: dict[str, tuple[int, int]] | None = None
        self.records: list = []

    def _build(self) -> None:
        self.where = {}
        for path in self.shards:
            try:
                records = grain.sources.ArrayRecordDataSource([path])
            except (RuntimeError, OSError):  # counted where the shard is read for training
                records = []
            for i in range(len(records)):
                try:
                    self.where[key_of(records[i])] = (len(self.records), i)
                except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile):
                    continue
            self.records.append(records)

    def __call__(self, key: str) -> dict[str, Any] | None:
        if self.where is None:
            self._build()
        found = self.where.get(key)
        return None if found is None else _read_record(self.records[found[0]][found[1]])


def prepared_dataset(shards: Sequence[Path], cfg: DataConfig, featurizer: Featurizer, accumulation: int = 1,
                     repeat: bool = True, process_index: int = 0, process_count: int = 1,
                     split: str | None = None) -> grain.IterDataset:
    """The same pipeline over `python -m train.prepare` ArrayRecord shards (Mimi codes stored, no audio work);
    context turns are read from the stored codes by key."""
    share = process_share(shards, process_index, process_count, cfg.seed)
    index = RecordIndex(shards)

    def one_pass(epoch: int) -> grain.IterDataset:
        examples = (_interleaved(share, cfg, _record_shard).map(_read_record)
                    .filter(lambda x: keep(x, cfg, split)))
        return _shuffled(examples, cfg, epoch).map(lambda x: sample(x, featurizer, index, cfg, split))

    return batches(Passes(one_pass, _nothing_usable(share, cfg), repeat), cfg, accumulation)


def examples_dataset(examples: Sequence, cfg: DataConfig, featurizer: Featurizer, accumulation: int = 1,
                     repeat: bool = True, process_index: int = 0, process_count: int = 1,
                     split: str | None = None) -> grain.IterDataset:
    """The pipeline over a random-access source of raw examples (a folder, manifest or `datasets` dataset, see
    train/sources.py): every process_count-th example, shuffled anew each pass."""
    if len(examples) < process_count:
        raise DataError(f"{len(examples)} examples cannot feed {process_count} processes: every process needs at "
                        f"least one example")
    share = grain.MapDataset.source(examples)[process_index::process_count]
    turns = RecentTurns(featurizer, examples, CACHED_CODES)

    def one_pass(epoch: int) -> grain.IterDataset:
        return (share.shuffle(seed=cfg.seed + epoch).to_iter_dataset()
                .map(lambda x: check_metadata(x) if x is not None else None)
                .filter(lambda x: keep(x, cfg, split)).map(turns.target)
                .map(lambda x: sample(x, featurizer, turns.context, cfg, split)))

    def error(skipped: collections.Counter) -> DataError:
        counts = skip_counts(skipped)
        return DataError(f"no usable example in a full pass over this process's {len(share)} example(s): skipped "
                         f"{counts}; the filters were data.min_duration={cfg.min_duration}, data.max_duration="
                         f"{cfg.max_duration}, data.max_frames={cfg.max_frames}; widen the filters that rejected "
                         f"everything or fix the data")

    return batches(Passes(one_pass, error, repeat), cfg, accumulation)


def dataset(source: str, cfg: DataConfig, featurizer: Featurizer, **kwargs) -> grain.IterDataset:
    """By `cfg.format` (detected when "auto"): `examples_dataset` over a folder, manifest or `datasets` dataset,
    `prepared_dataset` when `source` holds ArrayRecord shards, else `tar_dataset`."""
    fmt = sources.detect_format(source, cfg.format)
    if fmt != "emilia":
        return examples_dataset(sources.examples(source, fmt, cfg), cfg, featurizer, **kwargs)
    path = Path(source)
    if path.is_dir() and next(path.rglob(f"*{SUFFIX}"), None) is not None:
        return prepared_dataset(list_shards(source, SUFFIX), cfg, featurizer, **kwargs)
    return tar_dataset(list_shards(source), cfg, featurizer, **kwargs)
