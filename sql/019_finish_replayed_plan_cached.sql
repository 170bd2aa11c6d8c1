-- 019: every replay's finish planned once per session, not once per call.
--   dlqd_finish_replayed (migration 012) was a SQL function whose body, a
--   statement with data-modifying CTEs, cannot be inlined: Postgres planned
--   it again on every call. An express page of one row (a trickle: a page
--   per row) spent 0.4 to 0.8 ms of its 1.2 ms there. The same statement in
--   PL/pgSQL is planned once per session and kept, as every PL/pgSQL
--   statement is. Same signature, same rows written and returned; EXECUTE
--   granted as before (CREATE OR REPLACE keeps the grants).
CREATE OR REPLACE FUNCTION dlqd_finish_replayed(ids uuid[], policies text[], manual boolean,
                                                actor text, reason text, redrive uuid)
RETURNS TABLE (id uuid, lag_seconds float8)
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN QUERY
    WITH marked AS (
        UPDATE job_dlq j SET replayed_at = now()
         WHERE j.id = ANY (ids) AND j.replayed_at IS NULL
        RETURNING j.id, j.original_job_id, j.app_id, j.type, j.error_reason, j.dlq_at,
                  j.replayed_at
    ), cleared AS (
        DELETE FROM dlqd_entry_state s WHERE s.dlq_id IN (SELECT m.id FROM marked m)
    ), counted AS (
        INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
        SELECT m.app_id, m.type, m.error_reason, 'pending', -count(*)
          FROM marked m GROUP BY 1, 2, 3
    ), logged AS (
        INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, policy, outcome, manual,
                                     actor, reason, redrive_id)
        SELECT m.id, m.original_job_id, m.app_id, u.policy, 'replayed', manual, actor, reason,
               redrive
          FROM marked m
          JOIN unnest(ids, policies) WITH ORDINALITY AS u(id, policy, n) ON u.id = m.id
         ORDER BY u.n
    )
    SELECT m.id, CASE WHEN isfinite(m.dlq_at)
                      THEN extract(epoch FROM m.replayed_at - m.dlq_at)::float8 END
      FROM marked m;
END
$$;
