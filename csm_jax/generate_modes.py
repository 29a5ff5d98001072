"""The command line's modes beyond one utterance: a long text, a dialogue script, a batch of lines.

    python -m csm_jax.generate --text-file story.txt --out story.wav
    python -m csm_jax.generate --script dialogue.jsonl --out talk.wav          # + talk_001.wav, talk_002.wav ...
    python -m csm_jax.generate --batch-file lines.txt --out-dir lines/ --batch-size 8

A dialogue script has one JSON object per line: {"speaker": 0, "text": "...", "audio": "optional.wav"}; a turn with
audio is a recorded turn, used as context for the turns after it instead of being generated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from csm_jax.core.codec import FRAME_SECONDS
from csm_jax.core.errors import UserError

MODES = ("text_file", "script", "batch_file")


def add_arguments(p) -> None:
    m = p.add_argument_group("long texts, dialogues and batches (instead of --text)")
    m.add_argument("--text-file", default=None, help="a text of any length: split into sentences, generated in order "
                   "with the earlier ones as context, joined into --out")
    m.add_argument("--script", default=None, help="a dialogue, JSON lines {\"speaker\": 0, \"text\": ..., "
                   "\"audio\": optional recorded turn}: writes the conversation to --out and each turn beside it "
                   "(or into --out-dir)")
    m.add_argument("--batch-file", default=None, help="independent utterances, one per line, generated together in "
                   "batches; one wav per line in --out-dir, named by line number")
    m.add_argument("--out-dir", default=None, help="folder for per-turn (--script) or per-line (--batch-file) wavs")
    m.add_argument("--batch-size", type=int, default=8, help="rows generated together with --batch-file (default 8)")
    m.add_argument("--max-words", type=int, default=40, help="words per utterance of --text-file (default 40)")
    m.add_argument("--crossfade-ms", type=float, default=30.0, help="equal-power crossfade between utterances "
                   "(default 30)")
    e = p.add_argument_group("end of speech (see docs/guides/end-of-speech.md)")
    e.add_argument("--end-bias", type=float, default=0.0, help="added to codebook 0's logit of the end code from "
                   "--min-frames on; a 0 there ends the utterance (default 0 = off)")
    e.add_argument("--min-frames", type=int, default=10, help="frames (80 ms) before --end-bias applies (default 10)")
    e.add_argument("--stop-after-silence-ms", type=float, default=1200.0, help="stop an utterance after this much "
                   "near-silent decoded audio following speech (default 1200; 0 = off)")
    e.add_argument("--silence-db", type=float, default=-45.0, help="RMS level (dBFS) below which audio counts as "
                   "near-silence (default -45)")
    e.add_argument("--trim-silence", action="store_true", help="cut trailing near-silent audio from each utterance")


def wanted(args) -> bool:
    return any(getattr(args, m) is not None for m in MODES)


def end_of_speech_from_args(args):
    from csm_jax.inference.end_of_speech import EndOfSpeech

    return EndOfSpeech(end_bias=args.end_bias, min_frames=args.min_frames,
                       stop_after_silence_ms=args.stop_after_silence_ms, silence_db=args.silence_db,
                       trim_silence=args.trim_silence)


def check_arguments(args, parser) -> None:
    given = [m for m in ("text", *MODES) if getattr(args, m) is not None]
    if len(given) != 1:
        parser.error("give exactly one of --text, --text-file, --script, --batch-file"
                     + (f" (got {', '.join('--' + g.replace('_', '-') for g in given)})" if given else ""))
    if args.batch_file is not None and args.out_dir is None:
        parser.error("--batch-file writes one wav per line; give the folder with --out-dir")
    if args.batch_file is None and args.out is None:
        parser.error("give the output wav with --out")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.stream and args.text is None:
        parser.error("--stream writes one utterance; use it with --text")
    for name in MODES:
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            parser.error(f"--{name.replace('_', '-')} {path} does not exist")
    try:
        end_of_speech_from_args(args)
    except UserError as e:
        parser.error(str(e))


def read_script(path: str, mimi, num_codebooks: int):
    """Dialogue turns from a JSON-lines file; recorded turns' audio is read and Mimi-encoded."""
    from csm_jax.inference.longform import Turn
    from csm_jax.io import audio

    turns = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not JSON ({e.msg}); write one object per line like "
                            f"{{\"speaker\": 0, \"text\": \"Hello.\"}}") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise UserError(f"{where} needs a non-empty \"text\" string, like {{\"speaker\": 0, \"text\": \"Hello.\"}}")
        unknown = set(item) - {"speaker", "text", "audio"}
        if unknown:
            raise UserError(f"{where} has unknown keys {sorted(unknown)}; the keys are speaker, text and audio")
        codes = None
        if item.get("audio") is not None:
            wav = Path(path).parent / item["audio"]
            if not wav.is_file():
                raise UserError(f"{where}: audio {wav} does not exist; give a path relative to the script")
            codes = audio.encode(mimi, audio.read_audio(wav))[:num_codebooks]
        turns.append(Turn(item.get("speaker", 0), item["text"].strip(), codes))
    if not turns:
        raise UserError(f"{path} has no turns; write one JSON object per line")
    return turns


def numbered(out: Path, out_dir: str | None, index: int, count: int) -> Path:
    width = max(3, len(str(count)))
    if out_dir is not None:
        return Path(out_dir) / f"{index:0{width}d}.wav"
    return out.with_name(f"{out.stem}_{index:0{width}d}{out.suffix or '.wav'}")


def run(args, generator, sampling, context) -> int:
    """Runs the mode the arguments ask for with a loaded generator; returns the exit code."""
    from tqdm import tqdm

    from csm_jax.inference.longform import Turn, crossfade_join, generate_conversation, split_text
    from csm_jax.io import audio

    eos = end_of_speech_from_args(args)
    n = generator.frames.config.num_codebooks
    if args.batch_file is not None:
        return run_batch(args, generator, sampling, eos)
    if args.text_file is not None:
        pieces = split_text(Path(args.text_file).read_text(encoding="utf-8"), args.max_words)
        if not pieces:
            raise UserError(f"{args.text_file} has no text; give the words to say")
        turns = [Turn(args.speaker, t) for t in pieces]
    else:
        turns = read_script(args.script, generator.mimi, n)
    bar = tqdm(total=len(turns), unit="utterance", file=sys.stderr, desc="generating")
    out = Path(args.out)

    def done(i, result):
        bar.update(1)
        if args.script is not None:
            audio.write_audio(numbered(out, args.out_dir, i + 1, len(turns)), result.audio)

    results = generate_conversation(generator, turns, context=context, max_audio_length_ms=args.max_audio_length_ms,
                                    sampling=sampling, seed=args.seed, end_of_speech=eos, on_turn=done)
    bar.close()
    wave = crossfade_join([r.audio for r in results], args.crossfade_ms)
    audio.write_audio(out, wave)
    print(f"wrote {out}: {len(turns)} utterances, {len(wave) / audio.SAMPLE_RATE:.2f} s of 24 kHz audio",
          file=sys.stderr)
    return 0


def run_batch(args, generator, sampling, eos) -> int:
    from tqdm import tqdm

    from csm_jax.inference.generator import Request
    from csm_jax.io import audio

    lines = [(number, line.strip()) for number, line in
             enumerate(Path(args.batch_file).read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"{args.batch_file} has no lines of text; write one utterance per line")
    bar = tqdm(total=len(lines), unit="utterance", file=sys.stderr, desc="generating")
    width = max(3, len(str(lines[-1][0])))
    frames = 0
    for start in range(0, len(lines), args.batch_size):
        chunk = lines[start:start + args.batch_size]
        requests = [Request(text, args.speaker) for _, text in chunk]
        codes = generator.generate_codes(requests, args.max_audio_length_ms, seeds=[args.seed + k for k, _ in chunk],
                                         sampling=sampling, logits_processor=eos.processor())
        for (number, _), row, wave in zip(chunk, codes, generator.decode(codes)):
            row, wave = eos.finish(row, wave)
            frames += row.shape[1]
            audio.write_audio(Path(args.out_dir) / f"{number:0{width}d}.wav", generator.mark(wave))
        bar.update(len(chunk))
    bar.close()
    print(f"wrote {len(lines)} wavs to {args.out_dir}: {frames * FRAME_SECONDS:.2f} s of 24 kHz audio",
          file=sys.stderr)
    return 0
