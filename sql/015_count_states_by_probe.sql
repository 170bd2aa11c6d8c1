-- 015: the schedule's count trigger reads each changed row's group by its
-- primary key, never by scanning job_dlq.
--   * dlqd_count_states (012) joined the statement's schedule rows to job_dlq
--     and let the planner choose: for a page of a few thousand rows it hashed
--     the whole table (a sequential scan of every dead letter, per page: the
--     cost of scheduling grew with the table, not with the page). Each group
--     is now one index probe of job_dlq's primary key per row (a LATERAL
--     subquery with LIMIT 1, which the planner cannot flatten into a join).
--   * an UPDATE that changes no row's kind (a reschedule: a new due time, a
--     failure counted) writes nothing and reads job_dlq not at all: only the
--     rows whose kind changed are looked up.

CREATE OR REPLACE FUNCTION dlqd_count_states() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    previous text := current_setting('dlqd.maintenance', true);
BEGIN
    PERFORM set_config('dlqd.maintenance', 'on', true);
    IF TG_OP = 'INSERT' THEN
        INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
        SELECT g.app_id, g.type, g.error_reason, dlqd_state_kind(s.state, s.parked_reason),
               count(*)
          FROM new_states s
         CROSS JOIN LATERAL (SELECT j.app_id, j.type, j.error_reason FROM job_dlq j
                              WHERE j.id = s.dlq_id LIMIT 1) g
         GROUP BY 1, 2, 3, 4;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
        SELECT g.app_id, g.type, g.error_reason, dlqd_state_kind(s.state, s.parked_reason),
               -count(*)
          FROM old_states s
         CROSS JOIN LATERAL (SELECT j.app_id, j.type, j.error_reason FROM job_dlq j
                              WHERE j.id = s.dlq_id LIMIT 1) g
         GROUP BY 1, 2, 3, 4;
    ELSE
        -- the rows whose kind changed, as +1 for the new kind and -1 for the
        -- old; a row whose dlq_id changed (nothing of dlqd's does that) counts
        -- as one leaving and one arriving
        INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
        SELECT g.app_id, g.type, g.error_reason, d.kind, sum(d.n)
          FROM (SELECT n.dlq_id AS new_id, o.dlq_id AS old_id,
                       dlqd_state_kind(n.state, n.parked_reason) AS new_kind,
                       dlqd_state_kind(o.state, o.parked_reason) AS old_kind
                  -- a FULL JOIN is hashed or merged, never a nested loop over
                  -- two unindexed transition tables
                  FROM new_states n FULL JOIN old_states o ON o.dlq_id = n.dlq_id) c
         CROSS JOIN LATERAL (VALUES (c.new_id, c.new_kind, 1), (c.old_id, c.old_kind, -1))
                 AS d (dlq_id, kind, n)
         CROSS JOIN LATERAL (SELECT j.app_id, j.type, j.error_reason FROM job_dlq j
                              WHERE j.id = d.dlq_id LIMIT 1) g
         WHERE d.dlq_id IS NOT NULL
           AND (c.new_id IS NULL OR c.old_id IS NULL OR c.new_kind IS DISTINCT FROM c.old_kind)
         GROUP BY 1, 2, 3, 4
        HAVING sum(d.n) <> 0;
    END IF;
    PERFORM set_config('dlqd.maintenance', coalesce(previous, ''), true);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION dlqd_count_states() FROM PUBLIC;
SELECT dlqd_pin_search_path('dlqd_count_states()');
