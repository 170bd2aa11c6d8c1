-- 001: the dead-letter table, its pending-set indexes, tenant isolation,
-- the purge function, and the insert trigger (inbox entry and notification).

-- Requires PostgreSQL >= 13 (gen_random_uuid() in core).

CREATE TABLE job_dlq (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    original_job_id text        NOT NULL,
    app_id          text        NOT NULL,
    type            text        NOT NULL,
    payload         jsonb       NOT NULL,
    error_reason    text        NOT NULL,
    attempts        integer     NOT NULL CONSTRAINT job_dlq_attempts_check CHECK (attempts >= 0),
    error_history   jsonb       NOT NULL DEFAULT '[]'::jsonb
                                CONSTRAINT job_dlq_error_history_check CHECK (jsonb_typeof(error_history) = 'array'),
    dlq_at          timestamptz NOT NULL DEFAULT now(),
    replayed_at     timestamptz NULL,
    request_id      text        NULL,
    user_id         text        NULL
);

COMMENT ON TABLE job_dlq IS 'Jobs that failed for good. replayed_at IS NULL means pending. Owned by dlqd.';

-- Keyset order of the pending set: `dlqd list`, catch-up scans.
CREATE INDEX job_dlq_pending_dlq_at_id_idx ON job_dlq (dlq_at, id) WHERE replayed_at IS NULL;
-- Covering index so grouped counts and oldest ages are index-only scans.
CREATE INDEX job_dlq_pending_group_idx ON job_dlq (app_id, type, error_reason, dlq_at) WHERE replayed_at IS NULL;
-- Replay counts per original job.
CREATE INDEX job_dlq_original_job_id_idx ON job_dlq (original_job_id);
-- Purge of replayed rows walks this in replayed_at order.
CREATE INDEX job_dlq_replayed_at_idx ON job_dlq (replayed_at) WHERE replayed_at IS NOT NULL;

-- Tenant isolation. FORCE applies it to the table owner too; the dlqd role
-- sees every row through BYPASSRLS (or the fallback policy in sql/roles.sql).
ALTER TABLE job_dlq ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_dlq FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON job_dlq
    USING (app_id = current_setting('app.current_app_id', true))
    WITH CHECK (app_id = current_setting('app.current_app_id', true));

-- Deletes at most batch_size rows and returns how many. Callers loop until it
-- returns less than batch_size, one transaction per call, so no lock is held long.
-- Rows locked by a replay in flight are skipped, never waited for.
CREATE FUNCTION job_dlq_purge(
    replayed_before interval,
    pending_before  interval DEFAULT NULL,
    batch_size      integer  DEFAULT 10000
) RETURNS bigint
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    deleted bigint;
    more    bigint;
BEGIN
    IF replayed_before IS NULL THEN
        RAISE EXCEPTION 'job_dlq_purge: replayed_before must not be null';
    END IF;
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'job_dlq_purge: batch_size must be at least 1, got %', batch_size;
    END IF;

    WITH doomed AS (
        SELECT id FROM job_dlq
         WHERE replayed_at IS NOT NULL AND replayed_at < now() - replayed_before
         ORDER BY replayed_at
         LIMIT batch_size
           FOR UPDATE SKIP LOCKED
    )
    DELETE FROM job_dlq j USING doomed d WHERE j.id = d.id;
    GET DIAGNOSTICS deleted = ROW_COUNT;

    IF pending_before IS NOT NULL AND deleted < batch_size THEN
        WITH doomed AS (
            SELECT id FROM job_dlq
             WHERE replayed_at IS NULL AND dlq_at < now() - pending_before
             ORDER BY dlq_at, id
             LIMIT batch_size - deleted
               FOR UPDATE SKIP LOCKED
        )
        DELETE FROM job_dlq j USING doomed d WHERE j.id = d.id;
        GET DIAGNOSTICS more = ROW_COUNT;
        deleted := deleted + more;
    END IF;

    RETURN deleted;
END
$$;

REVOKE ALL ON FUNCTION job_dlq_purge(interval, interval, integer) FROM PUBLIC;

-- The inbox: every inserted pending row, until dlqd has evaluated it. Finding
-- new rows is then an index range scan, however many rows wait for a later
-- due time (an anti-join of job_dlq against dlqd's schedule grows with both).
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

-- One wake-up per INSERT statement, whatever its row count. The payload is a
-- fixed-size summary (well under the 8000-byte NOTIFY limit): the table is the
-- truth. SECURITY DEFINER: tenants (dlqd_app) need no privilege on dlqd_inbox.
CREATE FUNCTION job_dlq_notify_insert() RETURNS trigger
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

CREATE TRIGGER job_dlq_notify_insert
    AFTER INSERT ON job_dlq
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT
    EXECUTE FUNCTION job_dlq_notify_insert();
