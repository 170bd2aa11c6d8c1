-- 009: statements every path shares, written once; operators park and unpark.

-- Marks rows replayed (those still pending), drops their schedule rows and
-- logs each replay, in the order of ids; returns the rows marked and how long
-- each was dead. Ordinary pages, express pages and manual replays all finish
-- through it, so that a replay is recorded the same way whichever way it went.
CREATE FUNCTION dlqd_finish_replayed(ids uuid[], policies text[], manual boolean,
                                     actor text, reason text)
RETURNS TABLE (id uuid, lag_seconds float8)
LANGUAGE sql
AS $$
    WITH marked AS (
        UPDATE job_dlq j SET replayed_at = now()
         WHERE j.id = ANY (ids) AND j.replayed_at IS NULL
        RETURNING j.id, j.original_job_id, j.app_id, j.dlq_at, j.replayed_at
    ), cleared AS (
        DELETE FROM dlqd_entry_state s WHERE s.dlq_id IN (SELECT m.id FROM marked m)
    ), logged AS (
        INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, policy, outcome, manual,
                                     actor, reason)
        SELECT m.id, m.original_job_id, m.app_id, u.policy, 'replayed', manual, actor, reason
          FROM marked m
          JOIN unnest(ids, policies) WITH ORDINALITY AS u(id, policy, n) ON u.id = m.id
         ORDER BY u.n
    )
    SELECT m.id, CASE WHEN isfinite(m.dlq_at)
                      THEN extract(epoch FROM m.replayed_at - m.dlq_at)::float8 END
      FROM marked m
$$;
REVOKE ALL ON FUNCTION dlqd_finish_replayed(uuid[], text[], boolean, text, text) FROM PUBLIC;

-- An operator parks a row by hand (`dlqd park`, the console): sticky like a
-- park by event, until a replay or an unpark, which is logged too. The new
-- checks admit every row the old ones did: NOT VALID skips rescanning tables
-- that may hold millions of rows, and they hold for every row written.
ALTER TABLE dlqd_entry_state DROP CONSTRAINT dlqd_entry_state_parked_reason_check;
ALTER TABLE dlqd_entry_state
    ADD CONSTRAINT dlqd_entry_state_parked_reason_check
    CHECK (parked_reason IN ('max_replays', 'max_failures', 'invalid_row', 'http_4xx', 'manual'))
    NOT VALID;
ALTER TABLE dlqd_replay_log DROP CONSTRAINT dlqd_replay_log_outcome_check;
ALTER TABLE dlqd_replay_log
    ADD CONSTRAINT dlqd_replay_log_outcome_check
    CHECK (outcome IN ('replayed', 'failed', 'parked', 'unparked')) NOT VALID;
