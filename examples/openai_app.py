"""An app written for OpenAI's speech API, pointed at csm-jax's server: one file, then one stream.

    python -m csm_jax.serve --voices voices/ &          # the server (see docs/guides/serving.md)
    python examples/openai_app.py --base-url http://127.0.0.1:8000/v1 --voice narrator
"""

import argparse
import os

from openai import OpenAI

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
parser.add_argument("--api-key", default=os.environ.get("CSM_API_KEY", "none"), help="the server's --api-key")
parser.add_argument("--voice", default="narrator", help="a voice saved on the server")
parser.add_argument("--out", default="hello.wav")
args = parser.parse_args()

client = OpenAI(base_url=args.base_url, api_key=args.api_key)
# OpenAI's fields, plus CSM's own in extra_body: seed, temperature, topk, max_audio_length_ms, speaker, context
csm = {"seed": 0, "temperature": 0.9, "topk": 50, "max_audio_length_ms": 10_000}
speech = client.audio.speech.create(model="csm-1b", voice=args.voice, input="Hello there.", response_format="wav",
                                    extra_body=csm)
speech.write_to_file(args.out)
print(f"wrote {args.out}")

pcm = bytearray()
with client.audio.speech.with_streaming_response.create(model="csm-1b", voice=args.voice, input="Streaming now.",
                                                        response_format="pcm", extra_body=csm) as response:
    for chunk in response.iter_bytes():  # 16-bit little-endian 24 kHz mono, as it is generated: play it here
        pcm += chunk
print(f"streamed {len(pcm) // 2 / 24_000:.2f} s of audio")
