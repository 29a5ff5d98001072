"""python -m train.plot WORKDIR [--out PNG]: the loss curves of a training run, drawn from WORKDIR/metrics.jsonl.

Training loss (and its codebook-0 and depth-decoder parts) at every logged step, eval losses as markers. A resumed
run logs some steps twice; the later value is drawn. Writes WORKDIR/loss.png unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from csm_jax.core.errors import ArgumentParser, UserError, run_main

CURVES = {"loss": "training loss", "c0_loss": "codebook 0", "depth_loss": "depth decoder"}
EVAL = {"eval/loss": "eval loss", "eval/c0_loss": "eval codebook 0", "eval/depth_loss": "eval depth decoder"}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m train.plot", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", help="a training run's workdir (it holds metrics.jsonl)")
    p.add_argument("--out", help="the picture to write: .png, .svg or .pdf (default: WORKDIR/loss.png)")
    return p


def read_series(path: Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of every metric in CURVES and EVAL that metrics.jsonl holds."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; give the workdir of a training run (python -m train ... "
                        f"workdir=DIR writes DIR/metrics.jsonl)")
    series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}, line {number}, is not a metrics record ({type(e).__name__}: {e}); it should be "
                            f"a JSON object with a step, as python -m train writes") from None
        for key in CURVES.keys() | EVAL.keys():
            if isinstance(row.get(key), (int, float)):
                series.setdefault(key, {})[step] = float(row[key])
    if "loss" not in series and "eval/loss" not in series:
        raise UserError(f"{path} holds no loss yet; plot again once the run has logged a step (log_every)")
    return series


def draw(series: dict[str, dict[int, float]], out: Path, title: str) -> Path:
    """Draws the curves into `out` (through a temporary sibling, renamed when complete)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for key, label in CURVES.items():
        if key in series:
            steps = sorted(series[key])
            ax.plot(steps, [series[key][s] for s in steps], label=label, linewidth=2 if key == "loss" else 1)
    for (key, label), marker in zip(EVAL.items(), "os^"):
        if key in series:
            steps = sorted(series[key])
            ax.plot(steps, [series[key][s] for s in steps], marker, linestyle="--", label=label)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")  # created by savefig: the umask's mode
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return out


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Path(args.workdir)
    out = Path(args.out) if args.out else workdir / "loss.png"
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UserError(f"--out {out}: give a .png, .svg or .pdf file")
    draw(read_series(workdir / "metrics.jsonl"), out, workdir.resolve().name)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
