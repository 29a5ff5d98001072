"""Long recordings cut into training clips at the word or segment times a manifest row gives.

A row whose `segments` (or `words`) column lists `{"start", "end", "text"}` spans (seconds into its audio file)
becomes clips of `clip_seconds` = (shortest, longest) seconds, each with the transcript of the spans it holds. Cuts
fall only between spans; among the cuts that give a clip of an allowed length, the quietest is taken (the lowest
RMS of the audio between the two spans, or of 40 ms around the boundary where they touch), so clips end in pauses
rather than mid-word. A span longer than the longest clip stays one clip (the duration filter then skips it; audio
is never cut inside a span). Spans may name their `speaker` (a diarised transcript's label, e.g. "SPEAKER_00"): a
clip never holds two speakers' spans (every speaker change is a cut, where overlapping speech is kept whole in both
clips) and carries its spans' speaker. The clips of one recording are the turns of one conversation, in time order.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from train.skips import skip

PAD = 0.25  # seconds of the pause kept on each side of a cut
WINDOW = 0.04  # seconds around a boundary measured when the spans touch


@dataclasses.dataclass(frozen=True)
class Span:
    start: float
    end: float
    text: str
    speaker: str | None = None  # a label such as "SPEAKER_00"; None: the row's speaker


def speaker_label(value: Any) -> str | None:
    """A `speaker` cell as a label ("0", "alice", "SPEAKER_00"); None when empty."""
    label = "" if value is None else str(value).strip()
    return label or None


def speaker_ids(labels) -> dict[str, int]:
    """Speaker labels (None ignored) -> CSM speaker ids: a whole-number label is its own id, names are numbered in
    sorted order."""
    labels = {label for label in labels if label is not None}
    names = sorted(label for label in labels if not label.isdigit())
    return {label: int(label) if label.isdigit() else names.index(label) for label in labels}


def spans(value: Any, speaker: str | None = None) -> list[Span] | None:
    """A `segments`/`words` cell (a list, or its JSON text in a CSV) as spans sorted by start, each with its own
    `speaker` label or else `speaker` (the row's); None when malformed.

    An entry with neither `start` nor `end` (WhisperX leaves the times off words it cannot align, such as numbers)
    joins its text to the timed entry before it (the first timed one when none is before), so its words stay in the
    transcript of the clip that holds their audio."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, list) or not value:
        return None
    out, leading = [], []
    for s in value:
        if not isinstance(s, dict):
            return None
        text = str(s.get("text") or s.get("word") or "").strip()
        if s.get("start") is None and s.get("end") is None:
            if out:
                out[-1] = dataclasses.replace(out[-1], text=f"{out[-1].text} {text}".strip())
            else:
                leading.append(text)
            continue
        try:
            span = Span(float(s["start"]), float(s["end"]), " ".join([*leading, text]).strip(),
                        speaker_label(s.get("speaker")) or speaker)
        except (TypeError, KeyError, ValueError):
            return None
        if not 0 <= span.start < span.end:
            return None
        out.append(span)
        leading = []
    return sorted(out, key=lambda s: s.start) if out else None


def _read(path: str) -> tuple[np.ndarray, int] | None:
    import sphn

    try:
        audio, rate = sphn.read(path)
    except Exception:  # noqa: BLE001 - any decoder failure is a bad file
        return None
    return (audio.mean(axis=0), rate) if audio.size else None


def _rms(mono: np.ndarray, rate: int, start: float, end: float) -> float:
    if end - start < WINDOW:
        middle = (start + end) / 2
        start, end = middle - WINDOW / 2, middle + WINDOW / 2
    piece = mono[max(0, int(start * rate)):max(0, int(end * rate))]
    return float(np.sqrt(np.mean(np.square(piece, dtype=np.float64)))) if piece.size else 0.0


def cut_points(parts: list[Span], mono: np.ndarray, rate: int, clip_seconds: tuple[float, float]
               ) -> list[tuple[int, int, float, float]]:
    """(first span, last span + 1, start, end seconds) of each clip over `parts` (sorted spans of one recording);
    a change of speaker is always a cut."""
    n = len(parts)
    ends, starts, quiet = [], [], []  # for the cut after span j: where that clip ends, the next begins, its RMS
    for a, b in zip(parts[:-1], parts[1:]):
        gap_start, gap_end = a.end, max(a.end, b.start)
        middle = (gap_start + gap_end) / 2
        ends.append(min(middle, gap_start + PAD))
        starts.append(min(b.start, max(middle, gap_end - PAD)))  # spans that overlap are both kept whole
        quiet.append(_rms(mono, rate, gap_start, gap_end))
    changes = [j + 1 for j in range(n - 1) if parts[j].speaker != parts[j + 1].speaker]
    clips = []
    for first, stop in zip([0, *changes], [*changes, n]):
        begin = starts[first - 1] if first else max(0.0, parts[0].start - PAD)
        last = ends[stop - 1] if stop < n else parts[-1].end + PAD
        clips += _cut_turn(first, stop, begin, last, ends, starts, quiet, clip_seconds)
    return clips


def _cut_turn(first: int, stop: int, begin: float, last: float, ends: list[float], starts: list[float],
              quiet: list[float], clip_seconds: tuple[float, float]) -> list[tuple[int, int, float, float]]:
    """The clips of spans first..stop-1 (one speaker's turn, from `begin` to `last` seconds): cut_points' rule."""
    shortest, longest = clip_seconds
    clips = []
    while True:
        if last - begin <= longest or first == stop - 1:
            clips.append((first, stop, begin, last))
            return clips
        cuts = range(first, stop - 1)
        fitting = [j for j in cuts if shortest <= ends[j] - begin <= longest]
        leaves_enough = [j for j in fitting if last - starts[j] >= shortest]
        if leaves_enough or fitting:
            j = min(leaves_enough or fitting, key=lambda j: (quiet[j], begin - ends[j]))
        else:  # no allowed length: the longest clip under the limit, else the shortest over it
            under = [j for j in cuts if ends[j] - begin <= longest]
            j = under[-1] if under else first
        clips.append((first, j + 1, begin, ends[j]))
        first, begin = j + 1, starts[j]


def split_recording(item: dict[str, Any], parts: list[Span], clip_seconds: tuple[float, float],
                    speakers: dict[str, int]) -> list[dict[str, Any]]:
    """A manifest item of a long recording -> one item per clip (key `KEY#i`, start/end, the spans' text, the CSM
    id `speakers[label]` of their speaker where they name one), the clips one conversation (the row's, else the
    recording's key); [] (counted) when the audio cannot be read."""
    read = _read(item["audio"])
    if read is None:
        skip("bad audio", item["key"])
        return []
    mono, rate = read
    length = len(mono) / rate
    parts = [p for p in parts if p.start < length]
    if not parts:
        skip("bad segments", item["key"])
        return []
    out = []
    row_order = item.get("order", (0.0, 0.0))[0]
    for i, (first, stop, start, end) in enumerate(cut_points(parts, mono, rate, clip_seconds)):
        text = " ".join(p.text for p in parts[first:stop] if p.text)
        clip = {k: v for k, v in item.items() if k not in ("start", "end", "order")}
        if parts[first].speaker is not None:
            clip["speaker_id"] = speakers[parts[first].speaker]
        out.append({**clip, "key": f"{item['key']}#{i}", "text": text, "start": start, "end": min(end, length),
                    "conversation": item.get("conversation", item["key"]), "order": (row_order, start)})
    return out
