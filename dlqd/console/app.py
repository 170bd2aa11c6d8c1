"""The console's routes: HTML for browsers, the same data as JSON for API clients.

Every page reads through the operator layer (``dlqd.operator``), the very
functions behind ``dlqd list``, ``show``, ``explain``, ``replay``, ``park``
and ``redrive``; a request of a token bound to a tenant reads inside
:func:`dlqd.db.tenancy.tenant_scope` (row-level security) and acts on the
rows it can read, only. Actions need the ``operator`` role, are POSTs, and,
from a browser session, pass the CSRF check (``Sec-Fetch-Site``/``Origin``
and the session's token in the form). Pages render with JavaScript off;
``/static/console.js`` adds live refresh, "load more" and confirmations.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode
from uuid import UUID

import anyio
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dlqd.config import Settings
from dlqd.console import auth
from dlqd.console.chart import Chart, hourly_chart
from dlqd.db import replays
from dlqd.db.connector import Connection, Pool, pooled, transaction
from dlqd.db.tenancy import tenant_scope
from dlqd.errors import DatabaseError, DlqdError, NotFound, StatementTimeout, UsageError, error_line
from dlqd.filters import STATES, PendingFilter, glob_literal, parse_entry_id, search_keys
from dlqd.logs import get_logger
from dlqd.metrics import Metrics
from dlqd.operator import explain as explaining
from dlqd.operator import reads, redrive
from dlqd.operator import replay as acting
from dlqd.output import _default
from dlqd.web import ConcurrencyLimit

log = get_logger("dlqd.console")

HERE = Path(__file__).resolve().parent
#: a form or JSON body, at most
MAX_BODY = 64 * 1024
DRAIN_BYTES = 1024 * 1024  # read past an early answer, then let the connection go
DRAIN_SECONDS = 2.0
#: rows a page lists by default, and at most
PAGE = 50
MAX_PAGE = 500
#: a filtered list counts its rows up to this ("10,000+")
COUNT_CAP = 10_000
#: every read of a page is bounded: a search that would scan for long says so
READ_TIMEOUT = timedelta(seconds=5)
READ_LOCK_TIMEOUT = timedelta(seconds=2)
#: a refused sign-in is answered after this long (and logged)
SIGN_IN_PENALTY = 1.0
#: the payload a row page shows inline, at most (the JSON view has it all)
MAX_INLINE_PAYLOAD = 256 * 1024

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}
FLASH = {
    "replayed": "Replayed.",
    "replay_failed": "The replay failed: the row's history says why.",
    "skipped": "Nothing to replay: the row was replayed already, or has no target.",
    "parked": "Parked: the daemon leaves it alone until a replay or an unpark.",
    "unparked": "Unparked: the daemon decides it again by policy.",
    "unchanged": "Nothing changed (not in a state that allows it).",
    "redrive": "Redrive started: it runs on a daemon replica; its progress is below.",
    "cancel": "Cancel asked: the redrive stops after the chunk in flight.",
    "acted": "Done: the counts are below.",
}


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SecurityHeaders:
    """ASGI middleware: the console's security headers on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


@dataclass(frozen=True, slots=True)
class Form:
    """A POST's fields (form-encoded or JSON), each a list of strings."""

    fields: Mapping[str, list[str]]

    def one(self, name: str) -> str | None:
        values = [v for v in self.fields.get(name, []) if v != ""]
        return values[-1] if values else None

    def many(self, name: str) -> list[str]:
        return [v for v in self.fields.get(name, []) if v != ""]


def wants_json(request: Request) -> bool:
    if request.query_params.get("format") == "json":
        return True
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def answers_json(request: Request, ident: auth.Identity | None) -> bool:
    """An action's (or an error's) answer: JSON for API clients (a bearer token,
    or anyone asking for it), a page or a redirect for a browser session."""
    if wants_json(request):
        return True
    bearer = ident is None or ident.csrf is None
    return bearer and "text/html" not in request.headers.get("accept", "")


def own_origin(request: Request) -> str:
    scheme = "https" if secure(request) else request.url.scheme
    return f"{scheme}://{request.headers.get('host', request.url.netloc)}"


def secure(request: Request) -> bool:
    """The request came over TLS (here, or to the proxy in front)."""
    return (
        request.url.scheme == "https"
        or request.headers.get("x-forwarded-proto", "").lower() == "https"
    )


def filter_from(fields: Mapping[str, list[str]]) -> PendingFilter:
    def many(name: str) -> tuple[str, ...]:
        return tuple(v for v in fields.get(name, []) if v != "")

    def one(name: str) -> str | None:
        values = many(name)
        return values[-1] if values else None

    return PendingFilter(
        app_id=many("app_id"),
        type=many("type"),
        error_reason=many("error_reason"),
        state=many("state"),
        policy=many("policy"),
        payload=one("q"),
        error=one("error"),
    )


def filter_query(where: PendingFilter) -> list[tuple[str, str]]:
    """A filter as query parameters (the list's links keep it)."""
    pairs: list[tuple[str, str]] = []
    for name in ("app_id", "type", "error_reason", "state", "policy"):
        pairs += [(name, value) for value in getattr(where, name)]
    if where.payload is not None:
        pairs.append(("q", where.payload))
    if where.error is not None:
        pairs.append(("error", where.error))
    return pairs


def _json_response(document: object, status: int = 200) -> Response:
    body = json.dumps(document, default=_default, ensure_ascii=False)
    return Response(body, status, media_type="application/json")


def _raw_json(parts: list[str], status: int = 200) -> Response:
    return Response("".join(parts), status, media_type="application/json")


def _count_text(n: int, cap: int) -> str:
    return f"{cap:,}+" if n > cap else f"{n:,}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


async def _drain(request: Request) -> None:
    """Read what is left of a request's body (at most ``DRAIN_BYTES``) before the answer
    goes out. hypercorn closes a connection whose request was answered before its body
    came in, and closing a socket with bytes unread resets it: the client can lose the
    answer (a refusal, a 413) on the way. Read, the connection serves its next request.
    Bounded in time too: a client that sends its body slowly (or never) holds no
    request slot for longer than ``DRAIN_SECONDS``; its connection is then closed."""
    left = DRAIN_BYTES
    with (
        anyio.move_on_after(DRAIN_SECONDS),
        contextlib.suppress(RuntimeError, ClientDisconnect),  # RuntimeError: already read
    ):
        async for chunk in request.stream():
            left -= len(chunk)
            if left < 0:
                break


class Console:
    """The console of one daemon replica: its own pool, the daemon's settings."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        pool: Pool,
        metrics: Metrics,
        key: bytes,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.key = key
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["age"] = _age
        self.templates.filters["duration"] = _duration
        self.templates.filters["count"] = lambda n: f"{n:,}"
        self.templates.filters["globbed"] = glob_literal

    # ------------------------------------------------------------------ plumbing

    def sessions(self) -> auth.Sessions:
        return auth.Sessions(self.key, self.settings().console.session_ttl.total_seconds())

    def book(self) -> auth.TokenBook:
        return auth.TokenBook(self.settings().console.tokens)

    def redact(self) -> list[str]:
        return self.settings().console.redact_patterns()

    def who(self, request: Request) -> auth.Identity | None:
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            token = self.book().by_token(header[7:].strip())
            return auth.identity(token) if token is not None else None
        cookie = request.cookies.get(auth.COOKIE)
        if cookie:
            return self.sessions().verify(cookie, self.book())
        return None

    def render(
        self,
        request: Request,
        template: str,
        ident: auth.Identity | None,
        code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        page = self.templates.get_template(template).render(
            me=ident,
            path=request.url.path,
            flash=FLASH.get(request.query_params.get("done", "")),
            **context,
        )
        return HTMLResponse(page, code)

    def error(
        self, request: Request, ident: auth.Identity | None, status: int, message: str
    ) -> Response:
        if answers_json(request, ident):
            return _json_response({"error": message}, status)
        return self.render(
            request, "error.html", ident, status, status_code=status, message=message
        )

    async def body(self, request: Request) -> Form:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise HttpError(413, f"the request body is larger than {MAX_BODY} bytes")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                value = json.loads(bytes(data) or b"{}")
            except (ValueError, RecursionError):
                raise HttpError(400, "the body is not valid JSON") from None
            if not isinstance(value, dict):
                raise HttpError(400, "the body must be a JSON object")
            fields: dict[str, list[str]] = {}
            for name, item in value.items():
                items = item if isinstance(item, list) else [item]
                fields[name] = [
                    v if isinstance(v, str) else json.dumps(v) if isinstance(v, dict) else str(v)
                    for v in items
                    if v is not None
                ]
                if name == "dry_run" and isinstance(item, bool):
                    fields[name] = ["1" if item else ""]
            return Form(fields)
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, "the form is not UTF-8") from None
        return Form(parse_qs(text, keep_blank_values=True, max_num_fields=2000))

    def check_csrf(self, request: Request, ident: auth.Identity, form: Form | None) -> None:
        """A browser session's POST: same origin, with its session's CSRF token."""
        if ident.csrf is None:
            return  # a bearer token: nothing ambient for another site to use
        sent = request.headers.get("x-csrf-token") or (form.one("csrf") if form else None)
        problem = auth.csrf_problem(
            fetch_site=request.headers.get("sec-fetch-site"),
            origin=request.headers.get("origin"),
            own_origin=own_origin(request),
            sent=sent,
            expected=ident.csrf,
        )
        if problem is not None:
            log.warning("console request refused (CSRF)", actor=ident.name, why=problem)
            raise HttpError(403, problem)

    @staticmethod
    def check_search(where: PendingFilter, patterns: list[str]) -> None:
        """A payload search may not test masked keys (it would reveal their values)."""
        if where.payload is None:
            return
        import re

        for key in search_keys(where.payload):
            normalized = re.sub(r"[^a-z0-9]", "", key.lower())
            if any(p and p in normalized for p in patterns):
                raise UsageError(
                    f"payload search: the key {key[:60]!r} is masked (console.redact_keys): "
                    "it cannot be searched"
                )

    # ------------------------------------------------------------------ routing

    def app(self) -> Starlette:
        def guarded(
            handler: Callable[[Request, auth.Identity], Awaitable[Response]], *, act: bool = False
        ) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                try:
                    return await answer(request)
                finally:
                    if request.method != "GET":
                        await _drain(request)

            async def answer(request: Request) -> Response:
                ident = self.who(request)
                if ident is None:
                    if wants_json(request) or request.method != "GET":
                        return _json_response({"error": "sign in (a bearer token)"}, 401)
                    nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse(f"/login?{urlencode({'next': nxt})}", 303)
                try:
                    if request.method == "POST" and act and not ident.may_act:
                        raise HttpError(403, f"{ident.name} is a viewer: it cannot act")
                    return await handler(request, ident)
                except HttpError as exc:
                    return self.error(request, ident, exc.status, exc.message)
                except NotFound as exc:
                    return self.error(request, ident, 404, str(exc))
                except UsageError as exc:
                    return self.error(request, ident, 400, str(exc))
                except StatementTimeout:
                    return self.error(
                        request,
                        ident,
                        503,
                        "the database took too long for this page (a search over many rows?): "
                        "narrow the filter",
                    )
                except DlqdError as exc:
                    log.warning(
                        "console request failed", error=error_line(exc), path=request.url.path
                    )
                    status = 503 if isinstance(exc, DatabaseError) else 500
                    return self.error(request, ident, status, error_line(exc))

            return endpoint

        routes = [
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.sign_in, methods=["POST"]),
            Route("/logout", guarded(self.sign_out), methods=["POST"]),
            Route("/", guarded(self.overview), methods=["GET"]),
            Route("/jobs", guarded(self.jobs), methods=["GET"]),
            Route("/jobs/actions", guarded(self.bulk, act=True), methods=["POST"]),
            Route("/jobs/{id}", guarded(self.job), methods=["GET"]),
            Route("/jobs/{id}/replay", guarded(self.replay_one, act=True), methods=["POST"]),
            Route("/jobs/{id}/park", guarded(self.park_one, act=True), methods=["POST"]),
            Route("/jobs/{id}/unpark", guarded(self.unpark_one, act=True), methods=["POST"]),
            Route("/policies", guarded(self.policies), methods=["GET"]),
            Route("/redrives", guarded(self.redrives), methods=["GET"]),
            Route("/redrives/new", guarded(self.redrive_form), methods=["GET"]),
            Route("/redrives", guarded(self.redrive_start, act=True), methods=["POST"]),
            Route(
                "/redrives/{id}/cancel", guarded(self.redrive_cancel, act=True), methods=["POST"]
            ),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        return Starlette(
            routes=routes,
            middleware=[
                Middleware(ConcurrencyLimit),
                Middleware(SecurityHeaders),
                Middleware(GZipMiddleware, minimum_size=1000),
            ],
        )

    # ------------------------------------------------------------------ reading

    async def read(self, ident: auth.Identity, work: Callable[[Connection], Awaitable[Any]]) -> Any:
        """``work`` on a console connection, in one bounded transaction."""
        async with pooled(self.pool, wait=5) as conn, transaction(conn):
            await replays.bound_transaction(conn, READ_TIMEOUT, READ_LOCK_TIMEOUT)
            return await work(conn)

    async def scoped(
        self, ident: auth.Identity, work: Callable[[Connection], Awaitable[Any]]
    ) -> Any:
        """``work`` as ``ident`` sees the database: a bound token's tenant only."""

        async def inside(conn: Connection) -> Any:
            async with tenant_scope(conn, ident.app_id):
                return await work(conn)

        return await self.read(ident, inside)

    # ------------------------------------------------------------------ sign-in

    async def login_page(self, request: Request) -> Response:
        nxt = _safe_next(request.query_params.get("next"))
        if self.who(request) is not None:
            return RedirectResponse(nxt, 303)
        return self.render(request, "login.html", None, next=nxt, refused=None)

    async def sign_in(self, request: Request) -> Response:
        try:
            form = await self.body(request)
        except HttpError as exc:
            return _json_response({"error": exc.message}, exc.status)
        nxt = _safe_next(form.one("next"))
        problem = auth.csrf_problem(
            fetch_site=request.headers.get("sec-fetch-site"),
            origin=request.headers.get("origin"),
            own_origin=own_origin(request),
            sent="-",
            expected="-",
        )
        if problem is not None:
            return self.render(request, "login.html", None, 403, next=nxt, refused=problem)
        token = self.book().by_token(form.one("token") or "")
        client = request.client.host if request.client else "-"
        if token is None:
            self.metrics.console_sign_ins_total.labels("refused").inc()
            log.warning("console sign-in refused: the token matches none", client=client)
            await anyio.sleep(SIGN_IN_PENALTY)
            return self.render(
                request, "login.html", None, 401, next=nxt, refused="That token matches none."
            )
        cookie, ident = self.sessions().issue(token)
        self.metrics.console_sign_ins_total.labels("accepted").inc()
        log.info("console sign-in", actor=ident.name, role=ident.role, client=client)
        response = RedirectResponse(nxt, 303)
        response.set_cookie(
            auth.COOKIE,
            cookie,
            max_age=int(self.settings().console.session_ttl.total_seconds()),
            path="/",
            httponly=True,
            samesite="strict",
            secure=secure(request),
        )
        return response

    async def sign_out(self, request: Request, ident: auth.Identity) -> Response:
        form = await self.body(request)
        self.check_csrf(request, ident, form)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(auth.COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # ------------------------------------------------------------------ pages

    async def overview(self, request: Request, ident: auth.Identity) -> Response:
        data: reads.Overview = await self.read(
            ident, lambda conn: reads.overview(conn, app_id=ident.app_id)
        )
        if wants_json(request):
            return _json_response(data.status.to_json())
        status = data.status
        groups = sorted(status.groups, key=lambda g: g.pending, reverse=True)
        parked = {k: v for k, v in data.held.items() if k not in ("waiting", "unmatched")}
        chart: Chart = hourly_chart(data.hours)
        return self.render(
            request,
            "overview.html",
            ident,
            status=status,
            groups=groups[:200],
            more_groups=max(0, len(groups) - 200),
            parked_by_reason=sorted(parked.items(), key=lambda kv: -kv[1]),
            waiting=data.held.get("waiting", 0),
            chart=chart,
            leader=data.leader,
            purge=data.runs.get("purge"),
            purge_detail=json.loads(data.runs["purge"]["detail"]) if "purge" in data.runs else None,
            circuits=[c for c in data.circuits if c["open"]],
        )

    async def jobs(self, request: Request, ident: auth.Identity) -> Response:
        params = request.query_params
        where = filter_from({k: params.getlist(k) for k in params})
        self.check_search(where, self.redact())
        limit = _limit(params.get("limit"))
        cursor = params.get("cursor") or None
        as_json = wants_json(request)

        async def work(conn: Connection) -> tuple[reads.Page, int | None]:
            page = await reads.list_rows(
                conn, limit, cursor, where, documents=as_json, redact=self.redact()
            )
            # counted on the first page only, and at most up to the cap
            total = None if cursor or as_json else await reads.count_rows(conn, where, COUNT_CAP)
            return page, total

        page, total = await self.scoped(ident, work)
        if as_json:
            documents = ",".join(row["document"] for row in page.rows)
            return _raw_json(
                ['{"entries":[', documents, '],"next_cursor":', json.dumps(page.next_cursor), "}"]
            )
        query = filter_query(where)
        more = (
            "/jobs?" + urlencode([*query, ("cursor", page.next_cursor), ("limit", str(limit))])
            if page.next_cursor
            else None
        )
        return self.render(
            request,
            "jobs.html",
            ident,
            rows=page.rows,
            where=where,
            total=None if total is None else _count_text(total, COUNT_CAP),
            capped=total is not None and total > COUNT_CAP,
            more=more,
            continued=cursor is not None,
            query=urlencode(query),
            states=STATES,
            policies=[p.name for p in self.settings().policies],
            via=self._via_choices(),
        )

    async def job(self, request: Request, ident: auth.Identity) -> Response:
        entry_id = _entry_id(request)
        settings = self.settings()
        as_json = wants_json(request)

        async def work(
            conn: Connection,
        ) -> tuple[reads.Shown | None, explaining.Explanation | None, list[dict[str, Any]]]:
            shown = await reads.show(conn, entry_id, redact=self.redact(), pretty=not as_json)
            if shown is None:
                return None, None, []
            explanation = await explaining.explain(conn, settings, entry_id)
            errors = [] if as_json else await reads.errors(conn, entry_id, redact=self.redact())
            return shown, explanation, errors

        shown, explanation, errors = await self.scoped(ident, work)
        if shown is None or explanation is None:
            raise NotFound(f"no job_dlq row with id {entry_id}")
        if as_json:
            replays_json = json.dumps(shown.replays, default=_default, ensure_ascii=False)
            explain_json = json.dumps(explanation.to_json(), default=_default, ensure_ascii=False)
            return _raw_json(
                [shown.document[:-1], ',"replays":', replays_json, ',"explain":', explain_json, "}"]
            )
        payload = shown.row["payload_pretty"] or ""
        return self.render(
            request,
            "job.html",
            ident,
            row=shown.row,
            payload=payload[:MAX_INLINE_PAYLOAD],
            payload_cut=len(payload) > MAX_INLINE_PAYLOAD,
            payload_bytes=len(shown.row["payload"].encode()),
            errors=errors,
            replays=list(reversed(shown.replays)),
            explanation=explanation,
            via=self._via_choices(),
            pending=shown.row["replayed_at"] is None,
        )

    async def policies(self, request: Request, ident: auth.Identity) -> Response:
        settings = self.settings()

        async def work(conn: Connection) -> tuple[dict[str, Any], dict[str, Any]]:
            outcomes = await reads.policy_outcomes(conn, app_id=ident.app_id)
            circuits = await reads.circuits(conn)
            return outcomes, circuits

        outcomes, circuits = await self.read(ident, work)
        listed = []
        for policy in settings.policies:
            target = settings.target_for(policy)
            circuit = circuits.get(policy.name)
            counts = outcomes.get(policy.name, {})
            listed.append(
                {
                    "name": policy.name,
                    "match": policy.match.model_dump(mode="json", exclude_none=True),
                    "action": policy.action,
                    "target": target.kind if target is not None else None,
                    "rate_limit": (
                        f"{policy.rate_limit.per_second:g}/s" if policy.rate_limit else None
                    ),
                    "rate_limit_per": policy.rate_limit_per,
                    "max_replays": policy.max_replays,
                    "dry_run": policy.dry_run or settings.dry_run,
                    "circuit": ("open" if circuit and circuit["open"] else "closed"),
                    "circuit_failures": circuit["failures"] if circuit else 0,
                    "last_24h": {
                        o: int(counts.get(o, 0)) for o in ("replayed", "failed", "parked")
                    },
                }
            )
        if wants_json(request):
            return _json_response({"policies": listed})
        manual = outcomes.get("", {})
        return self.render(
            request,
            "policies.html",
            ident,
            policies=listed,
            manual={o: int(manual.get(o, 0)) for o in ("replayed", "failed", "parked")},
        )

    async def redrives(self, request: Request, ident: auth.Identity) -> Response:
        listed: list[redrive.Redrive] = await self.read(
            ident, lambda conn: redrive.listed(conn, app_id=ident.app_id)
        )
        if wants_json(request):
            return _json_response([r.to_json() for r in listed])
        return self.render(request, "redrives.html", ident, redrives=listed)

    async def redrive_form(self, request: Request, ident: auth.Identity) -> Response:
        """The confirmation before a redrive: what it would replay (a dry run)."""
        params = request.query_params
        where = filter_from({k: params.getlist(k) for k in params})
        self.check_search(where, self.redact())
        counted: redrive.Redrive = await self.read(
            ident,
            lambda conn: redrive.start(
                conn,
                self.settings(),
                where,
                actor=ident.name,
                app_id=ident.app_id,
                dry_run=True,
            ),
        )
        return self.render(
            request,
            "redrive_new.html",
            ident,
            counted=counted,
            where=where,
            fields=filter_query(where),
            query=urlencode(filter_query(where)),
            via=self._via_choices(),
        )

    # ------------------------------------------------------------------ acting

    def _via_choices(self) -> list[str]:
        settings = self.settings()
        return [p.name for p in settings.policies if settings.target_for(p) is not None]

    async def _visible(self, ident: auth.Identity, entry_id: UUID) -> None:
        """404 unless ``ident`` can read the row (a bound token: its tenant's rows)."""

        async def work(conn: Connection) -> list[UUID]:
            return await reads.visible(conn, [entry_id])

        if not await self.scoped(ident, work):
            raise NotFound(f"no job_dlq row with id {entry_id}")

    async def replay_one(self, request: Request, ident: auth.Identity) -> Response:
        entry_id = _entry_id(request)
        form = await self.body(request)
        self.check_csrf(request, ident, form)
        await self._visible(ident, entry_id)
        result = await self._replay(ident, [entry_id], form)
        if answers_json(request, ident):
            return _json_response(result.to_json(), 200 if result.ok else 409)
        done = "replayed" if result.replayed else "replay_failed" if result.failed else "skipped"
        return RedirectResponse(f"/jobs/{entry_id}?done={done}", 303)

    async def _replay(
        self, ident: auth.Identity, ids: list[UUID], form: Form
    ) -> acting.ReplayResult:
        async with pooled(self.pool, wait=5) as conn:
            result = await acting.replay(
                conn,
                self.settings(),
                ids=ids,
                via=form.one("via"),
                actor=ident.name,
                reason=form.one("reason"),
                app_id=ident.app_id,
            )
        log.info(
            "console replay",
            actor=ident.name,
            rows=len(ids),
            replayed=result.replayed,
            failed=result.failed,
            skipped=result.skipped,
        )
        return result

    async def park_one(self, request: Request, ident: auth.Identity) -> Response:
        return await self._park(request, ident, park=True)

    async def unpark_one(self, request: Request, ident: auth.Identity) -> Response:
        return await self._park(request, ident, park=False)

    async def _park(self, request: Request, ident: auth.Identity, *, park: bool) -> Response:
        entry_id = _entry_id(request)
        form = await self.body(request)
        self.check_csrf(request, ident, form)
        await self._visible(ident, entry_id)
        do = acting.park if park else acting.unpark
        async with pooled(self.pool, wait=5) as conn:
            result = await do(
                conn, [entry_id], actor=ident.name, reason=form.one("reason"), app_id=ident.app_id
            )
        log.info(
            "console park" if park else "console unpark",
            actor=ident.name,
            changed=len(result.changed),
        )
        if answers_json(request, ident):
            if not result.changed:
                return _json_response(
                    {"id": str(entry_id), "state": None, "error": "not in a state that allows it"},
                    409,
                )
            return _json_response(result.to_json()[0])
        done = ("parked" if park else "unparked") if result.changed else "unchanged"
        return RedirectResponse(f"/jobs/{entry_id}?done={done}", 303)

    async def bulk(self, request: Request, ident: auth.Identity) -> Response:
        """The rows selected on the list: replay, park or unpark them."""
        form = await self.body(request)
        self.check_csrf(request, ident, form)
        ids = [parse_entry_id(text) for text in form.many("id")][:MAX_PAGE]
        action = form.one("action")
        if not ids:
            raise UsageError("select at least one row")
        visible: list[UUID] = await self.scoped(ident, lambda conn: reads.visible(conn, ids))
        document: object
        if action == "replay":
            result = await self._replay(ident, visible, form)
            document = result.to_json()
        elif action in ("park", "unpark"):
            do = acting.park if action == "park" else acting.unpark
            async with pooled(self.pool, wait=5) as conn:
                parked = await do(
                    conn, visible, actor=ident.name, reason=form.one("reason"), app_id=ident.app_id
                )
            document = parked.to_json()
        else:
            raise UsageError("action must be replay, park or unpark")
        if answers_json(request, ident):
            return _json_response(document)
        back = form.one("back") or ""
        return RedirectResponse(f"/jobs?{_safe_query(back)}&done=acted", 303)

    async def redrive_start(self, request: Request, ident: auth.Identity) -> Response:
        form = await self.body(request)
        self.check_csrf(request, ident, form)
        where = filter_from(form.fields)
        self.check_search(where, self.redact())
        rate_text = form.one("rate")
        try:
            rate = float(rate_text) if rate_text is not None else None
        except ValueError:
            raise UsageError("rate: expected a number of rows a second") from None
        dry_run = form.one("dry_run") not in (None, "", "0", "false")
        started: redrive.Redrive = await self.read(
            ident,
            lambda conn: redrive.start(
                conn,
                self.settings(),
                where,
                actor=ident.name,
                via=form.one("via"),
                reason=form.one("reason"),
                rate=rate,
                app_id=ident.app_id,
                dry_run=dry_run,
            ),
        )
        if not dry_run:
            log.info(
                "console redrive started",
                actor=ident.name,
                redrive=str(started.id),
                matched=started.matched,
                rate=rate,
            )
        if answers_json(request, ident):
            return _json_response(started.to_json(), 200 if dry_run else 201)
        if dry_run:
            return RedirectResponse("/redrives/new?" + urlencode(filter_query(where)), 303)
        return RedirectResponse("/redrives?done=redrive", 303)

    async def redrive_cancel(self, request: Request, ident: auth.Identity) -> Response:
        form = await self.body(request)
        self.check_csrf(request, ident, form)
        try:
            redrive_id = UUID(request.path_params["id"])
        except ValueError:
            raise NotFound("no such redrive") from None
        cancelled = await self.read(
            ident, lambda conn: redrive.cancel(conn, redrive_id, app_id=ident.app_id)
        )
        if cancelled is None:
            raise NotFound(f"no redrive with id {redrive_id}")
        log.info("console redrive cancel", actor=ident.name, redrive=str(redrive_id))
        if answers_json(request, ident):
            return _json_response(cancelled.to_json())
        return RedirectResponse("/redrives?done=cancel", 303)


def _entry_id(request: Request) -> UUID:
    try:
        return parse_entry_id(request.path_params["id"])
    except UsageError:
        raise NotFound("no such row") from None


def _limit(text: str | None) -> int:
    if text is None or text == "":
        return PAGE
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"limit: expected a whole number from 1 to {MAX_PAGE}") from None
    if not 1 <= value <= MAX_PAGE:
        raise UsageError(f"limit: expected a whole number from 1 to {MAX_PAGE}")
    return value


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a path of this console, never another site."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _safe_query(text: str) -> str:
    """A query string the list page sent back (re-encoded: nothing but its pairs)."""
    pairs = [(k, v) for k, vs in parse_qs(text, max_num_fields=200).items() for v in vs]
    return urlencode([(k, v) for k, v in pairs if k not in ("done", "cursor")])
