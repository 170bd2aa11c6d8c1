"""Filters and cursors of the operator's reads: pure, no IO.

Globs as in policy matches (OR within a field, AND across fields), matched in
Postgres as regular expressions that match exactly what ``fnmatch`` matches;
opaque keyset cursors on ``(dlq_at, id)``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from uuid import UUID

from dlqd.errors import UsageError

# A cursor is short: anything longer was not printed by us (and could be a
# nesting bomb for the JSON decoder).
_MAX_CURSOR = 256


def encode_cursor(dlq_at: str, entry_id: UUID) -> str:
    """An opaque keyset cursor: the (dlq_at, id) of the last row of a page.

    ``dlq_at`` is Postgres's own ISO 8601 text, so that every timestamp
    Postgres can store (infinity included) survives the round trip.
    """
    raw = json.dumps([dlq_at, str(entry_id)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, UUID]:
    """(dlq_at text, id) from a cursor; UsageError for anything we did not print."""
    invalid = UsageError("invalid cursor: pass the next_cursor printed by a previous page")
    if len(cursor) > _MAX_CURSOR:
        raise invalid
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise invalid from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, str) for v in value)
        or len(value[0]) > 64
    ):
        raise invalid
    try:
        return value[0], UUID(value[1])
    except ValueError:
        raise invalid from None


def glob_regex(pattern: str) -> str:
    """A shell glob as a PostgreSQL regular expression that matches exactly what
    ``fnmatch.fnmatchcase`` matches (``*``, ``?``, ``[seq]``, ``[!seq]``)."""
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append("\\[")
                continue
            body = pattern[i:j]
            i = j + 1
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            # inside a bracket, escape what ARE treats specially
            chars = "".join("\\" + ch if ch in "\\^]-[" else ch for ch in body)
            # keep ranges a-z as ranges: fnmatch reads "-" between two characters as one
            chars = _ranges(body) if "-" in body[1:-1] else chars
            if not chars:  # only empty ranges, like [z-a]: fnmatch matches nothing (or anything)
                out.append("." if negate else "(?!)")
                continue
            out.append("[" + ("^" if negate else "") + chars + "]")
        else:
            out.append(c if c.isalnum() or c == "_" else "\\" + c)
    out.append("$")
    return "".join(out)


def _ranges(body: str) -> str:
    """A bracket body with ranges kept and every other character escaped."""
    parts: list[str] = []
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            lo, hi = body[k], body[k + 2]
            if lo <= hi:
                parts.append(_escape_in_bracket(lo) + "-" + _escape_in_bracket(hi))
            k += 3
        else:
            parts.append(_escape_in_bracket(body[k]))
            k += 1
    return "".join(parts)


def _escape_in_bracket(ch: str) -> str:
    return "\\" + ch if ch in "\\^]-[" else ch


#: a glob longer than this is no filter anyone typed (keys are at most 2048 bytes)
MAX_GLOB = 1000
#: a payload search document, at most (bytes of its JSON text) and deep
MAX_SEARCH_BYTES = 4096
MAX_SEARCH_DEPTH = 16
#: an error search, at most (characters)
MAX_ERROR_SEARCH = 200
STATES = ("new", "waiting", "parked", "unmatched")


def parse_payload_search(text: str) -> str:
    """A payload search (``payload @> DOCUMENT``): a JSON object or array, as
    compact JSON text; UsageError naming what is wrong."""
    if len(text.encode("utf-8", "replace")) > MAX_SEARCH_BYTES:
        raise UsageError(f"payload search: at most {MAX_SEARCH_BYTES} bytes of JSON")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise UsageError('payload search: not valid JSON (e.g. {"to": "x@example.com"})') from None
    if not isinstance(value, dict | list):
        raise UsageError('payload search: a JSON object or array (e.g. {"to": "x@example.com"})')
    if _depth(value) > MAX_SEARCH_DEPTH:
        raise UsageError(f"payload search: at most {MAX_SEARCH_DEPTH} levels deep")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def search_keys(text: str) -> list[str]:
    """Every object key of a payload search document, at any depth."""
    found: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                found.append(key)
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    walk(json.loads(text))
    return found


@dataclass(frozen=True, slots=True)
class PendingFilter:
    """Globs on the key columns (OR within a field, AND across fields), as in
    policy matches; for ``list``, also the recorded state and policy, a
    document the payload must contain (``payload``, JSON text) and text the
    last error must contain (``error``, any case)."""

    app_id: tuple[str, ...] = ()
    type: tuple[str, ...] = ()
    error_reason: tuple[str, ...] = ()
    state: tuple[str, ...] = ()
    policy: tuple[str, ...] = ()
    payload: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        for flag, globs in (
            ("--app-id", self.app_id),
            ("--type", self.type),
            ("--error-reason", self.error_reason),
            ("--policy", self.policy),
        ):
            if any(len(g) > MAX_GLOB for g in globs):
                raise UsageError(f"{flag}: a glob is at most {MAX_GLOB} characters")
        for state in self.state:
            if state not in STATES:
                raise UsageError(f"--state: {state[:40]!r} is not one of {', '.join(STATES)}")
        if self.payload is not None:
            object.__setattr__(self, "payload", parse_payload_search(self.payload))
        if self.error is not None and len(self.error) > MAX_ERROR_SEARCH:
            raise UsageError(f"error search: at most {MAX_ERROR_SEARCH} characters")

    @property
    def empty(self) -> bool:
        return self == PendingFilter()

    def params(self) -> dict[str, list[str] | str | None]:
        return {
            "app_ids": [glob_regex(p) for p in self.app_id] or None,
            "types": [glob_regex(p) for p in self.type] or None,
            "error_reasons": [glob_regex(p) for p in self.error_reason] or None,
            "states": list(self.state) or None,
            "policies": list(self.policy) or None,
            "payload": self.payload,
            "error": self.error or None,
        }

    def to_json(self) -> dict[str, object]:
        """The filter as a redrive keeps it (and ``redrive --json`` prints it)."""
        return {
            "app_id": list(self.app_id),
            "type": list(self.type),
            "error_reason": list(self.error_reason),
            "state": list(self.state),
            "policy": list(self.policy),
            "payload": json.loads(self.payload) if self.payload is not None else None,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, value: dict[str, object]) -> PendingFilter:
        def strings(key: str) -> tuple[str, ...]:
            items = value.get(key) or []
            return tuple(str(v) for v in items) if isinstance(items, list) else ()

        payload = value.get("payload")
        error = value.get("error")
        return cls(
            app_id=strings("app_id"),
            type=strings("type"),
            error_reason=strings("error_reason"),
            state=strings("state"),
            policy=strings("policy"),
            payload=json.dumps(payload) if payload is not None else None,
            error=str(error) if error is not None else None,
        )


def glob_literal(value: str) -> str:
    """A glob that matches exactly ``value``; for a key cut to a label (128
    characters, the last one "…"), every value it stands for."""
    escaped = "".join(f"[{c}]" if c in "*?[" else c for c in value)
    if len(value) == 128 and value.endswith("…"):
        escaped = escaped[:-1] + "*"
    return escaped


def parse_entry_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise UsageError(f"invalid id {text!r}: expected a UUID") from None
