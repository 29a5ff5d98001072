"""Every Python block of README.md and of the documentation runs as written, on tiny random models.

The blocks of one page run in order in one namespace (as a reader pastes them into one interpreter), in a folder that
holds the files they name (clip.wav, prev.wav, ckpt/csm-1b). What stands in for the hub: `load_csm_1b("sesame/
csm-1b")` loads a random `tiny_full_vocab` checkpoint with random Mimi weights, and the server at
http://127.0.0.1:8000 with the key KEY is a test server over that model. Blocks that include a file of examples/
(`--8<--`) are run by tests/test_examples.py instead."""

import re

import pytest

import csm_jax
from tests.helpers import KEY, ROOT, espeak_wav, random_mimi_file, tiny_checkpoint

BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]


def python_blocks(page: str) -> list[str]:
    return [b for b in BLOCK.findall((ROOT / page).read_text()) if "--8<--" not in b]


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def test_the_pages_with_python_are_found():
    assert {"README.md", "docs/concepts.md", "docs/guides/speak.md", "docs/guides/sampling-research.md"} <= set(
        PAGES_WITH_CODE)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A folder with a checkpoint at ckpt/csm-1b, clip.wav and prev.wav; and a random Mimi weights file."""
    folder = tmp_path_factory.mktemp("reader")
    tiny_checkpoint(folder / "ckpt" / "csm-1b")
    espeak_wav(folder / "clip.wav", "what the clip says", rate=16000)
    espeak_wav(folder / "prev.wav", "what did you do today", rate=22050)
    return folder, random_mimi_file(folder.parent / "mimi.safetensors")


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_python_blocks_run_as_written(page, tiny_files, server, monkeypatch):
    folder, mimi = tiny_files
    real = csm_jax.load_csm_1b

    def tiny_hub(checkpoint="sesame/csm-1b", **kwargs):
        kwargs.setdefault("mimi", mimi)
        return real(str(folder / "ckpt" / "csm-1b") if checkpoint == "sesame/csm-1b" else checkpoint, **kwargs)

    monkeypatch.setattr(csm_jax, "load_csm_1b", tiny_hub)
    monkeypatch.chdir(folder)
    namespace = {"__name__": "__snippet__"}
    for i, block in enumerate(python_blocks(page)):
        code = block.replace("http://127.0.0.1:8000", server.url).replace('api_key="KEY"', f'api_key="{KEY}"')
        exec(compile(code, f"{page}, python block {i + 1}", "exec"), namespace)
