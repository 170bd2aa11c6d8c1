-- The express page (dlqd/replay/express.py): new rows whose first matching
-- policy needs no Python, decided, scheduled, replayed, marked and logged by
-- one statement per page. Composed by dlqd/db/compose.py: {case} is the first
-- matching policy (the policies' matches compiled to SQL), {targets} one CTE
-- per target (express_target), {gates} the lock slots and token buckets
-- (express_gates, or express_no_gates when no policy needs them), {sink_rows}
-- reads the SELECT targets (a SELECT
-- in a WITH runs only when read). Each target's `replayed` holds its
-- policies' rows as claimed (replayed_at still NULL), as in the ordinary
-- path, where the target runs before the rows are marked.

-- name: express_page
WITH candidates AS MATERIALIZED (
    -- the next inbox entries, locked (replicas take different ones): an index
    -- range scan whatever the filters below, which the planner cannot estimate
    SELECT i.seq, i.dlq_id
      FROM dlqd_inbox i
     WHERE i.seq > %(after_seq)s
     ORDER BY i.seq
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), picked AS MATERIALIZED (
    -- each entry's row by its primary key (a lateral subquery with a locking
    -- clause is never flattened into a join: no plan scans job_dlq whole),
    -- with what to do: park, wait (a schedule row) or replay; rows with none
    -- are left to the ordinary path. Never the payload: only its stored size.
    SELECT c.seq, c.dlq_id AS id, e.original_job_id, e.app_id, e.type, e.row_bytes,
           e.policy, e.action, e.due_at, e.replays
      FROM candidates c
     CROSS JOIN LATERAL (
            SELECT j.original_job_id, j.app_id, j.type,
                   pg_column_size(j.payload) + pg_column_size(j.error_history) AS row_bytes,
                   m.policy, d.action, k.due_at, r.replays
              FROM job_dlq j
             -- OFFSET 0: each computed once per row, not inlined wherever it is used
             CROSS JOIN LATERAL (SELECT {case} AS policy OFFSET 0) m
             CROSS JOIN LATERAL (
                    SELECT (%(kinds)s::text[])[m.policy + 1] AS kind,
                           -- the jitter's function only for policies with one
                           j.dlq_at + CASE WHEN (%(jitters)s::bigint[])[m.policy + 1] > 0
                                      THEN dlqd_jittered_us(j.id,
                                                            (%(delays)s::bigint[])[m.policy + 1],
                                                            (%(jitters)s::bigint[])[m.policy + 1])
                                      ELSE (%(delays)s::bigint[])[m.policy + 1] END
                                      * interval '1 microsecond' AS due_at
                    OFFSET 0) k
             CROSS JOIN LATERAL (
                    -- max_replays: the job's replays within the log's retention
                    -- (as of this statement: see chosen for what commits meanwhile)
                    SELECT CASE WHEN (%(max_replays)s::int[])[m.policy + 1] IS NOT NULL THEN (
                               SELECT count(*) FROM dlqd_replay_log l
                                WHERE l.app_id = j.app_id
                                  AND l.original_job_id = j.original_job_id
                                  AND l.outcome = 'replayed'
                                  AND l.at > now() - %(retention)s::interval) END AS replays
                    OFFSET 0) r
             CROSS JOIN LATERAL (
                    SELECT CASE
                           WHEN k.kind = 'park' THEN 'park'
                           -- exponential: known here for a job never replayed
                           WHEN k.kind = 'exp' AND EXISTS (
                                SELECT FROM dlqd_replay_log l
                                 WHERE l.app_id = j.app_id
                                   AND l.original_job_id = j.original_job_id
                                   AND l.outcome = 'replayed'
                                   AND l.at > now() - %(retention)s::interval) THEN NULL
                           -- as the ordinary path decides: parked, scheduled or not
                           WHEN r.replays >= (%(max_replays)s::int[])[m.policy + 1]
                                THEN 'park_max'
                           WHEN k.due_at > now() THEN 'wait'
                           WHEN m.policy = ANY (%(replayable)s::int[]) THEN 'replay'
                           END AS action
                    OFFSET 0) d
             WHERE j.id = c.dlq_id
               AND m.policy >= 0
               AND d.action IS NOT NULL
               AND j.replayed_at IS NULL
               AND dlqd_row_problem(j.dlq_at, j.app_id, j.type, j.error_reason,
                                    j.original_job_id) IS NULL
               AND NOT EXISTS (SELECT FROM dlqd_entry_state s WHERE s.dlq_id = j.id)
               FOR UPDATE OF j SKIP LOCKED
           ) e
), budgeted AS MATERIALIZED (
    -- rows to replay up to the page's byte budget (the first always): the
    -- rest stay in the inbox, for the ordinary path's smaller statements
    SELECT * FROM (
        SELECT p.*, sum(p.row_bytes) FILTER (WHERE p.action = 'replay')
                        OVER (ORDER BY p.seq) AS running_bytes,
               (%(max_replays)s::int[])[p.policy + 1] AS max_replays,
               -- the job's lock slot: only what max_replays counts needs one
               CASE WHEN (%(max_replays)s::int[])[p.policy + 1] IS NOT NULL
                    THEN dlqd_slot(json_build_array('job', p.app_id, p.original_job_id)::text)
                    END AS slot
          FROM picked p) r
     WHERE r.action <> 'replay' OR r.running_bytes - r.row_bytes < %(max_bytes)s
{gates}
), inbox AS (
    DELETE FROM dlqd_inbox WHERE seq IN (SELECT seq FROM chosen)
), states AS (
    INSERT INTO dlqd_entry_state (dlq_id, state, policy, fingerprint, due_at, failures,
                                  parked_reason, last_error)
    SELECT p.id,
           CASE p.action WHEN 'park' THEN 'parked_policy' WHEN 'park_max' THEN 'parked'
                ELSE 'waiting' END,
           (%(names)s::text[])[p.policy + 1], %(fingerprint)s,
           CASE WHEN p.action = 'wait' THEN p.due_at END, 0,
           CASE WHEN p.action = 'park_max' THEN 'max_replays' END,
           CASE WHEN p.action = 'park_max' THEN p.max_error END
      FROM chosen p
     WHERE p.action <> 'replay'
), parked_logged AS (
    -- a park policy's rows and those over max_replays, logged as the
    -- ordinary path logs them
    INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, policy, outcome, error, manual)
    SELECT p.id, p.original_job_id, p.app_id, (%(names)s::text[])[p.policy + 1], 'parked',
           CASE WHEN p.action = 'park' THEN 'parked by policy' ELSE p.max_error END,
           false
      FROM chosen p
     WHERE p.action IN ('park', 'park_max')
     ORDER BY p.seq
), marked AS (
    -- marked, unscheduled and logged as every path does (migrations 009, 010), in
    -- inbox order; by primary key, whatever the planner thinks of chosen
    SELECT f.id, f.lag_seconds AS lag
      FROM dlqd_finish_replayed(
               ARRAY(SELECT id FROM chosen WHERE action = 'replay' ORDER BY seq),
               ARRAY(SELECT (%(names)s::text[])[policy + 1] FROM chosen
                      WHERE action = 'replay' ORDER BY seq),
               false, NULL, NULL, NULL) f
)
{targets}
SELECT (SELECT count(*) FROM candidates) AS scanned,
       (SELECT max(seq) FROM candidates) AS last_seq,
       (SELECT count(*) FROM chosen) AS claimed,
       {sink_rows} AS sink_rows,  -- read: a SELECT target runs only when read
       (SELECT coalesce(json_agg(json_build_array(g.policy, g.action, g.bucket, g.n, g.lag_sum)),
                        '[]')
          FROM (SELECT p.policy, p.action,
                       -- bounds below the age: its bucket (lowest first, +Inf last)
                       coalesce(%(bucket_count)s
                                - width_bucket(-m.lag, %(negated_bounds)s::float8[]), 0)
                           AS bucket,
                       count(*) AS n, coalesce(sum(m.lag), 0) AS lag_sum
                  FROM chosen p
                  LEFT JOIN marked m ON m.id = p.id
                 GROUP BY 1, 2, 3) g) AS outcomes

-- name: express_target
-- One target of an express page, over the rows of its policies.
, {name} AS (
WITH replayed AS (SELECT j.* FROM job_dlq j
    WHERE j.id = ANY (ARRAY(SELECT p.id FROM chosen p
                             WHERE p.action = 'replay' AND p.policy = ANY ({policies}::int[]))))
{sink}
)

-- name: express_notify_sink
-- The notify target's messages, in inbox order (as notify_rows sends them).
SELECT count(pg_notify({channel}, m.message))
  FROM (SELECT dlqd_notify_message(r.id, r.original_job_id, r.app_id, r.type, {only_id})
                   AS message,
               p.seq
          FROM replayed r JOIN chosen p ON p.id = r.id
         ORDER BY p.seq) AS m

-- name: express_row_sink
-- A per-row target in its in-server form (migration 017): {function} called
-- once per row, in inbox order (after the sort: volatile), each row as claimed.
SELECT count(*) AS n
  FROM (SELECT {function}(r::job_dlq) FROM replayed r JOIN chosen p ON p.id = r.id
         ORDER BY p.seq) AS calls

-- name: express_sink_rows
(SELECT count(*) FROM {name})


-- name: express_gates
-- Composed into express_page when some express policy has max_replays or a
-- rate limit: the slots and buckets its rows replay under (see chosen).
), slots AS MATERIALIZED (
    -- the lock slots of the jobs replayed under max_replays (the ordinary
    -- path's lock_slots, the same keys): SKIP LOCKED, never waited for
    SELECT s.slot, s.writer FROM dlqd_lock_slots s
     WHERE s.slot IN (SELECT b.slot FROM budgeted b
                       WHERE b.action = 'replay' AND b.max_replays IS NOT NULL)
     ORDER BY s.slot
       FOR UPDATE SKIP LOCKED
), gated AS MATERIALIZED (
    -- a job under max_replays replays with its slot held, and only when this
    -- statement's snapshot sees the slot's last writer (else a replay of it
    -- committed meanwhile: deferred, the ordinary path recounts); the page's
    -- returns of one job count one after another. Deferred rows (action NULL)
    -- stay in the inbox.
    SELECT b.seq, b.id, b.original_job_id, b.app_id, b.type, b.row_bytes, b.policy,
           b.due_at, b.max_replays, b.slot,
           (%(rates)s::float8[])[b.policy + 1] AS rate,
           CASE WHEN (%(rate_per_app)s::bool[])[b.policy + 1] THEN b.app_id ELSE '' END
               AS scope,
           CASE WHEN b.action <> 'replay' OR b.max_replays IS NULL THEN b.action
                WHEN NOT EXISTS (
                     SELECT FROM slots s
                      WHERE s.slot = b.slot
                        AND (s.writer IS NULL
                             OR pg_visible_in_snapshot(s.writer, pg_current_snapshot())))
                     THEN NULL
                WHEN b.replays + row_number() OVER (
                         PARTITION BY b.app_id, b.original_job_id,
                                      b.action = 'replay' AND b.max_replays IS NOT NULL
                         ORDER BY b.seq) > b.max_replays
                     THEN 'park_max'
                ELSE 'replay' END AS action
      FROM budgeted b
), buckets AS MATERIALIZED (
    -- the token buckets of the page's rate-limited rows (the ordinary path's
    -- buckets_take, the same rows): refilled for the time since they were
    -- touched, locked SKIP LOCKED (a bucket another replica holds, or one not
    -- made yet: no tokens now, its rows take the ordinary path)
    SELECT b.policy AS name, b.scope, w.policy,
           least(w.burst, b.tokens + greatest(0, extract(epoch FROM clock_timestamp()
                                                                   - b.updated_at))
                                     * w.rate) AS available
      FROM dlqd_rate_buckets b
      JOIN (SELECT DISTINCT g.policy, (%(names)s::text[])[g.policy + 1] AS name, g.scope,
                   g.rate, (%(bursts)s::float8[])[g.policy + 1] AS burst
              FROM gated g
             WHERE g.action = 'replay' AND g.rate IS NOT NULL) w
        ON b.policy = w.name AND b.scope = w.scope
     ORDER BY b.policy, b.scope
       FOR UPDATE OF b SKIP LOCKED
), chosen AS MATERIALIZED (
    -- a rate-limited policy's rows replay as far as its bucket's whole tokens
    -- go, in inbox order; the rest stay in the inbox (the ordinary path
    -- schedules them for the next token)
    SELECT * FROM (
        SELECT g.seq, g.id, g.original_job_id, g.app_id, g.type, g.row_bytes, g.policy,
               g.due_at, g.max_replays, g.slot, g.rate, g.scope,
               CASE WHEN g.action IS NULL THEN NULL
                    WHEN g.action <> 'replay' OR g.rate IS NULL THEN g.action
                    WHEN row_number() OVER (
                             PARTITION BY g.policy, g.scope,
                                          g.action = 'replay' AND g.rate IS NOT NULL
                             ORDER BY g.seq) <= coalesce(floor(k.available), 0)
                         THEN 'replay'
                    END AS action,
               -- what a row over max_replays is parked and logged with
               CASE WHEN g.action = 'park_max'
                    THEN format('max_replays (%%s) reached for job %%s', g.max_replays,
                                left(g.original_job_id, 200)) END AS max_error
          FROM gated g
          LEFT JOIN buckets k ON k.policy = g.policy AND k.scope = g.scope) r
     WHERE r.action IS NOT NULL
), taken AS (
    UPDATE dlqd_rate_buckets b
       SET tokens = k.available - t.n, updated_at = clock_timestamp()
      FROM buckets k
      JOIN (SELECT c.policy, c.scope, count(*) AS n FROM chosen c
             WHERE c.action = 'replay' AND c.rate IS NOT NULL
             GROUP BY 1, 2) t ON t.policy = k.policy AND t.scope = k.scope
     WHERE b.policy = k.name AND b.scope = k.scope
), stamped AS (
    UPDATE dlqd_lock_slots s SET writer = pg_current_xact_id()
     WHERE s.slot IN (SELECT c.slot FROM chosen c
                       WHERE c.action = 'replay' AND c.max_replays IS NOT NULL)

-- name: express_no_gates
-- Composed into express_page otherwise: nothing to lock, count or take.
), chosen AS MATERIALIZED (
    -- no policy counts replays or takes tokens: the budgeted rows as they are
    SELECT b.seq, b.id, b.original_job_id, b.app_id, b.type, b.row_bytes, b.policy,
           b.due_at, b.max_replays, b.slot, NULL::float8 AS rate, ''::text AS scope, b.action,
           NULL::text AS max_error
      FROM budgeted b
