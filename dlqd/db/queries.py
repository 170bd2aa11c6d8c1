"""Named SQL, loaded once from ``sql/queries.sql``; migrations from ``sql/NNN_*.sql``.

Each query in ``queries.sql`` starts with a ``-- name: <name>`` line. Values are
always bound parameters; nothing is assembled from strings at run time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import LiteralString


def sql_dir() -> Path:
    """The ``sql/`` folder: bundled in the wheel, or the source tree's."""
    package = Path(__file__).resolve().parent.parent
    bundled = package / "_sql"
    if bundled.is_dir():
        return bundled
    return package.parent / "sql"


_HEADER = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def _load(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    queries: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else len(text)
        body = text[match.end() : end].strip()
        name = match.group(1)
        if name in queries:
            raise RuntimeError(f"{path}: query {name!r} is defined twice")
        queries[name] = body
    return queries


_QUERIES = _load(sql_dir() / "queries.sql")


def q(name: str) -> LiteralString:
    """The text of a named query (a constant loaded from our own file)."""
    return _QUERIES[name]
