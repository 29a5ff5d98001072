"""`python -m convert` given bad input: it refuses with exit 2 and one `error: ...` line naming the fix, and every
file that existed before is byte-identical after; interrupted or out of space, it leaves nothing partial behind."""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import jax
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from convert.__main__ import main
from csm_jax.core.config import preset
from csm_jax.io.checkpoint import abstract_model, read_metadata
from csm_jax.io.output_dir import EXPORT_MARKER, output_kind
from tests.references import original_model, save_original
from tests.helpers import HANG_SECONDS

REPO = Path(__file__).resolve().parent.parent


def tree(*roots: Path) -> dict[str, str]:
    """Every path under `roots` with the sha256 of its bytes (files), its target (links) or its kind."""
    state = {}
    for root in roots:
        state[str(root)] = "dir"
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                if path.is_symlink():
                    state[str(path)] = "-> " + os.readlink(path)
                elif path.is_file():
                    state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                else:
                    state[str(path)] = "dir" if path.is_dir() else "other"
    return state


def partials(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def refused(argv: list, capsys, *roots: Path) -> str:
    """Runs the command line, asserts exit 2, one error line, no traceback and no change under `roots`."""
    before = tree(*roots)
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert tree(*roots) == before
    return err


@pytest.fixture
def earlier(hf_tiny_orbax, tmp_path):
    """A copy of an earlier conversion of ours."""
    return Path(shutil.copytree(hf_tiny_orbax, tmp_path / "earlier"))


# ---- where the output may go ---------------------------------------------------------------------------------

def test_output_that_is_or_holds_the_source_is_refused(hf_tiny, earlier, tmp_path, capsys, monkeypatch):
    src = Path(shutil.copytree(hf_tiny[0], tmp_path / "models" / "hf"))
    weights = src / "model.safetensors"
    for argv in ([src, src], [src, src.parent], [weights, weights], [weights, src]):
        err = refused([*argv, "--overwrite"], capsys, tmp_path)
        assert "source" in err and "another directory" in err, argv
    # an export over its own Orbax source, asked to overwrite: the source would be gone before it failed
    err = refused([earlier, earlier, "--to", "transformers", "--overwrite"], capsys, tmp_path)
    assert "is the source" in err and "another directory" in err
    # a directory that looks like an earlier export of ours but holds the --config being read
    (tmp_path / "cfg").mkdir()
    shutil.copy(src / "config.json", tmp_path / "cfg" / "config.json")
    (tmp_path / "cfg" / EXPORT_MARKER).write_text('{"format": "csm-jax-export"}')
    err = refused([src, tmp_path / "cfg", "--config", tmp_path / "cfg" / "config.json", "--overwrite"], capsys,
                  tmp_path)
    assert "contains the source" in err
    monkeypatch.chdir(tmp_path / "cfg")
    for out in (".", "..", ""):
        err = refused([src, out], capsys, tmp_path)
        assert "current directory" in err and "new directory" in err


def test_existing_file_foreign_directory_and_link_are_refused(hf_tiny, tmp_path, capsys):
    src = hf_tiny[0]
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "link").symlink_to(tmp_path / "photos")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, fix in [("notes.txt", "new directory"), ("photos", "new or empty directory"), ("link", "new directory"),
                     ("dangling", "new directory"), ("notes.txt/sub", "in a directory"),
                     ("photos/cat.jpg", "new directory")]:
        for flags in ([], ["--overwrite"]):
            err = refused([src, tmp_path / out, *flags], capsys, tmp_path)
            assert str(tmp_path / out) in err and fix in err, (out, err)


def test_earlier_output_is_replaced_only_with_overwrite(hf_tiny, earlier, tmp_path, capsys):
    src = hf_tiny[0]
    err = refused([src, earlier, "--dtype", "bfloat16"], capsys, tmp_path)
    assert "already holds a csm-jax checkpoint" in err and "--overwrite" in err
    (earlier / "notes.txt").write_text("mine")
    err = refused([src, earlier, "--overwrite"], capsys, tmp_path)
    assert "notes.txt" in err and "Move them away" in err
    (earlier / "notes.txt").unlink()

    assert main([str(src), str(earlier), "--dtype", "bfloat16", "--overwrite"]) == 0
    assert read_metadata(earlier)["dtype"] == "bfloat16" and partials(tmp_path) == []
    assert main([str(earlier), str(tmp_path / "hf"), "--to", "transformers"]) == 0  # exports are marked as ours
    assert output_kind(tmp_path / "hf") == "export"
    err = refused([earlier, tmp_path / "hf", "--to", "original"], capsys, tmp_path)
    assert "already holds a csm-jax export" in err and "--overwrite" in err
    assert main([str(earlier), str(tmp_path / "hf"), "--to", "original", "--overwrite"]) == 0
    assert '"backbone_flavor"' in (tmp_path / "hf" / "config.json").read_text()
    (tmp_path / "empty").mkdir()
    assert main([str(src), str(tmp_path / "empty")]) == 0  # an empty directory is used as it is
    assert output_kind(tmp_path / "empty") == "checkpoint" and partials(tmp_path) == []


# ---- what the source is --------------------------------------------------------------------------------------

class RunsCodeWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_unsafe_pickle_is_refused_as_unsafe(tmp_path, capsys):
    src = save_original(original_model(preset("tiny"), seed=8), tmp_path / "src", "pt")
    state = torch.load(src / "ckpt.pt", weights_only=True)
    torch.save({**state, "payload": RunsCodeWhenUnpickled(tmp_path / "pwned")}, src / "ckpt.pt")
    err = refused([src, tmp_path / "out"], capsys, tmp_path)
    assert "refused as unsafe" in err and "safetensors" in err and "truncated" not in err
    assert not (tmp_path / "pwned").exists()
    torch.save(state, src / "ckpt.pt", _use_new_zipfile_serialization=False)  # torch's legacy format: safe, no mmap
    assert main([str(src), str(tmp_path / "out")]) == 0


def test_sources_that_are_not_checkpoints_explain_the_fix(hf_tiny, earlier, tmp_path, capsys):
    src = hf_tiny[0]
    err = refused([earlier, tmp_path / "out"], capsys, tmp_path)  # forgot --to
    assert "already a csm-jax checkpoint" in err and "--to transformers" in err
    os.mkfifo(tmp_path / "fifo")
    err = refused([tmp_path / "fifo", tmp_path / "out"], capsys, tmp_path)  # would block reading
    assert "neither a regular file nor a directory" in err
    (tmp_path / "piped").mkdir()
    os.mkfifo(tmp_path / "piped" / "model.safetensors")
    err = refused([tmp_path / "piped", tmp_path / "out"], capsys, tmp_path)
    assert "not a regular file" in err
    for config, fix in [("garbage", "config.json"), ("[1, 2]", "config.json")]:
        (tmp_path / "bad.json").write_text(config)
        err = refused([src, tmp_path / "out", "--config", tmp_path / "bad.json"], capsys, tmp_path, src)
        assert fix in err
    err = refused([src, tmp_path / "out", "--config", tmp_path], capsys, tmp_path, src)  # a directory
    assert "--config" in err
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    err = refused([tmp_path / "adapter", tmp_path / "out", "--to", "transformers"], capsys, tmp_path)
    assert "is a LoRA adapter, not a model checkpoint" in err and f"--adapter {tmp_path / 'adapter'}" in err
    assert f"python -m convert SRC {tmp_path / 'adapter'}" not in err
    (tmp_path / "adapter" / "adapter_config.json").unlink()
    err = refused([tmp_path / "adapter", tmp_path / "out", "--to", "transformers"], capsys, tmp_path)
    assert "Convert a PyTorch checkpoint first: python -m convert SRC NEW_DIR" in err


def test_a_second_conversion_into_one_output_is_refused(hf_tiny, tmp_path, capsys):
    from csm_jax.io.locks import exclusive

    with exclusive(tmp_path / ".out.lock", "it", "wait"):
        err = refused([hf_tiny[0], tmp_path / "out"], capsys, tmp_path)
    assert f"the output {tmp_path / 'out'} is in use by pid {os.getpid()} on " in err
    assert "wait for that run to end (or stop it), or write to another directory" in err
    assert main([str(hf_tiny[0]), str(tmp_path / "out")]) == 0  # released: no lock file left to trip on
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_damaged_checkpoint_is_called_damaged(earlier, tmp_path, capsys):
    def truncate_params(ckpt):
        for path in (ckpt / "params").rglob("*"):
            if path.is_file() and path.stat().st_size > 1000:
                path.write_bytes(path.read_bytes()[:100])

    damages = {"metadata.json": lambda c: (c / "metadata.json").write_text("{"),
               "config.json": lambda c: (c / "config.json").write_text("[]"),
               "dtype": lambda c: (c / "metadata.json").write_text('{"format": "csm-jax", "dtype": "int7"}'),
               "params": truncate_params}
    for name, damage in damages.items():
        ckpt = Path(shutil.copytree(earlier, tmp_path / name))
        damage(ckpt)
        err = refused([ckpt, tmp_path / "out", "--to", "original"], capsys, tmp_path)
        assert "damaged" in err and "convert or save it again" in err, name


# ---- disk space ----------------------------------------------------------------------------------------------

def test_not_enough_space_is_found_before_reading_the_weights(hf_tiny, tmp_path, capsys, monkeypatch):
    import convert.from_torch
    import csm_jax.io.output_dir

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(csm_jax.io.output_dir.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2000, 2000))
    monkeypatch.setattr(convert.from_torch, "fill_params", lambda *a: pytest.fail("read the weights first"))
    err = refused([hf_tiny[0], tmp_path / "out", "--dtype", "bfloat16"], capsys, tmp_path, hf_tiny[0])
    csm = sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(preset("tiny")), nnx.Param)))
    codec = sum(v.nbytes for k, v in load_file(hf_tiny[0] / "model.safetensors").items()
                if k.startswith("codec_model."))
    assert f"needs about {(2 * csm + codec) / 1e6:.1f} MB" in err  # bfloat16 CSM tensors plus the float32 codec
    assert "2.0 kB free" in err and "another disk" in err


@pytest.mark.parametrize("to", ["orbax", "transformers"])
def test_disk_full_while_writing_leaves_nothing(to, hf_tiny, earlier, tmp_path, capsys, monkeypatch):
    import convert.from_torch
    import convert.to_torch

    def disk_full(path, *args, **kwargs):  # write_params(directory, ...) or write_safetensors(file, ...)
        (path / "params" if path.is_dir() else path).write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(convert.from_torch, "write_params", disk_full)
    monkeypatch.setattr(convert.to_torch, "write_safetensors", disk_full)
    src = hf_tiny[0] if to == "orbax" else earlier
    err = refused([src, earlier if to == "orbax" else tmp_path / "hf", "--to", to, "--overwrite"], capsys,
                  tmp_path, hf_tiny[0])
    assert "ran out of space" in err and "needs about" in err and " free " in err and "another disk" in err
    assert partials(tmp_path) == []


# ---- interruptions (real signals to real processes) ----------------------------------------------------------

SLOW_CONVERT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the test runner was started with them ignored
signal.signal(signal.SIGTERM, signal.SIG_DFL)
import convert.from_torch
import orbax.checkpoint as ocp
from convert.__main__ import main

def slowly(write, before):  # a signal arrives while the output is partial: before or after Orbax's write
    def slow(*args, **kwargs):
        if before:
            print("writing", flush=True)
            time.sleep(3)
        result = write(*args, **kwargs)
        if not before:
            print("writing", flush=True)
            time.sleep(300)
        return result
    return slow

if sys.argv[1] == "during-orbax":
    ocp.StandardCheckpointer.save = slowly(ocp.StandardCheckpointer.save, before=True)
else:
    convert.from_torch.write_config_and_metadata = slowly(convert.from_torch.write_config_and_metadata, before=False)
sys.exit(main(sys.argv[2:]))
"""


def start_slow_conversion(argv: list, when: str = "after-orbax") -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, when, *map(str, argv)], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline() == "writing\n", child.communicate(timeout=HANG_SECONDS)[1]
    return child


@pytest.mark.parametrize("sig, when, code", [(signal.SIGTERM, "after-orbax", 128 + signal.SIGTERM),
                                             (signal.SIGINT, "during-orbax", 130)])
def test_signal_removes_the_partial_output_and_keeps_the_earlier(sig, when, code, hf_tiny, earlier, tmp_path):
    """During Orbax's write the signal waits for the write to end (Orbax's threads cannot be stopped halfway)."""
    before = tree(tmp_path)
    child = start_slow_conversion([hf_tiny[0], earlier, "--dtype", "bfloat16", "--overwrite"], when)
    assert len(partials(tmp_path)) == 1
    child.send_signal(sig)
    _, err = child.communicate(timeout=HANG_SECONDS)
    assert child.returncode == code and "Traceback" not in err
    assert ("stopping once the current write ends" in err) == (when == "during-orbax")
    assert tree(tmp_path) == before and partials(tmp_path) == []
    assert main([str(hf_tiny[0]), str(earlier), "--dtype", "bfloat16", "--overwrite"]) == 0
    assert read_metadata(earlier)["dtype"] == "bfloat16"


def test_the_next_run_sweeps_what_a_killed_run_left(hf_tiny, tmp_path, capsys):
    child = start_slow_conversion([hf_tiny[0], tmp_path / "out"])
    child.kill()
    child.communicate(timeout=HANG_SECONDS)
    [left] = partials(tmp_path)
    assert left.startswith(f".out.partial-{child.pid}-")
    reused = tmp_path / f".out.partial-{os.getppid()}-0123abcd"  # its pid now names a process started after it
    reused.mkdir()
    os.utime(reused, (0, 0))
    alive = tmp_path / f".out.partial-{os.getppid()}-4567abcd"  # a writer that may still be at work
    lookalikes = [tmp_path / ".out.partial-mine", tmp_path / ".other.partial-1-0123abcd"]
    for path in (alive, *lookalikes):
        path.mkdir()
    (tmp_path / ".out.old-1-0123abcd").write_text("a file, not our directory")
    assert (tmp_path / ".out.lock").is_file()  # its lock file: the kernel released the lock itself
    kept = {k: v for k, v in tree(tmp_path).items() if left not in k and reused.name not in k and ".out.lock" not in k}
    assert main([str(hf_tiny[0]), str(tmp_path / "out")]) == 0
    assert read_metadata(tmp_path / "out")["dtype"] == "float32"
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith(str(tmp_path / "out"))} == kept


def test_command_line_exits_2_without_traceback(hf_tiny, tmp_path):
    src = hf_tiny[0]
    before = tree(src.parent)
    run = subprocess.run([sys.executable, "-m", "convert", str(src), str(src), "--overwrite"], cwd=REPO,
                         capture_output=True, text=True, timeout=HANG_SECONDS)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: ") and "another directory" in run.stderr
    assert tree(src.parent) == before
