"""How many XLA operations one decode frame costs: the body of the frame loop's `lax.while_loop` in the compiled
`_run_until` (codebook 0, the 31 depth-decoder steps, the backbone step), counted from the optimized HLO.

    python benchmarks/op_count.py --config csm_1b            # abstract weights: nothing is allocated
    python benchmarks/op_count.py --config csm_1b --weights-dtype int8 --kernels

Each instruction that runs as its own kernel or thunk counts one: a fusion, a library call (dot, custom call), an
unfused elementwise op, a copy; a loop inside the frame counts its body times its trip count (the depth loop's
29 steps when it is a loop), a conditional its largest branch; parameters, constants, tuples and bitcasts count
nothing. Compiled for the CPU; `--kernels` uses the CPU kernels (fewer, larger ops); without it the products are
XLA's own, as on a GPU, and `--gpu-sampler` also takes the sampler's GPU branch (`lax.top_k` for top-k instead of
the CPU's bisection), so that the count is the GPU graph's as the CPU compiler fuses it (XLA's GPU compiler fuses
more, so a GPU runs at most this many kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
        "replica-id", "opt-barrier"}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = .*? ([\w\-]+)\((.*)$")


def parse_hlo(text: str) -> tuple[dict[str, list[str]], str]:
    """HLO module text -> ({computation name: instruction lines}, entry name)."""
    computations, current, entry = {}, None, None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.strip() == "}":
            current = None
        elif current is not None and " = " in line:
            computations[current].append(line)
    return computations, entry


def _callee(line: str, attribute: str) -> str:
    return re.search(attribute + r"=%?([\w.\-]+)", line).group(1)


def _trip_count(line: str) -> int | None:
    found = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    return int(found.group(1)) if found else None


def count(computations: dict[str, list[str]], name: str, unknown_trips: list[str]) -> int:
    """Kernels/thunks one run of computation `name` executes (see the module docstring)."""
    total = 0
    for line in computations[name]:
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        op = match.group(1)
        if op in FREE:
            continue
        if op == "while":
            trips = _trip_count(line)
            if trips is None:
                unknown_trips.append(line.strip()[:80])
                trips = 1
            body, cond = _callee(line, "body"), _callee(line, "condition")
            total += trips * (count(computations, body, unknown_trips) + count(computations, cond, unknown_trips))
        elif op == "conditional":
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            names = [b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else [
                _callee(line, "true_computation"), _callee(line, "false_computation")]
            total += 1 + max(count(computations, b, unknown_trips) for b in names)
        elif op == "call":
            total += count(computations, _callee(line, "to_apply"), unknown_trips)
        else:
            total += 1
    return total


def frame_ops(hlo_text: str) -> dict:
    """Counts for the outermost while loop of the entry computation (the frame loop): its body once."""
    computations, entry = parse_hlo(hlo_text)
    pending = [entry]
    while pending:  # the frame loop may sit inside calls
        name = pending.pop(0)
        for line in computations[name]:
            match = _INSTRUCTION.match(line)
            if match and match.group(1) == "while":
                unknown = []
                body = _callee(line, "body")
                per_frame = count(computations, body, unknown) + count(computations, _callee(line, "condition"),
                                                                       unknown)
                top = sum(1 for b in computations[body] if (m := _INSTRUCTION.match(b)) and m.group(1) not in FREE)
                return {"ops_per_frame": per_frame, "top_level_ops_in_frame_body": top,
                        "loops_without_trip_count": unknown}
            if match and match.group(1) == "call":
                pending.append(_callee(line, "to_apply"))
    raise ValueError("no while loop in the compiled program")


def compiled_run_until(config_name: str, dtype: str, weights_dtype: str | None, kernels: bool, batch: int,
                       frames: int = 64, prompt: int = 64):
    """The compiled frame loop for abstract weights and state (no allocation)."""
    from csm_jax.core.config import preset
    from csm_jax.core.model import Csm
    from csm_jax.inference.decode_model import decode_model
    from csm_jax.inference.loop import _prefill, _run_until
    from csm_jax.inference.sampling import FrameSampling

    config = preset(config_name)
    compute = jnp.dtype(dtype)
    param_dtype = compute if weights_dtype in (None, "int8") else jnp.dtype(weights_dtype)

    def build():
        model = Csm(config, dtype=compute, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        if weights_dtype == "int8":
            return decode_model(model, cpu_kernels=kernels, weights_dtype="int8")
        return decode_model(model, cpu_kernels=kernels)

    abstract = nnx.eval_shape(build)
    graphdef, params = nnx.split(abstract)
    n = config.num_codebooks
    keys = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.zeros((batch,), jnp.uint32)))
    state = jax.eval_shape(lambda p, k: _prefill(graphdef, p, jnp.zeros((batch, prompt, n + 1), jnp.int32),
                                                 jnp.ones((batch, prompt, n + 1), bool),
                                                 jnp.ones((batch, prompt), jnp.int32), k, frames,
                                                 frame_capacity=frames), params, keys)
    return _run_until.lower(graphdef, params, state, jax.ShapeDtypeStruct((), jnp.int32), FrameSampling(),
                            None).compile()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="csm_1b")
    p.add_argument("--dtype", default="float32", help="compute dtype")
    p.add_argument("--weights-dtype", default=None, choices=["float32", "bfloat16", "int8"])
    p.add_argument("--kernels", action="store_true", help="with the CPU kernels (default: XLA's ops, as on GPU)")
    p.add_argument("--gpu-sampler", action="store_true", help="the sampler's GPU branch (lax.top_k)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dump", default=None, help="write the optimized HLO here")
    args = p.parse_args()
    if args.gpu_sampler:
        from csm_jax.inference import sampling

        sampling.top_k_bisection = sampling.top_k_sorted
    compiled = compiled_run_until(args.config, args.dtype, args.weights_dtype, args.kernels, args.batch)
    text = compiled.as_text()
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(text)
    print(json.dumps({"config": args.config, "dtype": args.dtype, "weights_dtype": args.weights_dtype,
                      "kernels": args.kernels, "gpu_sampler": args.gpu_sampler, "batch": args.batch,
                      **frame_ops(text)}))


if __name__ == "__main__":
    main()
