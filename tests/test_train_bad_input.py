"""python -m train and python -m train.prepare on bad input: every mistake exits 2 with one `error: ...` line that
names the fix and no traceback, before anything existing is touched; corrupt shards and members are skipped and
counted, never fatal; data that gives no usable example stops after one pass instead of looping forever."""

import dataclasses
import os
import json
import shutil
import signal
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import HANG_SECONDS, add_member, utterance_json
from train.__main__ import main as train_main
from train.data import SKIPPED, DataConfig, DataError, Featurizer, dataset, list_shards, tar_dataset
from train.prepare import main as prepare_main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--config", "train/configs/smoke.py"]


@contextmanager
def bounded(seconds: int = HANG_SECONDS):
    """Turns a hang (the bug these tests guard against) into a failure instead of a stuck test session; generous,
    as a compile on a loaded 2-core machine takes minutes."""
    def hung(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang?")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run(main, capsys, *argv) -> tuple[int, str]:
    with bounded():
        code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err.strip().splitlines()[-1] if err.strip() else ""


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corrupt(shards, tmp_path_factory) -> Path:
    """The `shards` EN shard (4 utterances, 4 corrupt members) beside a truncated ZH shard (its first utterance
    intact), a shard with one good utterance and members with a non-numeric duration and dnsmos, a file that is
    not a tar, and an empty one."""
    d = tmp_path_factory.mktemp("corrupt")
    (d / "EN").mkdir()
    shutil.copy(shards / "EN" / "EN-B000000.tar", d / "EN" / "EN-B000000.tar")
    zh = (shards / "ZH" / "ZH-B000000.tar").read_bytes()
    with tarfile.open(shards / "ZH" / "ZH-B000000.tar") as tar:
        members = tar.getmembers()
        mp3 = tar.extractfile(members[0]).read()
    cut = members[2].offset_data + members[2].size // 2  # inside the second utterance's audio
    (d / "ZH").mkdir()
    (d / "ZH" / "ZH-B000000.tar").write_bytes(zh[:cut])
    with tarfile.open(d / "EN" / "EN-B000001.tar", "w") as tar:
        for key, fields in [("good", {}), ("bad_duration", {"duration": "two seconds"}),
                            ("bad_dnsmos", {"dnsmos": "high"})]:
            add_member(tar, f"{key}.mp3", mp3)
            add_member(tar, f"{key}.json", json.dumps({**json.loads(utterance_json(key, "A sentence.", "EN")),
                                                **fields}).encode())
    (d / "XX").mkdir()
    (d / "XX" / "XX-B000000.tar").write_bytes(b"this is not a tar archive\n" * 40)
    (d / "XX" / "XX-B000001.tar").write_bytes(b"")
    return d


EXPECTED_SKIPS = {"missing json": 1, "empty text": 1, "non-finite audio": 1, "bad audio": 1, "truncated shard": 1,
                  "unreadable shard": 2, "bad duration": 1, "bad dnsmos": 1}
GOOD_UTTERANCES = 4 + 1 + 1  # EN-B000000, the head of the truncated ZH shard, "good"


@pytest.fixture(scope="module")
def featurizer():
    from csm_jax.io import audio, text
    return Featurizer(text.load_tokenizer(), audio.random_mimi(0), DataConfig(max_frames=128))


def test_corrupt_shards_and_members_are_skipped_counted_and_logged_once_per_shard(corrupt, featurizer, caplog):
    SKIPPED.clear()
    cfg = DataConfig(max_frames=128, batch_size=1, shuffle_window=2, interleave=3)
    with bounded(), caplog.at_level("WARNING", logger="train.data"):
        batches = list(tar_dataset(list_shards(str(corrupt)), cfg, featurizer, repeat=False))
        assert len(batches) == GOOD_UTTERANCES and dict(SKIPPED) == EXPECTED_SKIPS
        with pytest.raises(DataError):  # a second pass that the language filter empties
            list(tar_dataset(list_shards(str(corrupt)), dataclasses.replace(cfg, languages=("FR",)), featurizer))
    assert SKIPPED["unreadable shard"] == 4 and SKIPPED["truncated shard"] == 2  # counted on every pass ...
    for shard in ("ZH-B000000.tar", "XX-B000000.tar", "XX-B000001.tar"):  # ... logged once
        assert sum(shard in r.getMessage() and "shard" in r.getMessage() for r in caplog.records) == 1, shard


@pytest.mark.parametrize("filters, source, skips", [  # 8 members of all the shards have readable metadata
    (DataConfig(languages=("FR",)), ".", ["language filter 8", "unreadable shard 2", "truncated shard 1"]),
    (DataConfig(max_duration=1.0), ".", ["duration filter 8", "unreadable shard 2", "truncated shard 1"]),
    (DataConfig(min_dnsmos=4.0), ".", ["dnsmos filter 8", "unreadable shard 2", "truncated shard 1"]),
    (DataConfig(max_frames=8), "EN/EN-B000001.tar", ["longer than max_frames=8 1", "bad duration 1"]),
    (DataConfig(), "XX", ["unreadable shard 2"]),
])
def test_a_pass_with_no_usable_example_names_the_filters_and_the_skips(corrupt, featurizer, filters, source, skips):
    cfg = dataclasses.replace(filters, batch_size=1, shuffle_window=2)
    featurizer = dataclasses.replace(featurizer, cfg=cfg)
    with bounded(), pytest.raises(DataError) as e:
        next(iter(tar_dataset(list_shards(str(corrupt / source)), cfg, featurizer)))  # endless passes, yet stops
    message = str(e.value)
    assert all(skip in message for skip in skips), message
    for name in ("data.languages=", "data.min_duration=", "data.max_duration=", "data.min_dnsmos=",
                 "data.max_frames="):
        assert name in message
    assert "widen the filters" in message


@pytest.fixture(scope="module")
def trained(corrupt, tmp_path_factory) -> Path:
    """A two-step smoke run over the corrupt shards: it must finish and leave checkpoints and an export."""
    workdir = tmp_path_factory.mktemp("run") / "workdir"
    SKIPPED.clear()
    with bounded():
        code = train_main([*SMOKE, f"data.source={corrupt}", f"workdir={workdir}", "steps=2", "log_every=1",
                           "save_every=1"])
    assert code == 0
    return workdir


def test_a_run_over_corrupt_shards_trains_and_reports_the_skips(trained):
    assert (trained / "export" / "metadata.json").is_file() and (trained / "checkpoints" / "2").is_dir()
    metrics = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["skipped/unreadable shard"] >= 1 and metrics["skipped/truncated shard"] >= 1


def test_empty_data_stops_with_exit_2_instead_of_looping(corrupt, trained):
    """In a subprocess under a timeout: before the fix this looped forever, logging a skip per member."""
    before = snapshot(trained)
    out = subprocess.run([sys.executable, "-m", "train", *SMOKE, f"data.source={corrupt}", f"workdir={trained}",
                          "steps=3", "data.languages=FR"], cwd=ROOT, capture_output=True, text=True,
                         timeout=HANG_SECONDS)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no usable example in a full pass") and "language filter" in last
    assert "data.languages=('FR',)" in last and "widen the filters" in last
    assert snapshot(trained) == before  # the restored run's checkpoints, metrics and export are untouched


@pytest.mark.parametrize("argv, fix", [
    (["model=tiny"], "resume with that run's config, or give a new workdir"),
    (["optim.learning_rate=abc"], "expected a finite number (e.g. optim.learning_rate=1e-4)"),
    (["steps=-5"], "set steps to a value above 0"),
    (["steps=1"], "already holds step 2, past steps=1; set steps=2 or more to continue that run"),
])
def test_mistakes_leave_an_existing_run_untouched(corrupt, trained, capsys, argv, fix):
    before = snapshot(trained)
    code, err = run(train_main, capsys, *SMOKE, f"data.source={corrupt}", f"workdir={trained}", "steps=3", *argv)
    assert code == 2 and err.startswith("error: ") and fix in err, err
    assert snapshot(trained) == before


def config_file(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize("make_argv, fix", [
    (lambda d, tmp: [*SMOKE], "no training data: set data.source=DIR"),
    (lambda d, tmp: [*SMOKE, "data.source="], "no training data: set data.source=DIR"),
    (lambda d, tmp: [*SMOKE, f"data.source={tmp}/missing"], "does not exist; give a directory of Emilia .tar"),
    (lambda d, tmp: [*SMOKE, f"data.source={tmp}"], "no *.tar shards and no audio clips under"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", f"workdir={tmp}/file.txt"], "is a file; give a directory"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", f"workdir={tmp}/file.txt/run"], "is inside the file"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "optim.learning_rate=abc"], "optim.learning_rate=1e-4"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "optim.learning_rate=-1e-4"], "set optim.learning_rate to a value "
                                                                                "above 0"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "data.batch_size=0"], "set data.batch_size to a value above 0"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "steps=ten"], "expected a whole number (e.g. steps=100)"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "mesh=(0,1,1)"], "positive device count"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "mesh=(-1,-1,1)"], "at most one may be -1"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "mesh=(1,1)"], "expected 3 values"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "mesh=(64,1,1)"], "change the mesh sizes"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "model=huge"], "known presets: csm_1b"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "optim.total_steps=500"], "has no field 'total_steps'"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "optim.schedule=linear"], "constant, cosine"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "optim.warmup_steps=50"], "lower optim.warmup_steps"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "compute_dtype=int8"], "float32, bfloat16"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "data=EN"], "set its fields one by one"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "steps"], "key=value"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "data.min_duration=40"], "swap or widen them"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", f"init={tmp}"], "convert PyTorch weights first"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "eval_every=5", "data.eval_fraction=0"],
     "set eval_source=DIR"),
    (lambda d, tmp: [*SMOKE, f"data.source={d}", "eval_every=5", "data.eval_fraction=1e-6"],
     "gives fewer usable examples than one batch"),
    (lambda d, tmp: ["--config", config_file(tmp, "c.json", "{}"), f"data.source={d}"],
     "is not a Python config file: a config file is a Python file whose get_config()"),
    (lambda d, tmp: ["--config", f"{tmp}/missing.py"], "does not exist; a config file is"),
    (lambda d, tmp: ["--config", config_file(tmp, "c.py", "x = 1\n")], "defines no get_config()"),
    (lambda d, tmp: ["--config", config_file(tmp, "c.py", "def get_config(:\n")], "syntax error at line 1"),
    (lambda d, tmp: ["--config", config_file(tmp, "c.py", "def get_config():\n    return Foo()\n")],
     "failed (line 2): NameError"),
    (lambda d, tmp: ["--config", config_file(tmp, "c.py", "def get_config():\n    return {}\n")],
     "returned dict, not a TrainConfig"),
    (lambda d, tmp: ["--config", config_file(tmp, "c.py", "from train.configs.smoke import get_config\n"
                                                       "def finalize(cfg):\n    cfg.steps\n")],
     "returned NoneType, not a TrainConfig"),
    (lambda d, tmp: ["--config", config_file(tmp, "c.py", "from train.config import TrainConfig\n"
                                                       "def get_config():\n    return TrainConfig(steps='20')\n")],
     "steps='20' is not a valid whole number"),
])
def test_config_mistakes_exit_2_before_anything_is_built(corrupt, tmp_path, capsys, make_argv, fix):
    (tmp_path / "file.txt").write_text("not a workdir")
    argv = make_argv(corrupt, tmp_path)
    before = snapshot(tmp_path)
    code, err = run(train_main, capsys, *argv)
    assert code == 2 and err.startswith("error: ") and fix in err, err
    assert snapshot(tmp_path) == before


def test_overrides_are_parsed_by_field_type():
    from train.config import load_config

    cfg = load_config("train/configs/smoke.py", ["data.languages=EN,zh", "mesh=(-1, 1, 1)", "steps=1e3",
                                                 "init=None", "optim.learning_rate=3e-4", "workdir=123"])
    assert cfg.data.languages == ("EN", "zh") and cfg.mesh == (-1, 1, 1) and cfg.steps == 1000
    assert cfg.init is None and cfg.optim.learning_rate == 3e-4 and cfg.workdir == "123"
    assert load_config(None, ['data.languages=("ZH",)']).data.languages == ("ZH",)


def test_prepare_skips_corrupt_shards_and_training_reads_what_it_wrote(corrupt, featurizer, tmp_path, capsys):
    out = tmp_path / "prepared"
    with bounded():
        assert prepare_main([str(corrupt), str(out), "--mimi", "random"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    reports = {Path(r["source"]).name: r for r in map(json.loads, (x for x in captured.out.splitlines()
                                                                    if x.startswith("{")))}
    assert {name: r["skipped"] for name, r in reports.items()} == {
        "EN-B000000.tar": {"missing json": 1, "empty text": 1, "non-finite audio": 1, "bad audio": 1},
        "EN-B000001.tar": {"bad duration": 1, "bad dnsmos": 1}, "ZH-B000000.tar": {"truncated shard": 1},
        "XX-B000000.tar": {"unreadable shard": 1}, "XX-B000001.tar": {"unreadable shard": 1}}
    assert sum(r["records"] for r in reports.values()) == GOOD_UTTERANCES
    assert "5 shards prepared (3 unreadable or truncated" in captured.out

    (out / "YY-B000000.array_record").write_bytes(b"not an ArrayRecord file")
    SKIPPED.clear()
    cfg = DataConfig(max_frames=128, batch_size=1, shuffle_window=2)
    with bounded():
        assert len(list(dataset(str(out), cfg, featurizer, repeat=False))) == GOOD_UTTERANCES
    assert SKIPPED["unreadable shard"] == 1


@pytest.mark.parametrize("make_argv, fix", [
    (lambda d, tmp: [f"{tmp}/missing", f"{tmp}/out"], "give a directory of Emilia .tar shards"),
    (lambda d, tmp: [str(d), f"{tmp}/out", "--worker", "2", "--workers", "2"], "pass --workers N and --worker in"),
    (lambda d, tmp: [str(d), f"{tmp}/out", "--workers", "0"], "must be at least 1"),
    (lambda d, tmp: [str(d), f"{tmp}/out", "--batch-size", "0"], "give a batch size of 1 or more"),
])
def test_prepare_mistakes_exit_2(corrupt, tmp_path, capsys, make_argv, fix):
    code, err = run(prepare_main, capsys, *make_argv(corrupt, tmp_path))
    assert code == 2 and err.startswith("error: ") and fix in err, err
    assert not (tmp_path / "out").exists()


# ---- one run per workdir, one writer per prepared shard ---------------------------------------------------------


HOLD_LOCK = """
import sys, time
from csm_jax.io.locks import exclusive
with exclusive(sys.argv[1], "it", "wait"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_in_a_workdir_is_refused_and_a_killed_run_leaves_no_lock(corrupt, trained, capsys):
    lock = trained.parent / f".{trained.name}.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot(trained)
        argv = [*SMOKE, f"data.source={corrupt}", f"workdir={trained}", "steps=1"]
        code, err = run(train_main, capsys, *argv)
        assert code == 2 and err.startswith(f"error: the workdir {trained} is in use by pid {holder.pid} on "), err
        assert "wait for that run to end (or stop it), or give another workdir" in err
        assert snapshot(trained) == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()
    code, err = run(train_main, capsys, *argv)
    assert code == 2 and "already holds step 2, past steps=1" in err, err  # past the lock, to the resume check
    assert snapshot(trained) == before and not lock.exists()


def test_a_refused_run_into_a_new_nested_workdir_leaves_no_directory(corrupt, tmp_path, capsys):
    """The directories made to hold the workdir's lock go again when the run stops before writing anything."""
    workdir = tmp_path / "new" / "nested" / "run"
    code, err = run(train_main, capsys, *SMOKE, f"data.source={corrupt}", f"workdir={workdir}", "steps=3",
                    "data.languages=FR")
    assert code == 2 and err.startswith("error: no usable example in a full pass"), err
    assert not (tmp_path / "new").exists()


def test_a_resumed_run_drops_the_metrics_its_checkpoint_does_not_hold(corrupt, trained, tmp_path, capsys):
    workdir = tmp_path / "workdir"
    shutil.copytree(trained, workdir)
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    with open(workdir / "metrics.jsonl", "a") as f:  # a run killed after logging step 3, before checkpointing it
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    with bounded():
        assert train_main([*SMOKE, f"data.source={corrupt}", f"workdir={workdir}", "steps=3", "log_every=1",
                           "save_every=1"]) == 0
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [*steps, 3] and lines[-1]["loss"] != 1.0


@pytest.fixture(scope="module")
def shared_mimi():
    """`--mimi random` of train.prepare in-process takes one random Mimi instead of building one per call."""
    from csm_jax.io import audio

    mimi = audio.random_mimi(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(audio, "random_mimi", lambda *args, **kwargs: mimi)
        yield mimi


def clip_folder(root: Path, clips: dict[str, float]) -> Path:
    """A folder of noise clips of the given lengths in seconds, each with its transcript."""
    import numpy as np
    import soundfile as sf

    root.mkdir()
    for name, seconds in clips.items():
        noise = 0.1 * np.random.default_rng(0).standard_normal(int(16000 * seconds))
        sf.write(root / f"{name}.wav", noise.astype("float32"), 16000)
        (root / f"{name}.txt").write_text("some words")
    return root


def test_prepare_refuses_data_where_nothing_survives_with_the_skip_counts(tmp_path, shared_mimi, capsys):
    short = clip_folder(tmp_path / "short", {"blip": 0.01, "tick": 0.1})
    spans = tmp_path / "spans.jsonl"
    spans.write_text("".join(json.dumps({"audio": str(short / "blip.wav"), "text": "words", "start": s, "end": e})
                             + "\n" for s, e in [(2.0, 1.0), (0.0, 99.0), ("x", 1.0)]))
    columns = tmp_path / "columns.csv"
    columns.write_text(f"path,words\n{short / 'blip.wav'},some words\n")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no audio here")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".part-00000-of-00001.array_record.partial-999999"  # what an OOM-killed worker left
    stale.write_bytes(b"half a shard")
    cases = [
        (short, "no usable example in", "shorter than 0.2 s 2"),
        (spans, "no usable example in", "bad start/end 3"),
        (columns, "no usable example in", "missing audio 1"),
        (tmp_path / "texts", "no *.tar shards and no audio clips under", "a folder of clips with a transcript "
                                                                          "beside each (speaker/clip.wav and "),
    ]
    for source, message, fix in cases:
        code, err = run(prepare_main, capsys, str(source), str(out), "--mimi", "random")
        assert code == 2 and err.startswith("error: ") and message in err and fix in err, err
        assert sorted(p.name for p in out.iterdir()) == [], err  # no part, no report, no lock, no stale partial


def test_a_second_prepare_worker_is_refused_before_mimi_loads(tmp_path, capsys):
    """The worker's lock comes first: a Mimi path that does not exist is not even read."""
    from csm_jax.io.locks import exclusive

    source = clip_folder(tmp_path / "clips", {"one": 1.0})
    out = tmp_path / "new" / "out"
    out.mkdir(parents=True)
    with exclusive(out / ".worker-00001-of-00002.lock", "it", "wait"):
        code, err = run(prepare_main, capsys, str(source), str(out), "--mimi", str(tmp_path / "no-mimi.safetensors"),
                        "--worker", "1", "--workers", "2")
    assert code == 2 and err.startswith(f"error: worker 1 of 2 in {out} is in use by pid {os.getpid()}"), err
    assert "give each worker its own --worker" in err and sorted(out.iterdir()) == []
    out.rmdir(), out.parent.rmdir()  # a worker stopped before writing leaves no folder it made:
    code, err = run(prepare_main, capsys, str(source), str(out), "--mimi", str(tmp_path / "no-mimi.safetensors"))
    assert code == 2 and "no-mimi.safetensors" in err and not (tmp_path / "new").exists(), err


def test_a_second_prepare_worker_on_the_same_part_is_refused(tmp_path, shared_mimi, capsys):
    from csm_jax.io.locks import exclusive

    source = clip_folder(tmp_path / "clips", {"one": 1.0})
    out = tmp_path / "out"
    out.mkdir()
    with exclusive(out / ".part-00000-of-00001.array_record.lock", "it", "wait"):
        code, err = run(prepare_main, capsys, str(source), str(out), "--mimi", "random")
    assert code == 2 and f"error: the shard {out}/part-00000-of-00001.array_record is in use by pid {os.getpid()}" \
        in err and "give each worker its own --worker" in err, err
    assert sorted(p.name for p in out.iterdir()) == []
    code, err = run(prepare_main, capsys, str(source), str(out), "--mimi", "random")
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["part-00000-of-00001.array_record",
                                                                    "part-00000-of-00001.json"]
