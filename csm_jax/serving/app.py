"""The ASGI app (Starlette): OpenAI's `POST /v1/audio/speech`, voices, health, metrics and the playground page.

Every error is answered as OpenAI answers (`ApiError.body`), and nothing a client sends ends the process: the
handlers turn bad input into 4xx, a full queue into 429, and anything unexpected into a logged 500.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from csm_jax.core.codec import FRAME_MS, SAMPLE_RATE
from csm_jax.core.errors import UserError
from csm_jax.inference.prompt import coded_prompt_frames, max_frames_for
from csm_jax.io import audio
from csm_jax.io.frames import Segment
from csm_jax.serving.engine import END, Engine, Job, QueueFull
from csm_jax.serving.formats import MEDIA_TYPES, StreamEncoder, available_formats
from csm_jax.serving.metrics import Metrics
from csm_jax.serving.mimi_streams import MimiStreams
from csm_jax.serving.speech import ApiError, decode_base64_audio, parse_speech
from csm_jax.serving.voices import DEFAULT_ALIASES, VoiceError, VoiceExists, VoiceStore

log = logging.getLogger("csm_jax.serve")
PLAYGROUND = Path(__file__).parent / "static" / "playground.html"


@dataclasses.dataclass
class ServeConfig:
    """The server's options: slots and queue, per-request limits, API key, voice names (`python -m csm_jax.serve`
    sets them from its flags)."""

    slots: int = 4  # requests generated together on the device batch
    max_queue: int = 32  # requests waiting for a slot; one more gets 429
    chunk_frames: int = 2  # frames per device call: new requests join and audio leaves at these boundaries
    api_key: str | None = None  # required as `Authorization: Bearer KEY`; None: the API is open
    max_body_bytes: int = 20 << 20  # a larger request body gets 413
    max_input_chars: int = 4096  # of `input`
    max_audio_ms: float = 90_000  # the most audio one request may ask for
    max_context: int = 8  # context segments per request
    request_timeout: float = 300.0  # seconds from request to its last audio
    cache_length: int | None = None  # a slot's cache length (default: the model's max_seq_len + one bucket)
    model_name: str = "csm-1b"  # the model's name in /health and /v1/models (a request's `model` may be any string)
    # voice names answered without a saved voice of that name: -> a saved voice's name, or a speaker id
    voice_aliases: dict[str, str | int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_ALIASES))


def event(kind: str, **fields) -> None:
    """One structured (JSON) log line."""
    log.info(json.dumps({"event": kind, **fields}, default=str))


class SpeechService:
    """What the handlers share: the generator's tokenizer and model, the engine, the voices and the metrics."""

    def __init__(self, generator, config: ServeConfig, voices_dir: str | Path):
        self.generator, self.config = generator, config
        self.num_codebooks = generator.frames.config.num_codebooks
        self.formats = available_formats()
        self.default_format = "mp3" if "mp3" in self.formats else "wav"
        self.metrics = Metrics()
        self.metrics.slots_total.set(config.slots)
        self.streams = MimiStreams(generator.mimi, config.slots)
        self.engine = Engine(generator.frames, self.streams, config.slots, config.max_queue, config.chunk_frames,
                             self.metrics, config.cache_length)
        self.voices = VoiceStore(voices_dir, self.streams.encode, self.num_codebooks)
        self.voices.load_all()
        for name, target in config.voice_aliases.items():
            if isinstance(target, str) and self.voices.get(name) is None and self.voices.get(target) is None:
                log.warning("voice %s stands for the saved voice %s, which does not exist (yet)", name, target)
        self.ids = itertools.count(1)
        self.engine.warm_up(coded_prompt_frames(generator.tokenizer, "warm up", 0, (), self.num_codebooks))

    # ---- helpers -------------------------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; at most {limit} are accepted", None,
                           "request_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"the request body is over {limit} bytes; send less (shorter or fewer clips)",
                               None, "request_too_large")
            chunks.append(chunk)
        body = b"".join(chunks)
        request._body = body  # lets request.form() parse what was read
        return body

    async def read_json(self, request: Request):
        body = await self.read_body(request)
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e}); send a JSON object", None, "invalid_json") from None

    def wave_from_bytes(self, data: bytes, param: str):
        with tempfile.NamedTemporaryFile(suffix=".audio") as f:
            f.write(data)
            f.flush()
            try:
                return audio.read_audio(f.name)
            except audio.UnreadableAudio:
                raise ApiError(400, f"{param}: the uploaded file is no audio this server reads; send a "
                                    f"{audio.readable_formats()} file", param, "invalid_audio") from None
            except UserError as e:  # audio that is empty, silent or not finite
                raise ApiError(400, f"{param}: {str(e).replace(f.name, 'the uploaded audio')}", param,
                               "invalid_audio") from None

    def voice(self, name: str) -> tuple[list, str]:
        """The context and speaker of a voice name: a saved voice's, else what `config.voice_aliases` maps the name
        to (a saved voice, or a speaker id without context)."""
        voice, target = self.voices.get(name), self.config.voice_aliases.get(name)
        if voice is None and isinstance(target, int):
            return [], str(target)
        if voice is None and target is not None:
            voice = self.voices.get(target)
            if voice is None:
                raise ApiError(400, f"voice {name!r} stands for the saved voice {target!r}, which does not exist; "
                                    f"create it with POST /v1/voices", "voice", "voice_not_found")
        if voice is None:
            names = ", ".join(v.name for v in self.voices.list()) or "none saved yet (create one with POST /v1/voices)"
            raise ApiError(400, f"unknown voice {name!r}; the voices are: {names}; and the names "
                                f"{', '.join(sorted(self.config.voice_aliases))}", "voice", "voice_not_found")
        return voice.context(), voice.speaker

    def build_prompt(self, params):
        """The request's prompt frames (runs in a worker thread: inline context audio is Mimi-encoded)."""
        context, speaker = [], params.speaker
        if params.voice is not None:
            voice_context, voice_speaker = self.voice(params.voice)
            context += voice_context
            speaker = speaker if speaker is not None else voice_speaker
        for i, clip in enumerate(params.context):
            wave = self.wave_from_bytes(clip.audio, f"context[{i}].audio")
            context.append((Segment(clip.speaker, clip.text), self.streams.encode(wave)))
        try:
            prompt = coded_prompt_frames(self.generator.tokenizer, params.text, speaker or "0", context,
                                         self.num_codebooks)
            max_frames = max_frames_for(params.max_audio_length_ms)
            self.engine.batcher.check(prompt, max_frames)
        except (UserError, ValueError) as e:
            raise ApiError(400, str(e), "input", "prompt_too_long") from None
        return prompt, max_frames

    # ---- handlers ------------------------------------------------------------------------------------------

    async def speech(self, request: Request) -> Response:
        started = time.perf_counter()
        rid = f"speech-{next(self.ids)}"
        try:
            self.authorize(request)
            c = self.config
            params = parse_speech(await self.read_json(request), self.formats, self.default_format,
                                  c.max_input_chars, c.max_audio_ms, c.max_context)
            prompt, max_frames = await asyncio.to_thread(self.build_prompt, params)
            job = Job(prompt, max_frames, params.seed, params.sampling, asyncio.get_running_loop())
            try:
                self.engine.submit(job)
            except QueueFull:
                raise ApiError(429, f"the server is at capacity ({c.slots} generating, {c.max_queue} waiting); "
                                    f"retry shortly", None, "server_busy") from None
        except ApiError as e:
            self.metrics.requests.labels("rejected" if e.status == 429 else "invalid").inc()
            event("speech", id=rid, status=e.status, error=e.code)
            raise
        event("speech.start", id=rid, voice=params.voice, format=params.response_format, prompt=len(prompt),
              max_frames=max_frames, queue=self.engine.queue_depth())
        body = self._stream(rid, job, params, started, len(prompt))
        if params.stream_format == "sse":
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return StreamingResponse(body, media_type=MEDIA_TYPES[params.response_format])

    async def _stream(self, rid: str, job: Job, params, started: float, prompt_len: int):
        encoder, sse = StreamEncoder(params.response_format), params.stream_format == "sse"
        loop = asyncio.get_running_loop()

        async def encode(step, *args) -> bytes:
            """pcm and wav are a conversion; a codec's work runs in a worker thread (libsndfile releases the GIL),
            off the event loop that every other stream shares."""
            if params.response_format in ("pcm", "wav"):
                return step(*args)
            return await asyncio.to_thread(step, *args)

        deadline = loop.time() + self.config.request_timeout
        status, first = "cancelled", None

        def wrap(data: bytes) -> bytes:
            if not sse:
                return data
            return b"data: " + json.dumps({"type": "speech.audio.delta",
                                           "audio": base64.b64encode(data).decode()}).encode() + b"\n\n"

        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.queue.get(), max(deadline - loop.time(), 0.001))
                except asyncio.TimeoutError:
                    status = "timeout"
                    break
                if item is END:
                    status = "ok"
                    break
                if isinstance(item, Exception):
                    status = "failed"
                    break
                data = await encode(encoder.add, item)
                if data:
                    if first is None:
                        first = time.perf_counter() - started
                        self.metrics.ttfa.observe(first)
                    yield wrap(data)
            if status == "ok":
                tail = await encode(encoder.finish)
                if tail:
                    if first is None:
                        first = time.perf_counter() - started
                        self.metrics.ttfa.observe(first)
                    yield wrap(tail)
                if sse:
                    usage = {"input_tokens": prompt_len, "output_tokens": job.frames,
                             "total_tokens": prompt_len + job.frames}
                    yield b"data: " + json.dumps({"type": "speech.audio.done", "usage": usage}).encode() + b"\n\n"
            elif sse:
                error = ApiError(504 if status == "timeout" else 500, f"generation {status}").body()
                yield b"data: " + json.dumps({"type": "error", **error}).encode() + b"\n\n"
        finally:
            job.cancel()  # frees the slot at the next frame boundary when the client left early
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(status).inc()
            if status == "ok":
                self.metrics.latency.observe(seconds)
            event("speech.end", id=rid, status=status, frames=job.frames, audio_s=job.frames * FRAME_MS / 1000,
                  ttfa_s=None if first is None else round(first, 4), seconds=round(seconds, 4))

    async def list_voices(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [v.describe() for v in self.voices.list()]})

    async def get_voice(self, request: Request) -> Response:
        self.authorize(request)
        voice = self.voices.get(request.path_params["name"])
        if voice is None:
            raise ApiError(404, f"no voice named {request.path_params['name']!r}", "name", "voice_not_found")
        return JSONResponse(voice.describe())

    async def delete_voice(self, request: Request) -> Response:
        self.authorize(request)
        name = request.path_params["name"]
        if not self.voices.delete(name):
            raise ApiError(404, f"no voice named {name!r}", "name", "voice_not_found")
        return JSONResponse({"id": name, "object": "voice", "deleted": True})

    async def create_voice(self, request: Request) -> Response:
        """multipart/form-data (name, speaker, and `file` + `text` per clip, in order) or JSON
        ({"name", "speaker", "clips": [{"audio": base64, "text"}]}, or one clip as top-level audio + text)."""
        self.authorize(request)
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            await self.read_body(request)
            form = await request.form()
            files = [f for key in ("file", "audio") for f in form.getlist(key) if not isinstance(f, str)]
            texts = [t for t in form.getlist("text") if isinstance(t, str)]
            if len(files) != len(texts):
                raise ApiError(400, f"got {len(files)} audio file(s) and {len(texts)} transcript(s); send one 'text' "
                                    f"field per 'file'", "text")
            clips = [(await f.read(), t) for f, t in zip(files, texts)]
            name, speaker = form.get("name"), form.get("speaker") or "0"
        else:
            body = await self.read_json(request)
            if not isinstance(body, dict):
                raise ApiError(400, "the body must be a JSON object", None, "invalid_type")
            raw = body.get("clips") or ([{"audio": body.get("audio"), "text": body.get("text")}]
                                        if body.get("audio") is not None else [])
            if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
                raise ApiError(400, "'clips' must be a list of {\"audio\": base64, \"text\": transcript}", "clips")
            clips = [(decode_base64_audio(c.get("audio"), f"clips[{i}].audio"), c.get("text"))
                     for i, c in enumerate(raw)]
            name, speaker = body.get("name"), body.get("speaker", 0)
        if isinstance(speaker, bool) or not isinstance(speaker, (int, str)):
            raise ApiError(400, "'speaker' must be an integer or a string", "speaker", "invalid_type")
        try:
            voice = await asyncio.to_thread(self.voices.create, name, str(speaker), clips)
        except VoiceExists as e:
            raise ApiError(409, str(e), "name", "voice_exists") from None
        except VoiceError as e:
            raise ApiError(400, str(e), "name" if "name" in str(e) else "file", "invalid_voice") from None
        event("voice.created", name=voice.name, clips=len(voice.clips))
        return JSONResponse(voice.describe(), status_code=201)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.config.model_name, "slots": self.config.slots,
                             "busy": self.engine.busy(), "queued": self.engine.queue_depth(),
                             "voices": len(self.voices.voices), "api_key_required": bool(self.config.api_key),
                             "sample_rate": SAMPLE_RATE,
                             "formats": self.formats})

    async def metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": self.config.model_name, "object": "model",
                                                         "owned_by": "csm-jax"}]})

    async def playground(self, request: Request) -> Response:
        return HTMLResponse(PLAYGROUND.read_text())


async def _api_error(request: Request, exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").body(),
                        status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return JSONResponse(ApiError(500, f"internal error ({type(exc).__name__}); the request was not completed").body(),
                        status_code=500)


def build_app(generator, config: ServeConfig, voices_dir: str | Path) -> Starlette:
    """The app around a loaded `Generator`; compiles and warms up before returning."""
    service = SpeechService(generator, config, voices_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        yield
        service.engine.close()

    routes = [Route("/", service.playground), Route("/health", service.health),
              Route("/metrics", service.metrics_page), Route("/v1/models", service.models),
              Route("/v1/audio/speech", service.speech, methods=["POST"]),
              Route("/v1/voices", service.list_voices, methods=["GET"]),
              Route("/v1/voices", service.create_voice, methods=["POST"]),
              Route("/v1/voices/{name}", service.get_voice, methods=["GET"]),
              Route("/v1/voices/{name}", service.delete_voice, methods=["DELETE"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.service = service
    return app
