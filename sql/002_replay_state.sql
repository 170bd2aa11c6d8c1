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

-- The inbox: every inserted pending row, until dlqd has evaluated it. Finding
-- new rows is then an index range scan, however many rows wait for a later
-- due time (an anti-join of job_dlq against the schedule grows with both).
-- Written by the insert trigger in the job system's own transaction, so a row
-- and its inbox entry commit together; nothing depends on a NOTIFY arriving.
CREATE TABLE dlqd_inbox (
    seq    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dlq_id uuid   NOT NULL UNIQUE REFERENCES job_dlq (id) ON DELETE CASCADE
);

-- A queue: every row is inserted once and deleted soon after. Vacuum it
-- often, or the claim walks dead index entries.
ALTER TABLE dlqd_inbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
                            autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 1000);
ALTER TABLE dlqd_entry_state SET (autovacuum_vacuum_scale_factor = 0.02,
                                  autovacuum_analyze_scale_factor = 0.02);

INSERT INTO dlqd_inbox (dlq_id)
SELECT id FROM job_dlq WHERE replayed_at IS NULL ORDER BY dlq_at, id;

-- The trigger of 001, now also filling the inbox. SECURITY DEFINER: tenants
-- (dlqd_app) need no privilege on dlqd's tables to insert a dead letter.
CREATE OR REPLACE FUNCTION job_dlq_notify_insert() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    inserted bigint;
    oldest   timestamptz;
BEGIN
    INSERT INTO dlqd_inbox (dlq_id)
    SELECT id FROM new_rows WHERE replayed_at IS NULL ORDER BY dlq_at, id;
    SELECT count(*), min(dlq_at) INTO inserted, oldest FROM new_rows;
    IF inserted > 0 THEN
        PERFORM pg_notify('dlqd_job_dlq',
            json_build_object('op', 'insert', 'count', inserted, 'oldest_dlq_at', oldest)::text);
    END IF;
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION job_dlq_notify_insert() FROM PUBLIC;
