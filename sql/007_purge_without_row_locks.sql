-- 007: purge replayed rows without locking each row before deleting it.
-- Pending rows (pending_before) are still taken with SKIP LOCKED: replays lock them.

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

    -- No row locks first: nothing replays a replayed row, and locking each
    -- one before deleting it writes every tuple twice (bench/purge_bench.py).
    -- A row someone holds anyway (a manual replay by id) makes the batch wait
    -- up to the caller's lock_timeout, and the caller shrinks the batch.
    WITH doomed AS (
        SELECT id FROM job_dlq
         WHERE replayed_at IS NOT NULL AND replayed_at < now() - replayed_before
         ORDER BY replayed_at
         LIMIT batch_size
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
