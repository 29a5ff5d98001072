"""Command line: python -m convert SRC OUT [--dtype ...] [--to orbax|transformers|original] [--config ...] [--overwrite]

    python -m convert sesame/csm-1b ckpt/csm-1b                     # hub repo (transformers layout) -> Orbax
    python -m convert ~/csm/ckpt.pt ckpt/csm-1b --config csm_1b     # Sesame's first release -> Orbax
    python -m convert ckpt/csm-1b export/csm-1b-hf --to transformers
    python -m convert ckpt/csm-1b export/csm-1b-orig --to original --dtype bfloat16

OUT must be new or an empty directory; an earlier output of csm-jax there is replaced only with --overwrite, and
nothing else ever is. Exit status: 0 done, 2 a mistake in the arguments or files (one line `error: ...`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from convert.from_torch import convert_to_orbax
from convert.io import ConversionError
from convert.layouts import LAYOUTS
from convert.to_torch import export_checkpoint
from csm_jax.core.errors import run_main
from csm_jax.core.logs import configure_logging
from csm_jax.io.checkpoint import read_metadata


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="--to orbax: a PyTorch checkpoint directory, weights file (model.safetensors, "
                               "model.safetensors.index.json, ckpt.pt) or hub repo id; otherwise a csm-jax checkpoint")
    p.add_argument("out", help="directory to write: new, empty, or (with --overwrite) an earlier csm-jax output")
    p.add_argument("--to", choices=["orbax", *LAYOUTS], default="orbax", help="output format (default: orbax)")
    p.add_argument("--dtype", choices=["keep", "float32", "bfloat16"], default="keep",
                   help="parameter dtype of the output (default: keep the source's)")
    p.add_argument("--config", help="config.json of either family, or a preset name (csm_1b), overriding the one "
                                    "beside the weights (--to orbax only)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it holds an earlier csm-jax checkpoint or export (never anything else)")
    return p


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.WARNING, "%(message)s")
    start = time.perf_counter()
    if args.to == "orbax":
        out = convert_to_orbax(args.src, args.out, dtype=args.dtype, config=args.config, overwrite=args.overwrite)
        meta = read_metadata(out)
        what = f"{meta['layout']} layout, {meta['source_dtype']} -> {meta['dtype']}"
        if meta.get("codec"):
            what += f"; the Mimi codec weights went to {out / meta['codec']}"
    else:
        if args.config:
            raise ConversionError("--config only applies to --to orbax: an export uses the checkpoint's own "
                                  "config.json.")
        out = export_checkpoint(args.src, args.out, args.to, dtype=args.dtype, overwrite=args.overwrite)
        what = f"{args.to} layout"
        if args.to == "transformers" and not read_metadata(args.src).get("codec"):
            what += ("; it has no Mimi codec weights, so transformers will initialise codec_model randomly: "
                     "set model.codec_model = MimiModel.from_pretrained('kyutai/mimi') before decoding audio")
    print(f"wrote {out} ({what}) in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`run` under the exit-code convention: 2 and one `error: ...` line for every mistake of the user."""
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
