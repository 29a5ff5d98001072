"""Voices: saved contexts (clips + transcripts + a speaker id) with their Mimi codes, encoded once.

On disk a voice is a folder: its clips as 24 kHz wav files, and after the first load voice.json (names,
transcripts, speaker) and codes.npz (each clip's Mimi codes). A folder that holds only audio files with a
same-named .txt transcript beside each (and optionally speaker.txt) is encoded at start-up and completed with
those two files, so later start-ups reuse the codes. Every request naming a voice gets the same context codes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from csm_jax.core.codec import SAMPLE_RATE
from csm_jax.core.errors import UserError
from csm_jax.io import audio
from csm_jax.io.frames import Segment

log = logging.getLogger("csm_jax.serve")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
# The voice names of OpenAI's speech API, which apps written for it send. Each stands for a speaker id of its own
# (its place here) unless a saved voice has that name; CSM-1B has no fixed voice per id (without a reference clip
# the voice varies with the seed), so save voices under these names for voices that stay the same.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")
DEFAULT_ALIASES: dict[str, str | int] = {name: i for i, name in enumerate(OPENAI_VOICES)}


class VoiceError(UserError):
    """A voice that cannot be made or found; the message says what to change."""


class VoiceExists(VoiceError):
    """A voice of that name exists already."""


@dataclasses.dataclass(frozen=True)
class Clip:
    text: str
    speaker: str
    codes: np.ndarray  # (n, T) int32 Mimi codes


@dataclasses.dataclass(frozen=True)
class Voice:
    name: str
    speaker: str  # the speaker id requests with this voice speak as
    clips: tuple[Clip, ...]

    def context(self) -> list[tuple[Segment, np.ndarray]]:
        return [(Segment(c.speaker, c.text), c.codes) for c in self.clips]

    def describe(self) -> dict:
        seconds = sum(c.codes.shape[1] for c in self.clips) * 0.08
        return {"id": self.name, "object": "voice", "name": self.name, "speaker": self.speaker,
                "clips": [{"text": c.text, "speaker": c.speaker, "frames": int(c.codes.shape[1])} for c in self.clips],
                "seconds": round(seconds, 2)}


def read_aliases(path: str | Path) -> dict[str, str | int]:
    """The voice map file `path`, a JSON object of voice name -> saved voice name (a string) or speaker id (an
    integer), over `DEFAULT_ALIASES` (its names replace the defaults of the same name)."""
    from csm_jax.core.json_files import read_json_object

    advice = 'give a JSON object such as {"alloy": "narrator", "echo": 3} (voice name -> saved voice or speaker id)'
    mapping = read_json_object(path, VoiceError, advice)
    for name, target in mapping.items():
        check_name(name)
        if isinstance(target, bool) or not isinstance(target, (int, str)) or (isinstance(target, int) and target < 0):
            raise VoiceError(f"{path}: {name!r} maps to {target!r}; {advice}")
        if isinstance(target, str):
            check_name(target)
    return {**DEFAULT_ALIASES, **mapping}


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise VoiceError(f"voice name {name!r} is not allowed; use 1-64 letters, digits, '-', '_' or '.', starting "
                         f"with a letter or digit")
    return name


class VoiceStore:
    """Voices in `root` (one folder each), encoded with `encode` (24 kHz mono float32 -> codes (n, T))."""

    def __init__(self, root: str | Path, encode: Callable[[np.ndarray], np.ndarray], num_codebooks: int,
                 max_clip_seconds: float = 60.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.encode, self.num_codebooks, self.max_clip_seconds = encode, num_codebooks, max_clip_seconds
        self.voices: dict[str, Voice] = {}
        self.lock = threading.Lock()

    def load_all(self) -> None:
        """Loads (encoding where needed) every voice folder of the root; a broken folder is logged and skipped."""
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                self.voices[folder.name] = self._load(folder)
                log.info("voice %s: %d clip(s)", folder.name, len(self.voices[folder.name].clips))
            except (UserError, OSError, ValueError, KeyError) as e:
                log.warning("skipping voice folder %s: %s", folder, e)

    def get(self, name: str) -> Voice | None:
        return self.voices.get(name)

    def list(self) -> list[Voice]:
        return [self.voices[n] for n in sorted(self.voices)]

    def create(self, name: str, speaker: str, clips: Sequence[tuple[bytes, str]]) -> Voice:
        """A new voice from uploaded audio files (any format soundfile reads) and their transcripts."""
        check_name(name)
        if not clips:
            raise VoiceError("a voice needs at least one clip: audio and its transcript")
        with self.lock:
            if name in self.voices or (self.root / name).exists():
                raise VoiceExists(f"voice {name!r} exists; pick another name or delete it first")
            work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
        try:
            for i, (data, text) in enumerate(clips):
                if not isinstance(text, str) or not text.strip():
                    raise VoiceError(f"clip {i} has no transcript; give the words spoken in it")
                upload = work / f"upload-{i}"
                upload.write_bytes(data)
                try:
                    wave = audio.read_audio(upload)
                except audio.AudioError:
                    raise VoiceError(f"clip {i}: the audio cannot be read; send a {audio.readable_formats()} "
                                     f"file") from None
                finally:
                    upload.unlink()
                if len(wave) > self.max_clip_seconds * SAMPLE_RATE:
                    raise VoiceError(f"clip {i} is {len(wave) / SAMPLE_RATE:.1f} s long; clips may be at most "
                                     f"{self.max_clip_seconds:g} s")
                audio.write_audio(work / f"clip{i}.wav", wave)
                (work / f"clip{i}.txt").write_text(text.strip())
            (work / "speaker.txt").write_text(str(speaker))
            voice = self._load(work, name)
            with self.lock:
                if name in self.voices:
                    raise VoiceExists(f"voice {name!r} exists; pick another name or delete it first")
                work.rename(self.root / name)
                self.voices[name] = voice
            return voice
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)

    def delete(self, name: str) -> bool:
        with self.lock:
            if self.voices.pop(name, None) is None:
                return False
            shutil.rmtree(self.root / name, ignore_errors=True)
            return True

    def _load(self, folder: Path, name: str | None = None) -> Voice:
        name = check_name(name or folder.name)
        meta, codes_file = folder / "voice.json", folder / "codes.npz"
        if meta.is_file() and codes_file.is_file():
            info = json.loads(meta.read_text())
            with np.load(codes_file) as saved:
                codes = [saved[c["audio"]] for c in info["clips"]]
            if all(c.shape[0] >= self.num_codebooks for c in codes):
                return Voice(name, str(info["speaker"]), tuple(
                    Clip(c["text"], str(c["speaker"]), code[:self.num_codebooks].astype(np.int32))
                    for c, code in zip(info["clips"], codes)))
            log.info("voice %s: saved codes have fewer codebooks than the model; encoding again", name)
        speaker_file = folder / "speaker.txt"
        speaker = speaker_file.read_text().strip() if speaker_file.is_file() else "0"
        clips, entries, arrays = [], [], {}
        for wav in sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
            transcript = wav.with_suffix(".txt")
            if not transcript.is_file():
                raise VoiceError(f"{wav} has no transcript; put its words in {transcript.name} beside it")
            codes = np.asarray(self.encode(audio.read_audio(wav)), np.int32)
            text = transcript.read_text().strip()
            clips.append(Clip(text, speaker, codes[:self.num_codebooks]))
            entries.append({"audio": wav.name, "text": text, "speaker": speaker})
            arrays[wav.name] = codes
        if not clips:
            raise VoiceError(f"{folder} holds no audio clip ({', '.join(AUDIO_SUFFIXES)} files with a .txt "
                             f"transcript each)")
        np.savez(codes_file, **arrays)
        meta.write_text(json.dumps({"name": name, "speaker": speaker, "clips": entries}, indent=1))
        return Voice(name, speaker, tuple(clips))
