"""The collector: refreshes the gauges in the background, so a scrape runs no query.

Every ``metrics.refresh_interval``: grouped pending counts and oldest ages
(index-only over ``job_dlq_pending_group_idx``), parked counts (from the small
parked set), and ``pg_notification_queue_usage()``. Label sets are capped at
``metrics.max_series``: the largest groups keep their labels, the rest fold
into ``__other__``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dlqd.config import Settings
from dlqd.db import maintenance
from dlqd.db.connector import Pool, pooled
from dlqd.metrics import Metrics
from dlqd.services.base import PeriodicService
from dlqd.status import OTHER, collect_status


@dataclass(frozen=True, slots=True)
class Collected:
    groups: int
    series: int


class Collector(PeriodicService[Collected]):
    name = "collector"

    def __init__(self, pool: Pool, settings: Callable[[], Settings], metrics: Metrics) -> None:
        super().__init__()
        self.pool = pool
        self.settings = settings
        self.metrics = metrics

    def interval(self) -> float:
        return self.settings().metrics.refresh_interval.total_seconds()

    async def run_once(self) -> Collected:
        settings = self.settings()
        async with pooled(self.pool) as conn:
            status = await collect_status(conn)
            usage = await maintenance.notification_queue_usage(conn)
        m = self.metrics
        m.notification_queue_usage_ratio.set(usage)
        m.unmatched_entries.set(status.unmatched)
        tenant = settings.metrics.tenant_label
        pending: dict[tuple[str, str, str], list[float]] = {}
        oldest: dict[tuple[str, str], float] = {}
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
        return Collected(groups=len(status.groups), series=len(pending))
