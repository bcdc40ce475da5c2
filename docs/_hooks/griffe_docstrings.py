"""Griffe extension: two readings of the package's docstrings that Google style in griffe does not make itself.

- ``Example:`` heads the doctests (as in Optuna's docstrings); griffe knows only ``Examples:`` and would show
  the doctest as Markdown prose, so the heading is renamed.
- ``a, b, c: ...`` documents several related arguments on one line of ``Args:``; griffe would read it as one
  parameter named ``"a, b, c"`` (and warn that no such parameter exists), so the line becomes an entry for
  ``a`` with the description and one for each other name that points to it.

Only the text griffe parses changes, never the package's files, so the API reference shows each doctest as
code and each argument in the table with its type.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)
_ARGS = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments):\s*$")
_SHARED = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):\s+(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_shared_arguments(text: str) -> str:
    """``a, b: desc`` in an ``Args:`` section -> ``a: desc`` and ``b: See ``a``.``"""
    lines = text.split("\n")
    out: list[str] = []
    section: int | None = None  # the indent of the current Args: heading
    pending: list[str] = []  # entries to add once the current item's continuation lines end
    item_indent = 0
    for line in lines:
        if pending and (not line.strip() or _indent(line) <= item_indent):
            out.extend(pending)
            pending = []
        heading = _ARGS.match(line)
        if heading:
            section = len(heading.group(1))
        elif section is not None and line.strip() and _indent(line) <= section:
            section = None
        shared = _SHARED.match(line) if section is not None else None
        if shared:
            indent, names, description = shared.groups()
            first, *others = (name.strip() for name in names.split(","))
            item_indent = len(indent)
            out.append(f"{indent}{first}: {description}")
            pending = [f"{indent}{name}: See ``{first}``." for name in others]
            continue
        out.append(line)
    out.extend(pending)
    return "\n".join(out)


class DocstringReadings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = split_shared_arguments(_EXAMPLE.sub(r"\1Examples:", obj.docstring.value))
