"""Tables for people (rich when installed, plain text otherwise) and JSON for scripts.

Cells and titles hold text from stores, bundles and manifests made elsewhere: it is shown as
text, never as rich markup (``[/x]`` would crash the table, ``[link=...]`` forge it) and never
with its control characters (an escape sequence would rewrite the terminal).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.text import Text

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text: object) -> str:
    """``text`` with each control character shown as ``\\xNN`` instead of sent to the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def literal(text: object) -> Text:
    """``text`` as rich shows it literally: a Text (no markup, no ``:emoji:`` codes), control characters shown."""
    from rich.text import Text

    return Text(clean(text))


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        _plain_table(headers, rows, title)
        return
    table = Table(title=None if title is None else Text("\n").join(literal(t) for t in title.split("\n")))
    for h in headers:
        table.add_column(literal(h), overflow="fold")
    for row in rows:
        table.add_row(*(literal(c) for c in row))
    console = Console()
    # A pipe or a log file has no width: do not fold rows to rich's 80-column guess.
    console.width = max(100, console.width) if console.is_terminal else 200
    console.print(table)


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None) -> None:
    cells = [[clean(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        print("\n".join(clean(t) for t in title.split("\n")))
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
