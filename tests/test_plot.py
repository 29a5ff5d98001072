"""python -m train.plot: loss curves from metrics.jsonl, and its bad-input cases (exit 2, one line, nothing
replaced)."""

import json

import pytest

from train.plot import main, read_series


def write_metrics(workdir, rows):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_draws_the_losses_and_keeps_a_resumed_run_s_later_values(tmp_path, capsys):
    rows = [{"step": s, "loss": 10.0 - s, "c0_loss": 6.0 - s / 2, "depth_loss": 4.0 - s / 2} for s in (1, 2, 3)]
    rows += [{"step": 3, "eval/loss": 7.5}, {"step": 2, "loss": 8.5}]  # step 2 again after a resume
    write_metrics(tmp_path / "run", rows)
    assert read_series(tmp_path / "run" / "metrics.jsonl")["loss"] == {1: 9.0, 2: 8.5, 3: 7.0}
    assert main([str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "pics" / "loss.svg")]) == 0
    assert b"<svg" in (tmp_path / "pics" / "loss.svg").read_bytes()
    assert [p.name for p in (tmp_path / "pics").iterdir()] == ["loss.svg"]  # no temporary file left


@pytest.mark.parametrize("case, says", [
    ("missing", "does not exist; give the workdir of a training run"),
    ("not json", "line 2, is not a metrics record"),
    ("no step", "line 1, is not a metrics record"),
    ("no loss", "holds no loss yet"),
    ("bad suffix", "give a .png, .svg or .pdf file"),
])
def test_plot_bad_input_is_one_line_and_leaves_the_picture(tmp_path, capsys, case, says):
    work = tmp_path / "run"
    rows = {"not json": None, "no step": [{"loss": 1.0}], "no loss": [{"step": 1, "frames_per_s": 3.0}]}
    if case != "missing":
        write_metrics(work, rows.get(case) or [{"step": 1, "loss": 1.0}])
    if case == "not json":
        with open(work / "metrics.jsonl", "a") as f:
            f.write("{truncated\n")
    out = work / ("loss.txt" if case == "bad suffix" else "loss.png")
    if case != "missing":
        out.write_bytes(b"an earlier picture")
    assert main([str(work), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if case != "missing":
        assert out.read_bytes() == b"an earlier picture"
