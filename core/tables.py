"""Markdown tables: the one renderer every report, evaluation and benchmark uses (tabulate's
GitHub format)."""

from __future__ import annotations

from collections.abc import Sequence

from tabulate import tabulate


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], floatfmt: str = ".4f") -> str:
    """A GitHub Markdown table ending in a newline; floats formatted with `floatfmt`, None shown as
    "n/a", anything else as `str` (cells are never re-parsed as numbers)."""

    def cell(v: object) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    return tabulate(body, headers=list(header), tablefmt="github", disable_numparse=True) + "\n"
