-- 005: rate limits and circuit breakers shared by every replica.

-- A token bucket per policy (scope '') or per (policy, app_id). Replicas take
-- tokens in their claim transaction, row-locked and SKIP LOCKED, so the rate
-- holds for the whole deployment whatever the number of replicas.
CREATE TABLE dlqd_rate_buckets (
    policy     text        NOT NULL,
    scope      text        NOT NULL,
    tokens     float8      NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (policy, scope)
);

-- A circuit per policy: consecutive failures that say the target is down,
-- open until the cool-down ends, and the one trial (claimed by one replica,
-- until trial_until) that closes or reopens it.
CREATE TABLE dlqd_circuits (
    policy               text        PRIMARY KEY,
    consecutive_failures integer     NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    open_until           timestamptz NULL,
    trial_until          timestamptz NULL,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
