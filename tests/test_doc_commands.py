"""Every command line of ours in a shell block of README.md and of the documentation parses as written.

A line (after `\\` continuations, `&&`, `;` and pipes) that runs `python -m MODULE` for one of our command lines,
through any interpreter path or launcher (`.venv/bin/python`, `srun python`, `torchrun ... -m`, a quoted
`sbatch --wrap "..."`), is parsed by that module's own `build_parser()`; `python -m train` also loads its
`--config` file with the `key=value` overrides through train.config's loader. Nothing runs."""

import argparse
import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT

SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(`{3,})\s*([\w-]*)")
# python -m NAME -> the module whose build_parser() parses its arguments
PARSERS = {"csm_jax.generate": "csm_jax.generate", "csm_jax.serve": "csm_jax.serve", "convert": "convert.__main__",
           "train": "train.__main__", "train.prepare": "train.prepare", "train.plot": "train.plot"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]


@dataclass(frozen=True)
class Command:
    where: str  # page:line
    module: str
    args: tuple[str, ...]

    def __str__(self):
        return f"{self.where}: python -m {self.module} {shlex.join(self.args)}"


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of each shell block's commands: continuations joined, a console's `$ ` dropped."""
    lines, fence, start, pending = [], None, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        opened = FENCE.match(line)
        if fence is None:
            if opened:
                fence = (opened.group(1), opened.group(2).lower())
            continue
        if line.strip() == fence[0]:
            fence = None
            continue
        if fence[1] not in SHELL_BLOCKS:
            continue
        if fence[1] == "console" and not pending:
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append((start, pending + line))
        pending = ""
    return lines


def commands_in(words: list[str], where: str) -> list[Command]:
    """Our command lines among shell words: `-m NAME` after a python interpreter or torchrun, also inside a quoted
    word (`sbatch --wrap "python -m ..."`); the arguments run to the next separator."""
    found, i = [], 0
    while i < len(words):
        word = words[i]
        if " " in word and " -m " in f" {word} ":
            found += commands_in(shlex.split(word, comments=True), where)
        launched = any(Path(w).name.startswith("python") or Path(w).name == "torchrun" for w in words[:i])
        if word == "-m" and i + 1 < len(words) and words[i + 1] in PARSERS and launched:
            end = next((j for j in range(i + 2, len(words)) if words[j] in SEPARATORS), len(words))
            found.append(Command(where, words[i + 1], tuple(words[i + 2:end])))
            i = end
        i += 1
    return found


def commands(page: str, text: str | None = None) -> list[Command]:
    text = (ROOT / page).read_text() if text is None else text
    found = []
    for number, line in shell_lines(text):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        found += commands_in(list(lexer), f"{page}:{number}")
    return found


class ArgumentError(Exception):
    pass


def parse(command: Command) -> argparse.Namespace:
    """The command's arguments parsed by its own parser; a mistake raises instead of exiting."""
    parser = importlib.import_module(PARSERS[command.module]).build_parser()

    def error(message):
        raise ArgumentError(message)

    parser.error = error
    return parser.parse_args(list(command.args))


def check(command: Command) -> None:
    try:
        args = parse(command)
        if command.module == "train":
            from train.config import load_config

            assert args.config, "python -m train without --config"
            load_config(ROOT / args.config, args.overrides)
        problem = None
    except Exception as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        pytest.fail(f"{command}\n  {problem}", pytrace=False)


ALL = [c for page in PAGES for c in commands(page)]


def test_the_commands_are_found():
    # train.plot is shown inline and in the included examples/lora_on_folder.sh (run by tests/test_examples.py)
    assert {c.module for c in ALL} >= set(PARSERS) - {"train.plot"}
    assert any(c.where.startswith("README.md") for c in ALL)
    assert sum(c.module == "train" and "srun" not in c.where for c in ALL) >= 3


@pytest.mark.parametrize("command", ALL, ids=str)
def test_documented_command_parses(command):
    check(command)


def test_a_wrong_command_is_reported_with_its_page_and_line():
    page = "\n".join(["Intro", "```bash", "echo hi && .venv/bin/python -m csm_jax.generate \\",
                      "    --text hi --no-such-option  # comment", "srun python -m train --config train/configs/smoke.py \\",
                      "    optim.no_such_field=1", "```", "```python", "python -m convert", "```",
                      '```console', '$ sbatch --wrap "python -m train.prepare"', "output -m convert", "```"])
    found = commands("docs/page.md", page)
    assert [(c.where, c.module) for c in found] == [("docs/page.md:3", "csm_jax.generate"),
                                                     ("docs/page.md:5", "train"), ("docs/page.md:12", "train.prepare")]
    assert found[0].args == ("--text", "hi", "--no-such-option")
    for command, message in zip(found, ["--no-such-option", "no_such_field", "required"]):
        with pytest.raises(pytest.fail.Exception, match=rf"(?s)docs/page.md:\d+: python -m .*{message}"):
            check(command)
