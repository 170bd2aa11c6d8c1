-- 017: a per-row target's statement run for many rows by one call.
--   A per-row `sql` target (placeholders, `INSERT ... VALUES (%(id)s, ...)`)
--   used to run once per row from the daemon (pipelined, but a statement and
--   a bind per row). Its in-server form reads each placeholder from the row
--   itself, ($1).column, with $1 the row as claimed (job_dlq's row type), and
--   dlqd_replay_rows runs it once per row, in order, inside one statement:
--   an express page, or one chunk of the ordinary path's page (whose
--   bisection on failure calls it again on each half).
--   SECURITY INVOKER: the statement runs with the caller's rights and
--   search_path, exactly as the same statement sent by the daemon would.
CREATE FUNCTION dlqd_replay_rows(statement text, rows job_dlq[]) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
    r job_dlq;
    n bigint := 0;
BEGIN
    FOREACH r IN ARRAY rows LOOP
        EXECUTE statement USING r;
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION dlqd_replay_rows(text, job_dlq[]) IS
    'Runs a per-row target''s in-server form once per row, in order (dlqd/replay/targets.py).';
REVOKE ALL ON FUNCTION dlqd_replay_rows(text, job_dlq[]) FROM PUBLIC;
