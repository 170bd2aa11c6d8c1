"""``dlqd run``: the pool, start-up checks, signals, reload, and one task group
owning the HTTP server, the console (when enabled, with a pool of its own),
the replay workers and the background services (``dlqd/services/``:
listener, collector, health, redriver, leader with the purger and the
counter (its reconciliation sweeps), watchdog); systemd notifications."""

from __future__ import annotations

import os
import secrets
import signal
import socket
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from anyio import CancelScope
from anyio.abc import TaskGroup, TaskStatus

from dlqd import __version__
from dlqd.config import Settings, load_settings
from dlqd.db import maintenance
from dlqd.db.connector import (
    Connection,
    Pool,
    connect,
    describe_dsn,
    open_pool,
    password_of,
    pooler_drops_prepared_statements,
)
from dlqd.db.migrations import require_current_schema
from dlqd.db.tenancy import tenant_role_problem
from dlqd.errors import ConfigError
from dlqd.logs import get_logger, register_secret
from dlqd.metrics import Metrics
from dlqd.replay.checks import check_targets, sql_target_problems
from dlqd.replay.evaluate import DryRunLedger
from dlqd.replay.http import HttpDeliverer
from dlqd.replay.worker import Replayer
from dlqd.sdnotify import sd_notify, watchdog_interval
from dlqd.services.collector import Collector
from dlqd.services.counter import Counter
from dlqd.services.health import Health
from dlqd.services.leader import LeaderElector
from dlqd.services.listener import Listener
from dlqd.services.purger import Purger
from dlqd.services.redriver import Redriver
from dlqd.services.sweeper import Sweeper
from dlqd.services.watchdog import Watchdog
from dlqd.throttle import Throttle
from dlqd.wake import Wakeup
from dlqd.web import build_app, serve

log = get_logger("dlqd.daemon")
#: this many failed replayer passes in a row make the replica unready
FAILING_PASSES = 3
#: connections of the console's own pool (requests beyond it wait a moment, then 503)
CONSOLE_POOL = 4


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
        self.health: Health | None = None
        self.leader: LeaderElector | None = None
        self.pool: Pool | None = None
        self.replayers: list[Replayer] = []
        self.http_port: int | None = None
        self.console_port: int | None = None
        self.redriver: Redriver | None = None
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
        check_targets(settings)
        self.metrics.declare_policies([p.name for p in settings.policies])
        # Refuse to start against a database we cannot reach (exit 69): later
        # outages are ridden out with backoff.
        if settings.listen.enabled and settings.listen_dsn != settings.dsn:
            listen_probe = await connect(settings.listen_dsn, application_name="dlqd preflight")
            await listen_probe.close()
        probe = await connect(settings.dsn, autocommit=True, application_name="dlqd preflight")
        try:
            await require_current_schema(probe)
            prepare = True
            if await pooler_drops_prepared_statements(probe):
                prepare = False
                log.warning(
                    "database_url goes through a connection pooler that does not keep prepared "
                    "statements (PgBouncer before 1.21, or max_prepared_statements = 0): "
                    "running without them"
                )
            # Anything but exactly one plannable statement is refused. A target
            # the job system has not deployed yet may appear later: warn only
            # (failed attempts and the circuit breaker guard the rest).
            problems = await sql_target_problems(probe, settings)
            fatal = [text for text, kind in problems if kind == "syntax"]
            if fatal:
                raise ConfigError("invalid configuration: " + "; ".join(fatal))
            for text, _ in problems:
                log.warning("sql target does not plan", problem=text)
            console_key = await self._console_preflight(probe) if settings.console.enabled else None
        finally:
            await probe.close()

        async with AsyncExitStack() as stack:
            # A fixed pool, opened before the HTTP port: its connections are
            # held for the daemon's life, so no flood of HTTP clients can take
            # the descriptors the database work needs.
            # per worker: its passes and its http leg; then the services
            # (the redriver: its chunks and its lease)
            size = 2 * settings.replay.concurrency + 5
            # the replayer's statements run many times a second: prepared on
            # the server from the first run, unless a pooler cannot keep them
            pool = open_pool(settings.dsn, size, prepare=prepare)
            await pool.open(wait=True, timeout=30)
            stack.push_async_callback(pool.close)
            self.pool = pool
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._signals, tg.cancel_scope)
                self.http_port = await tg.start(
                    serve,
                    settings.metrics_host,
                    settings.metrics_port,
                    build_app(self.metrics.registry, self.readiness_problems),
                )
                if console_key is not None:
                    self.console_port = await self._serve_console(tg, stack, console_key, prepare)
                if settings.listen.enabled:
                    self.listener = Listener(self.settings, pool, self.wakeup, self.metrics)
                    await tg.start(self.listener.run)
                workers_done: list[anyio.Event] = []
                self.replayers = []
                dry_runs = DryRunLedger()
                http = HttpDeliverer()
                stack.push_async_callback(http.aclose)
                replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
                for index in range(settings.replay.concurrency):
                    done = anyio.Event()
                    workers_done.append(done)
                    replayer = Replayer(
                        pool,
                        self.settings,
                        self.metrics,
                        self.throttle,
                        self.stopping,
                        dry_runs=dry_runs,
                        http=http,
                        worker=f"{replica}/{index}",
                    )
                    self.replayers.append(replayer)
                    await tg.start(self._worker, replayer, done)
                # the background services, one shape each (dlqd/services/)
                self.health = Health(pool)
                sweeper = Sweeper(pool, self.settings, self.wakeup)
                self.leader = LeaderElector(
                    pool,
                    self.settings,
                    self.metrics,
                    [
                        Purger(pool, self.settings, self.metrics),
                        Counter(pool, self.settings, self.metrics, sweeper),
                    ],
                )
                self.redriver = Redriver(pool, self.settings, self.metrics, self.stopping)
                services: list[Any] = [
                    Collector(pool, self.settings, self.metrics),
                    self.health,
                    self.redriver,
                    self.leader,
                ]
                if (interval := watchdog_interval()) is not None:
                    services.append(Watchdog(interval))
                for service in services:
                    await tg.start(service.run, name=service.name)
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
                    console_port=self.console_port,
                )
                self.wakeup.set()  # first scan: rows inserted while no daemon ran

                await self.stopping.wait()
                sd_notify("STOPPING=1")
                log.info("stopping: finishing the batch in flight")
                timeout = self._settings.shutdown_timeout.total_seconds()
                with anyio.move_on_after(timeout, shield=True) as scope:
                    for done in workers_done:
                        await done.wait()
                    # a redrive lets go after its chunk in flight (another replica resumes it)
                    await self.redriver.idle.wait()
                if scope.cancelled_caught:
                    log.warning("shutdown_timeout reached: batches in flight are rolled back")
                tg.cancel_scope.cancel()
        log.info("stopped")
        return 0

    async def _console_preflight(self, conn: Connection) -> bytes:
        """What the console needs of the database: its session key, and for
        tokens bound to a tenant, a role to switch to (else: exit 78)."""
        bound = [t.name for t in self._settings.console.tokens if t.app_id is not None]
        if bound:
            problem = await tenant_role_problem(conn)
            if problem is not None:
                raise ConfigError(
                    f"invalid configuration: console.tokens: {bound[0]!r} is bound to a tenant, "
                    f"but {problem}"
                )
        return await maintenance.console_key(conn, secrets.token_bytes(32))

    async def _serve_console(
        self, tg: TaskGroup, stack: AsyncExitStack, key: bytes, prepare: bool
    ) -> int:
        """The console on its own address, with a small pool of its own: no page
        view takes a connection the replayers need. Its statements are planned
        for their parameters (its filters are optional: a generic plan would
        not use the index a given search needs)."""
        from dlqd.console.app import Console

        settings = self._settings
        pool = open_pool(settings.dsn, CONSOLE_POOL, prepare=False, name="dlqd console")
        await pool.open(wait=True, timeout=30)
        stack.push_async_callback(pool.close)
        console = Console(self.settings, pool, self.metrics, key)
        port: int = await tg.start(
            partial(serve, what="console"),
            settings.console.host,
            settings.console.port,
            console.app(),
        )
        return port

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
            check_targets(new)
        except ConfigError as exc:
            log.error("config reload refused: keeping the running config", error=str(exc))
            return
        before = self._settings.policies_fingerprint
        self._settings = new
        self.metrics.declare_policies([p.name for p in new.policies])
        log.info(
            "config reloaded",
            policies=len(new.policies),
            policies_changed=before != new.policies_fingerprint,
        )
        self.wakeup.set()  # re-evaluate rows under the new policies

    # ------------------------------------------------------------------ readiness

    def readiness_problems(self) -> list[str]:
        """What stops this replica from being ready (``/readyz``); empty when ready."""
        problems: list[str] = []
        if not self.started:
            problems.append("starting")  # ready means every service is up, as READY=1 does
        if self._settings.listen.enabled and not (self.listener and self.listener.connected):
            problems.append("listener not connected")
        if not (self.health and self.health.database_ok):
            problems.append("database unreachable")
        for replayer in self.replayers:
            if replayer.failures_in_a_row >= FAILING_PASSES:
                problems.append(
                    f"replayer failing ({replayer.failures_in_a_row} passes in a row): "
                    f"{replayer.last_error}"
                )
                break
        if self.stopping.is_set():
            problems.append("stopping")
        return problems


async def run_daemon(settings: Settings, config_file: str | Path | None) -> int:
    daemon = Daemon(settings, str(config_file) if config_file else None)
    return await daemon.run()
