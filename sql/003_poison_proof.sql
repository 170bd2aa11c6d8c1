-- 003: poison-proofing.
--   * rows that cannot be decided are recognised in SQL, before any value
--     crosses into the daemon (dlqd_row_problem);
--   * max_replays counts per (app_id, original_job_id), so one tenant never
--     uses up another's;
--   * rows parked by an event say why (parked_reason);
--   * purge and replay-log trimming run as SECURITY DEFINER functions, so the
--     dlqd role needs no DELETE on job_dlq or dlqd_replay_log.

-- Why a row cannot be decided, or NULL when it can. Inlined into the claim
-- queries: octet_length reads the stored length, never the value.
-- dlq_at must leave room for delays (durations are capped at 100 years).
CREATE FUNCTION dlqd_row_problem(dlq_at timestamptz, app_id text, type text,
                                 error_reason text, original_job_id text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN NOT isfinite(dlq_at) THEN 'dlq_at is infinite'
        WHEN dlq_at < '0001-01-02 00:00:00+00'::timestamptz
          OR dlq_at >= '9000-01-01 00:00:00+00'::timestamptz
            THEN 'dlq_at is outside the supported range (years 1 to 8999)'
        WHEN octet_length(app_id) > 2048 THEN 'app_id is longer than 2048 bytes'
        WHEN octet_length(type) > 2048 THEN 'type is longer than 2048 bytes'
        WHEN octet_length(error_reason) > 2048 THEN 'error_reason is longer than 2048 bytes'
        WHEN octet_length(original_job_id) > 2048 THEN 'original_job_id is longer than 2048 bytes'
    END
$$;

-- max_replays: successful replays of one job of one tenant, within the log's retention.
DROP INDEX dlqd_replay_log_replayed_idx;
CREATE INDEX dlqd_replay_log_job_idx ON dlqd_replay_log (app_id, original_job_id, at)
    WHERE outcome = 'replayed';
-- Trimming walks the log in time order.
CREATE INDEX dlqd_replay_log_at_idx ON dlqd_replay_log (at);

ALTER TABLE dlqd_entry_state
    ADD CONSTRAINT dlqd_entry_state_parked_reason_check
    CHECK (parked_reason IN ('max_replays', 'max_failures', 'invalid_row', 'http_4xx'));

-- The owner of job_dlq is itself subject to tenant isolation (FORCE). This
-- policy lets it see every row only while a maintenance function below has
-- set dlqd.maintenance for the transaction. (The owner can always disable
-- row-level security: this widens nothing it could not do anyway.)
CREATE POLICY dlqd_maintenance ON job_dlq FOR ALL TO CURRENT_USER
    USING (current_setting('dlqd.maintenance', true) = 'on');

CREATE OR REPLACE FUNCTION job_dlq_purge(
    replayed_before interval,
    pending_before  interval DEFAULT NULL,
    batch_size      integer  DEFAULT 10000
) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
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
    PERFORM set_config('dlqd.maintenance', 'on', true);

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

    PERFORM set_config('dlqd.maintenance', '', true);
    RETURN deleted;
END
$$;

REVOKE ALL ON FUNCTION job_dlq_purge(interval, interval, integer) FROM PUBLIC;

-- Deletes at most batch_size replay-log rows older than older_than; returns
-- how many. Callers loop, one transaction per call, like job_dlq_purge.
CREATE FUNCTION dlqd_trim_replay_log(older_than interval, batch_size integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    deleted bigint;
BEGIN
    IF older_than IS NULL OR batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'dlqd_trim_replay_log: older_than and a batch_size >= 1 are required';
    END IF;
    WITH doomed AS (
        SELECT id FROM dlqd_replay_log
         WHERE at < now() - older_than
         ORDER BY at
         LIMIT batch_size
    )
    DELETE FROM dlqd_replay_log l USING doomed d WHERE l.id = d.id;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

REVOKE ALL ON FUNCTION dlqd_trim_replay_log(interval, integer) FROM PUBLIC;
