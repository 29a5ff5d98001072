"""mkdocs hook: tables generated from the code at build time, so that the reference cannot drift from it.

A page line `<!-- options: MODULE -->` becomes the table of MODULE's command-line options, read from the argparse
parser that `MODULE.build_parser()` returns; `<!-- fields: MODULE.CLASS -->` becomes the table of a config
dataclass's fields (name, type, default, and the comment on the field's line).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import re
import tokenize

MARKER = re.compile(r"^<!-- (options|fields): ([\w.]+) -->$", re.MULTILINE)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(text) -> str:
    """A table cell in backticks: a pipe there splits no cell, and an escaped one would show its backslash."""
    return "`" + str(text).replace("\n", " ") + "`"


def options_table(module: str) -> str:
    parser = importlib.import_module(module).build_parser()
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for action in parser._actions:  # argparse keeps no public list of its arguments
        if isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                metavar = action.metavar or (("{" + ",".join(map(str, action.choices)) + "}") if action.choices
                                             else action.dest.upper())
                name += " " + (" ".join(metavar) if isinstance(metavar, tuple) else metavar)
        else:
            name = action.metavar or action.dest.upper()
            if action.nargs in ("*", "+"):
                name += " ..."
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS or default == []
        shown = "" if unset or action.nargs == "*" else _code(default)
        rows.append(f"| {_code(name)} | {shown} | {_cell(action.help or '')} |")
    usage = parser.format_usage().strip().removeprefix("usage: ")
    return f"```text\n{usage}\n```\n\n" + "\n".join(rows)


def _line_comments(source: str) -> dict[int, str]:
    return {tok.start[0]: tok.string.lstrip("# ").strip() for tok in
            tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}


def fields_table(path: str) -> str:
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    lines, first = inspect.getsourcelines(cls)
    comments = _line_comments("".join(lines))
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        line = next(i for i, text in enumerate(lines, 1) if re.match(rf"\s+{field.name}\s*:", text))
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if dataclasses.is_dataclass(default):
            default = f"{type(default).__name__}()"
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        meaning = _cell(comments.get(line, ""))
        rows.append(f"| {_code(field.name)} | {_code(kind)} | {_code(repr(default))} | {meaning} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **_) -> str:
    return MARKER.sub(lambda m: (options_table if m[1] == "options" else fields_table)(m[2]), markdown)
