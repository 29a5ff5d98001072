"""Emilia-format WebDataset shards built from espeak-ng speech (English, and Mandarin as tone-numbered pinyin)."""

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf

from tests.conftest import espeak_wav

ENGLISH = ["Hello there, how are you today?", "The weather is lovely this morning.",
           "Please pass me the salt.", "We will meet again tomorrow."]
MANDARIN = ["你好，今天天气很好。", "我们明天再见。"]


def mp3_bytes(tmp: Path, text: str, voice: str) -> bytes:
    wav = espeak_wav(tmp / "u.wav", text, voice)
    subprocess.run(["sox", wav, str(tmp / "u.mp3")], check=True, capture_output=True)
    return (tmp / "u.mp3").read_bytes()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def utterance_json(key: str, text: str, language: str, duration: float = 2.0, dnsmos: float = 3.5) -> bytes:
    return json.dumps({"id": key, "wav": f"{key}.mp3", "text": " " + text, "duration": duration,
                       "speaker": f"{language}_B000000_S00001", "language": language.lower(),
                       "dnsmos": dnsmos}).encode()


def make_shard(path: Path, language: str, texts: list[str], corrupt: bool = False) -> Path:
    """One shard `{LANG}-B000000.tar`; with `corrupt`, adds a bad mp3, a missing json, an empty text and NaN audio."""
    from pypinyin import Style, lazy_pinyin

    tmp = path.parent / f".{path.stem}-work"
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, text in enumerate(texts):
            key = f"{language}_B000000_S00001_W{i:06d}"
            spoken, voice = ((" ".join(lazy_pinyin(text, style=Style.TONE3)), "cmn-latn-pinyin")
                             if language == "ZH" else (text, "en-us"))
            add(tar, f"{key}.mp3", mp3_bytes(tmp, spoken, voice))
            add(tar, f"{key}.json", utterance_json(key, text, language))
        if corrupt:
            add(tar, "bad_mp3.mp3", b"\xff\xfb\x90\x00 this is not an mp3 stream" * 10)
            add(tar, "bad_mp3.json", utterance_json("bad_mp3", "broken audio", language))
            add(tar, "no_json.mp3", mp3_bytes(tmp, "no metadata", "en-us"))
            add(tar, "empty_text.mp3", mp3_bytes(tmp, "silence", "en-us"))
            add(tar, "empty_text.json", utterance_json("empty_text", "   ", language))
            nan = io.BytesIO()
            sf.write(nan, np.full(4800, np.nan, np.float32), 24000, format="WAV", subtype="FLOAT")
            add(tar, "nan_audio.wav", nan.getvalue())
            add(tar, "nan_audio.json", utterance_json("nan_audio", "not a number", language))
    return path
