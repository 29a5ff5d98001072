"""The speech server on loopback with a tiny random CSM (real vocabularies), random Mimi and the shipped tokenizer,
through real clients: the official `openai` package and plain HTTP (httpx). Audio is checked against
`Generator.generate` with the same voice, seed and settings; bad requests get OpenAI-shaped 4xx errors and leave
the server serving."""

import base64
import concurrent.futures
import io
import json
import signal
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from csm_jax.io import audio
from csm_jax.io.frames import Segment
from csm_jax.serve import main as serve_main
from csm_jax.serving.voices import VoiceStore
from tests.helpers import HANG_SECONDS, KEY, NARRATOR, best_lag, espeak_wav, libsndfile_encoding, sox_decode


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=HANG_SECONDS) as c:
        yield c


def narrator_context(server):
    return [Segment("1", NARRATOR, audio.read_audio(server.voices / "narrator" / "clip.wav"))]


def wav_samples(data: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(data), dtype="float32")[0]


def expected(server, text, ms, seed=0, temperature=0.9, topk=50, context=None, speaker="1"):
    return server.generator.generate(text, speaker, narrator_context(server) if context is None else context,
                                     max_audio_length_ms=ms, temperature=temperature, topk=topk, seed=seed)


def assert_same_audio(got, want):
    assert len(got) == len(want) > 0
    np.testing.assert_allclose(got, want, atol=2 / 32768)  # 16-bit rounding of the same float audio


def assert_close_audio(got, want, fmt):
    """Lossy audio decoded by libsndfile: what the codec makes of the same audio encoded whole, after the streamed
    MP3's delay (its placeholder frame and LAME's encoder delay, trimmed in a whole file by the LAME tag), with at
    most 4 frames (576 samples) of padding; Opus the same samples."""
    reference = sf.read(io.BytesIO(libsndfile_encoding(want, fmt)), dtype="float32")[0]
    lag, correlation = best_lag(got, reference)
    assert 0 <= len(got) - len(want) < {"mp3": 4 * 576, "opus": 1}[fmt]
    assert 0 <= lag <= len(got) - len(want) and correlation > 0.99, (lag, correlation)


def error_of(response):
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_openai_client_gets_the_audio_of_generate_with_the_voice(server, client):
    response = client.audio.speech.create(model="csm-1b", voice="narrator", input="Hello there.",
                                          response_format="wav",
                                          extra_body={"seed": 3, "temperature": 0.8, "topk": 30,
                                                      "max_audio_length_ms": 480})
    assert_same_audio(wav_samples(response.content), expected(server, "Hello there.", 480, 3, 0.8, 30))


def test_openai_streaming_response_gives_pcm_in_several_chunks(server, client):
    with client.audio.speech.with_streaming_response.create(
            model="csm-1b", voice="narrator", input="Streaming words.", response_format="pcm",
            extra_body={"seed": 5, "max_audio_length_ms": 1280}) as response:
        assert response.headers["content-type"] == "audio/pcm"
        chunks = [c for c in response.iter_bytes() if c]
    pcm = np.frombuffer(b"".join(chunks), "<i2").astype(np.float32) / 32767
    assert len(chunks) > 1  # audio left as frames were produced, not in one piece at the end
    assert_same_audio(pcm, expected(server, "Streaming words.", 1280, 5))


def test_openai_streaming_response_gives_mp3_as_it_is_encoded(server, client):
    with client.audio.speech.with_streaming_response.create(  # mp3 is the client's default format
            model="csm-1b", voice="narrator", input="Streaming words.",
            extra_body={"seed": 5, "max_audio_length_ms": 1280}) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        chunks = [c for c in response.iter_bytes() if c]
    assert len(chunks) > 1 and len(sox_decode(chunks[0], "mp3")) > 0  # playable audio before the utterance ended
    assert_close_audio(sf.read(io.BytesIO(b"".join(chunks)), dtype="float32")[0],
                       expected(server, "Streaming words.", 1280, 5), "mp3")


def test_concurrent_requests_each_get_their_own_single_generation(server, http):
    jobs = [("One, two.", 7, 0.0, 50, 640), ("Three.", 8, 0.8, 30, 960), ("Four five six.", 9, 0.8, 30, 400)]

    def ask(job):
        text, seed, temperature, topk, ms = job
        r = http.post("/v1/audio/speech", json={"model": "csm-1b", "input": text, "voice": "narrator",
                                                 "response_format": "wav", "seed": seed, "temperature": temperature,
                                                 "topk": topk, "max_audio_length_ms": ms})
        assert r.status_code == 200, r.text
        return wav_samples(r.content)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(ask, jobs))
    for (text, seed, temperature, topk, ms), audio_ in zip(jobs, got):
        assert_same_audio(audio_, expected(server, text, ms, seed, temperature, topk))


def test_sse_stream_carries_base64_audio_then_usage(server, http):
    with http.stream("POST", "/v1/audio/speech", json={"model": "csm-1b", "input": "Events.", "voice": "narrator",
                                                        "response_format": "pcm", "stream_format": "sse",
                                                        "max_audio_length_ms": 640}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] == 8
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(pcm) == 8 * 1920 * 2


def test_inline_context_and_compressed_formats(server, http, tmp_path):
    wav = espeak_wav(tmp_path / "ctx.wav", "some earlier words")
    context = [{"text": "some earlier words", "speaker": 0, "audio": base64.b64encode(open(wav, "rb").read()).decode()}]
    body = {"model": "csm-1b", "input": "And now this.", "context": context, "speaker": 0, "seed": 2,
            "max_audio_length_ms": 400}
    want = expected(server, "And now this.", 400, 2, context=[Segment(0, "some earlier words", audio.read_audio(wav))],
                    speaker=0)
    formats = http.get("/health").json()["formats"]
    for fmt in formats:
        r = http.post("/v1/audio/speech", json={**body, "response_format": fmt})
        assert r.status_code == 200, r.text
        if fmt == "pcm":
            got = np.frombuffer(r.content, "<i2").astype(np.float32) / 32767
        elif fmt == "flac":  # streamed: the length stays unknown, which libsndfile cannot read to the end
            got = sox_decode(r.content, "flac")
        else:
            got = sf.read(io.BytesIO(r.content), dtype="float32")[0]
        if fmt in ("pcm", "wav", "flac"):  # lossless
            assert_same_audio(got, want)
        else:
            assert_close_audio(got, want, fmt)


def test_voices_are_created_listed_persisted_and_consistent(server, http, tmp_path):
    wav = espeak_wav(tmp_path / "clone.wav", "a voice to copy")
    with open(wav, "rb") as f:
        r = http.post("/v1/voices", data={"name": "clone", "speaker": "2", "text": "a voice to copy"},
                      files={"file": ("clone.wav", f, "audio/wav")})
    assert r.status_code == 201, r.text
    assert r.json()["speaker"] == "2" and r.json()["clips"][0]["text"] == "a voice to copy"
    again = http.post("/v1/voices", json={"name": "clone", "audio": base64.b64encode(open(wav, "rb").read()).decode(),
                                          "text": "a voice to copy"})
    assert again.status_code == 409 and error_of(again)["code"] == "voice_exists"
    json_voice = http.post("/v1/voices", json={"name": "clone2", "speaker": 2, "clips": [
        {"audio": base64.b64encode(open(wav, "rb").read()).decode(), "text": "a voice to copy"}]})
    assert json_voice.status_code == 201, json_voice.text
    names = [v["name"] for v in http.get("/v1/voices").json()["data"]]
    assert {"narrator", "clone", "clone2"} <= set(names)

    body = {"model": "csm-1b", "input": "Same voice.", "response_format": "wav", "seed": 4, "max_audio_length_ms": 320}
    # the same codes each time; Mimi decodes the frames in chunks that depend on timing, hence a rounding's slack
    first = wav_samples(http.post("/v1/audio/speech", json={**body, "voice": "clone"}).content)
    assert_same_audio(wav_samples(http.post("/v1/audio/speech", json={**body, "voice": "clone"}).content), first)
    assert_same_audio(wav_samples(http.post("/v1/audio/speech", json={**body, "voice": "clone2"}).content), first)
    saved = server.voices / "clone"
    assert (saved / "codes.npz").is_file() and (saved / "voice.json").is_file()
    encoded = []
    reloaded = VoiceStore(server.voices, lambda w: encoded.append(w) or audio.encode(server.generator.mimi, w), 32)
    reloaded.load_all()
    assert not encoded  # saved codes are reused, never encoded again
    np.testing.assert_array_equal(reloaded.get("clone").clips[0].codes,
                                  server.app.state.service.voices.get("clone").clips[0].codes)
    assert http.delete("/v1/voices/clone2").json()["deleted"]
    assert http.get("/v1/voices/clone2").status_code == 404


def test_openai_voice_names_speak_as_their_speaker_or_mapped_voice_and_a_saved_voice_wins(server, http, monkeypatch,
                                                                                            tmp_path):
    body = {"model": "csm-1b", "input": "Hello there.", "response_format": "wav", "seed": 2, "max_audio_length_ms": 240}
    echo = http.post("/v1/audio/speech", json={**body, "voice": "echo"})  # speaker 4 by default, no context
    assert echo.status_code == 200, echo.text
    assert_same_audio(wav_samples(echo.content), expected(server, "Hello there.", 240, seed=2, context=[], speaker="4"))

    monkeypatch.setattr(server.config, "voice_aliases", {"alloy": "narrator", "nova": "gone", "echo": 4})
    alloy = http.post("/v1/audio/speech", json={**body, "voice": "alloy"})
    assert_same_audio(wav_samples(alloy.content), expected(server, "Hello there.", 240, seed=2))
    missing = http.post("/v1/audio/speech", json={**body, "voice": "nova"})
    assert missing.status_code == 400 and "'gone'" in error_of(missing)["message"]
    unknown = error_of(http.post("/v1/audio/speech", json={**body, "voice": "onyx"}))
    assert unknown["param"] == "voice" and "alloy, echo, nova" in unknown["message"]

    wav = espeak_wav(tmp_path / "echo.wav", "my echo")
    with open(wav, "rb") as f:
        assert http.post("/v1/voices", data={"name": "echo", "speaker": "1", "text": "my echo"},
                         files={"file": ("echo.wav", f, "audio/wav")}).status_code == 201
    try:
        saved = http.post("/v1/audio/speech", json={**body, "voice": "echo"})
        context = [Segment("1", "my echo", audio.read_audio(server.voices / "echo" / "clip0.wav"))]
        assert_same_audio(wav_samples(saved.content), expected(server, "Hello there.", 240, seed=2, context=context))
    finally:
        http.delete("/v1/voices/echo")


def test_unreadable_uploads_name_the_audio_formats_the_server_reads(http):
    noise = base64.b64encode(b"noise, no audio").decode()
    r = http.post("/v1/audio/speech", json={"input": "hi", "context": [{"text": "x", "audio": noise}]})
    assert r.status_code == 400 and "send a wav, flac, ogg or mp3 file" in error_of(r)["message"]
    r = http.post("/v1/voices", json={"name": "noisy", "audio": noise, "text": "x"})
    assert r.status_code == 400 and "send a wav, flac, ogg or mp3 file" in error_of(r)["message"]


def good(http):
    r = http.post("/v1/audio/speech", json={"model": "csm-1b", "input": "ok", "response_format": "pcm",
                                            "max_audio_length_ms": 160})
    assert r.status_code == 200 and len(r.content) == 2 * 1920 * 2


@pytest.mark.parametrize("body, status, param", [
    ({"input": "   "}, 400, "input"),
    ({"input": "x" * 301}, 400, "input"),
    ({"input": "hi", "voice": "nobody"}, 400, "voice"),
    ({"input": "hi", "response_format": "aac"}, 400, "response_format"),
    ({"input": 5}, 400, "input"),
    ({"input": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"input": "hi", "topk": 2.5}, 400, "topk"),
    ({"input": "hi", "speed": 1.5}, 400, "speed"),
    ({"input": "hi", "stream_format": "ws"}, 400, "stream_format"),
    ({"input": "hi", "colour": "blue"}, 400, "colour"),
    ({"input": "hi", "context": [{"text": "x", "audio": "not base64!"}]}, 400, "context[0].audio"),
    ({"input": "hi", "context": [{"text": "x", "audio": base64.b64encode(b"noise").decode()}]}, 400,
     "context[0].audio"),
    ({"input": "hi", "max_audio_length_ms": 10}, 400, "max_audio_length_ms"),
    ({"input": "hi", "max_audio_length_ms": 100000}, 400, "max_audio_length_ms"),
    (["input", "hi"], 400, None),
])
def test_bad_requests_get_a_400_naming_the_field_and_the_server_goes_on(http, body, status, param):
    r = http.post("/v1/audio/speech", json={"model": "csm-1b", **body} if isinstance(body, dict) else body)
    assert r.status_code == status, r.text
    error = error_of(r)
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    good(http)


def test_bad_json_oversize_body_wrong_key_and_unknown_route(server, http):
    r = http.post("/v1/audio/speech", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    r = http.post("/v1/audio/speech", json={"input": "x" * 10, "pad": "y" * (2 << 20)})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}):
        r = httpx.post(server.url + "/v1/audio/speech", json={"input": "hi"}, headers=headers)
        assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).audio.speech.create(
            model="csm-1b", voice="narrator", input="hi")
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    r = http.get("/v1/audio/speech")
    assert r.status_code == 405
    good(http)


def test_prompt_over_the_budget_is_a_400_with_the_fix(server, http):
    r = http.post("/v1/audio/speech", json={"input": "word " * 50, "voice": "narrator", "max_audio_length_ms": 19_000})
    assert r.status_code == 400 and "lower max_audio_length_ms" in error_of(r)["message"]
    good(http)


def wait_idle(http):
    for _ in range(600):
        health = http.get("/health").json()
        if health["busy"] == 0 and health["queued"] == 0:
            return health
        time.sleep(0.1)
    raise AssertionError(f"the server stayed busy: {health}")


def test_a_client_leaving_mid_stream_frees_its_slot(server, http):
    with http.stream("POST", "/v1/audio/speech", json={"input": "a long answer", "response_format": "pcm",
                                                        "max_audio_length_ms": 4000}) as r:
        assert r.status_code == 200
        next(r.iter_bytes())
    wait_idle(http)
    metrics = http.get("/metrics").text
    assert 'csm_requests_total{status="cancelled"}' in metrics
    good(http)


def test_a_full_queue_answers_429_and_recovers(server, http):
    def ask(_):
        r = http.post("/v1/audio/speech", json={"input": "busy", "response_format": "pcm",
                                                "max_audio_length_ms": 1600})
        return r.status_code, r.json()["error"]["code"] if r.status_code != 200 else None

    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        results = list(pool.map(ask, range(7)))
    assert (429, "server_busy") in results and (200, None) in results  # 2 slots + 2 waiting
    wait_idle(http)
    good(http)


def test_health_and_prometheus_metrics(http):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["slots"] == 2 and health["voices"] >= 1 and health["api_key_required"]
    text = http.get("/metrics").text
    for name in ("csm_requests_total", "csm_frames_generated_total", "csm_frames_per_second",
                 "csm_time_to_first_audio_seconds_bucket", "csm_request_seconds_count", "csm_queue_depth",
                 "csm_slots_busy"):
        assert name in text
    assert 'csm_requests_total{status="ok"}' in text


def test_command_line_refuses_bad_settings_and_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--slots", "0"])
    assert exit_info.value.code == 2 and "--slots must be at least 1" in capsys.readouterr().err
    from csm_jax.core.errors import run_main

    assert run_main(serve_main, ["--checkpoint", str(tmp_path / "missing"), "--mimi", "random",
                                 "--voices", str(tmp_path / "v")]) == 2
    assert "error: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--request-timeout", "nan"])
    assert exit_info.value.code == 2 and "'nan' is not a finite number" in capsys.readouterr().err
    voice_map = tmp_path / "voices.json"
    for content, message in [('{"alloy": true}', "'alloy' maps to True"), ('["alloy"]', "holds a JSON list"),
                             ('{"alloy": "../x"}', "voice name '../x' is not allowed")]:
        voice_map.write_text(content)
        assert run_main(serve_main, ["--voice-map", str(voice_map), "--checkpoint", str(tmp_path / "missing")]) == 2
        assert message in capsys.readouterr().err


def test_a_second_server_on_one_voices_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import os

    from csm_jax import serve
    from csm_jax.core.errors import run_main
    from csm_jax.io.locks import exclusive

    (tmp_path / "v" / "alice").mkdir(parents=True)
    (tmp_path / "v" / "alice" / "a.txt").write_text("hello")
    monkeypatch.setattr(serve, "load_generator", lambda args: pytest.fail("loaded the model"))
    with exclusive(tmp_path / "v" / ".lock", "it", "wait"):
        assert run_main(serve_main, ["--mimi", "random", "--voices", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the voices folder {tmp_path / 'v'} is in use by pid {os.getpid()} on "), err
    assert "give this server another --voices folder" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "v").rglob("*")) == ["a.txt", "alice"]


def test_the_command_line_logs_its_start_and_each_request_and_answers_openai_voice_names(model, tmp_path):
    """A real `python -m csm_jax.serve` process, with no voices: its stderr carries "serving on ..." and one JSON line
    at the start and one at the end of each request (the libraries it imports leave a handler on the root logger
    that a plain `logging.basicConfig` gives way to), and OpenAI's voice names are answered as speaker ids."""
    import portpicker

    from csm_jax.io.checkpoint import save_model
    from tests.helpers import WatchedProcess

    port = portpicker.pick_unused_port()
    server = WatchedProcess([sys.executable, "-m", "csm_jax.serve", "--checkpoint", save_model(model, tmp_path / "c"),
                             "--mimi", "random", "--voices", tmp_path / "voices", "--port", port, "--slots", "1",
                             "--api-key", KEY, "--log-level", "info"])
    try:
        server.wait_for(f"serving on http://127.0.0.1:{port}")
        server.wait_for(f"Uvicorn running on http://127.0.0.1:{port}")  # "serving on" comes before the port is bound
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=HANG_SECONDS)
        for voice in ("alloy", "shimmer"):
            speech = client.audio.speech.create(model="csm-1b", voice=voice, input="Hello.", response_format="wav",
                                                extra_body={"max_audio_length_ms": 160, "seed": 1})
            assert len(wav_samples(speech.content)) == 2 * 1920
        server.wait_for('"event": "speech.end", "id": "speech-2"')
    finally:
        server.process.send_signal(signal.SIGINT)
        server.finish()
    events = [json.loads(line[line.index("{"):]) for line in server.err.decode().splitlines()
              if " INFO csm_jax.serve {" in line]
    assert [(e["event"], e["id"]) for e in events] == [("speech.start", "speech-1"), ("speech.end", "speech-1"),
                                                       ("speech.start", "speech-2"), ("speech.end", "speech-2")]
    assert [e["voice"] for e in events[::2]] == ["alloy", "shimmer"]
    assert all(e["status"] == "ok" and e["frames"] == 2 for e in events[1::2])
