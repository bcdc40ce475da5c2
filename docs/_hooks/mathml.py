"""MkDocs hook: render the TeX that pymdownx.arithmatex marks (``generic: true``) as MathML at build time.

Arithmatex keeps ``$...$`` and ``$$...$$`` away from Markdown and wraps them in ``<span class="arithmatex">``
or ``<div class="arithmatex">`` holding ``\\(...\\)`` or ``\\[...\\]``. This hook replaces each with the
MathML that latex2mathml makes, which browsers render natively, so the site needs no MathJax or KaTeX and
no network. A formula latex2mathml cannot convert fails the build with the formula in the message.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\])\s*</(?P=tag)>',
    re.S,
)


def _render(match: re.Match[str]) -> str:
    block = match.group("block") is not None
    tex = html.unescape(match.group("block") if block else match.group("inline"))
    try:
        mathml = convert(tex, display="block" if block else "inline")
    except Exception as exc:  # latex2mathml raises its own exception types
        raise ValueError(f"cannot render the formula {tex!r} as MathML: {exc}") from exc
    return f'<div class="arithmatex">{mathml}</div>' if block else f'<span class="arithmatex">{mathml}</span>'


def on_page_content(html_text: str, **kwargs: object) -> str:
    return _MATH.sub(_render, html_text)
