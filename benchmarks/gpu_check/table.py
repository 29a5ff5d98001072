"""The run's table (markdown): the figures in the order the steps ran, then each step's status, with what failed."""

from __future__ import annotations

from benchmarks.gpu_check.plan import LORA


def fmt(x, spec: str = ".1f", unit: str = "") -> str:
    return "not measured" if x is None else f"{x:{spec}}{unit}"


def get(node, *path):
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def verdict(v: dict) -> str:
    return "PASS" if v.get("pass") else "FAIL"


def decode_row(v: dict | None) -> str:
    v = v or {}
    if "error" in v:
        return v["error"]
    text = f"{fmt(v.get('ms_per_frame'), '.2f')} ms/frame, {fmt(v.get('frames_per_s'), '.0f')} frames/s"
    if v.get("share_of_bandwidth_floor") is not None:
        text += f", {v['share_of_bandwidth_floor']:.0%} of the bandwidth floor"
    if v.get("ours_speedup") is not None:
        text += f"; csm-jax {v['ours_speedup']:.2f}x faster"
    return text


def env_rows(env: dict) -> list[tuple[str, str]]:
    tools = env.get("toolchain") or {}
    return [("device", f"{get(env, 'device', 'kind')} ({tools.get('nvidia_smi', 'no nvidia-smi')})"),
            ("versions", ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())),
            ("CUDA / cuDNN (torch), C compiler", tools.get("error") or
             f"{tools.get('torch_cuda')} / {tools.get('torch_cudnn')}, {tools.get('c_compiler') or 'none'}"
             f" (Python headers: {tools.get('python_headers')})"),
            ("memory read bandwidth (jitted sum)", fmt((get(env, "read_bandwidth", "bytes_per_s") or 0) / 1e9 or None,
                                                       ".4g", " GB/s")),
            ("bf16 matmul", fmt((get(env, "matmul_bf16", "flops_per_s") or 0) / 1e12 or None, ".4g", " TFLOP/s"))]


def correctness_rows(c: dict) -> list[tuple[str, str]]:
    rows = []
    for key, label in (("parity_float32", "float32 logits vs transformers"),
                       ("parity_bfloat16", "bf16 logits vs transformers f32")):
        v = c.get(key) or {}
        rows.append((label, v.get("error") or f"max abs {fmt(v.get('max_abs'), '.2e')} (bound {v.get('bound')}), "
                     f"c0 argmax {fmt(v.get('c0_argmax_agree'), '.0%')}: {verdict(v)}"))
    g = c.get("greedy") or {}
    rows.append(("greedy frames: device = CPU backend = transformers", g.get("error") or
                 f"{g.get('device_equals_cpu_backend')} / {g.get('device_equals_transformers')}: {verdict(g)}"))
    q = c.get("int8") or {}
    rows.append(("int8 vs float32 weights (c0 logits)", q.get("error") or
                 f"argmax {fmt(q.get('c0_argmax_agree'), '.1%')}, max abs {fmt(q.get('max_abs'), '.3f')}: "
                 f"{verdict(q)}"))
    return rows


def mimi_rows(m: dict, seconds: float) -> list[tuple[str, str]]:
    e, d, s = (m.get(k) or {} for k in ("encode", "decode", "stream"))
    return [(f"Mimi encode / decode {seconds} s (random weights, {m.get('device')})",
             e.get("error") or d.get("error") or f"{fmt(e.get('ms'))} / {fmt(d.get('ms'))} ms: "
                                                  f"{verdict(e)} / {verdict(d)}"),
            ("Mimi one streamed frame", s.get("error") or f"{fmt(s.get('first_frame_ms'))} ms: {verdict(s)}")]


def serve_rows(v: dict, s: dict) -> list[tuple[str, str]]:
    """The load test's rows: the halves, each level, and the goals (the most clients against one at a time)."""
    label = f"serving {s['config']}, {s['frames']} frames a request"

    def level(row):
        if not row:
            return "not measured"
        ms = [None if row.get(k) is None else 1e3 * row[k] for k in ("ttfa_p50", "ttfa_p95")]
        return (f"{fmt(row.get('fps'), '.1f', ' frames/s')}, time to first audio p50 {fmt(ms[0], '.0f', ' ms')} / "
                f"p95 {fmt(ms[1], '.0f', ' ms')}, latency p95 {fmt(row.get('latency_p95'), '.2f', ' s')}")

    if get(v, "setup", "error"):
        return [(label, v["setup"]["error"])]
    h = v.get("halves") or {}
    slots, most = s["slots"], s["clients"][-1]
    rows = [(f"{label}: the halves (Mimi on {v.get('mimi_device', '?')})", h.get("error") or
             f"decode batch alone {fmt(h.get('batch1_fps'), '.0f')} / {fmt(h.get(f'batch{slots}_fps'), '.0f')} "
             f"frames/s with 1 / {slots} busy slots; Mimi {fmt(h.get('mimi1_ms_per_frame'), '.2f')} / "
             f"{fmt(h.get(f'mimi{slots}_ms_per_frame'), '.2f')} ms per frame of 1 / {slots} streams"),
            (f"{label}, one at a time (1 slot, 1 client)", level(v.get("one_at_a_time")))]
    rows += [(f"{label}, {slots} slots, {n} client{'s' if n > 1 else ''}", level(v.get(f"clients_{n}")))
             for n in s["clients"]]
    top = v.get(f"clients_{most}") or {}
    rows.append((f"serving goals, {most} clients against one at a time", get(v, "load_test", "error") or
                 f"throughput {fmt(top.get('fps_x'), '.2f', 'x')} (goal >= 6x), p95 time to first audio "
                 f"{fmt(top.get('ttfa_p95_x'), '.2f', 'x')} (goal <= 2x)"))
    return rows


def lora_rows(lo: dict, size: dict) -> list[tuple[str, str]]:
    rows = []
    for name, batch, frames, dtype in size["lora"]:
        key = f"{name}_{dtype}"
        ours, theirs = lo.get(f"{key}_ours") or {}, lo.get(f"{key}_transformers_peft") or {}
        rows.append((f"{name} LoRA step r={LORA['rank']}, batch {batch} x {frames}, {dtype} compute",
                     f"ours {ours.get('error') or fmt(ours.get('ms'), '.1f', ' ms')}, transformers + PEFT "
                     f"{theirs.get('error') or fmt(theirs.get('ms'), '.1f', ' ms')}: ratio transformers/ours "
                     f"{fmt(lo.get(f'{key}_transformers_over_ours'), '.2f')}"))
    return rows


def table(figures: dict, steps: dict, size: dict) -> str:
    r = {name: figures.get(name) or {} for name in steps} | figures
    full, first, more = size["full"], size["first_batch"], size["more_batches"]
    rows = env_rows(r.get("env") or {})
    for step, label in (("decode_bf16", "bf16"), ("decode_int8", "int8"), ("decode_int4", "int4")):
        d = r.get(step) or {}
        rows.append((f"{full} decode, {label} weights, batch {first}", decode_row(d.get(f"batch_{first}"))
                     + f" (floor {fmt(d.get('floor_ms_per_frame'), '.2f', ' ms')})"))
    t = get(r, "decode_bf16", "time_to_first_audio") or {}
    rows.append((f"{full} time to first audio, bf16", t.get("error") or
                 f"{fmt(t.get('audio_ms'))} ms (codes {fmt(t.get('codes_ms'))} + Mimi "
                 f"{fmt(t.get('mimi_first_frame_ms'))})"))
    rows.append((f"transformers generate, bf16, batch {first}, eager",
                 decode_row(get(r, "transformers_eager", f"eager_batch_{first}"))))
    rows += correctness_rows(r.get("correctness") or {})
    rows += mimi_rows(r.get("mimi") or {}, size["mimi_seconds"])
    for dtype in ("bfloat16", "int8"):
        for batch in more:
            rows.append((f"{full} decode, {dtype} weights, batch {batch}",
                         decode_row(get(r, "decode_batches", f"{dtype}_batch_{batch}"))))
    for name, v in (r.get("command_buffer") or {}).items():
        rows.append((f"{full} decode batch {first}, XLA command buffers: {name}",
                     decode_row(v) + f" ({v.get('xla_flags') or 'XLA default'})"))
    tr = r.get("train") or {}
    t = tr.get("step") or {}
    rows.append((f"{full} train step, batch {size['train_batch']} x {size['train_frames']}", t.get("error") or
                 f"{fmt(t.get('step_s'), '.3f')} s, {fmt(t.get('frames_per_s'), '.0f')} frames/s, MFU "
                 f"{fmt(t.get('mfu_vs_790'), '.1%')} of 790 TFLOP/s, remat {t.get('remat')}"
                 + ("" if t.get("peak_memory_gb") is None else f", peak {t['peak_memory_gb']:.1f} GB")))
    rows += serve_rows(r.get("serve") or {}, size["serve"])
    rows += lora_rows(r.get("lora") or {}, size)
    compiled = r.get("transformers_compiled") or {}
    for key, v in compiled.items():
        if key != "mode":
            rows.append((f"transformers generate, bf16, {key.replace('_', ' ')} ({compiled.get('mode')})",
                         decode_row(v)))
    for name, s in steps.items():
        why = "; ".join(s["failures"])
        rows.append((f"step {name}", s["status"] + (f" in {s['seconds']} s" if "seconds" in s else "")
                     + (f": {why}" if why else "")))
    return "\n".join(["| check | result |", "|---|---|"] + [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows])
