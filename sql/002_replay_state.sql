-- 002: dlqd's own state, in Postgres so that it survives restarts and is
-- shared by every replica.

-- Every replay attempt and park, in order. Kept when job_dlq rows are purged:
-- max_replays counts successful replays per original_job_id across returns.
CREATE TABLE dlqd_replay_log (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dlq_id          uuid        NOT NULL,
    original_job_id text        NOT NULL,
    app_id          text        NOT NULL,
    policy          text        NULL,      -- null: manual replay through replay.default_target
    outcome         text        NOT NULL
                                CONSTRAINT dlqd_replay_log_outcome_check
                                CHECK (outcome IN ('replayed', 'failed', 'parked')),
    error           text        NULL,
    manual          boolean     NOT NULL DEFAULT false,
    at              timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dlqd_replay_log_dlq_id_idx ON dlqd_replay_log (dlq_id, at);
CREATE INDEX dlqd_replay_log_replayed_idx ON dlqd_replay_log (original_job_id)
    WHERE outcome = 'replayed';

-- The schedule: one row per pending job_dlq row that dlqd has evaluated.
--   waiting        due at due_at through policy
--   parked_policy  its policy says park (re-evaluated when policies change)
--   unmatched      no policy matches (re-evaluated when policies change)
--   parked         parked by an event (max_replays, http 4xx): sticky until
--                  `dlqd replay` clears it, whatever the policies say
-- fingerprint names the policies that computed the row, so a config change,
-- or a replica with another config, evaluates it again.
CREATE TABLE dlqd_entry_state (
    dlq_id          uuid        PRIMARY KEY REFERENCES job_dlq (id) ON DELETE CASCADE,
    state           text        NOT NULL
                                CONSTRAINT dlqd_entry_state_state_check
                                CHECK (state IN ('waiting', 'parked_policy', 'unmatched', 'parked')),
    policy          text        NULL,
    fingerprint     text        NOT NULL,
    due_at          timestamptz NULL,
    failures        integer     NOT NULL DEFAULT 0 CHECK (failures >= 0),
    last_error      text        NULL,
    last_failure_at timestamptz NULL,
    parked_reason   text        NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dlqd_entry_state_due_check CHECK ((state = 'waiting') = (due_at IS NOT NULL)),
    CONSTRAINT dlqd_entry_state_parked_check CHECK ((state = 'parked') = (parked_reason IS NOT NULL))
);

-- The replayer's claim and its next wake-up walk this in due order, for the
-- fingerprint of its own policies.
CREATE INDEX dlqd_entry_state_due_idx ON dlqd_entry_state (fingerprint, due_at)
    WHERE state = 'waiting';
-- The periodic scan for rows of other policies: two range scans, below and
-- above this replica's own fingerprint, whatever the number of its own rows.
CREATE INDEX dlqd_entry_state_fingerprint_idx ON dlqd_entry_state (fingerprint, dlq_id)
    WHERE state <> 'parked';

-- Rows parked by an event: counted by `dlqd status` and the metrics.
CREATE INDEX dlqd_entry_state_parked_idx ON dlqd_entry_state (dlq_id) WHERE state = 'parked';

-- Rows come and go with every replay: keep its statistics and visibility fresh.
ALTER TABLE dlqd_entry_state SET (autovacuum_vacuum_scale_factor = 0.02,
                                  autovacuum_analyze_scale_factor = 0.02);
