"""Fine-tuning on the user's own data: a folder of clips, a manifest, a `datasets` dataset; bad items counted;
packing; the held-out split; a CPU smoke run on a folder."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import ENGLISH, espeak_wav
from train.data import SKIPPED, SKIPPED_ONCE, DataConfig, DataError, Featurizer, dataset, in_split, padding_fraction
from train.sources import detect_format

LONG = "This sentence is spoken slowly and goes on for quite a while, much longer than every other clip here."


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Four espeak clips with transcripts (one in a subfolder), one long clip, and five bad items."""
    d = tmp_path_factory.mktemp("voice")
    for i, text in enumerate(ENGLISH):
        clip = d / ("more" if i == 3 else "") / f"clip{i}.wav"
        clip.parent.mkdir(exist_ok=True)
        espeak_wav(clip, text)
        clip.with_suffix(".txt").write_text(text + "\n")
    espeak_wav(d / "long.wav", LONG)
    (d / "long.txt").write_text(LONG)
    espeak_wav(d / "untranscribed.wav", "No transcript here.")
    espeak_wav(d / "empty.wav", "Empty text.")
    (d / "empty.txt").write_text("  \n")
    sf.write(d / "silent.wav", np.zeros(24000, np.float32), 24000)
    (d / "silent.txt").write_text("Nothing is said.")
    sf.write(d / "nan.wav", np.full(4800, np.nan, np.float32), 24000, subtype="FLOAT")
    (d / "nan.txt").write_text("Not a number.")
    (d / "broken.wav").write_bytes(b"RIFF this is not a wav file" * 10)
    (d / "broken.txt").write_text("Broken audio.")
    return d


@pytest.fixture(scope="module")
def manifest(folder, tmp_path_factory) -> Path:
    rows = [{"id": f"u{i}", "audio": f"{folder.name}/{p.relative_to(folder)}", "text": p.with_suffix(".txt")
             .read_text().strip(), "speaker": "bob" if i % 2 else "alice"}
            for i, p in enumerate(sorted(folder.rglob("clip*.wav")))]
    rows += [{"id": "u0", "audio": rows[1]["audio"], "text": "duplicate id"},
             {"id": "outside", "audio": f"{folder.name}/../../outside.wav", "text": "outside the root"},
             {"id": "span", "audio": rows[0]["audio"], "text": "Hello there", "start": 0.0, "end": 0.8}]
    path = folder.parent / "train.jsonl"  # the dataset root: paths are relative to it and may not leave it
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def featurizer():
    from csm_jax.io import audio, text
    return Featurizer(text.load_tokenizer(), audio.random_mimi(0), DataConfig(max_frames=128))


def _frames(source, featurizer, **cfg_fields):
    import dataclasses
    cfg = DataConfig(**{"max_frames": 128, "batch_size": 1, "max_duration": 3.5, **cfg_fields})
    f = dataclasses.replace(featurizer, cfg=cfg)
    return list(dataset(str(source), cfg, f, repeat=False))


@pytest.fixture(scope="module")
def padded(folder, featurizer):
    """Every good clip of the folder (the long one too), one per row."""
    return _frames(folder, featurizer, max_duration=30.0)


def _lengths(batches):
    return sorted(int(b["segment_ids"].sum()) for b in batches)


def test_folder_yields_every_good_clip_and_counts_the_bad_ones(folder, featurizer, padded):
    assert detect_format(str(folder)) == "folder"
    SKIPPED.clear()
    batches = _frames(folder, featurizer)
    assert len(batches) == len(ENGLISH)
    assert dict(SKIPPED) == {"missing transcript": 1, "empty text": 1, "silent audio": 1, "non-finite audio": 1,
                             "bad audio": 1, "duration filter": 1}
    assert len(padded) == len(ENGLISH) + 1  # the long clip is skipped, never truncated


def test_passes_after_the_first_meet_the_bad_items_again_but_count_them_once(folder, featurizer):
    """`SKIPPED_ONCE` (the training metrics' `skipped/*`) counts each bad item once however many passes meet it,
    also after the iterator is restored from its state."""
    import dataclasses
    SKIPPED.clear()
    SKIPPED_ONCE.clear()
    cfg = DataConfig(max_frames=128, batch_size=1, max_duration=3.5)
    ds = dataset(str(folder), cfg, dataclasses.replace(featurizer, cfg=cfg))  # endless passes
    it = iter(ds)
    for _ in range(3 * len(ENGLISH) + 1):  # three passes and the first row of a fourth
        next(it)
    once = {"missing transcript": 1, "empty text": 1, "silent audio": 1, "non-finite audio": 1, "bad audio": 1,
            "duration filter": 1}
    assert dict(SKIPPED_ONCE) == once
    assert SKIPPED["silent audio"] >= 3  # met by every pass
    state = it.get_state()
    SKIPPED_ONCE.clear()  # as in a new process
    iter(ds).set_state(state)
    assert dict(SKIPPED_ONCE) == once


def test_manifest_rows_resolve_relative_paths_and_skip_bad_rows(manifest, folder, featurizer):
    assert detect_format(str(manifest)) == "manifest"
    SKIPPED.clear()
    batches = _frames(manifest, featurizer)
    assert dict(SKIPPED) == {"duplicate id": 1, "outside dataset root": 1}
    assert len(batches) == len(ENGLISH) + 1  # and the 0.8 s span of the first clip
    lengths = sorted(int(b["segment_ids"].sum()) for b in batches)
    assert lengths[0] < lengths[1]  # the span is shorter than any whole clip


def test_a_dataset_where_nothing_survives_is_a_data_error(folder, featurizer, tmp_path):
    for name in ("silent", "nan", "empty"):
        shutil.copy(folder / f"{name}.wav", tmp_path / f"{name}.wav")
        shutil.copy(folder / f"{name}.txt", tmp_path / f"{name}.txt")
    with pytest.raises(DataError, match="silent audio 1.*non-finite audio 1|non-finite audio 1.*silent audio 1"):
        next(iter(dataset(str(tmp_path), DataConfig(max_frames=128, batch_size=1), featurizer)))
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "../x.wav", "text": "hi"}) + "\n")
    with pytest.raises(DataError, match="outside dataset root 1"):
        dataset(str(tmp_path / "m.jsonl"), DataConfig(), featurizer)


def test_a_saved_datasets_dataset_reads_like_the_folder(folder, featurizer, padded, tmp_path):
    import datasets
    clips = sorted(folder.rglob("clip*.wav"))
    ds = datasets.Dataset.from_dict({"speech": [{"bytes": c.read_bytes(), "path": c.name} for c in clips],
                                     "sentence": [c.with_suffix(".txt").read_text() for c in clips]})
    ds.cast_column("speech", datasets.Audio(decode=False)).save_to_disk(str(tmp_path / "hf"))
    assert detect_format(str(tmp_path / "hf")) == "hf"
    batches = _frames(tmp_path / "hf", featurizer, audio_column="speech", text_column="sentence")
    assert _lengths(batches) == _lengths(padded)[:-1]  # all but the long clip


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory) -> Path:
    from train.prepare import main

    out = tmp_path_factory.mktemp("prepared")
    assert main([str(folder), str(out), "--mimi", "random"]) == 0
    return out


def test_prepare_writes_a_folder_once_and_training_reads_it(prepared, featurizer, padded):
    report = json.loads((prepared / "part-00000-of-00001.json").read_text())
    assert report["records"] == len(ENGLISH) + 1 and report["skipped"]["missing transcript"] == 1
    assert _lengths(_frames(prepared, featurizer, max_duration=30.0)) == _lengths(padded)
    assert len(_frames(prepared, featurizer)) == len(ENGLISH)  # durations were stored: the filter applies


def test_packing_keeps_every_utterance_and_lowers_padding(folder, featurizer, padded):
    packed = _frames(folder, featurizer, max_duration=30.0, packing=True)

    def utterances(batches):
        out = []
        for b in batches:
            tokens, seg = b["tokens"][0, 0], b["segment_ids"][0, 0]
            out += [tokens[seg == s].tobytes() for s in np.unique(seg[seg > 0])]
        return sorted(out)

    assert utterances(packed) == utterances(padded)
    assert len(packed) < len(padded)
    before = np.mean([padding_fraction(b) for b in padded])
    after = np.mean([padding_fraction(b) for b in packed])
    print(f"data/padding_fraction on the espeak folder, max_frames=128: {before:.3f} padded, {after:.3f} packed")
    assert after < before


def test_packed_iterator_resumes_on_the_next_row(prepared, featurizer):
    import dataclasses
    cfg = DataConfig(max_frames=128, batch_size=1, max_duration=30.0, packing=True)
    ds = dataset(str(prepared), cfg, dataclasses.replace(featurizer, cfg=cfg))  # endless passes over stored codes
    it = iter(ds)
    next(it)
    state = it.get_state()
    expected = [next(it)["tokens"] for _ in range(3)]
    resumed = iter(ds)
    resumed.set_state(state)
    assert all(np.array_equal(next(resumed)["tokens"], e) for e in expected)


def test_held_out_split_is_deterministic_disjoint_and_sized():
    keys = [f"speaker/clip{i:05d}" for i in range(4000)]
    evals = {k for k in keys if in_split(k, "eval", 0.05)}
    trains = {k for k in keys if in_split(k, "train", 0.05)}
    assert evals.isdisjoint(trains) and evals | trains == set(keys)
    assert evals == {k for k in keys if in_split(k, "eval", 0.05)}
    assert 0.03 < len(evals) / len(keys) < 0.07


def test_a_smoke_run_on_a_prepared_folder_lowers_the_loss_and_reads_its_held_out_data_once(prepared, tmp_path,
                                                                                          monkeypatch):
    import train.__main__ as cli

    reads = []
    pipeline = cli.eval_pipeline
    monkeypatch.setattr(cli, "eval_pipeline", lambda *args: reads.append(args) or pipeline(*args))
    work = tmp_path / "run"  # Mimi codes of the folder prepared once: no encoding per pass
    argv = ["--config", "train/configs/smoke.py", f"data.source={prepared}", f"workdir={work}", "steps=12",
            "log_every=4", "save_every=100", "data.packing=true", "eval_every=6", "data.eval_fraction=0.3",
            "data.max_duration=30"]
    assert cli.main(argv) == 0
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
    assert all(0 <= m["data/padding_fraction"] < 1 for m in metrics if "loss" in m)
    assert [m["step"] for m in metrics if "eval/loss" in m] == [0, 6, 12]
    assert len(reads) == 1  # the held-out batches are read once and scored at every eval


def test_a_csv_manifest_lists_the_same_items_as_jsonl(manifest, tmp_path):
    import csv

    from train.sources import manifest_items

    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    path = manifest.with_suffix(".csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "audio", "text", "speaker", "start", "end"])
        writer.writeheader()
        writer.writerows(rows)
    assert detect_format(str(path)) == "manifest"
    from_csv, from_jsonl = manifest_items(path, DataConfig()), manifest_items(manifest, DataConfig())
    assert [(i["key"], i["audio"], i["text"], i.get("speaker_id")) for i in from_csv] == [
        (i["key"], i["audio"], i["text"], i.get("speaker_id")) for i in from_jsonl]
    assert {i.get("speaker_id") for i in from_csv} == {0, 1, None}  # names numbered in sorted order, or none


def test_the_voice_presets_validate_on_a_folder(folder, tmp_path):
    from train.config import load_config, validate

    cfg = load_config("train/configs/full_voice.py", [f"data.source={folder}", f"workdir={tmp_path / 'run'}"])
    validate(cfg)
    assert cfg.data.packing and cfg.optim.learning_rate == 2e-5 and not cfg.eval_source and cfg.data.eval_fraction
    assert cfg.lora.rank == 0
    cfg = load_config("train/configs/lora_voice.py", [f"data.source={folder}", f"workdir={tmp_path / 'run'}"])
    validate(cfg)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.learning_rate) == (32, 32.0, 2e-4) and cfg.data.packing


def test_the_voice_recipes_on_eight_clips_train_without_eval_and_with_a_warm_up_that_fits(folder, tmp_path, capsys):
    """What a new user tries first: a recipe as it is on a handful of clips and a short run. 5% of 8 clips cannot
    fill an eval batch, and 10 or 30 warm-up steps do not fit in 4: the run trains on every clip without eval (and
    says so) and warms up over a tenth of its steps. Both recipes have these settings (lora_voice takes full_voice's);
    full_voice runs (the tiny model, random Mimi and short rows stand in for CSM-1B)."""
    import train.__main__ as cli
    from train.config import load_config

    clips = tmp_path / "clips"
    clips.mkdir()
    for i, clip in enumerate(sorted(folder.rglob("clip*.wav")) * 2):  # the four good clips, twice
        shutil.copy(clip, clips / f"clip{i}.wav")
        shutil.copy(clip.with_suffix(".txt"), clips / f"clip{i}.txt")
    argv = [f"data.source={clips}", f"workdir={tmp_path / 'run'}", "model=tiny_full_vocab", "mimi=random",
            "compute_dtype=float32", "data.max_frames=128", "data.batch_size=1", "sample_every=0", "steps=4",
            "save_every=4", "log_every=2"]
    for recipe, warmup in (("lora_voice", 10), ("full_voice", 30)):
        cfg = load_config(f"train/configs/{recipe}.py", argv)
        assert cfg.optim.warmup_steps == 0 and cfg.eval_every and cfg.eval_optional
        assert load_config(f"train/configs/{recipe}.py", [*argv, "steps=300"]).optim.warmup_steps == warmup
    assert cli.main(["--config", "train/configs/full_voice.py", *argv]) == 0
    err = capsys.readouterr().err
    assert "no eval in this run: the held-out data.eval_fraction=0.05 of data.source gives fewer usable examples" in err
    assert "lowered to 0: this recipe warms up over at most a tenth of steps=4" in err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4] and not any("eval/loss" in m for m in metrics)
