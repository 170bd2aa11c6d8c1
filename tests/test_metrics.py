"""Every metric of DESIGN section 7, checked against what the database holds
and what the daemon did (real `dlqd run` processes, scraped over HTTP).

Metrics covered elsewhere, by the tests that cause them: listener_up and
listener_reconnects_total (test_daemon, test_faults), leader, purged_entries,
purge_runs and last_purge_success (test_leader), last_pass_success
(test_poison). Families in this file: pending, parked, unmatched, oldest age,
both histograms, every replays_total outcome, parked_total, notifications,
circuit_open, notification queue usage, build_info, max_series and
tenant_label.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.types.json import Jsonb

from dlqd import __version__
from dlqd.db.connector import connect
from dlqd.db.migrations import migrate
from dlqd.db.queries import sql_dir
from tests.daemon_helpers import (
    FRESH_WORKERS,
    SINK_STATEMENT,
    DaemonProcess,
    scalar,
    wait_until,
    write_config,
)
from tests.factories import INSERT_MANY, row_json
from tests.pgcluster import Cluster
from tests.test_poison import insert_rows, start

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(daemon: DaemonProcess) -> Samples:
    status, text = daemon.http("/metrics")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(scraped: Samples, name: str, **labels: str) -> float:
    """A sample of the scrape; a series that is missing fails the test (it is
    never taken for 0)."""
    key = (name, frozenset(labels.items()))
    assert key in scraped, f"no sample {name}{labels} in the scrape"
    return scraped[key]


def series(scraped: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in scraped.items() if n == name}


def collector_config(tmp_path: Path, extra: str = "") -> Path:
    """No policy, no periodic scan: the collector alone, refreshing every second."""
    return write_config(
        tmp_path / "d.toml",
        f"""
[listen]
poll_interval = "1h"
probe_interval = "1h"
[metrics]
refresh_interval = "1s"
{extra}
""",
    )


MIXED = f"""
[listen]
poll_interval = "300ms"
probe_interval = "1h"
[metrics]
refresh_interval = "1s"

[[policies]]
name = "sink"
match = {{ type = ["email.*"] }}
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}

[[policies]]
name = "broken"
match = {{ type = ["broken.*"] }}
retry_delay = "100ms"
backoff = "fixed"
max_failures = 2
circuit_breaker = {{ failures = 1000, cool_down = "1s" }}
target = {{ kind = "sql", statement = "SELECT 1/0" }}

[[policies]]
name = "hold"
match = {{ type = ["hold.*"] }}
action = "park"

[[policies]]
name = "trial"
match = {{ type = ["trial.*"] }}
dry_run = true
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}
"""


async def test_outcomes_histograms_and_the_collected_gauges_match_the_database(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    daemon = await start(daemons, sink_db, write_config(tmp_path / "d.toml", MIXED), tmp_path)
    first = samples(daemon)
    # declared at zero before any event, so that increase() sees the first one
    assert ("dlqd_replays_total", frozenset({("policy", "sink"), ("outcome", "replayed")})) in first
    assert value(first, "dlqd_notifications_total") == 0
    assert value(first, "dlqd_build_info", version=__version__) == 1

    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    batches = [
        [row_json(original_job_id=f"e{i}", type="email.send", dlq_at=hour_ago) for i in range(4)],
        [row_json(original_job_id="b0", type="broken.job", app_id="app-b")],
        [row_json(original_job_id=f"h{i}", type="hold.me", error_reason="bad") for i in range(2)],
        [row_json(original_job_id=f"t{i}", type="trial.run") for i in range(3)],
        [row_json(original_job_id=f"o{i}", type="other.x", app_id="app-c") for i in range(5)],
    ]

    async def listening() -> bool:
        return int(await scalar(sink_db, FRESH_WORKERS)) > 0

    # one statement each: one notification each while the worker listens (a
    # worker that drained a page looks again by itself for a moment, and
    # inserters send no NOTIFY meanwhile); each batch waits for it to listen,
    # and knows whether it notified (repeatable read: the trigger's snapshot)
    notifying = 0
    async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as conn:
        for batch in batches:
            await wait_until(listening, within=30)
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                seen = await (await conn.execute(FRESH_WORKERS)).fetchone()
                await conn.execute(INSERT_MANY, {"rows": Jsonb(batch)})
            notifying += bool(seen and seen[0])

    async def settled() -> bool:
        s = samples(daemon)
        return (
            value(s, "dlqd_replays_total", policy="sink", outcome="replayed") == 4
            and value(s, "dlqd_replays_total", policy="broken", outcome="parked") == 1
            and value(s, "dlqd_replays_total", policy="hold", outcome="parked") == 2
            and value(s, "dlqd_replays_total", policy="trial", outcome="dry_run") == 3
            and value(s, "dlqd_unmatched_entries") == 5
            and value(s, "dlqd_parked_entries", app_id="app-b", type="broken.job",
                      error_reason="timeout") == 1
        )  # fmt: skip

    await wait_until(settled, within=30)
    s = samples(daemon)

    # replays_total: every outcome, equal to what the replay log recorded
    async def logged(policy: str, outcome: str) -> int:
        return int(
            await scalar(
                sink_db,
                "SELECT count(*) FROM dlqd_replay_log WHERE policy = %s AND outcome = %s",
                [policy, outcome],
            )
        )

    assert await scalar(sink_db, "SELECT count(*) FROM sink") == 4
    assert value(s, "dlqd_replays_total", policy="sink", outcome="replayed") == await logged(
        "sink", "replayed"
    )
    assert value(s, "dlqd_replays_total", policy="broken", outcome="failed") == 2
    assert await logged("broken", "failed") == 2
    assert value(s, "dlqd_replays_total", policy="sink", outcome="failed") == 0
    assert value(s, "dlqd_parked_total", policy="broken", reason="max_failures") == 1
    assert value(s, "dlqd_parked_total", policy="hold", reason="policy") == 2
    assert value(s, "dlqd_parked_total", policy="sink", reason="max_failures") == 0

    # both histograms: one observation per replayed row, ages from dlq_at
    assert value(s, "dlqd_replay_duration_seconds_count", policy="sink") == 4
    assert 0 < value(s, "dlqd_replay_duration_seconds_sum", policy="sink") < 10
    assert value(s, "dlqd_dlq_to_replay_seconds_count", policy="sink") == 4
    assert 4 * 3600 <= value(s, "dlqd_dlq_to_replay_seconds_sum", policy="sink") < 4 * 3700
    assert value(s, "dlqd_dlq_to_replay_seconds_bucket", policy="sink", le="900.0") == 0
    assert value(s, "dlqd_dlq_to_replay_seconds_bucket", policy="sink", le="14400.0") == 4

    # notifications: one per inserting statement that saw a listening worker
    assert notifying >= 1
    assert value(s, "dlqd_notifications_total") == notifying

    # the collected gauges, group by group, against the table
    async with await psycopg.AsyncConnection.connect(sink_db) as conn:
        cur = await conn.execute(
            """SELECT app_id, type, error_reason, count(*),
                      count(*) FILTER (WHERE s.state IN ('parked', 'parked_policy')),
                      extract(epoch FROM now() - min(dlq_at))
                 FROM job_dlq j LEFT JOIN dlqd_entry_state s ON s.dlq_id = j.id
                WHERE replayed_at IS NULL GROUP BY 1, 2, 3"""
        )
        groups = await cur.fetchall()
    pending = series(s, "dlqd_pending_entries")
    assert len(pending) == len(groups) == 4
    for app_id, type_, reason, count, parked, age in groups:
        labels = frozenset({("app_id", app_id), ("type", type_), ("error_reason", reason)})
        assert pending[labels] == count
        assert series(s, "dlqd_parked_entries")[labels] == parked
        oldest = value(s, "dlqd_oldest_pending_age_seconds", app_id=app_id, type=type_)
        assert abs(oldest - float(age)) < 10
    assert sum(pending.values()) == 11
    assert sum(series(s, "dlqd_parked_entries").values()) == 3


async def test_the_circuit_gauge_follows_the_shared_circuit(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    cfg = write_config(
        tmp_path / "d.toml",
        """
[listen]
poll_interval = "300ms"
probe_interval = "1h"
[[policies]]
name = "down"
retry_delay = "100ms"
circuit_breaker = { failures = 2, cool_down = "1h" }
target = { kind = "sql", statement = "SELECT 1/0" }
""",
    )
    daemon = await start(daemons, sink_db, cfg, tmp_path)
    assert value(samples(daemon), "dlqd_circuit_open", policy="down") == 0
    await insert_rows(sink_db, [row_json(original_job_id=f"c{i}") for i in range(3)])

    async def opened() -> bool:
        return value(samples(daemon), "dlqd_circuit_open", policy="down") == 1

    await wait_until(opened, within=30)
    assert await scalar(
        sink_db, "SELECT open_until > now() FROM dlqd_circuits WHERE policy = 'down'"
    )
    # while open, passes go on and nothing more is attempted
    failed = "SELECT count(*) FROM dlqd_replay_log WHERE outcome = 'failed'"
    at_open = int(await scalar(sink_db, failed))
    assert 2 <= at_open <= 3
    passes = value(samples(daemon), "dlqd_replayer_passes_total")

    async def passed_again() -> bool:
        return value(samples(daemon), "dlqd_replayer_passes_total") >= passes + 3

    await wait_until(passed_again, within=30)
    assert int(await scalar(sink_db, failed)) == at_open
    assert value(samples(daemon), "dlqd_circuit_open", policy="down") == 1


async def test_series_beyond_max_series_fold_into_other(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    cfg = collector_config(tmp_path, "max_series = 3")
    rows = [
        *[row_json(original_job_id=f"a{i}", type="t.a") for i in range(5)],
        *[row_json(original_job_id=f"b{i}", type="t.b") for i in range(4)],
        *[row_json(original_job_id=f"c{i}", type="t.c") for i in range(2)],
        *[row_json(original_job_id=f"d{i}", type="t.d") for i in range(1)],
    ]
    await insert_rows(sink_db, rows)
    daemon = await start(daemons, sink_db, cfg, tmp_path)

    def labels(type_: str) -> frozenset[tuple[str, str]]:
        return frozenset({("app_id", "app-a"), ("type", type_), ("error_reason", "timeout")})

    other = frozenset(
        {("app_id", "__other__"), ("type", "__other__"), ("error_reason", "__other__")}
    )
    expected = {labels("t.a"): 5.0, labels("t.b"): 4.0, other: 3.0}

    async def folded() -> bool:
        return series(samples(daemon), "dlqd_pending_entries") == expected

    await wait_until(folded, within=30)
    ages = series(samples(daemon), "dlqd_oldest_pending_age_seconds")
    assert len(ages) == 3
    assert frozenset({("app_id", "__other__"), ("type", "__other__")}) in ages


async def test_tenant_label_off_merges_tenants(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    cfg = collector_config(tmp_path, "tenant_label = false")
    tenants = [f"tenant-{n}" for n in range(6)]
    await insert_rows(
        sink_db,
        [row_json(original_job_id=f"{t}-{i}", app_id=t) for t in tenants for i in range(2)],
    )
    daemon = await start(daemons, sink_db, cfg, tmp_path)
    merged = frozenset({("app_id", ""), ("type", "email.send"), ("error_reason", "timeout")})

    async def one_series() -> bool:
        return series(samples(daemon), "dlqd_pending_entries") == {merged: 12.0}

    await wait_until(one_series, within=30)
    _, text = daemon.http("/metrics")
    assert "tenant-" not in text  # no tenant name anywhere in the exposition


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[str]:
    """A migrated database on a throwaway cluster of this test's own: the NOTIFY
    queue is server-wide, and the machine's server is shared by tests running
    side by side (and filling it would slow theirs)."""
    with Cluster.create() as cluster:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE queue")
        url = cluster.url("queue")

        async def prepare() -> None:
            conn = await connect(url, autocommit=True)
            try:
                await migrate(conn)
                await conn.execute((sql_dir() / "roles.sql").read_text().encode())
            finally:
                await conn.close()

        anyio.run(prepare)
        yield url


async def test_notification_queue_usage_is_the_servers(
    own_server: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    sink_db = own_server
    cfg = collector_config(tmp_path)
    daemon = await start(daemons, sink_db, cfg, tmp_path)
    assert value(samples(daemon), "dlqd_notification_queue_usage_ratio") == 0
    # A listener stuck inside a transaction holds the queue's tail: the queue fills.
    async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as stuck:
        await stuck.execute("LISTEN metrics_test")
        await stuck.execute("BEGIN")
        await stuck.execute("SELECT 1")
        async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as noisy:
            await noisy.execute(
                "SELECT pg_notify('metrics_test', repeat('x', 7000) || g) "
                "FROM generate_series(1, 2000) g"
            )
            usage = float(await scalar(sink_db, "SELECT pg_notification_queue_usage()"))
            assert usage > 0

            async def reported() -> bool:
                return value(samples(daemon), "dlqd_notification_queue_usage_ratio") >= usage

            await wait_until(reported, within=30)
        await stuck.execute("ROLLBACK")
