"""The user's own speech data as lists of utterances: a folder of clips with transcripts, a JSONL/CSV manifest, or a
Hugging Face `datasets` dataset. Each becomes a Grain map source of raw examples shaped like the Emilia tar
pipeline's (`{"key", ".wav": bytes, "meta": {"text", ...}}`), so filters, Mimi encoding, shuffling, resume and
per-process sharding are shared.

- `folder`: `clip.wav` (or .flac/.mp3/.ogg) beside `clip.txt`, anywhere under the root. The CSM speaker id is 0,
  or from `speakers.json` at the root (`{"name": id}`, name = a subfolder or a clip's path without extension), or
  else each subfolder is a speaker numbered in sorted order when there are several.
- `manifest`: a `.jsonl` or `.csv` file with columns `audio` (a path relative to the manifest), `text`, optional
  `speaker` (an id, or names numbered in sorted order), `start`/`end` (seconds), `id`; for conversations
  `context` (ids of earlier turns, a list or one string joined with `|`, `,`, `;` or spaces) or a conversation
  column (`data.conversation_column`) ordered by `data.order_column`, else `start`, else row order; for long
  recordings `segments` or `words` (lists of {start, end, text} and optionally `speaker`, as a diarised transcript
  gives), cut into clips by train/clips.py. Speaker names of rows and segments share one numbering.
- `hf`: a dataset saved with `save_to_disk`, a directory of parquet files, or a hub id (`datasets.load_dataset`),
  with `data.audio_column`, `data.text_column` and optional `data.speaker_column` (ids, or names numbered in sorted
  order) and conversation columns.

Context: each item's meta carries `context`, the keys of up to `data.context_turns` earlier turns (oldest first);
`get(key)` reads any item by key, so training encodes those turns and `prepare` stores the keys only.

Items that cannot be used (no transcript, empty text, missing audio, duplicate ids, paths outside the root, context
ids that name no item) are skipped and counted in `SKIPPED` when listed; unreadable, silent or non-finite audio is
counted when decoded.
"""

from __future__ import annotations

import collections
import csv
import json
import re
from pathlib import Path
from typing import Any

from train.clips import speaker_ids, speaker_label, spans, split_recording
from train.skips import AUDIO_EXTENSIONS, SKIPPED, DataError, skip

FORMATS = ("auto", "emilia", "folder", "manifest", "hf")


def detect_format(source: str, fmt: str = "auto") -> str:
    """`fmt` unless it is "auto": a manifest file, a saved `datasets` dataset or parquet files, a folder of audio
    clips without tar shards; else "emilia" (tar or prepared shards, or a hub dataset id)."""
    if fmt != "auto":
        return fmt
    path = Path(source)
    if path.is_file():
        return {".jsonl": "manifest", ".csv": "manifest", ".parquet": "hf"}.get(path.suffix, "emilia")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf"
        suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
        if not suffixes & {".tar", ".array_record"}:
            if ".parquet" in suffixes:
                return "hf"
            if suffixes & set(AUDIO_EXTENSIONS):
                return "folder"
    return "emilia"


class Examples:
    """A random-access source of raw examples over listed items (audio read lazily)."""

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items
        self.index = {item["key"]: i for i, item in enumerate(items)}

    def __len__(self) -> int:
        return len(self.items)

    def get(self, key: str) -> dict[str, Any] | None:
        """The raw example with this key (a context turn); None when there is none."""
        return self[self.index[key]] if key in self.index else None

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.items[index]
        path = Path(item["audio"])
        try:
            data = path.read_bytes()
        except OSError:
            return skip("unreadable audio", item["key"])
        meta = {k: v for k, v in item.items() if k not in ("key", "audio")}
        return {"key": item["key"], path.suffix.lower(): data, "meta": meta}


def _unique(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for item in items:
        if item["key"] in seen:
            skip("duplicate id", item["key"])
            continue
        seen.add(item["key"])
        out.append(item)
    return out


def folder_items(root: Path) -> list[dict[str, Any]]:
    clips = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    mapping = _speakers_json(root)
    folders = sorted({c.parent.relative_to(root).as_posix() for c in clips})
    by_folder = {name: i for i, name in enumerate(folders)} if len(folders) > 1 else {}
    items = []
    for clip in clips:
        key = clip.relative_to(root).with_suffix("").as_posix()
        transcript = clip.with_suffix(".txt")
        if not transcript.is_file():
            skip("missing transcript", key)
            continue
        try:
            text = transcript.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            skip("unreadable transcript", key)
            continue
        folder = clip.parent.relative_to(root).as_posix()
        speaker = mapping.get(key, mapping.get(folder, by_folder.get(folder))) if mapping else by_folder.get(folder)
        items.append({"key": key, "audio": str(clip), "text": text, **({} if speaker is None else
                                                                        {"speaker_id": speaker})})
    return _unique(items)


def _speakers_json(root: Path) -> dict[str, int]:
    path = root / "speakers.json"
    if not path.is_file():
        return {}
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read ({e}); write it as {{\"subfolder or clip\": speaker id}}") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, int) and v >= 0 for v in mapping.values()):
        raise DataError(f"{path} must map subfolder or clip names to speaker ids (whole numbers >= 0), e.g. "
                        f"{{\"alice\": 0, \"bob\": 1}}")
    return mapping


def link_context(items: list[dict[str, Any]], turns: int) -> list[dict[str, Any]]:
    """Sets each item's `context` to the keys of up to `turns` earlier turns, oldest first: its own `context_ids`
    (ids that name no item are skipped and counted), else the turns before it in its `conversation` by `order`
    (a sortable value; items without one keep their listing order). Consumes both fields."""
    keys = {item["key"] for item in items}
    conversations: dict[Any, list[tuple[Any, int, dict]]] = collections.defaultdict(list)
    for position, item in enumerate(items):
        if item.get("conversation") not in (None, ""):
            conversations[item["conversation"]].append((item.get("order", (position, 0.0)), position, item))
    earlier: dict[str, list[str]] = {}
    for turns_of in conversations.values():
        ordered = [item["key"] for _, _, item in sorted(turns_of, key=lambda t: t[:2])]
        earlier.update({key: ordered[max(0, i - turns):i] for i, key in enumerate(ordered)} if turns else {})
    for item in items:
        listed = item.pop("context_ids", None)
        item.pop("conversation", None)
        item.pop("order", None)
        if not turns:
            continue
        if listed is not None:
            for missing in (c for c in listed if c not in keys):
                skip("missing context id", f"{item['key']} -> {missing}")
            context = [c for c in listed if c in keys and c != item["key"]][-turns:]
        else:
            context = earlier.get(item["key"], [])
        if context:
            item["context"] = context
    return items


def context_ids(value: Any) -> list[str]:
    """A `context` cell as ids: a list, its JSON text, or one string joined with |, comma, ; or spaces."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part for part in re.split(r"[|,;\s]+", str(value or "")) if part]


def _order(row: dict[str, Any], column: str, position: int) -> tuple[float, float]:
    for field in (column, "start"):
        try:
            return (float(row[field]), 0.0)
        except (KeyError, TypeError, ValueError):
            continue
    return (float(position), 0.0)


def manifest_items(path: Path, cfg) -> list[dict[str, Any]]:
    """The rows of a manifest as items; `cfg` (a DataConfig) names the conversation columns, the number of context
    turns and the clip lengths of long recordings."""
    rows = _read_manifest(path)
    root = path.parent.resolve()
    cells = [next((row[c] for c in ("segments", "words") if row.get(c) not in (None, "", [])), None) for row in rows]
    timed = [None if cell is None else spans(cell, speaker_label(row.get("speaker")))
             for row, cell in zip(rows, cells)]
    speakers = speaker_ids([speaker_label(row.get("speaker")) for row in rows]
                           + [p.speaker for parts in timed for p in parts or ()])
    items = []
    for line, (row, cell, parts) in enumerate(zip(rows, cells, timed), 1):
        key = str(row.get("id") or "").strip() or f"{path.name}:{line}"
        audio = str(row.get("audio") or "").strip()
        if not audio:
            skip("missing audio", key)
            continue
        clip = (root / audio).resolve()
        if not clip.is_relative_to(root):
            skip("outside dataset root", key)
            continue
        item: dict[str, Any] = {"key": key, "audio": str(clip), "text": str(row.get("text") or "").strip()}
        if (speaker := speaker_label(row.get("speaker"))) is not None:
            item["speaker_id"] = speakers[speaker]
        for field in ("start", "end"):
            if row.get(field) not in (None, ""):
                item[field] = row[field]
        if row.get(cfg.conversation_column) not in (None, ""):
            item["conversation"] = str(row[cfg.conversation_column])
            item["order"] = _order(row, cfg.order_column, line)
        if row.get(cfg.context_column) not in (None, "", []):
            item["context_ids"] = context_ids(row[cfg.context_column])
        if cell is None:
            items.append(item)
        elif parts is None:
            skip("bad segments", key)
        else:
            items += split_recording(item, parts, cfg.clip_seconds, speakers)
    return link_context(_unique(items), cfg.context_turns)


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    try:
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError, csv.Error) as e:
        raise DataError(f"manifest {path} cannot be read ({e}); write one JSON object per line (or a CSV with a "
                        f"header) with the columns audio, text and optionally speaker, start, end, id") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"manifest {path}: every line must be a JSON object such as "
                        f"{{\"audio\": \"clips/a.wav\", \"text\": \"Hello.\"}}")
    return rows


class HfExamples:
    """Rows of a `datasets` dataset as raw examples; the audio column is read undecoded (bytes or a path)."""

    def __init__(self, source: str, cfg):
        try:
            import datasets
        except ImportError:
            raise DataError(f"data.source={source} is read with Hugging Face datasets, which is not installed: "
                            f"pip install 'csm-jax[hf]' (or datasets)") from None

        path = Path(source)
        try:
            if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
                ds = datasets.load_from_disk(str(path))
            elif path.exists():
                files = [str(p) for p in ([path] if path.is_file() else sorted(path.rglob("*.parquet")))]
                ds = datasets.load_dataset("parquet", data_files=files)
            else:
                ds = datasets.load_dataset(source)
        except (OSError, ValueError, FileNotFoundError) as e:
            raise DataError(f"data.source={source} cannot be loaded as a datasets dataset ({e}); give a directory "
                            f"written by save_to_disk, parquet files, or a hub dataset id") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        for column in (cfg.audio_column, cfg.text_column, *([cfg.speaker_column] if cfg.speaker_column else [])):
            if column not in ds.column_names:
                raise DataError(f"data.source={source} has no column {column!r} (columns: "
                                f"{', '.join(ds.column_names)}); set data.audio_column, data.text_column or "
                                f"data.speaker_column")
        self.speakers = speaker_ids(map(speaker_label, ds[cfg.speaker_column])) if cfg.speaker_column else {}
        if isinstance(ds.features[cfg.audio_column], datasets.Audio):
            ds = ds.cast_column(cfg.audio_column, datasets.Audio(decode=False))
        self.ds, self.cfg, self.name = ds, cfg, path.name or source
        self.context: dict[str, list[str]] = {}
        if cfg.context_turns and cfg.conversation_column in ds.column_names:
            order = ds[cfg.order_column] if cfg.order_column in ds.column_names else None
            turns = [{"key": f"{self.name}:{i}", "conversation": c,
                      **({} if order is None else {"order": _order({"turn": order[i]}, "turn", i)})}
                     for i, c in enumerate(ds[cfg.conversation_column])]  # rows without a turn keep row order
            self.context = {t["key"]: t["context"] for t in link_context(turns, cfg.context_turns) if "context" in t}

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        row = self.ds[int(index)]
        key = f"{self.name}:{index}"
        audio = row[self.cfg.audio_column]
        data, ext = None, ".wav"
        if isinstance(audio, dict):
            data = audio.get("bytes")
            if audio.get("path"):
                ext = Path(audio["path"]).suffix.lower() or ext
                if data is None:
                    try:
                        data = Path(audio["path"]).read_bytes()
                    except OSError:
                        return skip("unreadable audio", key)
        elif isinstance(audio, (bytes, str)):
            data = audio if isinstance(audio, bytes) else None
        if data is None:
            return skip("missing audio", key)
        meta: dict[str, Any] = {"text": str(row[self.cfg.text_column] or "").strip()}
        if self.cfg.speaker_column and (speaker := speaker_label(row[self.cfg.speaker_column])) is not None:
            meta["speaker_id"] = self.speakers[speaker]
        if key in self.context:
            meta["context"] = self.context[key]
        return {"key": key, ext: data, "meta": meta}

    def get(self, key: str) -> dict[str, Any] | None:
        """The raw example with this key (`NAME:row`, a context turn); None when there is none."""
        name, _, row = key.rpartition(":")
        return self[int(row)] if name == self.name and row.isdigit() and int(row) < len(self) else None


def examples(source: str, fmt: str, cfg) -> Examples | HfExamples:
    """The raw examples of a folder, manifest or hf source (a DataError when none could be listed)."""
    before = SKIPPED.copy()
    if fmt == "hf":
        found: Examples | HfExamples = HfExamples(source, cfg)
    elif fmt == "folder":
        found = Examples(folder_items(Path(source)))
    elif fmt == "manifest":
        found = Examples(manifest_items(Path(source), cfg))
    else:
        raise AssertionError(fmt)
    if not len(found):
        counts = ", ".join(f"{r} {n}" for r, n in (SKIPPED - before).most_common()) or "no items found"
        raise DataError(f"no usable example in data.source={source} (data.format={fmt}): {counts}; see "
                        f"docs/guides/fine-tuning.md (Your own data) for the layout of each format")
    return found
