"""The body of `POST /v1/audio/speech`: OpenAI's fields plus CSM's own, checked one by one so that every mistake
gets a 400 that names the field and the fix."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math

from csm_jax.core.codec import FRAME_MS
from csm_jax.inference.sampling import FrameSampling, SamplerConfig
from csm_jax.io.audio import readable_formats


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
             504: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


OPENAI_FIELDS = {"model", "input", "voice", "response_format", "speed", "stream_format", "instructions"}
CSM_FIELDS = {"speaker", "context", "temperature", "topk", "top_k", "top_p", "min_p", "seed", "max_audio_length_ms"}


@dataclasses.dataclass
class ContextClip:
    text: str
    speaker: str
    audio: bytes  # an audio file's bytes (any format soundfile reads)


@dataclasses.dataclass
class SpeechParams:
    text: str
    voice: str | None
    response_format: str
    stream_format: str
    speaker: str | None
    context: list[ContextClip]
    sampling: FrameSampling
    seed: int
    max_audio_length_ms: float


def _bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def _number(body: dict, name: str, default, low=None, high=None, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _bad(f"'{name}' must be {kind}, got {type(value).__name__} {value!r}", name, "invalid_type")
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise _bad(f"'{name}' must be {kind} in [{low}, {high}], got {value!r}", name)
    return value


def _string(body: dict, name: str, default=None) -> str | None:
    value = body.get(name, default)
    if value is not None and not isinstance(value, str):
        raise _bad(f"'{name}' must be a string, got {type(value).__name__}", name, "invalid_type")
    return value


def _speaker(value, param: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise _bad(f"'{param}' must be a speaker id (an integer or a non-empty string), got {value!r}", param,
                   "invalid_type")
    return str(value).strip()


def decode_base64_audio(value, param: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise _bad(f"'{param}' must be a base64 string of an audio file ({readable_formats()})", param,
                   "invalid_type")
    if value.startswith("data:") and "," in value:  # a data: URL from a browser
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"'{param}' is not valid base64; encode the audio file's bytes with base64", param) from None


def parse_speech(body, formats: list[str], default_format: str, max_input_chars: int,
                 max_audio_ms: float, max_context: int) -> SpeechParams:
    """Checks a decoded JSON body; raises ApiError(400) naming the first wrong field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    unknown = sorted(set(body) - OPENAI_FIELDS - CSM_FIELDS)
    if unknown:
        raise _bad(f"unrecognized request argument(s): {', '.join(unknown)}; the fields are "
                   f"{', '.join(sorted(OPENAI_FIELDS | CSM_FIELDS))}", unknown[0], "unknown_parameter")
    _string(body, "model")
    text = body.get("input")
    if not isinstance(text, str):
        raise _bad("'input' is required: the text to speak, as a string", "input",
                   "missing_required_parameter" if text is None else "invalid_type")
    if not text.strip():
        raise _bad("'input' is empty; give the text to speak", "input")
    if len(text) > max_input_chars:
        raise _bad(f"'input' is {len(text)} characters; at most {max_input_chars} are allowed, split the text",
                   "input", "string_above_max_length")
    voice = body.get("voice")
    if isinstance(voice, dict):  # OpenAI's newer {"id": ...} form
        voice = voice.get("id")
    if voice is not None and not isinstance(voice, str):
        raise _bad("'voice' must be a voice name (see GET /v1/voices)", "voice", "invalid_type")
    fmt = _string(body, "response_format", default_format) or default_format
    if fmt not in formats:
        more = " (mp3 and opus need libsndfile >= 1.1 with those codecs)" if fmt in ("mp3", "opus") else ""
        raise _bad(f"response_format {fmt!r} is not supported here{more}; use one of {', '.join(formats)}",
                   "response_format", "unsupported_value")
    stream_format = _string(body, "stream_format", "audio") or "audio"
    if stream_format not in ("audio", "sse"):
        raise _bad(f"stream_format must be 'audio' or 'sse', got {stream_format!r}", "stream_format")
    speed = _number(body, "speed", 1.0)
    if speed != 1.0:
        raise _bad(f"speed {speed} is not supported: CSM speaks at its own rate; send 1.0 or leave it out", "speed",
                   "unsupported_value")
    if _string(body, "instructions"):
        raise _bad("'instructions' is not supported by CSM; steer the voice with 'voice' or 'context' instead",
                   "instructions", "unsupported_value")
    speaker = None if body.get("speaker") is None else _speaker(body["speaker"], "speaker")
    context = body.get("context") or []
    if not isinstance(context, list):
        raise _bad("'context' must be a list of {\"text\", \"speaker\", \"audio\" (base64)} objects", "context",
                   "invalid_type")
    if len(context) > max_context:
        raise _bad(f"'context' has {len(context)} segments; at most {max_context} are allowed", "context")
    clips = []
    for i, seg in enumerate(context):
        where = f"context[{i}]"
        if not isinstance(seg, dict) or set(seg) - {"text", "speaker", "audio"}:
            raise _bad(f"{where} must be an object with 'text', 'speaker' and 'audio' (base64 audio file)", where,
                       "invalid_type")
        text_i = seg.get("text")
        if not isinstance(text_i, str) or not text_i.strip():
            raise _bad(f"{where}.text must be the non-empty transcript of its audio", f"{where}.text")
        clips.append(ContextClip(text_i, _speaker(seg.get("speaker", speaker or 0), f"{where}.speaker"),
                                 decode_base64_audio(seg.get("audio"), f"{where}.audio")))
    temperature = _number(body, "temperature", 0.9, 0.0, 10.0)
    if "topk" in body and "top_k" in body:
        raise _bad("give either 'topk' or 'top_k', not both", "top_k")
    topk = _number(body, "topk" if "topk" in body else "top_k", 50, 0, 1 << 20, integer=True)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise _bad("'top_p' must be in (0, 1] (1 = off)", "top_p")
    min_p = _number(body, "min_p", 0.0, 0.0, 0.999)
    seed = _number(body, "seed", 0, 0, 2 ** 32 - 1, integer=True)
    max_ms = _number(body, "max_audio_length_ms", min(90_000, max_audio_ms), FRAME_MS, max_audio_ms)
    config = SamplerConfig(temperature=float(temperature), top_k=int(topk), top_p=float(top_p), min_p=float(min_p))
    return SpeechParams(text=text, voice=voice, response_format=fmt, stream_format=stream_format, speaker=speaker,
                        context=clips, sampling=FrameSampling.same(config), seed=int(seed),
                        max_audio_length_ms=float(max_ms))
