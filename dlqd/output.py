"""Rendering for the CLI: one JSON document, or a readable table."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO
from uuid import UUID


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def print_json(document: object, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(document, out, default=_default, ensure_ascii=False)
    out.write("\n")


_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F]}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
# C1 controls (U+0080-U+009F) start terminal escape sequences too; bidi
# controls reorder what a terminal shows ("txt.exe" read as "exe.txt")
_CONTROL.update({i: f"\\u{i:04x}" for i in range(0x80, 0xA0)})
_CONTROL.update(
    {
        i: f"\\u{i:04x}"
        for i in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
    }
)


def safe(text: str) -> str:
    """``text`` with control characters escaped: a value can never drive the terminal."""
    return text.translate(_CONTROL)


def print_raw_json(parts: Sequence[str], out: TextIO | None = None) -> None:
    """Write a document assembled from JSON texts that Postgres rendered (never decoded)."""
    out = out or sys.stdout
    for part in parts:
        out.write(part)
    out.write("\n")


def _cell(value: Any, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, datetime):
        text = value.strftime("%Y-%m-%d %H:%M:%S%z")
    elif isinstance(value, float):
        text = f"{value:.1f}"
    else:
        text = str(value)
    text = safe(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    out: TextIO | None = None,
    max_width: int = 40,
) -> None:
    out = out or sys.stdout
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    out.write(line.rstrip() + "\n")
    for row in cells:
        out.write("  ".join(t.ljust(w) for t, w in zip(row, widths, strict=True)).rstrip() + "\n")
