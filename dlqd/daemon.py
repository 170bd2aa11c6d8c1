"""``dlqd run``: one task group owning the listener, the replay workers, the
metrics collector and the HTTP server; signals; systemd notifications."""

from __future__ import annotations

import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
from anyio import CancelScope
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from dlqd import __version__
from dlqd.config import Settings, load_settings
from dlqd.db import connect, describe_dsn, password_of
from dlqd.errors import ConfigError
from dlqd.httpserver import Response, serve
from dlqd.listener import Listener
from dlqd.logs import get_logger, register_secret
from dlqd.metrics import Metrics
from dlqd.migrations import require_current_schema
from dlqd.queries import q
from dlqd.replay.checks import check_supported_targets, sql_target_problems
from dlqd.replay.evaluate import DryRunLedger
from dlqd.replay.targets import error_line
from dlqd.replay.worker import Replayer
from dlqd.sdnotify import sd_notify, watchdog_interval
from dlqd.status import collect_status
from dlqd.throttle import Throttle
from dlqd.wake import Wakeup

log = get_logger("dlqd.daemon")
OTHER = "__other__"
HEALTH_INTERVAL = 1.0  # seconds between database checks behind /readyz
HEALTH_TIMEOUT = 2.0


def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one: clients of the
    metrics port must never starve the database connections of descriptors."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError):
        pass  # not permitted or not POSIX: the HTTP connection cap still holds


class Daemon:
    def __init__(self, settings: Settings, config_file: str | None = None) -> None:
        self._settings = settings
        self.config_file = config_file
        self.metrics = Metrics()
        self.throttle = Throttle()
        self.wakeup = Wakeup()
        self.stopping = anyio.Event()
        self.listener: Listener | None = None
        self.pool: AsyncConnectionPool[Any] | None = None
        self.http_port: int | None = None
        self.database_ok = False
        self.started = False

    def settings(self) -> Settings:
        return self._settings

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        settings = self._settings
        raise_fd_limit()
        for dsn in (settings.dsn, settings.listen_dsn):
            register_secret(dsn)
            register_secret(password_of(dsn))
        check_supported_targets(settings)
        # Refuse to start against a database we cannot reach (exit 69): later
        # outages are ridden out with backoff.
        if settings.listen.enabled and settings.listen_dsn != settings.dsn:
            listen_probe = await connect(settings.listen_dsn, application_name="dlqd preflight")
            await listen_probe.close()
        probe = await connect(settings.dsn, autocommit=True, application_name="dlqd preflight")
        try:
            await require_current_schema(probe)
            # Anything but exactly one plannable statement is refused. A target
            # the job system has not deployed yet may appear later: warn only
            # (failed attempts and the circuit breaker guard the rest).
            problems = await sql_target_problems(probe, settings)
            fatal = [text for text, syntax in problems if syntax]
            if fatal:
                raise ConfigError("invalid configuration: " + "; ".join(fatal))
            for text, _ in problems:
                log.warning("sql target does not plan", problem=text)
        finally:
            await probe.close()

        async with AsyncExitStack() as stack:
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                settings.dsn,
                min_size=1,
                max_size=settings.replay.concurrency + 3,
                kwargs={
                    "autocommit": True,
                    "row_factory": dict_row,
                    "application_name": "dlqd",
                },
                check=AsyncConnectionPool.check_connection,
                open=False,
                name="dlqd",
            )
            await pool.open(wait=True, timeout=30)
            stack.push_async_callback(pool.close)
            self.pool = pool
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._signals, tg.cancel_scope)
                self.http_port = await tg.start(
                    serve,
                    settings.metrics_host,
                    settings.metrics_port,
                    {"/metrics": self._metrics, "/healthz": self._healthz, "/readyz": self._readyz},
                )
                if settings.listen.enabled:
                    self.listener = Listener(self.settings, pool, self.wakeup, self.metrics)
                    await tg.start(self.listener.run)
                workers_done: list[anyio.Event] = []
                dry_runs = DryRunLedger()
                for _ in range(settings.replay.concurrency):
                    done = anyio.Event()
                    workers_done.append(done)
                    replayer = Replayer(
                        pool,
                        self.settings,
                        self.metrics,
                        self.throttle,
                        self.stopping,
                        dry_runs=dry_runs,
                    )
                    await tg.start(self._worker, replayer, done)
                tg.start_soon(self._collector)
                tg.start_soon(self._sweeper)
                await tg.start(self._health)
                if (interval := watchdog_interval()) is not None:
                    tg.start_soon(self._watchdog, interval)
                self.started = True
                sd_notify("READY=1")
                log.info(
                    "started",
                    version=__version__,
                    database=describe_dsn(settings.dsn),
                    listen=settings.listen.enabled,
                    policies=len(settings.policies),
                    workers=settings.replay.concurrency,
                    http_port=self.http_port,
                )
                self.wakeup.set()  # first scan: rows inserted while no daemon ran

                await self.stopping.wait()
                sd_notify("STOPPING=1")
                log.info("stopping: finishing the batch in flight")
                timeout = self._settings.shutdown_timeout.total_seconds()
                with anyio.move_on_after(timeout, shield=True) as scope:
                    for done in workers_done:
                        await done.wait()
                if scope.cancelled_caught:
                    log.warning("shutdown_timeout reached: batches in flight are rolled back")
                tg.cancel_scope.cancel()
        log.info("stopped")
        return 0

    async def _worker(
        self,
        replayer: Replayer,
        done: anyio.Event,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await replayer.run(self.wakeup.flag(), task_status=task_status)
        finally:
            done.set()

    def stop(self) -> None:
        self.stopping.set()
        self.wakeup.set()

    async def _signals(self, scope: CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self._reload()
                elif self.stopping.is_set():
                    log.warning("second stop signal: exiting now")
                    scope.cancel()
                elif not self.started:
                    # still starting (e.g. waiting for the listener): nothing in flight
                    log.info("stop signal during start-up", signal=signal.Signals(signum).name)
                    self.stopping.set()
                    scope.cancel()
                else:
                    log.info("stop signal", signal=signal.Signals(signum).name)
                    self.stop()

    def _reload(self) -> None:
        try:
            new = load_settings(self.config_file)
            check_supported_targets(new)
        except ConfigError as exc:
            log.error("config reload refused: keeping the running config", error=str(exc))
            return
        before = self._settings.policies_fingerprint
        self._settings = new
        log.info(
            "config reloaded",
            policies=len(new.policies),
            policies_changed=before != new.policies_fingerprint,
        )
        self.wakeup.set()  # re-evaluate rows under the new policies

    async def _health(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep ``database_ok`` fresh, so /readyz answers at once without a query."""
        assert self.pool is not None  # noqa: S101 - set before any task starts
        started = False
        while True:
            try:
                with anyio.fail_after(HEALTH_TIMEOUT):
                    async with self.pool.connection(timeout=HEALTH_TIMEOUT) as conn:
                        await conn.execute("SELECT 1")
                self.database_ok = True
            except Exception:  # noqa: BLE001 - any failure means not reachable now
                self.database_ok = False
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(HEALTH_INTERVAL)

    async def _sweeper(self) -> None:
        """The periodic scan for rows that reached job_dlq without the insert
        trigger (a restore with session_replication_role = replica, a disabled
        trigger): they join the inbox and the workers are woken."""
        assert self.pool is not None  # noqa: S101 - set before any task starts
        while True:
            try:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(q("enqueue_orphans"))
                    moved = max(0, cur.rowcount)
                if moved:
                    log.warning("rows found without an inbox entry", rows=moved)
                    self.wakeup.set()
            except Exception as exc:  # noqa: BLE001 - the sweeper must outlive any error
                log.warning("orphan sweep failed", error=error_line(exc))
            await anyio.sleep(self._settings.listen.poll_interval.total_seconds())

    async def _watchdog(self, interval: float) -> None:
        while True:
            sd_notify("WATCHDOG=1")
            await anyio.sleep(interval)

    # ------------------------------------------------------------------ metrics

    async def _collector(self) -> None:
        """Refresh the gauges in the background, so a scrape never runs a query."""
        while True:
            try:
                await self.refresh_gauges()
            except Exception as exc:  # noqa: BLE001 - the collector must outlive any error
                log.warning("metrics refresh failed", error=error_line(exc))
            await anyio.sleep(self._settings.metrics.refresh_interval.total_seconds())

    async def refresh_gauges(self) -> None:
        assert self.pool is not None  # noqa: S101 - set before any task starts
        settings = self._settings
        async with self.pool.connection() as conn:
            status = await collect_status(conn, settings.policies)
            cur = await conn.execute(q("notification_queue_usage"))
            row = await cur.fetchone()
        m = self.metrics
        m.notification_queue_usage_ratio.set(row["usage"] if row else 0.0)
        m.unmatched_entries.set(status.unmatched)
        tenant = settings.metrics.tenant_label
        pending: dict[tuple[str, str, str], list[float]] = {}
        oldest: dict[tuple[str, str], float] = {}
        # the largest groups keep their labels; the rest fold into __other__
        ranked = sorted(status.groups, key=lambda g: g.pending, reverse=True)
        for index, group in enumerate(ranked):
            keep = index < settings.metrics.max_series - 1
            app = group.app_id if tenant else ""
            key = (app, group.type, group.error_reason) if keep else (OTHER, OTHER, OTHER)
            counts = pending.setdefault(key, [0.0, 0.0])
            counts[0] += group.pending
            counts[1] += group.parked
            age_key = (key[0], key[1])
            age = group.oldest_pending_age_seconds or 0.0
            oldest[age_key] = max(oldest.get(age_key, 0.0), age)
        m.pending_entries.clear()
        m.parked_entries.clear()
        m.oldest_pending_age_seconds.clear()
        for (app, type_, reason), (n_pending, n_parked) in pending.items():
            m.pending_entries.labels(app, type_, reason).set(n_pending)
            m.parked_entries.labels(app, type_, reason).set(n_parked)
        for (app, type_), age in oldest.items():
            m.oldest_pending_age_seconds.labels(app, type_).set(age)

    # ------------------------------------------------------------------ HTTP routes

    async def _metrics(self) -> Response:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)

    async def _healthz(self) -> Response:
        return 200, "text/plain; charset=utf-8", b"ok\n"

    async def _readyz(self) -> Response:
        problems: list[str] = []
        if self._settings.listen.enabled and not (self.listener and self.listener.connected):
            problems.append("listener not connected")
        if not self.database_ok:
            problems.append("database unreachable")
        if self.stopping.is_set():
            problems.append("stopping")
        if problems:
            return 503, "text/plain; charset=utf-8", ("; ".join(problems) + "\n").encode()
        return 200, "text/plain; charset=utf-8", b"ready\n"


async def run_daemon(settings: Settings, config_file: str | Path | None) -> int:
    daemon = Daemon(settings, str(config_file) if config_file else None)
    return await daemon.run()
