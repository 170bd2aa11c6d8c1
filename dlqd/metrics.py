"""Prometheus metrics (names and labels are the contract of DESIGN section 7)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from dlqd import __version__

# *_created samples double the series count for no operational use
disable_created_metrics()  # type: ignore[no-untyped-call]

# Histogram upper bounds (+Inf implied). Express pages bucket their rows' ages
# in Postgres against AGE_BUCKETS.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
AGE_BUCKETS = (
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0,
    7 * 86400.0,
)  # fmt: skip


def bucket_index(bounds: tuple[float, ...], value: float) -> int:
    """The bucket ``value`` falls in: the first bound >= value (len(bounds): +Inf)."""
    return bisect_left(bounds, value)


def observe_counts(child: Histogram, counts: Mapping[int, int], total: float) -> None:
    """Record many observations already counted by bucket: the effect of one
    ``observe()`` per value (bucket index as :func:`bucket_index` gives it),
    without a Python call per value. prometheus-client has no such method; this
    writes the two things its ``observe`` writes, and a test holds the two to
    the same exposition (the version is pinned below 0.27)."""
    child._sum.inc(total)
    for index, n in counts.items():
        if n:
            child._buckets[index].inc(n)


# Reasons a row is parked by an event (not by a policy's park action); alerts watch these.
PARK_EVENTS = ("max_failures", "max_replays", "invalid_row", "http_4xx")


class Metrics:
    """Every dlqd metric, on a registry of its own (one per daemon instance)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # the standard process_*, python_info and python_gc_* families
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(standard)
        self.pending_entries = Gauge(
            "dlqd_pending_entries",
            "Rows with replayed_at IS NULL (parked and unmatched included).",
            ["app_id", "type", "error_reason"],
            registry=r,
        )
        self.parked_entries = Gauge(
            "dlqd_parked_entries",
            "Pending rows parked by policy or by event.",
            ["app_id", "type", "error_reason"],
            registry=r,
        )
        self.oldest_pending_age_seconds = Gauge(
            "dlqd_oldest_pending_age_seconds",
            "Age of the oldest pending row.",
            ["app_id", "type"],
            registry=r,
        )
        self.unmatched_entries = Gauge(
            "dlqd_unmatched_entries", "Pending rows that no policy matches.", registry=r
        )
        self.replays_total = Counter(
            "dlqd_replays_total",
            "Replay decisions and outcomes.",
            ["policy", "outcome"],
            registry=r,
        )
        self.replay_duration_seconds = Histogram(
            "dlqd_replay_duration_seconds",
            "Time spent running a target for a batch, per row.",
            ["policy"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.dlq_to_replay_seconds = Histogram(
            "dlqd_dlq_to_replay_seconds",
            "From dlq_at to replayed_at.",
            ["policy"],
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.parked_total = Counter(
            "dlqd_parked",
            "Rows parked, by policy and reason: policy (a park action), max_failures, "
            "max_replays, invalid_row, http_4xx.",
            ["policy", "reason"],
            registry=r,
        )
        self.notifications_total = Counter(
            "dlqd_notifications", "NOTIFY wake-ups received.", registry=r
        )
        self.listener_up = Gauge(
            "dlqd_listener_up", "1 while the LISTEN connection is up.", registry=r
        )
        self.listener_reconnects_total = Counter(
            "dlqd_listener_reconnects", "Reconnections of the LISTEN connection.", registry=r
        )
        self.circuit_open = Gauge(
            "dlqd_circuit_open",
            "1 while a policy's circuit breaker is open.",
            ["policy"],
            registry=r,
        )
        self.purged_entries_total = Counter(
            "dlqd_purged_entries", "Rows deleted by purge.", registry=r
        )
        self.purge_runs_total = Counter(
            "dlqd_purge_runs", "Purge runs by outcome.", ["outcome"], registry=r
        )
        self.last_purge_success_timestamp_seconds = Gauge(
            "dlqd_last_purge_success_timestamp_seconds",
            "Unix time of the last successful purge.",
            registry=r,
        )
        self.purge_due_timestamp_seconds = Gauge(
            "dlqd_purge_due_timestamp_seconds",
            "Unix time of the scheduled purge run that is due next; kept while runs fail, "
            "moved on by a success (0 where this replica is not the leader).",
            registry=r,
        )
        self.leader = Gauge(
            "dlqd_leader", "1 on the replica that is the leader (it runs the purge).", registry=r
        )
        self.notification_queue_usage_ratio = Gauge(
            "dlqd_notification_queue_usage_ratio",
            "pg_notification_queue_usage() on the server.",
            registry=r,
        )
        self.last_pass_success_timestamp_seconds = Gauge(
            "dlqd_last_pass_success_timestamp_seconds",
            "Unix time at which a replayer pass last completed (an old value: a stalled replayer).",
            registry=r,
        )
        self.replayer_passes_total = Counter(
            "dlqd_replayer_passes",
            "Replayer passes (a flood of wake-ups must not multiply them).",
            registry=r,
        )
        self.redrive_rows_total = Counter(
            "dlqd_redrive_rows",
            "Rows redrives replayed, failed or skipped (counted once committed).",
            ["outcome"],
            registry=r,
        )
        self.redrives_running = Gauge(
            "dlqd_redrives_running",
            "Redrives this replica runs now (sum them over replicas).",
            registry=r,
        )
        self.count_corrections_total = Counter(
            "dlqd_count_corrections",
            "Rows the leader's reconciliation corrected in the counts (changes no trigger saw: "
            "a restore with triggers off, an update by another role).",
            ["kind"],
            registry=r,
        )
        self.counts_reconciled_timestamp_seconds = Gauge(
            "dlqd_counts_reconciled_timestamp_seconds",
            "Unix time the leader last reconciled the counts with the table (0 elsewhere).",
            registry=r,
        )
        self.console_sign_ins_total = Counter(
            "dlqd_console_sign_ins",
            "Console sign-ins by outcome (refused: a token that matches none).",
            ["outcome"],
            registry=r,
        )
        # series that alerts compare must exist before their first event
        for outcome in ("success", "error"):
            self.purge_runs_total.labels(outcome)
        for outcome in ("replayed", "failed", "skipped"):
            self.redrive_rows_total.labels(outcome)
        for outcome in ("accepted", "refused"):
            self.console_sign_ins_total.labels(outcome)
        for kind in ("pending", "waiting", "unmatched", "parked"):
            self.count_corrections_total.labels(kind)
        for reason in PARK_EVENTS:
            self.parked_total.labels("none", reason)
        self.build_info = Gauge("dlqd_build_info", "dlqd's version.", ["version"], registry=r)
        self.build_info.labels(version=__version__).set(1)

    def declare_policies(self, names: list[str]) -> None:
        """Create every policy's series at zero, so that rate() and increase()
        see a policy's first event (a series born at 1 hides it)."""
        for name in names:
            for outcome in ("replayed", "failed", "parked", "dry_run"):
                self.replays_total.labels(name, outcome)
            for reason in (*PARK_EVENTS, "policy"):
                self.parked_total.labels(name, reason)
            self.circuit_open.labels(name)
