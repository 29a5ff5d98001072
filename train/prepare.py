"""python -m train.prepare SRC OUT --worker I --workers N: Mimi-encode training data once into ArrayRecord.

SRC is any data source training reads (`--format`, detected by default): Emilia tar shards, a folder of clips with
transcripts, a JSONL/CSV manifest or a `datasets` dataset (see train/sources.py). Emilia shards are prepared one
output shard per tar; the other formats one shard per worker, `part-I-of-N.array_record`.

Mimi encoding is the expensive step of the tar pipeline; `prepare` does it once per utterance and training then
reads the ArrayRecord shards (`data.source=OUT`). Worker I of N takes every N-th shard of the sorted list, so the
work splits across a SLURM array (`--worker $SLURM_ARRAY_TASK_ID --workers $SLURM_ARRAY_TASK_COUNT`) or one
process per host. Each output shard is written under a temporary name and renamed when complete, next to a
`.json` report of what was skipped; shards whose output exists are skipped, so a killed worker is simply rerun.
Corrupt input never stops a worker: a shard that is not a tar ("unreadable shard") or breaks off ("truncated
shard") is prepared from what could be read, and its report says so.

A record holds the utterance key, text, Emilia metadata and codes (num_codebooks, T) int16; the metadata filters
(language, duration, dnsmos) apply at training time, so one prepared copy serves every filter setting. Every clip
is encoded once, as its own record; a turn's record names its context turns by key (up to `--context-turns`), and
training reads their codes from whichever shard holds them. Long recordings with segment or word times are cut
into clips (`--clip-seconds`) before encoding.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
from pathlib import Path


from csm_jax.core.errors import UserError, run_main
from csm_jax.core.logs import configure_logging
from csm_jax.core.numbers import finite_float
from csm_jax.io.locks import exclusive_making_parents
from train.data import (SKIPPED, DataConfig, DataError, TarShard, check_metadata, decode_audio, list_shards,
                        parse_metadata)
from train.records import SUFFIX, serialize
from train.skips import skip_counts
from train.sources import FORMATS, detect_format


def prepare_shard(tar: Path, output: Path, mimi, num_codebooks: int = 32, batch_size: int = 16) -> dict:
    """One tar shard -> one ArrayRecord shard (atomically); returns the report written next to it."""
    SKIPPED.clear()  # before the shard is opened: an unreadable one is counted then
    return write_records((parse_metadata(raw) for raw in TarShard(tar)), str(tar), output, mimi, num_codebooks,
                         batch_size)


def write_records(examples, source: str, output: Path, mimi, num_codebooks: int = 32, batch_size: int = 16,
                  require_records: bool = False) -> dict:
    """Parsed examples (None where skipped) -> one ArrayRecord shard (atomically); returns the report written next
    to it, with the `SKIPPED` counts (cleared by the caller). The decoded duration is stored in the metadata so the
    duration filters apply at training time. One writer per shard: a second one is refused (`exclusive`), and the
    partial files of killed writers are removed. With `require_records`, a shard that would hold no record is not
    written: a DataError names the skip counts."""
    from csm_jax.io.locks import exclusive

    output.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(output.with_name(f".{output.name}.lock"), f"the shard {output}",
                   "give each worker its own --worker"):
        for stale in output.parent.glob(f".{output.name}.partial-*"):
            stale.unlink()
        return _write_records(examples, source, output, mimi, num_codebooks, batch_size, require_records)


def _write_records(examples, source: str, output: Path, mimi, num_codebooks: int, batch_size: int,
                   require_records: bool) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    from csm_jax.io.audio import SAMPLE_RATE, encode_batch

    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    writer = ArrayRecordWriter(str(partial), "group_size:1")
    written, pending = 0, []

    def flush():
        nonlocal written
        if pending:
            for (example, _), codes in zip(pending, encode_batch(mimi, [a for _, a in pending])):
                meta = example["meta"]
                writer.write(serialize(example["key"], str(meta["text"]).strip(), meta, codes[:num_codebooks]))
                written += 1
            pending.clear()

    try:
        for example in examples:
            audio = decode_audio(example) if example is not None else None
            if audio is not None:
                pending.append(({**example, "meta": {"duration": len(audio) / SAMPLE_RATE, **example["meta"]}},
                                audio))
            if len(pending) == batch_size:
                flush()
        flush()
    finally:
        writer.close()
    if require_records and not written:
        partial.unlink()
        raise DataError(f"no usable example in {source} for {output.name}: skipped {skip_counts(SKIPPED)}; fix "
                        f"what the skip counts name (transcripts, columns such as --audio-column/--text-column, "
                        f"start/end times, clip lengths) and run again")
    report = {"source": source, "records": written, "skipped": dict(SKIPPED)}
    output.with_suffix(".json").write_text(json.dumps(report))
    os.replace(partial, output)  # the shard appears only when complete
    return report


def prepare_examples(source: str, fmt: str, out: Path, mimi, worker: int, workers: int, num_codebooks: int = 32,
                     batch_size: int = 16, cfg: DataConfig = DataConfig()) -> dict | None:
    """This worker's every workers-th example of a folder, manifest or `datasets` source -> one ArrayRecord shard;
    None when that shard exists already; a DataError when no example survives."""
    from train.sources import examples

    output = out / f"part-{worker:05d}-of-{workers:05d}{SUFFIX}"
    if output.exists():
        return None
    SKIPPED.clear()
    found = examples(source, fmt, cfg)  # what listing skipped is counted in the report too
    mine = (found[i] for i in range(worker, len(found), workers))
    report = write_records((check_metadata(x) if x is not None else None for x in mine), source, output, mimi,
                           num_codebooks, batch_size, require_records=True)
    return {"output": str(output), **report}


def _check_worker(worker: int, workers: int) -> None:
    if workers < 1:
        raise UserError(f"--workers {workers} must be at least 1 (the number of workers sharing the shards)")
    if not 0 <= worker < workers:
        raise UserError(f"--worker {worker} is outside 0..{workers - 1}; pass --workers N and --worker in [0, N)")


def my_shards(source: str, out: Path, worker: int, workers: int) -> list[tuple[Path, Path]]:
    """(tar, output) pairs of this worker's share that are not done yet."""
    _check_worker(worker, workers)
    root = Path(source)
    shards = list_shards(source)
    pairs = [(s, out / (s.relative_to(root) if root.is_dir() else Path(s.name)).with_suffix(SUFFIX))
             for s in shards[worker::workers]]
    return [(s, o) for s, o in pairs if not o.exists()]


def main(argv=None) -> int:
    """The command line: exit 0, 2 with one `error: ...` line for a mistake in the arguments, 1 for a bug."""
    return run_main(_main, argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a directory of Emilia .tar shards (or a hub dataset id), a folder of clips with "
                                  "transcripts, a .jsonl/.csv manifest or a datasets dataset")
    p.add_argument("--format", default="auto", choices=FORMATS, help="the source's format (default: detected)")
    p.add_argument("--audio-column", default="audio", help="hf: the audio column")
    p.add_argument("--text-column", default="text", help="hf: the transcript column")
    p.add_argument("--speaker-column", default="", help="hf: a column of CSM speaker ids")
    defaults = DataConfig()
    p.add_argument("--context-turns", type=int, default=defaults.context_turns,
                   help="earlier turns of a conversation recorded as each turn's context (training may use fewer)")
    p.add_argument("--conversation-column", default=defaults.conversation_column,
                   help="manifest/hf: the conversation a turn belongs to")
    p.add_argument("--order-column", default=defaults.order_column, help="manifest/hf: a turn's place in it")
    p.add_argument("--clip-seconds", type=finite_float, nargs=2, default=defaults.clip_seconds, metavar=("MIN", "MAX"),
                   help="clip lengths for long recordings with segment or word times")
    p.add_argument("out", help="output directory; mirrors the source's layout with .array_record shards")
    p.add_argument("--worker", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)),
                   help="this worker's index, 0..N-1 (default: $SLURM_ARRAY_TASK_ID, else 0)")
    p.add_argument("--workers", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)),
                   help="workers sharing the shards, worker I taking every N-th (default: $SLURM_ARRAY_TASK_COUNT, "
                        "else 1)")
    p.add_argument("--mimi", default=None, help="Mimi weights (file or hub id); 'random' for tests")
    p.add_argument("--num-codebooks", type=int, default=32, help="codebooks kept per frame (CSM uses 32)")
    p.add_argument("--batch-size", type=int, default=16, help="utterances per Mimi call")
    p.add_argument("--device", default=None, help="torch device for Mimi (default: cuda when available)")
    return p


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.INFO, "%(levelname)s %(name)s: %(message)s")
    if args.context_turns < 0 or not 0 < args.clip_seconds[0] < args.clip_seconds[1]:
        clips = " ".join(map(str, args.clip_seconds))
        raise UserError(f"--context-turns {args.context_turns} and --clip-seconds {clips}: give 0 or more context "
                        f"turns and clip lengths MIN MAX with 0 < MIN < MAX (e.g. 3 15)")
    if args.batch_size < 1 or not 1 <= args.num_codebooks <= 32:
        raise UserError(f"--batch-size {args.batch_size} and --num-codebooks {args.num_codebooks}: give a batch size "
                        f"of 1 or more and 1 to 32 codebooks (CSM uses 32)")
    fmt = detect_format(args.source, args.format)
    todo = my_shards(args.source, Path(args.out), args.worker, args.workers) if fmt == "emilia" else []
    _check_worker(args.worker, args.workers)
    # this worker's share, before Mimi loads: a second process with the same --worker is refused at once
    with exclusive_making_parents(Path(args.out) / f".worker-{args.worker:05d}-of-{args.workers:05d}.lock",
                                  f"worker {args.worker} of {args.workers} in {args.out}",
                                  "give each worker its own --worker"):
        return _prepare(args, fmt, todo)


def _prepare(args, fmt: str, todo: list[tuple[Path, Path]]) -> int:
    import torch

    from csm_jax.io import audio

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mimi = (audio.random_mimi(0, device, args.num_codebooks) if args.mimi == "random"
            else audio.load_mimi(args.mimi, device, args.num_codebooks))
    if fmt != "emilia":
        cfg = DataConfig(audio_column=args.audio_column, text_column=args.text_column,
                         speaker_column=args.speaker_column, context_turns=args.context_turns,
                         conversation_column=args.conversation_column, order_column=args.order_column,
                         clip_seconds=tuple(args.clip_seconds))
        report = prepare_examples(args.source, fmt, Path(args.out), mimi, args.worker, args.workers,
                                  args.num_codebooks, args.batch_size, cfg)
        print(json.dumps(report) if report else f"worker {args.worker}/{args.workers}: already prepared", flush=True)
        return 0
    broken, records, skipped = 0, 0, collections.Counter()
    for tar, output in todo:
        report = prepare_shard(tar, output, mimi, args.num_codebooks, args.batch_size)
        broken += any(reason.endswith(" shard") for reason in report["skipped"])
        records += report["records"]
        skipped.update(report["skipped"])
        print(json.dumps({"output": str(output), **report}), flush=True)
    note = f" ({broken} unreadable or truncated: see their .json reports)" if broken else ""
    print(f"worker {args.worker}/{args.workers}: {len(todo)} shards prepared{note}", flush=True)
    if todo and not records:
        raise DataError(f"no usable example in this worker's {len(todo)} shards of {args.source}: skipped "
                        f"{skip_counts(skipped)}; see the shards' .json reports and give shards with readable audio "
                        f"and metadata")
    return 0


if __name__ == "__main__":
    sys.exit(main())
