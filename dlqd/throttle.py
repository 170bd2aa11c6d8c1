"""Rate limits and circuit breakers for the whole deployment.

Their state lives in Postgres (``dlqd_rate_buckets``, ``dlqd_circuits``,
migration 005), so the limits hold whatever the number of replicas: three
replicas at ``10/s`` replay ten rows a second between them, and one replica's
failures open a policy's circuit for all, with a single trial row
cluster-wide after the cool-down.

Tokens are taken in the claim transaction (the bucket row stays locked until
it commits; other replicas skip it for that moment). Circuits are read before
admitting rows and written after a transaction committed. This process keeps
only what the last answers said — when a bucket has a token again, which
circuits are open — to leave throttled rows out of its claims and to sleep
exactly until the next one may go.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from dlqd.config import Policy
from dlqd.db import limits
from dlqd.db.connector import Connection

#: a bucket or a trial another replica holds right now: look again this soon
CONTENDED_WAIT = 0.05
#: a closed circuit read this recently is not read again before admitting rows:
#: a circuit another replica opens holds here within this long
CIRCUIT_FRESH = 0.5


class Admissible(Protocol):
    """What admission needs of an item: its policy and its tenant."""

    @property
    def policy(self) -> Policy | None: ...
    @property
    def app_id(self) -> str: ...


@dataclass(slots=True)
class CircuitView:
    open: bool = False
    cool_down_left: float = 0.0
    trial_running: bool = False
    read_at: float = 0.0
    # closed, no failure counted, no trial: a success has nothing to record
    clean: bool = False


def _scope(policy: Policy, app_id: str) -> str:
    return app_id if policy.rate_limit_per == "app_id" else ""


class Throttle:
    """This replica's view of the shared limits, and the calls that change them."""

    def __init__(self) -> None:
        self._token_at: dict[tuple[str, str], float] = {}  # monotonic time of the next token
        self._circuits: dict[str, CircuitView] = {}
        self._known: set[str] = set()  # circuit rows seen in Postgres: no insert needed

    # ------------------------------------------------------------------ local knowledge

    def circuit_view(self, name: str) -> CircuitView:
        return self._circuits.setdefault(name, CircuitView())

    def open_circuits(self) -> dict[str, bool]:
        return {name: view.open for name, view in self._circuits.items()}

    def blocked(
        self, policies: Iterable[Policy], now: float
    ) -> tuple[set[str], set[tuple[str, str]], float | None]:
        """Policies and (policy, app_id) pairs that cannot replay now, and the
        seconds until the first of them may go again (None: nothing blocked)."""
        names: set[str] = set()
        pairs: set[tuple[str, str]] = set()
        waits: list[float] = []
        for policy in policies:
            view = self._circuits.get(policy.name)
            if view is not None and view.open:
                left = view.cool_down_left - (now - view.read_at)
                if left > 0:
                    names.add(policy.name)
                    waits.append(left)
                    continue
            if policy.rate_limit is None:
                continue
            for (name, scope), at in self._token_at.items():
                if name == policy.name and at > now:
                    if scope:
                        pairs.add((name, scope))
                    else:
                        names.add(name)
                    waits.append(at - now)
        return names, pairs, min(waits) if waits else None

    # ------------------------------------------------------------------ Postgres

    async def _ensure_circuits(self, conn: Connection, names: Iterable[str]) -> None:
        """Create the circuit rows this process has not seen yet (once, not per page)."""
        unknown = sorted(set(names) - self._known)
        if unknown:
            await limits.ensure_circuits(conn, unknown)

    async def read_circuits(self, conn: Connection, names: Sequence[str], now: float) -> None:
        if not names:
            return
        await self._ensure_circuits(conn, names)
        for row in await limits.read_circuits(conn, list(names)):
            self._known.add(row["policy"])
            self._circuits[row["policy"]] = CircuitView(
                row["open"], row["cool_down_left"], row["trial_running"], now, row["clean"]
            )

    async def refresh_circuits(self, conn: Connection, names: Sequence[str], now: float) -> None:
        """Read the circuits of ``names`` not read within ``CIRCUIT_FRESH``, and
        the open ones (whose cool-down may have ended)."""
        stale = [
            name
            for name in names
            if name not in self._circuits
            or self._circuits[name].open
            or now - self._circuits[name].read_at >= CIRCUIT_FRESH
        ]
        await self.read_circuits(conn, stale, now)

    async def closed_circuits(self, conn: Connection, names: Sequence[str], now: float) -> set[str]:
        """Of ``names``, the policies whose circuit is closed (refreshed first)."""
        await self.refresh_circuits(conn, names, now)
        return {name for name in names if not self.circuit_view(name).open}

    async def admit(
        self, conn: Connection, items: Sequence[Any], now: float, *, trial_lease: timedelta
    ) -> tuple[list[Any], list[Any], float | None]:
        """(admitted, deferred, seconds until a deferred one may go) for ``items``
        (each with ``.policy`` and ``.row.app_id``), in ``conn``'s transaction."""
        policies = {i.policy.name: i.policy for i in items if i.policy is not None}
        await self.refresh_circuits(conn, sorted(policies), now)
        admitted: list[Any] = []
        deferred: list[Any] = []
        waits: list[float] = []
        trials: dict[str, bool] = {}
        for item in items:
            policy = item.policy
            if policy is None:
                admitted.append(item)
                continue
            view = self.circuit_view(policy.name)  # unknown yet: closed
            if not view.open:
                admitted.append(item)
                continue
            if view.cool_down_left > 0 or view.trial_running:
                deferred.append(item)
                waits.append(max(view.cool_down_left, CONTENDED_WAIT))
                continue
            if policy.name not in trials:  # half-open: one trial row, cluster-wide
                trials[policy.name] = await limits.claim_trial(conn, policy.name, trial_lease)
                if trials[policy.name]:
                    admitted.append(item)
                    view.trial_running = True
                    continue
            deferred.append(item)
            waits.append(CONTENDED_WAIT)
        admitted, limited, wait = await self._take_tokens(conn, admitted, now)
        if wait is not None:
            waits.append(wait)
        return admitted, deferred + limited, min(waits) if waits else None

    async def _take_tokens(
        self, conn: Connection, items: list[Any], now: float
    ) -> tuple[list[Any], list[Any], float | None]:
        wanted: dict[tuple[str, str], list[Any]] = {}
        policies: dict[str, Policy] = {}
        for item in items:
            policy = item.policy
            if policy is not None and policy.rate_limit is not None:
                wanted.setdefault((policy.name, _scope(policy, item.row.app_id)), []).append(item)
                policies[policy.name] = policy
        if not wanted:
            return items, [], None
        keys = sorted(wanted)
        rates = [policies[p].rate_limit.per_second for p, _ in keys]  # type: ignore[union-attr]
        bursts = [policies[p].rate_limit.burst for p, _ in keys]  # type: ignore[union-attr]
        rows = await limits.take_tokens(conn, keys, rates, bursts, [len(wanted[k]) for k in keys])
        granted: dict[tuple[str, str], int] = {}
        waits: list[float] = []
        for row in rows:
            key = (row["policy"], row["scope"])
            granted[key] = int(row["granted"])
            if granted[key] < len(wanted[key]):
                self._token_at[key] = now + float(row["next_token_in"])
                waits.append(float(row["next_token_in"]))
            else:
                self._token_at.pop(key, None)
        admitted = [i for i in items if i.policy is None or i.policy.rate_limit is None]
        limited: list[Any] = []
        for key in keys:
            take = granted.get(key)
            if take is None:  # another replica holds this bucket right now
                waits.append(CONTENDED_WAIT)
                take = 0
            admitted += wanted[key][:take]
            limited += wanted[key][take:]
        return admitted, limited, min(waits) if waits else None

    async def record(
        self, conn: Connection, attempts: Sequence[tuple[Policy, bool, bool]], now: float
    ) -> list[tuple[str, str]]:
        """Record committed attempts (policy, succeeded, evidence the target is down),
        in order; the circuits that ``opened`` or ``closed`` because of them."""
        by_policy: dict[str, tuple[Policy, bool, int, bool]] = {}
        for policy, success, evidence in attempts:
            _, reset, failures, _ = by_policy.get(policy.name, (policy, False, 0, False))
            if success:
                reset, failures = True, 0
            elif evidence:
                failures += 1
            by_policy[policy.name] = (policy, reset, failures, True)
        changes: list[tuple[str, str]] = []
        # Only successes on a circuit that was clean when this batch read it:
        # nothing to write (a failure another replica counted since is reset
        # by the next batch's success, which reads it).
        by_policy = {
            name: entry
            for name, entry in by_policy.items()
            if not (entry[1] and entry[2] == 0 and self.circuit_view(name).clean)
        }
        if not by_policy:
            return changes
        await self._ensure_circuits(conn, by_policy)
        for name, (policy, reset, failures, _) in sorted(by_policy.items()):
            row = await limits.record_circuit(
                conn,
                name,
                reset=reset,
                failures=failures,
                threshold=policy.circuit_breaker.failures,
                cool_down=policy.circuit_breaker.cool_down,
            )
            if row is None:
                continue  # another replica's insert not committed yet: next time
            self._known.add(name)
            view = self.circuit_view(name)
            view.open = bool(row["is_open"])
            view.trial_running = False
            view.clean = reset and failures == 0 and not row["is_open"]
            if row["is_open"]:
                view.cool_down_left = policy.circuit_breaker.cool_down.total_seconds()
                view.read_at = now
            if row["is_open"] and not row["was_open"]:
                changes.append((name, "opened"))
            elif row["was_open"] and not row["is_open"]:
                changes.append((name, "closed"))
        return changes
