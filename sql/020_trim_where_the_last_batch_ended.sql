-- 020: the replay log trimmed from where the last batch ended.
--   dlqd_trim_replay_log (migration 010) deletes the oldest batch_size
--   entries past retention on each call: every batch's index scan starts at
--   the oldest end of the log, where the entries the earlier batches deleted
--   stay in the index until a vacuum. While anything holds the horizon back
--   (a vacuum of the same big table does) they are not even marked dead, and
--   each batch visits the heap tuple of every one of them: at 50,000,000
--   entries the trim fell to 1,079 entries/s after 6.5 million
--   (bench/purge_bench.py --log-rows). dlqd_trim_replay_log_after takes the
--   `at` the last batch reached and starts there; the first batch (after
--   null) also trims the hourly outcomes, as the two-argument form does on
--   every call. Its entries are deleted by tuple id, not joined back by id
--   (a batch of 10,000 took 11 ms instead of 19). The two-argument form
--   stays, for callers of its own.
CREATE FUNCTION dlqd_trim_replay_log_after(older_than interval, batch_size integer,
                                           after timestamptz)
RETURNS TABLE (deleted bigint, reached timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    IF older_than IS NULL OR batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'dlqd_trim_replay_log_after: older_than and a batch_size >= 1 are required';
    END IF;
    -- `at >= after`, not `>`: entries of one transaction share their `at`, and
    -- the last batch may have stopped among them. Deleted by their tuple ids
    -- (a TID scan), not joined back by id: half the buffers a batch touches,
    -- and the same snapshot (the age test again guards against anything else).
    WITH doomed AS (
        SELECT l.ctid FROM dlqd_replay_log l
         WHERE l.at < now() - older_than AND l.at >= coalesce(after, '-infinity')
         ORDER BY l.at
         LIMIT batch_size
    ), gone AS (
        DELETE FROM dlqd_replay_log l
         WHERE l.ctid = ANY (ARRAY(SELECT d.ctid FROM doomed d))
           AND l.at < now() - older_than
        RETURNING l.at
    )
    SELECT count(*), max(gone.at) INTO deleted, reached FROM gone;
    IF after IS NULL THEN
        DELETE FROM dlqd_replay_hours WHERE hour < date_trunc('hour', now() - older_than);
    END IF;
    RETURN NEXT;
END
$$;
REVOKE ALL ON FUNCTION dlqd_trim_replay_log_after(interval, integer, timestamptz) FROM PUBLIC;
SELECT dlqd_pin_search_path('dlqd_trim_replay_log_after(interval, integer, timestamptz)');
-- the daemon's grant at once (sql/roles.sql grants it too), so that a
-- deployment whose role script has not run again yet keeps trimming
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'dlqd') THEN
        GRANT EXECUTE ON FUNCTION dlqd_trim_replay_log_after(interval, integer, timestamptz)
            TO dlqd;
    END IF;
END
$$;
