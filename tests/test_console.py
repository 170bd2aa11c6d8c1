"""The console over HTTP, against a real `dlqd run` on real Postgres: access,
tenant scope by row-level security, CSRF, headers, redaction, actions."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest

from dlqd.console.auth import COOKIE
from tests.conftest import as_role, dlqd_cli
from tests.console_helpers import (
    TOKENS,
    Console,
    console_config,
    ids_of,
    rows_of,
    seed,
    start_console,
    tokens_toml,
)
from tests.daemon_helpers import DaemonProcess, scalar, wait_until, write_config

pytestmark = pytest.mark.anyio


async def parked_all(db_url: str, n: int) -> None:
    """Wait for the daemon to park every email row (its policy says so)."""

    async def done() -> bool:
        return int(await scalar(db_url, "SELECT count(*) FROM dlqd_entry_state")) >= n

    await wait_until(done, 30)


async def console_with_rows(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> tuple[Console, list[str], list[str]]:
    seed(sink_db, rows_of("shop", 6) + rows_of("crm", 4))
    console = await start_console(sink_db, tmp_path, daemons)
    await parked_all(sink_db, 10)
    return console, ids_of(sink_db, "shop"), ids_of(sink_db, "crm")


@contextmanager
def signed_in(console: Console, token: str) -> Iterator[tuple[httpx.Client, str]]:
    """A browser-like session: signed in with a cookie; its CSRF token."""
    with console.client() as client:
        answer = client.post("/login", data={"token": token, "next": "/jobs"})
        assert answer.status_code == 303, answer.text
        page = client.get("/jobs", headers={"Accept": "text/html"})
        match = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert match, page.text
        yield client, match.group(1)


# --------------------------------------------------------------------------- serving


async def test_off_by_default_and_never_on_the_metrics_port(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    config = write_config(tmp_path / "plain.toml", "[listen]\nprobe_interval = '1h'\n")
    daemon = DaemonProcess(as_role(sink_db, "dlqd"), config, tmp_path)
    daemons.append(daemon.start())
    await daemon.wait_ready()
    assert not any(e.get("event") == "console listening" for e in daemon.events())
    assert daemon.http("/jobs")[0] == 404
    # the console beside /metrics is refused
    clash = write_config(
        tmp_path / "clash.toml",
        f"metrics_port = 9470\n[console]\nenabled = true\nport = 9470\n{tokens_toml()}",
    )
    result = dlqd_cli("check", "--config", str(clash), env={"DLQD_DATABASE_URL": sink_db})
    assert result.returncode == 78
    assert "console.port: must differ from metrics_port" in result.stderr
    console = await start_console(sink_db, tmp_path, daemons)
    assert console.daemon.console_port not in (0, console.daemon.port)
    # the metrics port serves no console page, the console no metrics
    assert console.daemon.http("/jobs")[0] == 404
    with console.client("ops-token") as client:
        assert client.get("/metrics").status_code == 404


def test_enabled_without_a_token_refuses_to_start(sink_db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "dlqd.toml", "[console]\nenabled = true\n")
    result = dlqd_cli("run", "--config", str(config), env={"DLQD_DATABASE_URL": sink_db})
    assert result.returncode == 78
    assert "console.tokens: the console refuses to start enabled without a token" in result.stderr


async def test_a_token_bound_to_a_tenant_needs_the_tenant_role(
    sink_db: str, tmp_path: Path
) -> None:
    """Without a role to switch to, a bound token could not be scoped: no start."""
    with psycopg.connect(sink_db, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS dlqd_nomember")
        conn.execute("CREATE ROLE dlqd_nomember LOGIN BYPASSRLS")
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO dlqd_nomember")
    try:
        result = dlqd_cli(
            "run",
            "--config",
            str(console_config(tmp_path)),
            env={"DLQD_DATABASE_URL": as_role(sink_db, "dlqd_nomember")},
        )
        assert result.returncode == 78, result.stderr
        assert "'shop-ops' is bound to a tenant" in result.stderr
        assert "not a member of dlqd_tenant" in result.stderr
    finally:
        with psycopg.connect(sink_db, autocommit=True) as conn:
            conn.execute("DROP OWNED BY dlqd_nomember")
            conn.execute("DROP ROLE dlqd_nomember")


async def test_unauthenticated_requests_get_nothing(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    console, shop, _ = await console_with_rows(sink_db, tmp_path, daemons)
    with console.client() as client:
        for path in ("/", "/jobs", f"/jobs/{shop[0]}", "/policies", "/redrives"):
            answer = client.get(path, headers={"Accept": "application/json"})
            assert answer.status_code == 401, path
            assert "shop" not in answer.text
            page = client.get(path, headers={"Accept": "text/html"})
            assert page.status_code == 303
            assert page.headers["location"].startswith("/login?next=")
        assert client.post(f"/jobs/{shop[0]}/replay").status_code == 401
        assert client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 303
    assert int(await scalar(sink_db, "SELECT count(*) FROM sink")) == 0


async def test_every_page_is_html_and_the_same_json_as_the_cli(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    console, shop, _ = await console_with_rows(sink_db, tmp_path, daemons)
    env = {"DLQD_DATABASE_URL": as_role(sink_db, "dlqd")}
    with console.client("ops-token") as client:
        for path in ("/", "/jobs", f"/jobs/{shop[0]}", "/policies", "/redrives"):
            page = client.get(path, headers={"Accept": "text/html"})
            assert page.status_code == 200, (path, page.text)
            assert page.headers["content-type"].startswith("text/html")
            assert client.get(path + "?format=json").headers["content-type"] == "application/json"
        status = client.get("/", headers={"Accept": "application/json"}).json()
        cli_status = json.loads(dlqd_cli("status", "--json", env=env).stdout)
        strip = [{k: v for k, v in g.items() if k != "oldest_pending_age_seconds"}
                 for g in cli_status["groups"]]  # fmt: skip
        assert [{k: v for k, v in g.items() if k != "oldest_pending_age_seconds"}
                for g in status["groups"]] == strip  # fmt: skip
        assert (status["pending"], status["parked"]) == (10, 10)
        listed = client.get("/jobs?format=json&limit=3").json()
        cli_list = json.loads(dlqd_cli("list", "--json", "--limit", "3", env=env).stdout)
        assert [e["id"] for e in listed["entries"]] == [e["id"] for e in cli_list["entries"]]
        assert set(listed) == set(cli_list) == {"entries", "next_cursor"}
        assert set(listed["entries"][0]) == set(cli_list["entries"][0])
        second = client.get("/jobs", params={"format": "json", "cursor": listed["next_cursor"]})
        assert len(second.json()["entries"]) == 7
        row = client.get(f"/jobs/{shop[0]}?format=json").json()
        cli_row = json.loads(dlqd_cli("show", shop[0], "--json", env=env).stdout)
        assert set(row) == {*cli_row, "explain"}
        assert row["replays"] == cli_row["replays"]
        cli_explain = json.loads(dlqd_cli("explain", shop[0], "--json", env=env).stdout)
        assert row["explain"]["verdict"] == cli_explain["verdict"] == "park"
        assert row["explain"]["policy"] == "hold-email"
        assert (
            client.get("/jobs/00000000-0000-0000-0000-000000000000?format=json").status_code == 404
        )
        assert client.get("/jobs/not-a-uuid?format=json").status_code == 404


# --------------------------------------------------------------------------- acting


async def test_a_viewer_cannot_act_whatever_it_posts(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    console, shop, _ = await console_with_rows(sink_db, tmp_path, daemons)
    target = shop[0]
    with console.client("view-token") as viewer:
        page = viewer.get(f"/jobs/{target}", headers={"Accept": "text/html"})
        assert "Replay now" not in page.text
        assert 'action="/jobs/' not in page.text
        listing = viewer.get("/jobs", headers={"Accept": "text/html"}).text
        assert "Redrive all matching" not in listing
        assert 'name="id"' not in listing
        forged = [
            (f"/jobs/{target}/replay", {"via": "sink"}),
            (f"/jobs/{target}/park", {}),
            (f"/jobs/{target}/unpark", {}),
            ("/jobs/actions", {"id": target, "action": "replay", "via": "sink"}),
            ("/redrives", {"type": "*", "via": "sink"}),
            ("/redrives/00000000-0000-0000-0000-000000000000/cancel", {}),
        ]
        for path, form in forged:
            answer = viewer.post(path, data=form)
            assert answer.status_code == 403, (path, answer.text)
            assert answer.json() == {"error": "victor is a viewer: it cannot act"}
    with signed_in(console, "view-token") as (viewer_session, csrf):
        answer = viewer_session.post(f"/jobs/{target}/replay", data={"csrf": csrf, "via": "sink"})
        assert answer.status_code == 403
    assert int(await scalar(sink_db, "SELECT count(*) FROM sink")) == 0
    assert int(await scalar(sink_db, "SELECT count(*) FROM dlqd_redrives")) == 0
    with console.client("ops-token") as operator:
        page = operator.get(f"/jobs/{target}", headers={"Accept": "text/html"}).text
        assert "Replay now" in page


async def test_a_refused_post_is_answered_after_its_body_on_a_connection_that_lives_on(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """hypercorn closes a connection whose request was answered before its body came
    in, and closing a socket with bytes unread resets it: the answer can be lost on the
    way (a viewer's forged POSTs failed under load with "Server disconnected without
    sending a response"). A refusal waits for the body, and the connection serves on."""
    console, shop, _ = await console_with_rows(sink_db, tmp_path, daemons)
    body = b"via=sink"
    head = (
        f"POST /jobs/{shop[0]}/replay HTTP/1.1\r\nHost: console\r\n"
        "Authorization: Bearer view-token\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    then = b"GET /login HTTP/1.1\r\nHost: console\r\n\r\n"
    received = b""
    with anyio.fail_after(15):
        async with await anyio.connect_tcp("127.0.0.1", console.daemon.console_port) as stream:
            await stream.send(head)
            # the window in which the console used to answer (and hang up) before the body
            with anyio.move_on_after(1):
                received += await stream.receive()
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(body + then)
            while received.count(b"HTTP/1.1 ") < 2:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                    break
    statuses = re.findall(rb"HTTP/1.1 (\d{3})", received)
    assert statuses == [b"403", b"200"], received[:300]


async def test_a_refused_post_whose_body_never_comes_is_answered_all_the_same(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Waiting for the body of a request it refuses is bounded: a client without a
    token that announces a body and never sends it gets its 401 (and its connection
    closed) in seconds, never holds a request slot until the server's read timeout."""
    console, shop, _ = await console_with_rows(sink_db, tmp_path, daemons)
    head = (
        f"POST /jobs/{shop[0]}/replay HTTP/1.1\r\nHost: console\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    received = b""
    # under the server's read timeout (10 s), after which no answer would come
    with anyio.fail_after(8):
        async with await anyio.connect_tcp("127.0.0.1", console.daemon.console_port) as stream:
            await stream.send(head)
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                    break
    assert re.findall(rb"HTTP/1.1 (\d{3})", received) == [b"401"], received[:300]


async def test_actions_are_logged_with_the_token_and_the_reason(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    console, shop, _ = await console_with_rows(sink_db, tmp_path, daemons)
    with console.client("ops-token") as client:
        replayed = client.post(
            f"/jobs/{shop[0]}/replay", json={"via": "sink", "reason": "relay fixed"}
        )
        assert replayed.json() == {
            "replayed": 1, "failed": 0, "skipped": 0, "dry_run": False,
            "skipped_by_reason": {"already_replayed": 0, "not_found": 0, "no_target": 0},
        }  # fmt: skip
        again = client.post(f"/jobs/{shop[0]}/replay", json={"via": "sink"}).json()
        assert again["skipped_by_reason"]["already_replayed"] == 1
        parked = client.post(f"/jobs/{shop[1]}/park", data={"reason": "customer asked"})
        assert parked.json() == {"id": shop[1], "state": "parked"}
        unparked = client.post(f"/jobs/{shop[1]}/unpark", data={"reason": "go"})
        assert unparked.json() == {"id": shop[1], "state": "new"}
        bulk = client.post(
            "/jobs/actions", data={"id": shop[2:4], "action": "replay", "via": "sink"}
        )
        assert bulk.json()["replayed"] == 2
    with psycopg.connect(sink_db) as conn:
        log = conn.execute(
            """SELECT dlq_id::text, outcome, actor, reason FROM dlqd_replay_log
                WHERE manual ORDER BY id"""
        ).fetchall()
        sunk = conn.execute("SELECT dlq_id::text FROM sink ORDER BY dlq_id").fetchall()
    assert (shop[0], "replayed", "alice", "relay fixed") in log
    assert (shop[1], "parked", "alice", "customer asked") in log
    assert (shop[1], "unparked", "alice", "go") in log
    assert {r[0] for r in sunk} == {shop[0], shop[2], shop[3]}
    assert len(sunk) == 3  # once each


# --------------------------------------------------------------------------- tenant scope


async def test_a_tenant_token_sees_and_touches_its_rows_only(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    console, shop, crm = await console_with_rows(sink_db, tmp_path, daemons)
    with console.client("ops-token") as ops:
        ops.post(f"/jobs/{crm[0]}/replay", json={"via": "sink", "reason": "crm"})
    with console.client("shop-token") as tenant:
        status = tenant.get("/?format=json").json()
        assert status["pending"] == 6
        assert {g["app_id"] for g in status["groups"]} == {"shop"}
        listed = tenant.get("/jobs?format=json&limit=100").json()["entries"]
        assert sorted(e["id"] for e in listed) == sorted(shop)
        # forged filters, ids and urls: nothing of crm
        assert tenant.get("/jobs?format=json&app_id=crm").json()["entries"] == []
        assert tenant.get("/jobs?format=json&app_id=*").json()["entries"] != []
        assert tenant.get("/jobs", params={"format": "json", "q": '{"to": "crm0@example.com"}'}
                          ).json()["entries"] == []  # fmt: skip
        for row in crm:
            assert tenant.get(f"/jobs/{row}?format=json").status_code == 404
            assert tenant.get(f"/jobs/{row}", headers={"Accept": "text/html"}).status_code == 404
            assert tenant.post(f"/jobs/{row}/replay", json={"via": "sink"}).status_code == 404
            assert tenant.post(f"/jobs/{row}/park", json={}).status_code == 404
        bulk = tenant.post(
            "/jobs/actions",
            data={"id": [crm[1], crm[2], shop[0]], "action": "replay", "via": "sink"},
        ).json()
        assert bulk["replayed"] == 1
        counted = tenant.post("/redrives", json={"app_id": "crm", "via": "sink", "dry_run": True})
        assert counted.json()["matched"] == 0
        everything = tenant.post("/redrives", json={"via": "sink", "dry_run": True}).json()
        assert everything["matched"] == 5
        hours = tenant.get("/policies?format=json").json()["policies"]
        assert {p["name"]: p["last_24h"]["replayed"] for p in hours}["sink"] == 1  # not crm's
        assert "crm" not in tenant.get("/", headers={"Accept": "text/html"}).text
        assert "crm" not in tenant.get("/jobs", headers={"Accept": "text/html"}).text
    with psycopg.connect(sink_db) as conn:
        replayed_crm = conn.execute(
            "SELECT count(*) FROM job_dlq WHERE app_id = 'crm' AND replayed_at IS NOT NULL"
        ).fetchone()
    assert replayed_crm == (1,)  # the operator's, none by the tenant


async def test_a_tenant_redrive_replays_its_rows_only(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    console, _shop, _crm = await console_with_rows(sink_db, tmp_path, daemons)
    with console.client("shop-token") as tenant:
        started = tenant.post("/redrives", json={"app_id": "*", "via": "sink", "reason": "all"})
        assert started.status_code == 201
        redrive = started.json()
        assert redrive["matched"] == 6
        assert redrive["actor"] == "shop-ops"

        async def finished() -> bool:
            states = tenant.get("/redrives?format=json").json()
            return states[0]["state"] == "done"

        await wait_until(finished, 30)
        assert tenant.get("/redrives?format=json").json()[0]["replayed"] == 6
    with console.client("ops-token") as ops:
        other = ops.post("/redrives", json={"app_id": "crm", "via": "sink", "rate": 0.01}).json()
    with console.client("shop-token") as tenant:
        assert [r["id"] for r in tenant.get("/redrives?format=json").json()] == [redrive["id"]]
        assert tenant.post(f"/redrives/{other['id']}/cancel").status_code == 404
    with psycopg.connect(sink_db) as conn:
        by_app = dict(
            conn.execute(
                """SELECT j.app_id, count(*) FROM sink s JOIN job_dlq j ON j.id = s.dlq_id
                    GROUP BY 1"""
            ).fetchall()
        )
    assert by_app.get("shop") == 6
    assert by_app.get("crm", 0) <= 1  # the operator's own redrive, at 0.01 rows a second


async def test_the_tenant_scope_is_row_level_security(sink_db: str) -> None:
    """Inside the scope even a query with no filter at all sees one tenant."""
    from dlqd.db.connector import connect
    from dlqd.db.tenancy import tenant_scope

    seed(sink_db, rows_of("shop", 2) + rows_of("crm", 3))
    with psycopg.connect(sink_db, autocommit=True) as admin:
        admin.execute(
            """INSERT INTO dlqd_entry_state (dlq_id, state, fingerprint)
               SELECT id, 'unmatched', 'f' FROM job_dlq;
               INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, outcome)
               SELECT id, original_job_id, app_id, 'failed' FROM job_dlq;
               INSERT INTO dlqd_redrives (filter, scope_app_id, actor)
               VALUES ('{}', 'shop', 'a'), ('{}', 'crm', 'b'), ('{}', NULL, 'c')"""
        )
    conn = await connect(as_role(sink_db, "dlqd"), autocommit=True)
    try:
        async with tenant_scope(conn, "shop"):
            counts = {}
            for table in ("job_dlq", "dlqd_entry_state", "dlqd_inbox", "dlqd_replay_log",
                          "dlqd_replay_hours", "dlqd_redrives"):  # fmt: skip
                cur = await conn.execute(f"SELECT count(*) AS n FROM {table}".encode())
                counts[table] = (await cur.fetchone() or {})["n"]
            cur = await conn.execute(b"SELECT current_user AS who")
            assert (await cur.fetchone() or {})["who"] == "dlqd_tenant"
        assert counts == {
            "job_dlq": 2, "dlqd_entry_state": 2, "dlqd_inbox": 2, "dlqd_replay_log": 2,
            "dlqd_replay_hours": 1, "dlqd_redrives": 1,
        }  # fmt: skip
        cur = await conn.execute(b"SELECT current_user AS who, count(*) AS n FROM job_dlq")
        assert await cur.fetchone() == {"who": "dlqd", "n": 5}  # the scope ended with its block
    finally:
        await conn.close()


# --------------------------------------------------------------------------- browsers


async def test_csrf_and_cross_origin_requests_are_refused(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    console, shop, _ = await console_with_rows(sink_db, tmp_path, daemons)
    target = f"/jobs/{shop[0]}/replay"
    with signed_in(console, "ops-token") as (session, csrf):
        same = {"Sec-Fetch-Site": "same-origin"}
        refused = [
            (same, {"via": "sink"}),  # no token in the form
            (same, {"via": "sink", "csrf": "forged"}),
            ({"Sec-Fetch-Site": "cross-site"}, {"via": "sink", "csrf": csrf}),
            ({"Sec-Fetch-Site": "same-site"}, {"via": "sink", "csrf": csrf}),
            # an older browser, without Sec-Fetch-Site: its Origin decides
            ({"Origin": "https://evil.example"}, {"via": "sink", "csrf": csrf}),
            ({"Origin": "null"}, {"via": "sink", "csrf": csrf}),
        ]
        for headers, form in refused:
            answer = session.post(target, data=form, headers={**headers, "Accept": "text/html"})
            assert answer.status_code == 403, (headers, form)
        assert int(await scalar(sink_db, "SELECT count(*) FROM sink")) == 0
        # a page under Referrer-Policy: no-referrer posts with Origin: null
        ok = session.post(
            target, data={"via": "sink", "csrf": csrf}, headers={**same, "Origin": "null"}
        )
        assert ok.status_code == 303
        assert ok.headers["location"] == f"/jobs/{shop[0]}?done=replayed"
    assert int(await scalar(sink_db, "SELECT count(*) FROM sink")) == 1
    # signing in from another site is refused too (no session planted by a stranger)
    with console.client(headers={"Sec-Fetch-Site": "cross-site"}) as stranger:
        answer = stranger.post("/login", data={"token": "ops-token"})
        assert answer.status_code == 403
        assert COOKIE not in answer.cookies


async def test_the_session_cookie(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    config = console_config(tmp_path)
    console = await start_console(sink_db, tmp_path, daemons, config)
    with console.client() as client:
        answer = client.post("/login", data={"token": "ops-token", "next": "//evil.example/x"})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/"
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Max-Age=28800" in cookie
        assert "Secure" not in cookie
        assert "ops-token" not in cookie
        behind_tls = client.post(
            "/login", data={"token": "ops-token"}, headers={"X-Forwarded-Proto": "https"}
        )
        assert "Secure" in behind_tls.headers["set-cookie"]
        value = answer.cookies[COOKIE]
    for forged in (value[:-2] + "xx", value.replace("v1.", "v2."), "v1.e30.AAAA"):
        with console.client(cookies={COOKIE: forged}) as client:
            assert client.get("/?format=json").status_code == 401
    with console.client(cookies={COOKIE: value}) as client:
        assert client.get("/?format=json").status_code == 200
        # the token leaves the config (a reload): its sessions end with it
        config.write_text(config.read_text().replace(tokens_toml(), tokens_toml(
            {k: v for k, v in TOKENS.items() if k != "ops-token"})))  # fmt: skip
        console.daemon.send_signal(signal.SIGHUP)

        async def ended() -> bool:
            return client.get("/?format=json").status_code == 401

        await wait_until(ended, 15)
        assert client.post("/logout").status_code == 401


def test_sessions_expire_and_are_bound_to_their_token() -> None:
    from dlqd.config import ConsoleToken
    from dlqd.console.auth import Sessions, TokenBook, digest

    token = ConsoleToken(name="alice", sha256=digest("t1"), role="operator")
    sessions = Sessions(b"k" * 32, ttl=60)
    cookie, ident = sessions.issue(token, now=1000.0)
    book = TokenBook((token,))
    assert sessions.verify(cookie, book, now=1059.0) == ident
    assert sessions.verify(cookie, book, now=1061.0) is None
    rotated = ConsoleToken(name="alice", sha256=digest("t2"), role="operator")
    assert sessions.verify(cookie, TokenBook((rotated,)), now=1001.0) is None
    assert Sessions(b"x" * 32, ttl=60).verify(cookie, book, now=1001.0) is None


async def test_security_headers_and_no_inline_code(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    console, shop, _ = await console_with_rows(sink_db, tmp_path, daemons)
    with console.client("ops-token") as client:
        for path in ("/", "/jobs", f"/jobs/{shop[0]}", "/policies", "/redrives",
                     "/redrives/new?type=email.*", "/login", "/jobs/nope"):  # fmt: skip
            page = client.get(path, headers={"Accept": "text/html"})
            headers = page.headers
            csp = headers["content-security-policy"]
            assert "script-src 'self'" in csp
            assert "style-src 'self'" in csp
            assert "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp
            assert headers["referrer-policy"] == "no-referrer"
            assert headers["x-frame-options"] == "DENY"
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["cache-control"] == "no-store"
            html = page.text
            assert not re.search(r"<script(?![^>]*\bsrc=)", html), path
            assert not re.search(r"\sstyle=", html), path
            assert not re.search(r"\son[a-z]+=", html), path


async def test_secrets_are_masked_in_postgres_and_never_searched(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    nested = {
        "to": "x@example.com",
        "password": "pw-1",
        "auth": {"Api-Key": "key-2", "list": [{"client_secret": "sec-3"}, {"ok": "visible"}]},
        "Authorization": "Bearer tok-4",
        "accessToken": "tok-5",
    }
    seed(sink_db, rows_of("shop", 1, payload=nested))
    console = await start_console(sink_db, tmp_path, daemons)
    await parked_all(sink_db, 1)
    [row] = ids_of(sink_db, "shop")
    secrets_ = ("pw-1", "key-2", "sec-3", "tok-4", "tok-5", "history-secret")
    with console.client("ops-token") as client:
        documents = [
            client.get(f"/jobs/{row}?format=json").text,
            client.get("/jobs?format=json").text,
            client.get(f"/jobs/{row}", headers={"Accept": "text/html"}).text,
        ]
        for text in documents:
            assert not any(s in text for s in secrets_), text
            assert "visible" in text
            assert "x@example.com" in text
        shown = client.get(f"/jobs/{row}?format=json").json()["payload"]
        assert shown["password"] == "•••"
        assert shown["auth"]["Api-Key"] == "•••"
        assert shown["auth"]["list"] == [{"client_secret": "•••"}, {"ok": "visible"}]
        # a search may not test a masked key's value
        for search in ('{"password": "pw-1"}', '{"auth": {"api_key": "key-2"}}'):
            answer = client.get("/jobs", params={"format": "json", "q": search})
            assert answer.status_code == 400
            assert "is masked" in answer.json()["error"]
            assert "pw-1" not in answer.text
        found = client.get(
            "/jobs", params={"format": "json", "q": '{"auth": {"list": [{"ok": "visible"}]}}'}
        )
        assert [e["id"] for e in found.json()["entries"]] == [row]
    # the CLI, for an operator with the database's rights, shows the row as it is
    shown_by_cli = dlqd_cli("show", row, "--json", env={"DLQD_DATABASE_URL": sink_db})
    assert "pw-1" in shown_by_cli.stdout
    assert not any(s in console.daemon.logs() for s in secrets_)


async def test_a_refused_sign_in_is_slowed_logged_and_counted(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    console = await start_console(sink_db, tmp_path, daemons)
    with console.client() as client:
        started = time.monotonic()
        answer = client.post("/login", data={"token": "guess-1234"})
        assert time.monotonic() - started >= 0.9
        assert answer.status_code == 401
        assert "matches none" in answer.text
        assert COOKIE not in answer.cookies
    assert console.daemon.metric('dlqd_console_sign_ins_total{outcome="refused"}') == 1
    refusals = [
        e
        for e in console.daemon.events()
        if e.get("event", "").startswith("console sign-in refused")
    ]
    assert len(refusals) == 1
    assert "guess-1234" not in console.daemon.logs()


async def test_bad_input_is_a_clear_error(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    console, shop, _ = await console_with_rows(sink_db, tmp_path, daemons)
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/jobs", {"q": "{not json"}, "payload search: not valid JSON"),
        ("/jobs", {"q": '"a string"'}, "payload search: a JSON object or array"),
        ("/jobs", {"state": "gone"}, "--state: 'gone' is not one of"),
        ("/jobs", {"limit": "0"}, "limit: expected a whole number"),
        ("/jobs", {"cursor": "garbage"}, "invalid cursor"),
        ("/jobs", {"type": "x" * 2000}, "a glob is at most 1000 characters"),
    ]
    with console.client("ops-token") as client:
        for path, params, message in cases:
            answer = client.get(path, params={**params, "format": "json"})
            assert answer.status_code == 400, (params, answer.text)
            assert message in answer.json()["error"]
        bad_via = client.post(f"/jobs/{shop[0]}/replay", json={"via": "nope"})
        assert bad_via.status_code == 400
        assert "--via nope: no such policy" in bad_via.json()["error"]
        assert client.post("/redrives", json={"rate": "fast"}).status_code == 400
        assert client.post("/redrives", json={"rate": 0}).status_code == 400
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        huge = client.post(f"/jobs/{shop[0]}/park", content=b"x" * 70_000, headers=form)
        assert huge.status_code == 413


def test_tokens_and_redacted_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from dlqd.config import load_settings
    from dlqd.console.auth import digest

    tokens = [{"name": "ci", "sha256": digest("t"), "role": "operator", "app_id": "shop"}]
    monkeypatch.setenv("DLQD_DATABASE_URL", "postgresql://localhost/x")
    monkeypatch.setenv("DLQD_CONSOLE__ENABLED", "true")
    monkeypatch.setenv("DLQD_CONSOLE__TOKENS", json.dumps(tokens))
    monkeypatch.setenv("DLQD_CONSOLE__REDACT_KEYS", '["pin", "X-Card"]')
    settings = load_settings()
    [token] = settings.console.tokens
    assert (token.name, token.role, token.app_id) == ("ci", "operator", "shop")
    assert settings.console.redact_patterns() == ["pin", "xcard"]
    monkeypatch.setenv("DLQD_CONSOLE__TOKENS", '[{"name": "ci", "sha256": "nope", "role": "x"}]')
    with pytest.raises(Exception, match=r"console\.tokens\.0\.sha256|console\.tokens\[0\]"):
        load_settings()
