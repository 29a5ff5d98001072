"""The command line's modes beyond one utterance: a long text, a dialogue script, a batch of lines.

    python -m csm_jax.generate --text-file story.txt --out story.wav
    python -m csm_jax.generate --script dialogue.jsonl --out talk.wav          # + talk_001.wav, talk_002.wav ...
    python -m csm_jax.generate --batch-file lines.txt --out-dir lines/ --batch-size 8

A dialogue script has one JSON object per line: {"speaker": 0, "text": "...", "audio": "optional.wav"}; a turn with
audio is a recorded turn, used as context for the turns after it instead of being generated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from csm_jax.core.codec import FRAME_SECONDS
from csm_jax.core.errors import UserError
from csm_jax.core.numbers import finite_float

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
    m.add_argument("--overwrite", action="store_true", help="replace per-turn or per-line wavs that already exist "
                   "(without it such a run is refused before anything is generated)")
    m.add_argument("--crossfade-ms", type=finite_float, default=30.0, help="equal-power crossfade between utterances "
                   "(default 30)")
    e = p.add_argument_group("end of speech (see docs/guides/end-of-speech.md)")
    e.add_argument("--end-bias", type=finite_float, default=0.0,
                   help="added to codebook 0's logit of the end code from "
                   "--min-frames on; a 0 there ends the utterance (default 0 = off)")
    e.add_argument("--min-frames", type=int, default=10, help="frames (80 ms) before --end-bias applies (default 10)")
    e.add_argument("--stop-after-silence-ms", type=finite_float, default=1200.0,
                   help="stop an utterance after this much "
                   "near-silent decoded audio following speech (default 1200; 0 = off)")
    e.add_argument("--silence-db", type=finite_float, default=-45.0,
                   help="RMS level (dBFS) below which audio counts as "
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
    for bad, message in [(args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
                         (args.max_words < 1, f"--max-words must be >= 1, got {args.max_words}"),
                         (args.crossfade_ms < 0, f"--crossfade-ms must be >= 0 (0 = butt joins), got "
                                                 f"{args.crossfade_ms:g}")]:
        if bad:
            parser.error(message)
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


@dataclasses.dataclass
class Plan:
    """What a mode will say and write, read and checked before the model loads."""

    turns: list[tuple[int, str, Path | None]]  # --text-file and --script: (speaker, text, recorded audio or None)
    lines: list[tuple[int, str]]  # --batch-file: (line number, text)
    outputs: list[Path]  # the files written besides --out: per-turn or per-line wavs


def plan(args, speaker: int) -> Plan:
    """Reads the mode's file and checks the whole output set: every per-turn or per-line wav can be written, and
    none replaces an existing file unless --overwrite was given."""
    from csm_jax.inference.longform import split_text

    turns, lines = [], []
    if args.text_file is not None:
        turns = [(speaker, t, None) for t in split_text(read_text(args.text_file, "--text-file"), args.max_words)]
        if not turns:
            raise UserError(f"{args.text_file} has no text; give the words to say")
    elif args.script is not None:
        turns = read_script(args.script)
    else:
        lines = [(number, line.strip()) for number, line in
                 enumerate(read_text(args.batch_file, "--batch-file").splitlines(), 1) if line.strip()]
        if not lines:
            raise UserError(f"{args.batch_file} has no lines of text; write one utterance per line")
    outputs = []
    if args.script is not None:
        outputs = [numbered(Path(args.out), args.out_dir, i, len(turns)) for i in range(1, len(turns) + 1)]
    elif lines:
        width = max(3, len(str(lines[-1][0])))
        outputs = [Path(args.out_dir) / f"{number:0{width}d}.wav" for number, _ in lines]
    check_outputs(args, outputs)
    return Plan(turns, lines, outputs)


def check_outputs(args, outputs: list[Path]) -> None:
    from csm_jax.io import audio

    if not outputs:
        return
    if args.out_dir is not None and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise UserError(f"--out-dir {args.out_dir} is a file; give a folder for the wavs (it is made when missing)")
    where = f"--out-dir {args.out_dir}" if args.out_dir is not None else f"{Path(args.out).parent}"
    if args.out is not None and Path(args.out).resolve() in {p.resolve() for p in outputs}:
        raise UserError(f"--out {args.out} is also the name of a per-turn wav; give --out another name")
    existing = [p for p in outputs if os.path.lexists(p)]
    if existing and not args.overwrite:
        names = ", ".join(p.name for p in existing[:5]) + (f" ... ({len(existing)} in all)" if len(existing) > 5
                                                           else "")
        raise UserError(f"{where} already holds {names}, which this run would replace; nothing was written. Pass "
                        f"--overwrite to replace them, or give another "
                        f"{'--out-dir' if args.out_dir is not None else '--out'}")
    for path in [outputs[0], *existing]:
        audio.check_output_path(path)


def read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        f"give a plain text file") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path} ({e.strerror}); give a readable text file") from None


def read_script(path: str) -> list[tuple[int, str, Path | None]]:
    """Dialogue turns from a JSON-lines file: (speaker, text, recorded audio inside the script's folder or None)."""
    from csm_jax.inference.prompt import speaker_id

    folder = Path(path).resolve().parent
    turns = []
    for number, line in enumerate(read_text(path, "--script").splitlines(), 1):
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
        speaker = speaker_id(item.get("speaker", 0), f"{where}: speaker")
        wav = None
        if item.get("audio") is not None:
            if not isinstance(item["audio"], str):
                raise UserError(f"{where}: audio {item['audio']!r} is not a path; give the recording's path relative "
                                f"to the script as a string")
            wav = (folder / item["audio"]).resolve()
            if folder not in wav.parents:
                raise UserError(f"{where}: audio {item['audio']!r} is outside the script's folder {folder}; put the "
                                f"recording in that folder (or below it) and give its path relative to the script")
            if not wav.is_file():
                raise UserError(f"{where}: audio {wav} does not exist; give a path relative to the script")
        turns.append((speaker, item["text"].strip(), wav))
    if not turns:
        raise UserError(f"{path} has no turns; write one JSON object per line")
    return turns


def numbered(out: Path, out_dir: str | None, index: int, count: int) -> Path:
    width = max(3, len(str(count)))
    if out_dir is not None:
        return Path(out_dir) / f"{index:0{width}d}.wav"
    return out.with_name(f"{out.stem}_{index:0{width}d}{out.suffix or '.wav'}")


def run(args, plan: Plan, generator, sampling, context) -> int:
    """Runs the mode the arguments ask for with a loaded generator; returns the exit code."""
    from tqdm import tqdm

    from csm_jax.inference.longform import Turn, crossfade_join, generate_conversation
    from csm_jax.io import audio

    eos = end_of_speech_from_args(args)
    n = generator.frames.config.num_codebooks
    if plan.lines:
        return run_batch(args, plan, generator, sampling, eos)
    turns = [Turn(speaker, text, None if wav is None else audio.encode(generator.mimi, audio.read_audio(wav))[:n])
             for speaker, text, wav in plan.turns]
    out = Path(args.out)
    with tqdm(total=len(turns), unit="utterance", file=sys.stderr, desc="generating") as bar:
        def done(i, result):
            bar.update(1)
            if plan.outputs:
                audio.write_audio(plan.outputs[i], result.audio)

        results = generate_conversation(generator, turns, context=context,
                                        max_audio_length_ms=args.max_audio_length_ms, sampling=sampling,
                                        seed=args.seed, end_of_speech=eos, on_turn=done)
    wave = crossfade_join([r.audio for r in results], args.crossfade_ms)
    audio.write_audio(out, wave)
    print(f"wrote {out}: {len(turns)} utterances, {len(wave) / audio.SAMPLE_RATE:.2f} s of 24 kHz audio",
          file=sys.stderr)
    return 0


def run_batch(args, plan: Plan, generator, sampling, eos) -> int:
    from tqdm import tqdm

    from csm_jax.inference.generator import Request
    from csm_jax.io import audio

    frames = 0
    with tqdm(total=len(plan.lines), unit="utterance", file=sys.stderr, desc="generating") as bar:
        for start in range(0, len(plan.lines), args.batch_size):
            chunk = plan.lines[start:start + args.batch_size]
            requests = [Request(text, args.speaker) for _, text in chunk]
            codes = generator.generate_codes(requests, args.max_audio_length_ms,
                                             seeds=[args.seed + k for k, _ in chunk], sampling=sampling,
                                             logits_processor=eos.processor())
            for path, row, wave in zip(plan.outputs[start:start + args.batch_size], codes, generator.decode(codes)):
                row, wave = eos.finish(row, wave)
                frames += row.shape[1]
                audio.write_audio(path, generator.mark(wave))
            bar.update(len(chunk))
    print(f"wrote {len(plan.lines)} wavs to {args.out_dir}: {frames * FRAME_SECONDS:.2f} s of 24 kHz audio",
          file=sys.stderr)
    return 0
