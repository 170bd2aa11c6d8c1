"""Named SQL, loaded once from ``sql/queries.sql`` and ``sql/express.sql``;
migrations from ``sql/NNN_*.sql``; each adapter's from ``sql/adapters/<name>.sql``.

Each query starts with a ``-- name: <name>`` line. A ``-- fragment: <name>``
block is a piece of text that queries include as ``{{name}}`` (the narrow
row's columns, say, written once; a fragment may include those defined before
it), substituted when the file is loaded. Values
are always bound parameters; what is composed at run time (an operator's
target statement, compiled policy matches) is composed in ``dlqd.db.compose``
alone, with ``psycopg.sql``.
"""

from __future__ import annotations

import functools
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


_HEADER = re.compile(r"^--\s*(name|fragment):\s*(\w+)\s*$", re.MULTILINE)
_INCLUDE = re.compile(r"\{\{(\w+)\}\}")


def _load(*paths: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    fragments: dict[str, str] = {}
    for path in paths:
        text = path.read_text(encoding="utf-8")
        matches = list(_HEADER.finditer(text))
        for match, following in zip(matches, [*matches[1:], None], strict=True):
            end = following.start() if following else len(text)
            body = text[match.end() : end].strip()
            kind, name = match.group(1), match.group(2)
            if name in queries or name in fragments:
                raise RuntimeError(f"{path}: {name!r} is defined twice")
            (fragments if kind == "fragment" else queries)[name] = body
    for name, fragment in fragments.items():
        # a fragment's own leading comment lines are not part of what it includes
        lines = fragment.splitlines()
        while lines and lines[0].lstrip().startswith("--"):
            lines.pop(0)
        fragments[name] = "\n".join(lines)

    def include(match: re.Match[str]) -> str:
        if match.group(1) not in fragments:
            raise RuntimeError(f"no SQL fragment named {match.group(1)!r}")
        return fragments[match.group(1)]

    # a fragment may include fragments defined before it
    for name in list(fragments):
        fragments[name] = _INCLUDE.sub(include, fragments[name])
    return {name: _INCLUDE.sub(include, body) for name, body in queries.items()}


_QUERIES = _load(sql_dir() / "queries.sql", sql_dir() / "express.sql")


def q(name: str) -> LiteralString:
    """The text of a named query (a constant loaded from our own file)."""
    return _QUERIES[name]


@functools.cache
def _adapter_file(system: str) -> dict[str, str]:
    return _load(sql_dir() / "adapters" / f"{system}.sql")


def adapter_q(system: str, name: str) -> LiteralString:
    """The text of an adapter's named template (``sql/adapters/<system>.sql``)."""
    return _adapter_file(system)[name]
