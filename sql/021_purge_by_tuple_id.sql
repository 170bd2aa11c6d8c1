-- 021: the purge deletes each batch by tuple id.
--   job_dlq_purge (migration 007) joined its batch back to job_dlq by `id`:
--   a probe of the primary key per row, in random order (the ids are
--   random uuids). The batch's tuple ids, taken in the same statement, are
--   a TID scan instead (migration 020 did the same for the replay log's
--   trim). The conditions are tested again on each row deleted, so a row
--   changed since the batch was chosen is left alone. Same signature, same
--   rows deleted, the same locks (none for replayed rows, SKIP LOCKED for
--   pending ones); the search path is pinned again (CREATE OR REPLACE
--   resets a function's settings).
CREATE OR REPLACE FUNCTION job_dlq_purge(
    replayed_before interval,
    pending_before  interval DEFAULT NULL,
    batch_size      integer  DEFAULT 10000
) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
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
        SELECT ctid FROM job_dlq
         WHERE replayed_at IS NOT NULL AND replayed_at < now() - replayed_before
         ORDER BY replayed_at
         LIMIT batch_size
    )
    DELETE FROM job_dlq j
     WHERE j.ctid = ANY (ARRAY(SELECT d.ctid FROM doomed d))
       AND j.replayed_at IS NOT NULL AND j.replayed_at < now() - replayed_before;
    GET DIAGNOSTICS deleted = ROW_COUNT;

    IF pending_before IS NOT NULL AND deleted < batch_size THEN
        WITH doomed AS (
            SELECT ctid FROM job_dlq
             WHERE replayed_at IS NULL AND dlq_at < now() - pending_before
             ORDER BY dlq_at, id
             LIMIT batch_size - deleted
               FOR UPDATE SKIP LOCKED
        )
        DELETE FROM job_dlq j
         WHERE j.ctid = ANY (ARRAY(SELECT d.ctid FROM doomed d))
           AND j.replayed_at IS NULL AND j.dlq_at < now() - pending_before;
        GET DIAGNOSTICS more = ROW_COUNT;
        deleted := deleted + more;
    END IF;

    PERFORM set_config('dlqd.maintenance', '', true);
    RETURN deleted;
END
$$;
SELECT dlqd_pin_search_path('job_dlq_purge(interval, interval, integer)');
