"""Tables for people (rich when installed, plain text otherwise) and JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        _plain_table(headers, rows, title)
        return
    table = Table(title=title)
    for h in headers:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    console = Console()
    # A pipe or a log file has no width: do not fold rows to rich's 80-column guess.
    console.width = max(100, console.width) if console.is_terminal else 200
    console.print(table)


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        print(title)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
