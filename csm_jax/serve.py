r"""Command line: an OpenAI-compatible speech server with continuous batching and voices.

    python -m csm_jax.serve --checkpoint sesame/csm-1b --host 127.0.0.1 --port 8000 --slots 8 --voices voices/

`POST /v1/audio/speech` as OpenAI defines it (plus CSM's context, sampling, seed and length fields), voices
under /v1/voices, `GET /health`, `GET /metrics` (Prometheus) and a playground page at `/`. The API key comes from
--api-key or $CSM_API_KEY; without one the API is open (bind to 127.0.0.1 then).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from csm_jax.core.errors import UserError, run_main
from csm_jax.core.logs import configure_logging
from csm_jax.core.numbers import finite_float
from csm_jax.generate import add_dtype_arguments

# JAX would otherwise take 75% of a GPU's memory at start-up and leave too little for Mimi (PyTorch) beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

API_KEY_ENV = "CSM_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m csm_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="sesame/csm-1b", help="csm-jax checkpoint directory, PyTorch "
                   "checkpoint or hub id (default sesame/csm-1b)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--slots", type=int, default=8, help="requests generated together in one decode batch "
                   "(default 8)")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting for a slot before 429 (default 32)")
    p.add_argument("--chunk-frames", type=int, default=2, help="frames per device call; new requests join and "
                   "audio leaves at these boundaries (default 2)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default ${API_KEY_ENV})")
    p.add_argument("--voices", default=None, help="voices folder: one subfolder per voice with audio clips and a "
                   ".txt transcript beside each; new voices are saved here (default ~/.cache/csm_jax/voices)")
    p.add_argument("--voice-map", default=None, help="JSON file of voice names a request may send without a saved "
                   "voice of that name -> a saved voice's name or a speaker id, e.g. {\"alloy\": \"narrator\", "
                   "\"echo\": 3}; OpenAI's names (alloy, ash, ballad, coral, echo, fable, nova, onyx, sage, "
                   "shimmer, verse, marin, cedar) stand for speaker ids 0-12 unless the file says otherwise")
    add_dtype_arguments(p)
    p.add_argument("--tokenizer", default=None, help="Llama-3 tokenizer directory or hub id (default: offline "
                   "tokenizer.model from llama-models)")
    p.add_argument("--mimi", default=None, help="Mimi weights (.safetensors) or hub id (default: "
                   "kyutai/moshiko-pytorch-bf16); 'random' builds random weights, for tests only")
    p.add_argument("--max-audio-length-ms", type=finite_float, default=90_000,
                   help="longest audio a request may ask for")
    p.add_argument("--max-input-chars", type=int, default=4096, help="longest input text (default 4096)")
    p.add_argument("--max-body-mb", type=finite_float, default=20, help="largest request body in MiB (default 20)")
    p.add_argument("--request-timeout", type=finite_float, default=300, help="seconds a request may take (default 300)")
    p.add_argument("--cache-length", type=int, default=None, help="a slot's KV-cache length in frames (default: "
                   "the model's max_seq_len + 64)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def load_generator(args):
    """The `Generator`, loaded as the generate command line loads it (no watermark: streamed audio is not
    watermarked)."""
    import jax.numpy as jnp

    from csm_jax.inference.generator import load_csm_1b
    from csm_jax.io import audio

    mimi = audio.random_mimi(0) if args.mimi == "random" else args.mimi
    return load_csm_1b(args.checkpoint, dtype=jnp.dtype(args.dtype),
                       param_dtype=args.weights_dtype or args.dtype, tokenizer=args.tokenizer, mimi=mimi,
                       watermark=False)


def config_from_args(args, parser):
    from csm_jax.serving.app import ServeConfig
    from csm_jax.serving.voices import DEFAULT_ALIASES, read_aliases

    for name in ("slots", "max_queue", "chunk_frames", "max_input_chars"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_audio_length_ms < 80:
        parser.error(f"--max-audio-length-ms {args.max_audio_length_ms} is shorter than one 80 ms frame")
    return ServeConfig(slots=args.slots, max_queue=args.max_queue, chunk_frames=args.chunk_frames,
                       api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                       max_body_bytes=int(args.max_body_mb * (1 << 20)), max_input_chars=args.max_input_chars,
                       max_audio_ms=args.max_audio_length_ms, request_timeout=args.request_timeout,
                       cache_length=args.cache_length,
                       voice_aliases=read_aliases(args.voice_map) if args.voice_map else dict(DEFAULT_ALIASES))


@contextlib.contextmanager
def serve_in_background(app, host: str = "127.0.0.1"):
    """Serves the ASGI `app` (`csm_jax.serving.app.build_app`) with uvicorn on a free port of `host`, from a thread of
    this process, for the `with` block's duration; yields its base URL. For notebooks, tests and benchmarks."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the server on port {port} did not start (its error is logged above)")
            time.sleep(0.05)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, "%(asctime)s %(levelname)s %(name)s %(message)s")
    config = config_from_args(args, parser)

    import uvicorn

    from csm_jax.io.hub import cache_dir
    from csm_jax.io.locks import exclusive
    from csm_jax.serving.app import build_app

    voices = Path(args.voices or cache_dir() / "voices")
    try:
        voices.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the voices folder {voices} ({e.strerror}); give --voices a folder you can "
                        f"write to") from None
    with exclusive(voices / ".lock", f"the voices folder {voices}", "give this server another --voices folder"):
        try:
            app = build_app(load_generator(args), config, str(voices))
        except (ValueError, OSError) as e:  # a bad checkpoint, tokenizer, Mimi or voices folder
            raise UserError(str(e)) from None
        logging.getLogger("csm_jax.serve").info("serving on http://%s:%d (%d slots, voices in %s)", args.host,
                                                args.port, config.slots, voices)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
