"""Who is asking: tokens, signed session cookies, CSRF checks. Pure, no IO.

A token is 32 random bytes (``dlqd console token``); the config holds only
its SHA-256. An API client sends it as ``Authorization: Bearer``; a browser
signs in with it once and gets a session cookie: ``v1.<payload>.<mac>``, the
payload naming the token (by name and the start of its digest, so a token
removed from the config ends its sessions), the expiry and the session's
CSRF secret, the MAC an HMAC-SHA256 under a key kept in Postgres (one for
every replica). Every comparison of secrets is in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from dlqd.config import ConsoleToken

Role = Literal["viewer", "operator"]
COOKIE = "dlqd_session"
TOKEN_BYTES = 32
#: a session cookie longer than this was not made by us
MAX_COOKIE = 1024


@dataclass(frozen=True, slots=True)
class Identity:
    """The token a request authenticated with: its name is the actor of what it does."""

    name: str
    role: Role
    app_id: str | None
    csrf: str | None = None  # a browser session's CSRF secret (None: a bearer token)

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


def new_token() -> tuple[str, str]:
    """A new random token and its SHA-256 (lowercase hex)."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, digest(token)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class TokenBook:
    """The configured tokens, looked up by the digest of what a client sent."""

    def __init__(self, tokens: tuple[ConsoleToken, ...]) -> None:
        self.tokens = tokens

    def by_token(self, token: str) -> ConsoleToken | None:
        """The token ``token`` is, compared with every one in constant time."""
        sent = digest(token)
        found: ConsoleToken | None = None
        for candidate in self.tokens:
            if hmac.compare_digest(sent, candidate.sha256):
                found = candidate
        return found

    def by_name(self, name: str, digest_start: str) -> ConsoleToken | None:
        for candidate in self.tokens:
            if candidate.name == name and hmac.compare_digest(
                candidate.sha256[: len(digest_start)], digest_start
            ):
                return candidate
        return None


def identity(token: ConsoleToken, csrf: str | None = None) -> Identity:
    return Identity(token.name, token.role, token.app_id, csrf)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Signed session cookies under ``key``, valid for ``ttl`` seconds."""

    def __init__(self, key: bytes, ttl: float) -> None:
        self.key = key
        self.ttl = ttl

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self.key, payload.encode(), hashlib.sha256).digest())

    def issue(self, token: ConsoleToken, now: float | None = None) -> tuple[str, Identity]:
        """A new session for ``token``: the cookie's value and who it is."""
        csrf = secrets.token_urlsafe(24)
        expires = int((now if now is not None else time.time()) + self.ttl)
        body = {"n": token.name, "d": token.sha256[:16], "e": expires, "c": csrf}
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"v1.{payload}.{self._mac(payload)}", identity(token, csrf)

    def verify(self, cookie: str, book: TokenBook, now: float | None = None) -> Identity | None:
        """Who a cookie says, if we signed it, it has not expired, and its token
        is still configured; None otherwise."""
        if len(cookie) > MAX_COOKIE:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or parts[0] != "v1":
            return None
        _, payload, mac = parts
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            body = json.loads(_unb64(payload))
        except (ValueError, binascii.Error):
            return None
        if not isinstance(body, dict):
            return None
        name, start, expires, csrf = body.get("n"), body.get("d"), body.get("e"), body.get("c")
        if not (
            isinstance(name, str)
            and isinstance(start, str)
            and isinstance(expires, int)
            and isinstance(csrf, str)
        ):
            return None
        if expires <= (now if now is not None else time.time()):
            return None
        token = book.by_name(name, start)
        return identity(token, csrf) if token is not None else None


def csrf_problem(
    *,
    fetch_site: str | None,
    origin: str | None,
    own_origin: str,
    sent: str | None,
    expected: str | None,
) -> str | None:
    """Why a state-changing request of a browser session is refused (None: it is not).

    The browser says where the request comes from: ``Sec-Fetch-Site`` (every
    current browser; it cannot be set by a page), else ``Origin`` (which a
    page under ``Referrer-Policy: no-referrer`` sends as ``null`` even to its
    own origin, so it decides only where Sec-Fetch-Site is missing); and the
    form carries the session's CSRF secret.
    """
    if fetch_site is not None:
        if fetch_site not in ("same-origin", "none"):
            return f"a {fetch_site} request (Sec-Fetch-Site) may not change anything"
    elif origin == "null":
        return "a request from an opaque origin may not change anything"
    elif origin is not None and origin != own_origin:
        return "a request from another origin may not change anything"
    if expected is None or sent is None or not hmac.compare_digest(sent, expected):
        return "the form's CSRF token is missing or wrong: reload the page and try again"
    return None
