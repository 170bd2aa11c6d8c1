-- 017: a per-row target's statement run for many rows by one statement.
--   A per-row `sql` target (placeholders, `INSERT ... VALUES (%(id)s, ...)`)
--   ran once per row from the daemon: a statement and a bind per row, even
--   pipelined. Its in-server form reads each placeholder from the row
--   itself, ($1).column, with $1 the row as claimed (job_dlq's row type).
--   The daemon defines it as a SQL function of the session's own temporary
--   schema (pg_temp.dlqd_row_<hash of the text>(job_dlq)), and one query
--   calls it once per row, in order: an express page, or a group of the
--   ordinary path's page (whose bisection on failure calls it on each half).
--   A SQL function's statement is planned once per query that calls it, not
--   once per row as EXECUTE in PL/pgSQL would be.
--   SECURITY INVOKER, and a function of the caller's own session: the
--   statement runs with the caller's rights and search_path, exactly as the
--   same statement sent by the daemon would. It needs TEMPORARY on the
--   database (PUBLIC has it unless revoked; dlqd then keeps the client form).
CREATE FUNCTION dlqd_define_row_function(name text, statement text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
    IF name !~ '^dlqd_row_[0-9a-f]{32}$' THEN
        RAISE EXCEPTION 'not a per-row function name: %', name;
    END IF;
    IF to_regprocedure(format('pg_temp.%I(job_dlq)', name)) IS NULL THEN
        EXECUTE format('CREATE FUNCTION pg_temp.%I(job_dlq) RETURNS void LANGUAGE sql VOLATILE AS %L',
                       name, statement);
    END IF;
END
$$;
COMMENT ON FUNCTION dlqd_define_row_function(text, text) IS
    'Defines a per-row target''s in-server form for this session (dlqd/replay/targets.py).';
REVOKE ALL ON FUNCTION dlqd_define_row_function(text, text) FROM PUBLIC;
