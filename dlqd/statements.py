"""An operator's target statement, read as the server will: tokens, not characters.

Pure functions over the statement text. They find where the statement really
starts and ends (comments, whitespace and trailing semicolons are not part of
it, quoted text and dollar-quoted bodies are one token each), so that every
path that runs a target, and ``dlqd check`` that validates it, embeds exactly
the same text; and they say what kind of statement it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: the statements a target may be: data manipulation or a query, nothing else
#: (EXPLAIN accepts CREATE TABLE AS, DECLARE, EXECUTE and REFRESH too)
TARGET_KEYWORDS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "VALUES"})

_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    start: int
    end: int


class StatementError(ValueError):
    """The text is not one statement the tokenizer can read."""


def tokens(text: str) -> list[Token]:
    """The significant tokens of ``text``: comments and whitespace dropped,
    quoted strings, quoted identifiers and dollar-quoted bodies one token each."""
    found: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while depth and j < n:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            if depth:
                raise StatementError("a /* comment is not closed")
            i = j
        elif c in "'\"":
            escapes = c == "'" and found and found[-1].end == i and found[-1].text.upper() == "E"
            j = i + 1
            while True:
                if j >= n:
                    raise StatementError(f"a {c} quote is not closed")
                if escapes and text[j] == "\\":
                    j += 2
                elif text[j] == c:
                    if text.startswith(c * 2, j):
                        j += 2
                    else:
                        break
                else:
                    j += 1
            if escapes:
                found.pop()
            found.append(Token(text[i : j + 1], i, j + 1))
            i = j + 1
        elif c == "$" and (tag := _DOLLAR_TAG.match(text, i)):
            close = text.find(tag.group(0), tag.end())
            if close < 0:
                raise StatementError("a dollar-quoted string is not closed")
            end = close + len(tag.group(0))
            found.append(Token(text[i:end], i, end))
            i = end
        elif word := _WORD.match(text, i):
            found.append(Token(word.group(0), i, word.end()))
            i = word.end()
        else:
            found.append(Token(c, i, i + 1))
            i += 1
    return found


def statement_body(text: str) -> str:
    """The one statement in ``text``, without the comments and whitespace around
    it and without trailing semicolons; StatementError for none, or for more
    than one."""
    found = tokens(text)
    while found and found[-1].text == ";":
        found.pop()
    if not found:
        raise StatementError("is empty")
    if any(t.text == ";" for t in found):
        raise StatementError("must be exactly one SQL statement")
    return text[found[0].start : found[-1].end]


def first_keyword(text: str) -> str:
    """The statement's first word, upper case ('' when it starts otherwise)."""
    found = tokens(text)
    if found and _WORD.fullmatch(found[0].text):
        return found[0].text.upper()
    return found[0].text if found else ""


def target_problem(text: str) -> str | None:
    """Why ``text`` cannot be a target statement (one line), or None."""
    try:
        body = statement_body(text)
    except StatementError as exc:
        return str(exc)
    keyword = first_keyword(body)
    if keyword not in TARGET_KEYWORDS and keyword != "(":
        return (
            f"starts with {keyword[:40]!r}: a target is one SELECT, INSERT, UPDATE, DELETE "
            "or MERGE statement (with its own WITH if it likes)"
        )
    return None


def split_statements(text: str) -> list[str]:
    """The statements of a script, each without its comments around it or its
    semicolon (a semicolon inside quotes or a dollar-quoted body splits nothing)."""
    parts: list[str] = []
    start: Token | None = None
    last: Token | None = None
    for token in tokens(text):
        if token.text == ";":
            if start is not None and last is not None:
                parts.append(text[start.start : last.end])
            start = last = None
        else:
            start = start or token
            last = token
    if start is not None and last is not None:
        parts.append(text[start.start : last.end])
    return parts
