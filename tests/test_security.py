"""A hostile tenant must not escape its rows, nor stall anyone else's replays.

Every attack runs as a tenant would: connected as ``dlqd_app`` with
``app.current_app_id`` set to its own tenant (or, where the attack goes through
a function only the daemon may call, as the ``dlqd`` role). The databases are
migrated by the superuser and by an ordinary owner role, the two set-ups
operators run.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from dlqd.db.connector import connect
from dlqd.db.migrations import migrate
from tests.conftest import apply_roles, as_role, dlqd_cli, with_dbname
from tests.daemon_helpers import (
    SINK_STATEMENT,
    DaemonProcess,
    scalar,
    wait_until,
    write_config,
)
from tests.factories import INSERT_MANY, row_json

pytestmark = pytest.mark.anyio


# --------------------------------------------------------------------------- set-ups


@pytest.fixture(params=["superuser", "ordinary owner"])
def owned_db(request: pytest.FixtureRequest, admin_url: str, template_db: str) -> Iterator[str]:
    """A migrated database with the role script applied, its tables owned by the
    superuser (cloned from the suite's template) or by an ordinary role that
    migrated it itself. Yields a superuser URL."""
    name = f"dlqd_sec_{uuid.uuid4().hex[:12]}"
    owner = f"dlqd_owner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if request.param == "superuser":
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template_db)
                )
            )
        else:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(owner)))
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(owner)
                )
            )
    url = with_dbname(admin_url, name)
    if request.param != "superuser":
        with psycopg.connect(url, autocommit=True) as conn:
            # an ordinary owner owns the schema it migrates into (as on PostgreSQL 15+)
            conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(owner)))

        async def as_owner() -> None:
            owner_conn = await connect(as_role(url, owner), autocommit=True)
            try:
                await migrate(owner_conn)
            finally:
                await owner_conn.close()

        anyio.run(as_owner)
        apply_roles(url, admin_url)  # one run at a time: roles are cluster-wide
    try:
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(owner)))


def tenant(url: str, app_id: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(as_role(url, "dlqd_app"), autocommit=True)
    conn.execute("SELECT set_config('app.current_app_id', %s, false)", [app_id])
    return conn


def definer_functions(url: str) -> dict[str, list[str]]:
    """Every SECURITY DEFINER function in dlqd's schema, with its settings."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """SELECT p.oid::regprocedure::text, coalesce(p.proconfig, '{}')
                 FROM pg_proc p
                WHERE p.pronamespace = current_schema()::regnamespace AND p.prosecdef"""
        ).fetchall()
    return {name: list(config) for name, config in rows}


SECRET = {"card": "4111-secret"}


def seed_victim(url: str) -> None:
    """Another tenant's rows, replayed long ago (what a purge would delete) and pending."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason,
                                    attempts, replayed_at)
               VALUES ('v1', 'victim', 't', %s, 'r', 1, NULL),
                      ('v2', 'victim', 't', %s, 'r', 1, now() - interval '30 days')""",
            [psycopg.types.json.Jsonb(SECRET), psycopg.types.json.Jsonb(SECRET)],
        )
        conn.execute(
            """INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, outcome, at)
               VALUES (gen_random_uuid(), 'v0', 'victim', 'replayed', now() - interval '90 days')"""
        )


def shadow_everything(conn: psycopg.Connection[Any], url: str) -> None:
    """In ``conn``'s own temporary schema: a table for every relation of dlqd's
    schema (and the trigger's transition table), each with triggers that copy
    what they can see and try to escalate; functions and operators named like
    the built-ins definer code calls. Whatever of it runs, runs as whoever calls
    it, and leaves a trace in ``pg_temp.loot``."""
    with psycopg.connect(url) as admin:
        tables = admin.execute(
            """SELECT c.relname,
                      string_agg(quote_ident(a.attname) || ' ' ||
                                 format_type(a.atttypid, a.atttypmod), ', '
                                 ORDER BY a.attnum)
                 FROM pg_class c
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
                GROUP BY c.relname"""
        ).fetchall()
    conn.execute(
        """CREATE TEMP TABLE loot (who text, what text);
           CREATE FUNCTION pg_temp.pwn() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               INSERT INTO pg_temp.loot
               SELECT current_user, coalesce(string_agg(payload::text, ','), 'no rows')
                 FROM public.job_dlq;
               PERFORM set_config('dlqd.maintenance', 'on', true);
               INSERT INTO pg_temp.loot
               SELECT current_user, coalesce(string_agg(payload::text, ','), 'no rows')
                 FROM public.job_dlq;
               RETURN NULL;
           END $$;"""
    )
    names = [
        *tables,
        ("new_rows", "id uuid, replayed_at timestamptz, dlq_at timestamptz"),
        ("taken", "seq bigint, dlq_id uuid, counted boolean"),  # the inbox's delete trigger
    ]
    for name, columns in names:
        table = sql.Identifier(name)
        conn.execute(sql.SQL("CREATE TEMP TABLE {} ({})").format(table, sql.SQL(columns)))
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER pwn AFTER INSERT OR UPDATE OR DELETE ON pg_temp.{} "
                "FOR EACH STATEMENT EXECUTE FUNCTION pg_temp.pwn()"
            ).format(table)
        )
    # rows the purge functions would find in a shadowing job_dlq or replay log
    conn.execute(
        """INSERT INTO pg_temp.job_dlq (id, original_job_id, app_id, type, payload, error_reason,
                                        attempts, error_history, dlq_at, replayed_at)
           VALUES (gen_random_uuid(), 'x', 'x', 'x', '{}', 'x', 1, '[]', now() - interval '9 days',
                   now() - interval '9 days')"""
    )
    conn.execute(
        """INSERT INTO pg_temp.dlqd_replay_log (dlq_id, original_job_id, app_id, outcome, at)
           VALUES (gen_random_uuid(), 'x', 'x', 'replayed', now() - interval '99 days')"""
    )
    conn.execute("DELETE FROM pg_temp.loot")  # the seeding above fired our own triggers
    # functions and operators: never looked up in pg_temp unless it is named
    conn.execute(
        """CREATE FUNCTION pg_temp.pwn_text(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO pg_temp.loot VALUES (current_user, 'operator'); RETURN a = b; END $$;
           CREATE OPERATOR pg_temp.= (LEFTARG = text, RIGHTARG = text, FUNCTION = pg_temp.pwn_text);
           CREATE FUNCTION pg_temp.pg_notify(text, text) RETURNS void LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO pg_temp.loot VALUES (current_user, 'pg_notify'); END $$;
           CREATE FUNCTION pg_temp.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO pg_temp.loot VALUES (current_user, 'now'); RETURN now(); END $$;
           CREATE FUNCTION pg_temp.set_config(text, text, boolean) RETURNS text
           LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO pg_temp.loot VALUES (current_user, 'set_config'); RETURN ''; END $$;"""
    )


def loot(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return conn.execute("SELECT who, what FROM pg_temp.loot").fetchall()


# --------------------------------------------------------------------------- finding 1


def test_every_security_definer_function_pins_its_search_path(owned_db: str) -> None:
    """Finding 1: definer code resolves names through a pinned path: pg_catalog
    first, dlqd's schema, the caller's temporary schema last."""
    functions = definer_functions(owned_db)
    assert set(functions) == {
        "job_dlq_notify_insert()",
        "job_dlq_purge(interval,interval,integer)",
        "dlqd_trim_replay_log(interval,integer)",
        "dlqd_trim_replay_log_after(interval,integer,timestamp with time zone)",
        "dlqd_count_outcomes()",
        "dlqd_count_deleted()",
        "dlqd_count_truncated()",
        "dlqd_count_taken_entries()",
        "dlqd_count_states()",
        "dlqd_fold_counts()",
        "dlqd_reconcile_counts()",
        "dlqd_capture(text,text,text,text,jsonb,text,integer,jsonb,jsonb)",
    }
    for name, settings in functions.items():
        assert "search_path=pg_catalog, public, pg_temp" in settings, (name, settings)


def test_a_tenant_cannot_shadow_what_the_insert_trigger_uses(owned_db: str) -> None:
    """Finding 1: temporary tables, functions and operators named like what the
    insert trigger (SECURITY DEFINER) uses are never reached, by any tenant."""
    seed_victim(owned_db)
    with tenant(owned_db, "attacker") as conn:
        shadow_everything(conn, owned_db)
        conn.execute(
            """INSERT INTO public.job_dlq (original_job_id, app_id, type, payload, error_reason,
                                           attempts)
               VALUES ('mine', 'attacker', 't', '{}', 'r', 1)"""
        )
        assert loot(conn) == []
        # the real inbox got the row, the shadow nothing
        assert conn.execute("SELECT count(*) FROM pg_temp.dlqd_inbox").fetchone() == (0,)
    with psycopg.connect(owned_db) as admin:
        assert admin.execute("SELECT count(*) FROM dlqd_inbox").fetchone() == (2,)
        assert admin.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = 'dlqd_app'"
        ).fetchone() == (False,)


def test_the_daemon_role_cannot_shadow_what_the_purge_functions_use(owned_db: str) -> None:
    """Finding 1: the purge and trim functions run as the tables' owner; the
    ``dlqd`` role calling them with its own shadows gains nothing."""
    seed_victim(owned_db)
    with psycopg.connect(as_role(owned_db, "dlqd"), autocommit=True) as conn:
        shadow_everything(conn, owned_db)
        purged = conn.execute("SELECT job_dlq_purge('7 days')").fetchone()
        trimmed = conn.execute("SELECT dlqd_trim_replay_log('30 days')").fetchone()
        conn.execute(
            """INSERT INTO public.dlqd_replay_log (dlq_id, original_job_id, app_id, outcome, at)
               VALUES (gen_random_uuid(), 'old', 'victim', 'replayed',
                       now() - interval '60 days')"""
        )
        onwards = conn.execute(
            "SELECT deleted FROM dlqd_trim_replay_log_after('30 days', 10, NULL)"
        ).fetchone()
        assert loot(conn) == []
        assert purged == (1,)  # the victim's old replayed row, the real one
        assert trimmed == (1,)
        assert onwards == (1,)
        # the shadows were not touched
        assert conn.execute("SELECT count(*) FROM pg_temp.job_dlq").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM pg_temp.dlqd_replay_log").fetchone() == (1,)
        # the replay log's trigger (definer: it keeps the hourly counts)
        conn.execute(
            """INSERT INTO public.dlqd_replay_log (dlq_id, original_job_id, app_id, outcome)
               VALUES (gen_random_uuid(), 'j', 'victim', 'failed')"""
        )
        assert loot(conn) == []
        assert conn.execute("SELECT count(*) FROM pg_temp.dlqd_replay_hours").fetchone() == (0,)
        # the counts' definer code: the schedule's trigger, the fold, the reconciliation
        conn.execute(
            """INSERT INTO public.dlqd_entry_state (dlq_id, state, fingerprint)
               SELECT id, 'unmatched', 'f' FROM public.job_dlq WHERE replayed_at IS NULL"""
        )
        # the inbox's delete trigger: the victim's single-row insert left an
        # entry that counts its row; taking it writes the real delta
        conn.execute("DELETE FROM public.dlqd_inbox")
        assert loot(conn) == []
        assert conn.execute(
            """SELECT sum(n) FROM public.dlqd_count_deltas
                WHERE app_id = 'victim' AND kind = 'pending'"""
        ).fetchone() == (1,)
        conn.execute("SELECT dlqd_fold_counts()")
        conn.execute("SELECT * FROM dlqd_reconcile_counts()")
        assert loot(conn) == []
        for shadow in ("dlqd_count_deltas", "dlqd_counts", "dlqd_counts_reconciled", "taken"):
            assert conn.execute(f"SELECT count(*) FROM pg_temp.{shadow}").fetchone() == (0,)
    with psycopg.connect(owned_db) as admin:
        assert admin.execute(
            "SELECT n FROM dlqd_replay_hours WHERE app_id = 'victim' AND outcome = 'failed'"
        ).fetchone() == (1,)


def test_tenants_cannot_call_maintenance_functions_or_create_in_dlqds_schema(
    owned_db: str,
) -> None:
    """Finding 1: what a tenant could shadow with, it cannot create; what runs
    with more rights, it cannot call."""
    with tenant(owned_db, "attacker") as conn:
        for statement in (
            "SELECT job_dlq_purge('0s')",
            "SELECT dlqd_trim_replay_log('0s')",
            "SELECT * FROM dlqd_trim_replay_log_after('0s', 10, NULL)",
            "CREATE TABLE public.mine (x int)",
            "CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT 1'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        # the maintenance switch is the owner's alone: set, it shows a tenant nothing more
        seed_victim(owned_db)
        conn.execute("SELECT set_config('dlqd.maintenance', 'on', false)")
        assert conn.execute("SELECT count(*) FROM job_dlq").fetchone() == (0,)


# --------------------------------------------------------------------------- finding 3


def config(tmp_path: Path, policies: str, extra: str = "") -> Path:
    return write_config(
        tmp_path / "dlqd.toml",
        f"""
{extra}
[listen]
poll_interval = "1h"
probe_interval = "500ms"

{policies}
""",
    )


SINK_POLICY = f"""
[[policies]]
name = "all"
max_replays = 5
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}
"""


async def start(
    daemons: list[DaemonProcess], db_url: str, cfg: Path, tmp_path: Path, **env: str
) -> DaemonProcess:
    daemon = DaemonProcess(as_role(db_url, "dlqd"), cfg, tmp_path, **env).start()
    daemons.append(daemon)
    await daemon.wait_ready()
    return daemon


async def insert_as(db_url: str, app_id: str, *original_job_ids: str, **fields: Any) -> None:
    rows = [row_json(original_job_id=j, app_id=app_id, **fields) for j in original_job_ids]
    async with await psycopg.AsyncConnection.connect(
        as_role(db_url, "dlqd_app"), autocommit=True
    ) as conn:
        await conn.execute("SELECT set_config('app.current_app_id', %s, false)", [app_id])
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})


async def sunk(db_url: str, app_id: str) -> int:
    return int(
        await scalar(
            db_url,
            "SELECT count(*) FROM sink s JOIN job_dlq j ON j.id = s.dlq_id WHERE j.app_id = %s",
            [app_id],
        )
    )


ADVISORY_KEYS = (
    "SELECT pg_advisory_lock(hashtextextended(k, 0)) FROM unnest(%s::text[]) AS k",
    [
        [
            '["t1","lockme"]',
            '["job","t1","lockme"]',
            "dlqd:leader",
            "dlqd:migrate",
            'dlqd:bucket:["all",""]',
            "dlqd:circuit:all",
        ]
    ],
)


def test_no_query_of_the_daemon_takes_an_advisory_lock() -> None:
    """Finding 3: any role may take any advisory lock, so nothing the daemon waits
    on may be one; only `dlqd migrate` (an operator, waiting visibly) uses one."""
    from dlqd.db.queries import _QUERIES

    advisory = {name for name, text in _QUERIES.items() if re.search(r"advisory\w*\(", text)}
    assert advisory == {"migrations_try_lock", "migrations_unlock"}


async def test_a_tenants_advisory_locks_stall_no_replay_and_no_election(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 3: a tenant holding every advisory lock dlqd ever used (the job
    key of a max_replays row, the leader's and the migration's) stalls nothing:
    its own row replays, other tenants' rows replay, a leader is elected."""
    holder = tenant(sink_db, "t1")
    try:
        holder.execute(*ADVISORY_KEYS)
        daemon = await start(daemons, sink_db, config(tmp_path, SINK_POLICY), tmp_path)
        await insert_as(sink_db, "t1", "lockme")
        await insert_as(sink_db, "t2", "other-1", "other-2")

        async def replayed() -> bool:
            return await sunk(sink_db, "t1") == 1 and await sunk(sink_db, "t2") == 2

        await wait_until(replayed, within=10)

        async def leads() -> bool:
            return daemon.metric("dlqd_leader") == 1

        await wait_until(leads, within=10)
        assert daemon.http("/readyz")[0] == 200
        failed = [e for e in daemon.events() if e.get("event") == "replayer pass failed"]
        assert failed == []
    finally:
        holder.close()


def test_migrate_names_the_session_holding_its_lock_and_gives_up(db_url: str) -> None:
    """Finding 3: `dlqd migrate` waits for the migration lock a bounded time,
    saying who holds it, then fails in one line."""
    holder = tenant(db_url, "t1")
    try:
        holder.execute(*ADVISORY_KEYS)
        pid = holder.info.backend_pid
        started = time.monotonic()
        result = dlqd_cli("migrate", "--wait", "2s", env={"DLQD_DATABASE_URL": db_url})
        took = time.monotonic() - started
    finally:
        holder.close()
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("dlqd: waiting for the migration lock, held by pid")
    assert f"pid {pid} (role dlqd_app" in lines[-1]
    assert lines[-1].startswith("dlqd: error: the migration lock is still taken after 2s")
    assert took < 30
    freed = dlqd_cli("migrate", "--wait", "2s", env={"DLQD_DATABASE_URL": db_url})
    assert freed.returncode == 0, freed.stderr
    assert freed.stdout == "database is up to date\n"


# --------------------------------------------------------------------------- findings 4 to 7:
# one tenant does its worst, another tenant's rows keep replaying

NEIGHBOUR_WAIT = 20  # seconds: the stalls found took 45 s to forever (a loaded CI machine takes 10)


async def replayed_soon(db_url: str, app_id: str, n: int = 1) -> None:
    """``n`` rows of tenant ``app_id``, inserted now, are replayed into the sink soon."""
    jobs = [f"{app_id}-{uuid.uuid4().hex[:8]}" for _ in range(n)]
    await insert_as(db_url, app_id, *jobs, type="quick")

    async def done() -> bool:
        return await sunk(db_url, app_id) >= n

    await wait_until(done, within=NEIGHBOUR_WAIT)


SET_BASED = "INSERT INTO sink (dlq_id, type, payload) SELECT id, type, payload FROM replayed"


async def test_huge_rows_past_the_servers_temp_file_limit_stall_nobody(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 4: with temp_file_limit = 100MB on the daemon's role, 40 rows of
    3.2 MB from one tenant: no page fails for good, every row replays, and
    another tenant's row is replayed meanwhile; /readyz stays truthful."""
    dbname = psycopg.conninfo.conninfo_to_dict(sink_db)["dbname"]
    with psycopg.connect(sink_db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE dlqd IN DATABASE {} SET temp_file_limit = '100MB'").format(
                sql.Identifier(str(dbname))
            )
        )
    policy = f"""
[[policies]]
name = "set"
target = {{ kind = "sql", statement = "{SET_BASED}" }}
"""
    daemon = await start(daemons, sink_db, config(tmp_path, policy), tmp_path)
    with tenant(sink_db, "noisy") as conn:
        # 3.2 MB of hex each, which TOAST cannot squeeze much
        conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
               SELECT 'big' || g, 'noisy', 'huge',
                      jsonb_build_object('blob', (SELECT string_agg(md5(g::text || s), '')
                                                    FROM generate_series(1, 100000) s)),
                      'r', 1
                 FROM generate_series(1, 40) g"""
        )
    await replayed_soon(sink_db, "quiet")

    async def all_of_them() -> bool:
        return await sunk(sink_db, "noisy") == 40

    await wait_until(all_of_them, within=120)
    assert daemon.http("/readyz")[0] == 200
    assert await scalar(sink_db, "SELECT count(*) FROM dlqd_entry_state") == 0


async def test_a_group_too_big_for_the_statement_timeout_is_split_not_parked(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 5: rows fine alone but too slow as one group are split until
    they fit; none is parked, the circuit never opens, and another tenant's
    small rows of the same page replay too."""
    slow = (
        "INSERT INTO sink (dlq_id, type, payload) SELECT r.id, r.type, r.payload FROM replayed r"
        " CROSS JOIN LATERAL (SELECT pg_sleep(CASE WHEN r.type = 'slow' THEN 0.15 ELSE 0 END)) s"
    )
    policy = f"""
[[policies]]
name = "set"
retry_delay = "100ms"
circuit_breaker = {{ failures = 3, cool_down = "1h" }}
target = {{ kind = "sql", statement = "{slow}" }}
"""
    extra = '[replay]\nstatement_timeout = "1s"\n'
    daemon = await start(daemons, sink_db, config(tmp_path, policy, extra), tmp_path)
    rows = [row_json(original_job_id=f"slow{i}", app_id="noisy", type="slow") for i in range(20)]
    rows += [row_json(original_job_id=f"fast{i}", app_id="quiet", type="fast") for i in range(5)]
    async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as conn:
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})

    async def all_of_them() -> bool:
        return int(await scalar(sink_db, "SELECT count(*) FROM sink")) == 25

    await wait_until(all_of_them, within=60)
    parked = await scalar(sink_db, "SELECT count(*) FROM dlqd_entry_state")
    assert parked == 0
    assert daemon.metric('dlqd_circuit_open{policy="set"}') == 0
    assert not any(e.get("event") == "circuit opened" for e in daemon.events())


class RawReceiver:
    """An HTTP/1.1 receiver on a raw socket: reads each request (head and
    body), then lets ``answer(request, stream)`` reply however badly it likes.
    Records requests, how many ran at once, and when each connection closed."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self.active = 0
        self.most_active = 0
        self.closed_after: list[float] = []  # seconds from request to the client's close
        self.sent = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def serve(self, tg: Any) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(listener.serve, self._handle)

    async def _read_request(self, stream: Any, buffer: bytes) -> tuple[dict[str, Any], bytes]:
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive()
        head, first = buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
        length = int(headers.get("content-length", "0"))
        rest = bytearray(first)
        while len(rest) < length:
            rest += await stream.receive(1024 * 1024)
        body = json.loads(rest[:length])
        # a big body is kept as its size only
        kept = body if length < 1024**2 else {"original_job_id": body["original_job_id"]}
        return {"headers": headers, "body": kept}, bytes(rest[length:])

    async def _handle(self, stream: Any) -> None:
        buffer = b""
        async with stream:
            while True:
                try:
                    request, buffer = await self._read_request(stream, buffer)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return
                self.requests.append(request)
                self.active += 1
                self.most_active = max(self.most_active, self.active)
                started = time.monotonic()
                try:
                    await self.answer(request, stream, self)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    self.closed_after.append(time.monotonic() - started)
                    return
                finally:
                    self.active -= 1


def http_policy(url: str, extra: str = "", *, timeout: str = "2s") -> str:
    return f"""
[[policies]]
name = "hook"
match = {{ type = ["hook"] }}
retry_delay = "1h"
target = {{ kind = "http", url = "{url}", timeout = "{timeout}"{extra} }}
{SINK_POLICY}"""


async def test_a_slow_receiver_holds_up_only_its_own_rows(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 6: a receiver sending a byte every half second, never finishing its
    answer: the request fails at its total deadline (2 s), and other policies'
    rows replay meanwhile."""

    async def trickle(request: dict[str, Any], stream: Any, receiver: RawReceiver) -> None:
        while True:
            await stream.send(b"H")
            await anyio.sleep(0.5)

    receiver = RawReceiver(trickle)
    async with anyio.create_task_group() as tg:
        await receiver.serve(tg)
        cfg = config(tmp_path, http_policy(receiver.url))
        daemon = await start(daemons, sink_db, cfg, tmp_path)
        await insert_as(sink_db, "noisy", "slow-hook", type="hook")

        async def called() -> bool:
            return len(receiver.requests) == 1

        await wait_until(called, within=NEIGHBOUR_WAIT)
        await replayed_soon(sink_db, "quiet", 3)

        async def gave_up() -> bool:
            return len(receiver.closed_after) == 1

        await wait_until(gave_up, within=NEIGHBOUR_WAIT)
        assert receiver.closed_after[0] < 6  # the 2 s deadline, not a read timeout
        last_error = await scalar(sink_db, "SELECT last_error FROM dlqd_entry_state")
        assert last_error == "HTTP timeout after 2s"
        assert daemon.http("/readyz")[0] == 200
        tg.cancel_scope.cancel()


async def test_a_huge_answer_is_never_read_whole(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 6: a 2xx with a 100 MB body acknowledges the row; the daemon reads a
    bounded part of it and lets the connection go."""
    size = 100 * 1024**2

    async def flood(request: dict[str, Any], stream: Any, receiver: RawReceiver) -> None:
        await stream.send(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        chunk = b"\0" * 65536
        while receiver.sent < size:
            await stream.send(chunk)
            receiver.sent += len(chunk)

    receiver = RawReceiver(flood)
    async with anyio.create_task_group() as tg:
        await receiver.serve(tg)
        await start(daemons, sink_db, config(tmp_path, http_policy(receiver.url)), tmp_path)
        await insert_as(sink_db, "noisy", "flood", type="hook")

        async def acknowledged() -> bool:
            return bool(await scalar(sink_db, "SELECT replayed_at IS NOT NULL FROM job_dlq"))

        await wait_until(acknowledged, within=NEIGHBOUR_WAIT)

        async def let_go() -> bool:
            return len(receiver.closed_after) == 1

        await wait_until(let_go, within=NEIGHBOUR_WAIT)
        assert receiver.sent < size / 2
        tg.cancel_scope.cancel()


async def test_request_bodies_held_at_once_are_capped_in_bytes(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 6: three rows of 40 MB (max_in_flight 10): sent one at a time, as
    the bodies a daemon holds at once are capped (64 MiB)."""

    async def slow_ok(request: dict[str, Any], stream: Any, receiver: RawReceiver) -> None:
        await anyio.sleep(0.3)
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    receiver = RawReceiver(slow_ok)
    async with anyio.create_task_group() as tg:
        await receiver.serve(tg)
        # 40 MB sent and read by a Python receiver: on a busy machine that takes
        # more than the usual 2 s (a timeout would fail the row, due again in 1 h)
        policy = http_policy(receiver.url, timeout="60s")
        await start(daemons, sink_db, config(tmp_path, policy), tmp_path)
        with tenant(sink_db, "noisy") as conn:
            conn.execute(
                """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason,
                                        attempts)
                   SELECT 'big' || g, 'noisy', 'hook',
                          jsonb_build_object('blob', repeat('x', 40000000)), 'r', 1
                     FROM generate_series(1, 3) g"""
            )

        async def acknowledged() -> bool:
            count = "SELECT count(*) FROM job_dlq WHERE replayed_at IS NOT NULL"
            return int(await scalar(sink_db, count)) == 3

        await wait_until(acknowledged, within=120)
        assert len(receiver.requests) == 3
        assert receiver.most_active == 1
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("value", ["inf", "1e18", "nan", "Fri, 31 Dec 9999 23:59:59 GMT"])
async def test_a_retry_after_of_any_value_is_clamped_and_nothing_is_sent_twice(
    value: str, sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 7: `Retry-After: inf` (or 1e18, ...) on one row of a page: each good
    row is POSTed once, the bad row's failed attempt is recorded."""

    async def answer(request: dict[str, Any], stream: Any, receiver: RawReceiver) -> None:
        if request["body"]["original_job_id"] == "bad":
            head = f"HTTP/1.1 503 Busy\r\nRetry-After: {value}\r\nContent-Length: 0\r\n\r\n"
        else:
            head = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        await stream.send(head.encode())

    receiver = RawReceiver(answer)
    async with anyio.create_task_group() as tg:
        await receiver.serve(tg)
        cfg = config(tmp_path, http_policy(receiver.url).replace('retry_delay = "1h"', ""))
        daemon = await start(daemons, sink_db, cfg, tmp_path)
        rows = [row_json(original_job_id=j, app_id="t", type="hook") for j in ("a", "b", "bad")]
        rows += [row_json(original_job_id=j, app_id="t", type="hook") for j in ("c", "d", "e")]
        async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as conn:
            await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})

        async def settled() -> bool:
            done = await scalar(
                sink_db, "SELECT count(*) FROM job_dlq WHERE replayed_at IS NOT NULL"
            )
            failed = await scalar(sink_db, "SELECT failures FROM dlqd_entry_state")
            return int(done) == 5 and failed == 1

        await wait_until(settled, within=NEIGHBOUR_WAIT)
        keys = [r["headers"]["idempotency-key"] for r in receiver.requests]
        good = [r for r in receiver.requests if r["body"]["original_job_id"] != "bad"]
        assert len(good) == 5 == len({r["headers"]["idempotency-key"] for r in good})
        assert len(keys) == 6
        errors = [e for e in daemon.events() if e.get("level") == "error"]
        assert errors == []
        due = await scalar(sink_db, "SELECT due_at - now() FROM dlqd_entry_state")
        assert due <= timedelta(hours=1)  # the policy's max_delay caps what the server asked
        tg.cancel_scope.cancel()


async def test_readiness_says_when_every_pass_fails(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 3: a replayer whose every pass fails is not ready (it said ready
    while no row moved), and is again once its passes succeed."""
    extra = '[replay]\nlock_timeout = "200ms"\n'
    daemon = await start(daemons, sink_db, config(tmp_path, SINK_POLICY, extra), tmp_path)
    blocker = await psycopg.AsyncConnection.connect(sink_db)
    try:
        await blocker.execute("LOCK TABLE dlqd_inbox IN ACCESS EXCLUSIVE MODE")
        await scalar(sink_db, "SELECT pg_notify('dlqd_job_dlq', 'wake up')")

        async def unready() -> bool:
            status, text = daemon.http("/readyz")
            return status == 503 and "replayer failing" in text

        await wait_until(unready, within=NEIGHBOUR_WAIT)
        _, text = daemon.http("/readyz")
        assert "lock timeout" in text
    finally:
        await blocker.close()

    async def ready() -> bool:
        return daemon.http("/readyz")[0] == 200

    await wait_until(ready, within=NEIGHBOUR_WAIT * 2)
    await replayed_soon(sink_db, "quiet")


# --------------------------------------------------------------------------- finding 9


async def test_tenant_values_cannot_blow_up_metrics_or_status(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 9: 500 rows whose type is 100,000 characters, and 1,500 more types:
    label values and status keys are cut to 128 characters, status names at
    most 1,000 groups, and both stay small."""
    with tenant(sink_db, "noisy") as conn:
        conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
               SELECT 'long' || g, 'noisy', repeat('t', 99990) || g, '{}'::jsonb, 'r', 1
                 FROM generate_series(1, 500) g
               UNION ALL
               SELECT 'many' || g, 'noisy', 'type-' || g, '{}'::jsonb, 'r', 1
                 FROM generate_series(1, 1500) g"""
        )
    extra = '[metrics]\nrefresh_interval = "1s"\n'
    daemon = await start(daemons, sink_db, config(tmp_path, "", extra), tmp_path)

    async def collected() -> bool:
        _, text = daemon.http("/metrics")
        return 'dlqd_pending_entries{app_id="__other__"' in text

    await wait_until(collected, within=NEIGHBOUR_WAIT)
    _, text = daemon.http("/metrics")
    assert len(text) < 1024**2
    labels = re.findall(r'="([^"]*)"', text)
    assert max(len(v) for v in labels) <= 128
    result = dlqd_cli("status", "--json", env={"DLQD_DATABASE_URL": sink_db})
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) < 1024**2
    status = json.loads(result.stdout)
    assert status["pending"] == 2000
    assert len(status["groups"]) == 1000
    assert sum(g["pending"] for g in status["groups"]) == 2000
    assert max(len(g["type"]) for g in status["groups"]) == 128
    assert any(g["type"].endswith("…") for g in status["groups"])


# --------------------------------------------------------------------------- finding 10


@pytest.mark.parametrize(
    "statement",
    [
        "ANALYZE SELECT nextval('probe_seq'), pg_sleep(3)",
        "analyze verbose SELECT nextval('probe_seq')",
        "VERBOSE SELECT nextval('probe_seq')",
        "CREATE TABLE stolen AS SELECT nextval('probe_seq')",
        "DECLARE c CURSOR FOR SELECT nextval('probe_seq')",
        "EXECUTE something",
        "/* hi */ SELECT 1; SELECT nextval('probe_seq')",
    ],
)
def test_check_and_start_refuse_what_is_not_one_query_and_run_nothing(
    statement: str, db_url: str, tmp_path: Path
) -> None:
    """Finding 10: `ANALYZE SELECT ...` made validation's EXPLAIN an EXPLAIN
    ANALYZE (the sequence advanced, a pg_terminate_backend ran). Anything but
    one SELECT, INSERT, UPDATE, DELETE or MERGE is refused, and nothing runs."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE probe_seq")
        conn.execute("GRANT USAGE ON SEQUENCE probe_seq TO dlqd")
    target = f'{{ kind = "sql", statement = "{statement}" }}'
    cfg = config(tmp_path, f'[[policies]]\nname = "sneaky"\ntarget = {target}')
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd"), "DLQD_METRICS_PORT": "0"}
    for command in ("check", "run"):
        started = time.monotonic()
        result = dlqd_cli(command, "--config", str(cfg), env=env)
        assert result.returncode == 78, (command, result.stderr)
        assert result.stderr.startswith("dlqd: error: invalid configuration: policies[0].target")
        assert result.stderr.count("\n") == 1
        assert time.monotonic() - started < 20
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT last_value, is_called FROM probe_seq").fetchone() == (1, False)


async def test_a_locked_target_table_is_a_one_line_error_for_check_and_no_hang_at_start(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 10: with the target's table locked, `check` hung and start-up sat
    silent with no port open. Validation waits 2 s for a lock."""
    cfg = config(
        tmp_path,
        f'[[policies]]\nname = "set"\ntarget = {{ kind = "sql", statement = "{SET_BASED}" }}',
    )
    blocker = await psycopg.AsyncConnection.connect(sink_db)
    try:
        await blocker.execute("LOCK TABLE sink IN ACCESS EXCLUSIVE MODE")
        env = {"DLQD_DATABASE_URL": as_role(sink_db, "dlqd")}
        result = await anyio.to_thread.run_sync(
            lambda: dlqd_cli("check", "--config", str(cfg), env=env)
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith(
            "dlqd: error: policies[0].target.statement: could not be planned within 2s"
        )
        assert result.stderr.count("\n") == 1
        daemon = await start(daemons, sink_db, cfg, tmp_path)  # ready, not stuck
        warned = [e for e in daemon.events() if e.get("event") == "sql target does not plan"]
        assert "could not be planned within 2s" in warned[0]["problem"]
    finally:
        await blocker.close()
    await replayed_soon(sink_db, "quiet")


# --------------------------------------------------------------------------- finding 11


async def test_url_credentials_and_query_values_never_show(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 11: an http target's URL with credentials and a token in its query:
    a 404 parks the row, and neither secret is in the log, last_error, the
    replay log, `show` or `list`."""

    async def not_found(request: dict[str, Any], stream: Any, receiver: RawReceiver) -> None:
        await stream.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    receiver = RawReceiver(not_found)
    async with anyio.create_task_group() as tg:
        await receiver.serve(tg)
        url = f"http://user:hunter2@127.0.0.1:{receiver.port}/notfound?token=SECRET&x=1"
        daemon = await start(daemons, sink_db, config(tmp_path, http_policy(url)), tmp_path)
        await insert_as(sink_db, "t", "hooked", type="hook")

        async def parked() -> bool:
            reason = "SELECT parked_reason FROM dlqd_entry_state"
            return await scalar(sink_db, reason) == "http_4xx"

        await wait_until(parked, within=NEIGHBOUR_WAIT)
        assert receiver.requests[0]["headers"]["authorization"].startswith("Basic ")
        tg.cancel_scope.cancel()
    row_id = str(await scalar(sink_db, "SELECT id FROM job_dlq"))
    env = {"DLQD_DATABASE_URL": sink_db}
    shown = [
        daemon.logs(),
        str(await scalar(sink_db, "SELECT last_error FROM dlqd_entry_state")),
        str(await scalar(sink_db, "SELECT string_agg(error, ' ') FROM dlqd_replay_log")),
        dlqd_cli("show", row_id, env=env).stdout,
        dlqd_cli("show", row_id, "--json", env=env).stdout,
        dlqd_cli("list", "--json", env=env).stdout,
        dlqd_cli("list", env=env).stdout,
    ]
    for text in shown:
        assert "hunter2" not in text
        assert "SECRET" not in text
    assert (
        f"HTTP 404 from http://***@127.0.0.1:{receiver.port}/notfound?token=***&x=***" in shown[1]
    )


def test_a_url_with_credentials_and_an_authorization_header_is_refused(
    db_url: str, tmp_path: Path
) -> None:
    """Finding 11: the URL's credentials silently replaced the configured
    Authorization header: the two together are a configuration error."""
    target = (
        '{ kind = "http", url = "https://user:hunter2@hooks.example/x", '
        'headers = { Authorization = "env:HOOK_TOKEN" } }'
    )
    cfg = config(tmp_path, f'[[policies]]\nname = "hook"\ntarget = {target}')
    result = dlqd_cli(
        "check", "--config", str(cfg), env={"DLQD_DATABASE_URL": db_url, "HOOK_TOKEN": "t0k"}
    )
    assert result.returncode == 78
    assert "policies[0].target: url: has credentials and an Authorization header" in result.stderr
    assert "hunter2" not in result.stderr
    assert result.stderr.count("\n") == 1
