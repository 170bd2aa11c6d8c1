-- Named queries used by dlqd. Each starts with a "-- name: <name>" line.
-- Parameters are psycopg named placeholders; values are always bound.

-- name: get_entry
SELECT id, original_job_id, app_id, type, payload, error_reason, attempts,
       error_history, dlq_at, replayed_at, request_id, user_id
  FROM job_dlq
 WHERE id = %(id)s

-- name: insert_entry
INSERT INTO job_dlq (id, original_job_id, app_id, type, payload, error_reason,
                     attempts, error_history, dlq_at, request_id, user_id)
VALUES (coalesce(%(id)s, gen_random_uuid()), %(original_job_id)s, %(app_id)s, %(type)s,
        %(payload)s, %(error_reason)s, %(attempts)s, %(error_history)s,
        coalesce(%(dlq_at)s, now()), %(request_id)s, %(user_id)s)
RETURNING id, original_job_id, app_id, type, payload, error_reason, attempts,
          error_history, dlq_at, replayed_at, request_id, user_id

-- name: mark_replayed
UPDATE job_dlq SET replayed_at = now()
 WHERE id = %(id)s AND replayed_at IS NULL
RETURNING replayed_at

-- fragment: pending_columns
-- What a listed row shows: the row's keys and the state the daemon recorded.
j.id, j.dlq_at, j.original_job_id, j.app_id, j.type, j.error_reason, j.attempts,
       CASE WHEN s.state IS NULL THEN 'new'
            WHEN s.state IN ('parked', 'parked_policy') THEN 'parked'
            ELSE s.state END AS state,
       s.policy, s.due_at, coalesce(s.failures, 0) AS failures, s.last_error,
       CASE WHEN s.state = 'parked_policy' THEN 'policy' ELSE s.parked_reason END
           AS parked_reason

-- fragment: pending_filters
-- A filter's conditions on a pending row j and its schedule row s, but the
-- state: dead-lettered up to `until` (a redrive's creation), globs as
-- regexes (OR within a field, AND across fields), the recorded policy, a
-- document the payload contains (job_dlq_pending_payload_idx), text the last
-- error contains (the job system's last entry in error_history, or the last
-- failed replay's).
(%(until)s::timestamptz IS NULL OR j.dlq_at <= %(until)s::timestamptz)
   AND (%(app_ids)s::text[] IS NULL OR j.app_id ~ ANY (%(app_ids)s::text[]))
   AND (%(types)s::text[] IS NULL OR j.type ~ ANY (%(types)s::text[]))
   AND (%(error_reasons)s::text[] IS NULL OR j.error_reason ~ ANY (%(error_reasons)s::text[]))
   AND (%(policies)s::text[] IS NULL OR s.policy = ANY (%(policies)s::text[]))
   AND (%(payload)s::jsonb IS NULL OR j.payload @> %(payload)s::jsonb)
   AND (%(error)s::text IS NULL
        OR strpos(lower(coalesce(j.error_history -> -1 #>> '{}', '')), lower(%(error)s::text)) > 0
        OR strpos(lower(coalesce(s.last_error, '')), lower(%(error)s::text)) > 0)

-- fragment: pending_selected
-- The pending rows a filter selects, in keyset order on (dlq_at, id)
-- (job_dlq_pending_dlq_at_id_idx), never by OFFSET: after the cursor.
SELECT {{pending_columns}}
  FROM job_dlq j
  LEFT JOIN dlqd_entry_state s ON s.dlq_id = j.id
 WHERE j.replayed_at IS NULL
   AND (%(after_dlq_at)s::timestamptz IS NULL
        OR (j.dlq_at, j.id) > (%(after_dlq_at)s::timestamptz, %(after_id)s::uuid))
   AND (%(states)s::text[] IS NULL
        OR CASE WHEN s.state IS NULL THEN 'new'
                WHEN s.state IN ('parked', 'parked_policy') THEN 'parked'
                ELSE s.state END = ANY (%(states)s::text[]))
   AND {{pending_filters}}
 ORDER BY j.dlq_at, j.id

-- fragment: parked_selected
-- The same for a filter of parked rows alone (`--state parked`, so no state
-- condition but the index's own, which the planner estimates well): a range scan
-- of the parked schedule rows in the same (dlq_at, id) order
-- (dlqd_entry_state_parked_at_idx, migration 018), each row by its key,
-- instead of a walk of every pending row.
SELECT {{pending_columns}}
  FROM dlqd_entry_state s
  JOIN job_dlq j ON j.id = s.dlq_id
 WHERE s.state IN ('parked', 'parked_policy')
   AND j.replayed_at IS NULL
   AND (%(after_dlq_at)s::timestamptz IS NULL
        OR (s.parked_dlq_at, s.dlq_id) > (%(after_dlq_at)s::timestamptz, %(after_id)s::uuid))
   AND {{pending_filters}}
 ORDER BY s.parked_dlq_at, s.dlq_id

-- fragment: listed_rows
-- A page's rows as `dlqd list` and the console show them. `document` (the
-- row as JSON text, payload included, with the keys `redact` names masked by
-- Postgres) only when asked for: a table of rows needs no payload. Keys as
-- text, cut.
SELECT l.id, left(l.original_job_id, 200) AS original_job_id, left(l.app_id, 200) AS app_id,
       left(l.type, 200) AS type, left(l.error_reason, 200) AS error_reason, l.attempts,
       to_json(l.dlq_at) #>> '{}' AS dlq_at, l.state, l.policy,
       to_json(l.due_at) #>> '{}' AS due_at, l.failures, l.last_error, l.parked_reason,
       CASE WHEN %(documents)s THEN
           (to_jsonb(j) || jsonb_build_object(
               'payload', dlqd_redact(j.payload, %(redact)s::text[]),
               'error_history', dlqd_redact(j.error_history, %(redact)s::text[]),
               'state', l.state, 'policy', l.policy, 'due_at', l.due_at,
               'failures', l.failures, 'last_error', l.last_error,
               'parked_reason', l.parked_reason))::text
       END AS document
  FROM listed l
  JOIN job_dlq j ON j.id = l.id
 ORDER BY l.dlq_at, l.id

-- name: list_pending
-- A page of `dlqd list` and of the console.
WITH listed AS (
    {{pending_selected}}
     LIMIT %(limit)s
)
{{listed_rows}}

-- name: list_parked
-- The same page when the filter asks for parked rows alone.
WITH listed AS (
    {{parked_selected}}
     LIMIT %(limit)s
)
{{listed_rows}}

-- name: count_pending
-- The pending rows a filter selects, counted up to `cap` (NULL: all of them).
SELECT count(*) AS n FROM ({{pending_selected}} LIMIT %(cap)s) AS selected

-- name: count_parked
-- The same for a filter of parked rows alone.
SELECT count(*) AS n FROM ({{parked_selected}} LIMIT %(cap)s) AS selected

-- name: migrations_try_lock
-- Serialises `dlqd migrate` runs (a session lock: the table it would guard
-- may not exist yet). Any role may take an advisory lock: the caller waits a
-- bounded time, saying who holds it (migrations_lock_holder).
SELECT pg_try_advisory_lock(hashtextextended('dlqd:migrate', 0)) AS locked

-- name: migrations_lock_holder
SELECT a.pid, a.usename, a.application_name, a.backend_start
  FROM pg_locks l
  JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
           SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.objsubid = 1
   AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended('dlqd:migrate', 0)
 LIMIT 1

-- name: migrations_unlock
SELECT pg_advisory_unlock(hashtextextended('dlqd:migrate', 0))

-- name: migration_timeouts
-- A migration waits a bounded time for the tables it changes (a tenant may
-- hold a lock on job_dlq that an ALTER or CREATE INDEX would wait behind).
SELECT set_config('lock_timeout', %(lock_timeout)s, true)

-- name: migration_session_timeouts
-- A migration that runs outside a transaction: the same bound, for the session
-- (reset to 0, no bound, once it is done).
SELECT set_config('lock_timeout', %(lock_timeout)s, false)

-- name: index_invalid
-- An index an interrupted CREATE INDEX CONCURRENTLY left invalid.
SELECT NOT i.indisvalid AS invalid FROM pg_index i WHERE i.indexrelid = to_regclass(%(name)s)

-- name: migrations_create_table
CREATE TABLE IF NOT EXISTS dlqd_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: migrations_table_exists
SELECT to_regclass('dlqd_schema_migrations') IS NOT NULL AS present

-- name: migrations_applied
SELECT version, name, checksum FROM dlqd_schema_migrations ORDER BY version

-- name: migrations_record
INSERT INTO dlqd_schema_migrations (version, name, checksum)
VALUES (%(version)s, %(name)s, %(checksum)s)

-- name: replay_history
SELECT at, policy, outcome, error, manual, actor, reason, redrive_id
  FROM dlqd_replay_log
 WHERE dlq_id = %(id)s
 ORDER BY at, id

-- name: backend_pid
SELECT pg_backend_pid() AS pid

-- name: pooler_probe
SELECT 'dlqd pooler probe' AS probe

-- name: pooler_probe_prepared
-- psycopg names the statements it prepares _pg3_0, _pg3_1, ...: seen on the
-- server as such, a pooler in between passes our names through.
SELECT count(*) AS ours FROM pg_prepared_statements
 WHERE statement = %(probe)s AND starts_with(name, '_pg3_')

-- name: ping
SELECT current_setting('server_version_num')::int AS server_version_num

-- fragment: narrow_row
-- The narrow row (dlqd/replay/rows.py), over job_dlq j, the row_problem
-- join p and the schedule row s (LEFT JOINed where it may be missing).
j.id, left(j.original_job_id, 2049) AS original_job_id, left(j.app_id, 2049) AS app_id,
       left(j.type, 2049) AS type, left(j.error_reason, 2049) AS error_reason, j.attempts,
       CASE WHEN p.problem IS NULL THEN j.dlq_at END AS dlq_at, p.problem,
       j.replayed_at IS NOT NULL AS replayed,
       pg_column_size(j.payload) + pg_column_size(j.error_history) AS row_bytes,
       coalesce(s.failures, 0) AS failures, s.last_failure_at, s.last_error, s.state,
       s.policy AS scheduled_policy

-- fragment: row_problem
CROSS JOIN LATERAL (SELECT dlqd_row_problem(j.dlq_at, j.app_id, j.type, j.error_reason,
                                            j.original_job_id) AS problem) p

-- The claim queries below return a *narrow* row: the columns a policy
-- decides on, never payload or error_history (targets read those inside
-- Postgres), only their stored size (row_bytes: read from the value's header,
-- never decompressed), so that a target runs over a bounded number of bytes. A row that cannot be decided comes back with `problem` set, its
-- dlq_at NULL and its key columns cut short, so nothing unreadable crosses
-- into the daemon (dlqd_row_problem, migration 003).

-- name: inbox_entries
-- Rows inserted since dlqd last looked, in insertion order. Locked (inbox and
-- row) so that replicas split them and a manual replay waits for us. Driven by
-- the inbox's primary key; a candidates CTE would be simpler to plan but lets
-- replicas collide on the same unlocked candidates.
SELECT {{narrow_row}}, i.seq, now() AS db_now
  FROM dlqd_inbox i
  JOIN job_dlq j ON j.id = i.dlq_id
  {{row_problem}}
  LEFT JOIN dlqd_entry_state s ON s.dlq_id = i.dlq_id
 WHERE i.seq > %(after_seq)s
 ORDER BY i.seq
 LIMIT %(limit)s
   FOR UPDATE OF i, j SKIP LOCKED

-- name: stale_entries
-- Scheduled rows that other policies (another fingerprint) evaluated: after
-- a config change, or rows a replica with another config left behind.
-- Candidates from dlqd_entry_state_fingerprint_idx, as a range scan: rare
-- work (policy changes), so replicas colliding on a candidate only shortens a
-- page; the rest waits for the next periodic scan.
WITH candidates AS MATERIALIZED (
    SELECT fingerprint, dlq_id FROM dlqd_entry_state
     WHERE state <> 'parked'
       AND (fingerprint, dlq_id) > (%(after_fingerprint)s, %(after_id)s::uuid)
       AND (%(below)s::text IS NULL OR fingerprint < %(below)s)
       AND fingerprint <> %(fingerprint)s
     ORDER BY fingerprint, dlq_id
     LIMIT %(limit)s
)
SELECT {{narrow_row}},
       c.fingerprint, NULL::bigint AS seq, now() AS db_now
  FROM candidates c
  JOIN dlqd_entry_state s ON s.dlq_id = c.dlq_id
  JOIN job_dlq j ON j.id = c.dlq_id
  {{row_problem}}
 WHERE s.state <> 'parked' AND s.fingerprint <> %(fingerprint)s AND j.replayed_at IS NULL
 ORDER BY c.fingerprint, c.dlq_id
   FOR UPDATE OF s, j SKIP LOCKED

-- name: delete_inbox
DELETE FROM dlqd_inbox WHERE seq = ANY (%(seqs)s::bigint[])

-- name: enqueue_orphans
-- Safety net for rows that reached job_dlq without the trigger (restores with
-- session_replication_role = replica, a disabled trigger): pending rows with
-- neither an inbox entry nor a schedule go to the inbox. One keyset page of
-- the pending set at a time (job_dlq_pending_dlq_at_id_idx), each row probed
-- in the two primary/unique indexes: O(page log n) whatever the statistics
-- say (the caller's transaction turns off the plans that could loop over a
-- whole table per row: sweep_plans). Returns the page's last key.
WITH page AS MATERIALIZED (
    SELECT j.id, j.dlq_at FROM job_dlq j
     WHERE j.replayed_at IS NULL
       AND (%(after_dlq_at)s::timestamptz IS NULL
            OR (j.dlq_at, j.id) > (%(after_dlq_at)s::timestamptz, %(after_id)s::uuid))
     ORDER BY j.dlq_at, j.id
     LIMIT %(limit)s
), orphans AS (
    INSERT INTO dlqd_inbox (dlq_id)
    SELECT p.id FROM page p
     WHERE NOT EXISTS (SELECT FROM dlqd_entry_state s WHERE s.dlq_id = p.id)
       AND NOT EXISTS (SELECT FROM dlqd_inbox i WHERE i.dlq_id = p.id)
     ORDER BY p.dlq_at, p.id
    ON CONFLICT (dlq_id) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM orphans) AS moved, (SELECT count(*) FROM page) AS scanned,
       (SELECT to_json(dlq_at) #>> '{}' FROM page ORDER BY dlq_at DESC, id DESC LIMIT 1)
           AS last_dlq_at,
       (SELECT id FROM page ORDER BY dlq_at DESC, id DESC LIMIT 1) AS last_id

-- name: sweep_plans
-- For the sweep's transaction: index probes only (statistics taken while the
-- inbox was empty made a nested loop over a materialised inbox look cheap:
-- 30,000 new rows then took 15 s), under a statement timeout.
SELECT set_config('enable_seqscan', 'off', true), set_config('enable_material', 'off', true),
       set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true),
       set_config('statement_timeout', %(statement_timeout)s, true),
       set_config('lock_timeout', %(lock_timeout)s, true)

-- name: due_entries
-- Scheduled rows whose time has come, oldest due first, skipping the policies
-- and tenants that are throttled right now (dlqd_entry_state_due_idx).
SELECT {{narrow_row}},
       NULL::bigint AS seq, now() AS db_now
  FROM dlqd_entry_state s
  JOIN job_dlq j ON j.id = s.dlq_id
  {{row_problem}}
 WHERE s.state = 'waiting'
   AND s.fingerprint = %(fingerprint)s
   AND s.due_at <= now()
   AND j.replayed_at IS NULL
   AND s.policy <> ALL (%(blocked_policies)s::text[])
   AND (s.policy, j.app_id) NOT IN (
         SELECT * FROM unnest(%(blocked_pair_policies)s::text[], %(blocked_pair_apps)s::text[]))
 ORDER BY s.due_at
 LIMIT %(limit)s
   FOR UPDATE OF s, j SKIP LOCKED

-- name: next_due
-- One entry of dlqd_entry_state_due_idx.
SELECT extract(epoch FROM due_at - now())::float8 AS seconds
  FROM dlqd_entry_state
 WHERE state = 'waiting' AND fingerprint = %(fingerprint)s
 ORDER BY due_at
 LIMIT 1

-- name: replay_counts
-- Successful replays of each (app_id, original_job_id) within the log's
-- retention (dlqd_replay_log_job_idx).
SELECT u.app_id, u.original_job_id, count(*) AS replays
  FROM unnest(%(app_ids)s::text[], %(original_job_ids)s::text[]) AS u(app_id, original_job_id)
  JOIN dlqd_replay_log l ON l.app_id = u.app_id AND l.original_job_id = u.original_job_id
 WHERE l.outcome = 'replayed' AND l.at > now() - %(retention)s::interval
 GROUP BY u.app_id, u.original_job_id

-- name: lock_slots
-- Try-locks the slots of keys (dlqd_lock_slots, migration 008) for this
-- transaction, never waiting: the keys whose slot it now holds. A replica
-- replaying returns of a job under max_replays holds the job's slot, so that
-- another replica replaying a return of the same job defers it. Tenants cannot
-- lock these rows (advisory locks, by contrast, are anyone's to take).
-- A job's slot is computed here, from (app_id, original_job_id), as the
-- express page computes it.
WITH wanted AS (
    SELECT k.app_id, k.original_job_id,
           dlqd_slot(json_build_array('job', k.app_id, k.original_job_id)::text) AS slot
      FROM unnest(%(app_ids)s::text[], %(job_ids)s::text[]) AS k(app_id, original_job_id)
), locked AS MATERIALIZED (
    SELECT s.slot FROM dlqd_lock_slots s
     WHERE s.slot IN (SELECT slot FROM wanted)
     ORDER BY s.slot
       FOR UPDATE SKIP LOCKED
), stamped AS (
    -- so that an express page whose statement began before this transaction
    -- commits defers these jobs instead of counting without it (migration 016)
    UPDATE dlqd_lock_slots s SET writer = pg_current_xact_id()
     WHERE s.slot IN (SELECT slot FROM locked)
)
SELECT w.app_id, w.original_job_id FROM wanted w JOIN locked l ON l.slot = w.slot

-- name: relock_rows
-- Rows taken up again in a new transaction (one half of a batch that failed
-- at commit; rows an http target has answered for): still pending, and (for
-- the daemon) not parked meanwhile.
SELECT j.id, now() AS db_now
  FROM job_dlq j
 WHERE j.id = ANY (%(ids)s::uuid[])
   AND j.replayed_at IS NULL
   AND (%(manual)s OR NOT EXISTS (SELECT FROM dlqd_entry_state s
                                   WHERE s.dlq_id = j.id AND s.state = 'parked'))
   FOR UPDATE OF j SKIP LOCKED

-- name: transaction_settings
-- Every replay transaction (and the console's reads): its statements bounded,
-- and none of them compiled by JIT. An express page is planned for a page of
-- replay.batch_size rows whatever it then finds, and its estimated cost
-- passes jit_above_cost: compiling its expressions took 140 ms of a
-- 5,000-row page (EXPLAIN ANALYZE), more than they then saved, and a page
-- planned for its parameters (a session's first five, a backlog's) paid it.
SELECT set_config('statement_timeout', %(statement_timeout)s, true),
       set_config('lock_timeout', %(lock_timeout)s, true),
       set_config('jit', 'off', true)

-- name: replayed_relation
-- What a set-based target statement reads as `replayed`: the group's rows
-- (composed in front of the operator's statement, dlqd/db/compose.py).
replayed AS (SELECT * FROM job_dlq WHERE id = ANY (%(ids)s::uuid[]))

-- name: explain_prefix
-- Validation plans a target with options in parentheses: `ANALYZE SELECT ...`
-- after it is a syntax error, never an EXPLAIN ANALYZE that runs the statement.
EXPLAIN (COSTS OFF)

-- name: validation_timeouts
-- `dlqd check` and start-up plan target statements under these: a locked
-- table is a one-line error, not a hang.
SELECT set_config('lock_timeout', %(lock_timeout)s, true),
       set_config('statement_timeout', %(statement_timeout)s, true)

-- name: begin
BEGIN

-- name: commit
COMMIT

-- name: custom_plans
-- For this transaction: plan each statement for its parameters (an express
-- page expected to be full; dlqd/replay/express.py says why).
SELECT set_config('plan_cache_mode', 'force_custom_plan', true)

-- name: constraints_immediate
SET CONSTRAINTS ALL IMMEDIATE

-- name: finish_replayed
-- One round trip for the rows whose target succeeded (dlqd_finish_replayed:
-- mark, drop their schedule, log), and the batch's inbox entries (all of
-- them, replayed or not) in the same statement.
WITH inbox AS (
    DELETE FROM dlqd_inbox WHERE seq = ANY (%(inbox_seqs)s::bigint[])
)
SELECT id, lag_seconds
  FROM dlqd_finish_replayed(%(ids)s::uuid[], %(policies)s::text[], %(manual)s, %(actor)s,
                            %(reason)s, %(redrive)s::uuid)

-- name: log_outcomes
-- Original job ids and tenants come from job_dlq itself: the daemon may hold
-- only a shortened copy of an invalid row's key columns.
INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, policy, outcome, error, manual,
                             actor, reason, redrive_id)
SELECT u.dlq_id, j.original_job_id, j.app_id, u.policy, u.outcome, u.error, u.manual,
       %(actor)s, %(reason)s, %(redrive)s::uuid
  FROM unnest(%(dlq_ids)s::uuid[], %(policies)s::text[], %(outcomes)s::text[],
              %(errors)s::text[], %(manual)s::boolean[]) WITH ORDINALITY
       AS u(dlq_id, policy, outcome, error, manual, n)
  JOIN job_dlq j ON j.id = u.dlq_id
 ORDER BY u.n

-- name: upsert_states
INSERT INTO dlqd_entry_state AS s (dlq_id, state, policy, fingerprint, due_at, parked_reason,
                                   failures, last_error, last_failure_at)
SELECT * FROM unnest(%(dlq_ids)s::uuid[], %(states)s::text[], %(policies)s::text[],
                     %(fingerprints)s::text[], %(due_ats)s::timestamptz[],
                     %(parked_reasons)s::text[], %(failures)s::int[], %(last_errors)s::text[],
                     %(last_failure_ats)s::timestamptz[])
ON CONFLICT (dlq_id) DO UPDATE
   SET state = excluded.state, policy = excluded.policy, fingerprint = excluded.fingerprint,
       due_at = excluded.due_at, parked_reason = excluded.parked_reason,
       failures = excluded.failures, last_error = excluded.last_error,
       last_failure_at = excluded.last_failure_at, updated_at = now()

-- name: notify_rows
-- The notify target: one message per row, built inside Postgres, in batch order.
SELECT count(pg_notify(%(channel)s, m))
  FROM (SELECT dlqd_notify_message(j.id, j.original_job_id, j.app_id, j.type, %(only_id)s) AS m
          FROM unnest(%(ids)s::uuid[]) WITH ORDINALITY AS u(id, n)
          JOIN job_dlq j ON j.id = u.id
         ORDER BY u.n) AS messages

-- name: define_row_function
-- A per-row target's in-server form as this session's function (migration 017).
SELECT dlqd_define_row_function(%(name)s, %(statement)s)

-- name: replay_rows
-- A per-row target in its in-server form: {function} called once per row, in
-- batch order (called after the sort: volatile), each row as claimed.
SELECT count(*) AS n
  FROM (SELECT {function}(j)
          FROM unnest(%(ids)s::uuid[]) WITH ORDINALITY AS u(id, n)
          JOIN job_dlq j ON j.id = u.id
         ORDER BY u.n) AS calls

-- name: replay_rows_allowed
-- Whether this role may run per-row targets in their in-server form: the
-- function that defines them, and a temporary schema to define them in.
SELECT CASE WHEN f.fn IS NULL THEN false
            ELSE has_function_privilege(f.fn, 'EXECUTE')
                 AND has_database_privilege(current_database(), 'TEMPORARY') END AS allowed
  FROM (SELECT to_regprocedure('dlqd_define_row_function(text, text)') AS fn) f

-- name: status_groups
-- Index-only over job_dlq_pending_group_idx. Keys as labels (dlqd_label: a
-- tenant's over-long value is cut, and its groups merge).
-- Rows with an infinite dlq_at count as pending but have no age.
SELECT dlqd_label(app_id) AS app_id, dlqd_label(type) AS type,
       dlqd_label(error_reason) AS error_reason, count(*) AS pending,
       greatest(0, extract(epoch FROM now() - min(dlq_at) FILTER (WHERE isfinite(dlq_at))))::float8
           AS oldest_age
  FROM job_dlq
 WHERE replayed_at IS NULL
 GROUP BY 1, 2, 3

-- name: status_held
-- Parked (by policy or by event) and unmatched rows, as the daemon recorded
-- them, by group: from dlqd_entry_state_held_idx, never a scan of job_dlq.
WITH held AS MATERIALIZED (
    SELECT dlq_id, state FROM dlqd_entry_state WHERE state <> 'waiting'
)
SELECT dlqd_label(j.app_id) AS app_id, dlqd_label(j.type) AS type,
       dlqd_label(j.error_reason) AS error_reason,
       count(*) FILTER (WHERE h.state IN ('parked', 'parked_policy')) AS parked,
       count(*) FILTER (WHERE h.state = 'unmatched') AS unmatched
  FROM held h
  JOIN job_dlq j ON j.id = h.dlq_id
 WHERE j.replayed_at IS NULL
 GROUP BY 1, 2, 3

-- name: notify
SELECT pg_notify(%(channel)s, %(payload)s)

-- name: notification_queue_usage
SELECT pg_notification_queue_usage()::float8 AS usage

-- name: entry_state
SELECT state, policy, fingerprint, due_at, failures, last_error, last_failure_at,
       parked_reason, updated_at
  FROM dlqd_entry_state
 WHERE dlq_id = %(id)s

-- name: lock_entries
-- Manual replay: narrow rows like the claims, but waiting for a daemon's batch
-- in flight instead of skipping it (it then finds the row replayed: skipped).
-- `app_id`: a tenant-bound console request or redrive, which selected its rows
-- under row-level security already, replays no other tenant's row regardless.
SELECT {{narrow_row}}, NULL::bigint AS seq, now() AS db_now
  FROM job_dlq j
  {{row_problem}}
  LEFT JOIN dlqd_entry_state s ON s.dlq_id = j.id
 WHERE j.id = ANY (%(ids)s::uuid[])
   AND (%(app_id)s::text IS NULL OR j.app_id = %(app_id)s::text)
 ORDER BY j.id
   FOR UPDATE OF j

-- name: entry_narrow
-- One row as `dlqd explain` sees it: what a policy decides on, and its state.
SELECT {{narrow_row}},
       to_json(j.dlq_at) #>> '{}' AS dlq_at_text, to_json(j.replayed_at) #>> '{}' AS replayed_at_text,
       s.parked_reason, s.due_at, NULL::bigint AS seq,
       (SELECT true FROM dlqd_inbox i WHERE i.dlq_id = j.id) AS in_inbox, now() AS db_now
  FROM job_dlq j
  {{row_problem}}
  LEFT JOIN dlqd_entry_state s ON s.dlq_id = j.id
 WHERE j.id = %(id)s

-- name: entry_document
-- One row for `dlqd show` and `dlqd list`, rendered by Postgres: the daemon
-- never decodes a payload (nor a timestamp Python cannot hold). `document`
-- is the row as JSON text; the other columns feed the human-readable form.
-- Keys that `redact` names are masked here, before anything leaves Postgres.
SELECT j.id, j.original_job_id, j.app_id, j.type, j.error_reason, j.attempts,
       to_json(j.dlq_at) #>> '{}' AS dlq_at, to_json(j.replayed_at) #>> '{}' AS replayed_at,
       j.request_id, j.user_id, r.payload::text AS payload, r.error_history::text AS error_history,
       CASE WHEN %(pretty)s THEN jsonb_pretty(r.payload) END AS payload_pretty,
       CASE WHEN %(pretty)s THEN jsonb_pretty(r.error_history) END AS error_history_pretty,
       (to_jsonb(j) || jsonb_build_object('payload', r.payload,
                                          'error_history', r.error_history))::text AS document
  FROM job_dlq j
 CROSS JOIN LATERAL (SELECT dlqd_redact(j.payload, %(redact)s::text[]) AS payload,
                            dlqd_redact(j.error_history, %(redact)s::text[]) AS error_history) r
 WHERE j.id = %(id)s

-- name: park_entries
-- An operator parks pending rows: locked as a manual replay locks them (a
-- daemon's batch in flight finishes first), scheduled `parked` with reason
-- `manual` (sticky until a replay or an unpark), out of the inbox, logged.
WITH locked AS (
    SELECT j.id, j.original_job_id, j.app_id FROM job_dlq j
     WHERE j.id = ANY (%(ids)s::uuid[]) AND j.replayed_at IS NULL
       AND (%(app_id)s::text IS NULL OR j.app_id = %(app_id)s::text)
     ORDER BY j.id
       FOR UPDATE OF j
), inbox AS (
    DELETE FROM dlqd_inbox WHERE dlq_id IN (SELECT id FROM locked)
), parked AS (
    INSERT INTO dlqd_entry_state AS s (dlq_id, state, policy, fingerprint, parked_reason,
                                       failures)
    SELECT id, 'parked', NULL, '', 'manual', 0 FROM locked
    ON CONFLICT (dlq_id) DO UPDATE
       SET state = 'parked', parked_reason = 'manual', due_at = NULL, updated_at = now()
    RETURNING s.dlq_id
), logged AS (
    INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, outcome, error, manual,
                                 actor, reason)
    SELECT id, original_job_id, app_id, 'parked', 'parked by hand', true, %(actor)s, %(reason)s
      FROM locked
)
SELECT dlq_id AS id FROM parked

-- name: unpark_entries
-- An operator unparks rows parked by hand or by an event: the schedule row
-- goes, the row goes back to the inbox (decided again as new), logged.
WITH locked AS (
    SELECT j.id, j.original_job_id, j.app_id FROM job_dlq j
      JOIN dlqd_entry_state s ON s.dlq_id = j.id AND s.state = 'parked'
     WHERE j.id = ANY (%(ids)s::uuid[]) AND j.replayed_at IS NULL
       AND (%(app_id)s::text IS NULL OR j.app_id = %(app_id)s::text)
     ORDER BY j.id
       FOR UPDATE OF j, s
), cleared AS (
    DELETE FROM dlqd_entry_state WHERE dlq_id IN (SELECT id FROM locked)
), queued AS (
    INSERT INTO dlqd_inbox (dlq_id) SELECT id FROM locked ORDER BY id
    ON CONFLICT (dlq_id) DO NOTHING
), logged AS (
    INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, outcome, manual, actor,
                                 reason)
    SELECT id, original_job_id, app_id, 'unparked', true, %(actor)s, %(reason)s FROM locked
)
SELECT id FROM locked

-- name: purge_batch
SELECT job_dlq_purge(%(replayed_before)s, %(pending_before)s, %(batch_size)s) AS deleted

-- name: purge_count
SELECT count(*) AS n
  FROM job_dlq
 WHERE (replayed_at IS NOT NULL AND replayed_at < now() - %(replayed_before)s::interval)
    OR (%(pending_before)s::interval IS NOT NULL
        AND replayed_at IS NULL AND dlq_at < now() - %(pending_before)s::interval)

-- name: leader_claim
-- The leader's lease (dlqd_leader, migration 008): taken when it has expired,
-- renewed while it is ours; by the server's clock alone. Two replicas
-- claiming at once: the second waits for the first's one-statement commit,
-- then finds the lease taken. Returns a row while this replica leads.
UPDATE dlqd_leader
   SET holder = %(holder)s,
       expires_at = now() + %(ttl)s::interval,
       elected_at = CASE WHEN holder = %(holder)s AND expires_at >= now() THEN elected_at
                         ELSE now() END
 WHERE singleton AND (holder = %(holder)s OR expires_at < now())
RETURNING elected_at

-- name: leader_release
-- A clean step-down: the lease ends now, a follower takes it at its next try.
UPDATE dlqd_leader SET expires_at = now() WHERE singleton AND holder = %(holder)s

-- name: leader_lease
SELECT holder, expires_at >= now() AS active, elected_at FROM dlqd_leader WHERE singleton

-- name: purge_timeouts
SELECT set_config('lock_timeout', %(lock_timeout)s, true),
       set_config('statement_timeout', %(statement_timeout)s, true)

-- name: trim_replay_log
-- A batch of the replay log past retention, from the `at` the last batch
-- reached (null: the first batch); migration 020 says why.
SELECT deleted, reached FROM dlqd_trim_replay_log_after(%(older_than)s, %(batch_size)s, %(after)s)

-- name: http_body_size
-- The size of a request body before it is fetched: bodies held at once are
-- capped in bytes (dlqd/replay/http.py).
SELECT octet_length(to_jsonb(j)::text) AS size FROM job_dlq j
 WHERE j.id = %(id)s AND j.replayed_at IS NULL

-- name: http_body
-- An http target's request body: every column, payload as an object, rendered
-- by Postgres as UTF-8 bytes (the daemon never decodes it).
SELECT convert_to(to_jsonb(j)::text, 'UTF8') AS body FROM job_dlq j
 WHERE j.id = %(id)s AND j.replayed_at IS NULL

-- name: buckets_ensure
-- Only buckets that do not exist yet, and only where this replica holds the
-- key's lock slot (SKIP LOCKED): an insert meeting another transaction's
-- uncommitted insert of the same key would wait for it. The loser finds no
-- bucket this time (no tokens) and the committed one next time.
WITH wanted AS (
    SELECT w.policy, w.scope, w.burst,
           dlqd_slot(jsonb_build_array('bucket', w.policy, w.scope)::text) AS slot
      FROM unnest(%(policies)s::text[], %(scopes)s::text[], %(bursts)s::float8[])
           AS w(policy, scope, burst)
     WHERE NOT EXISTS (SELECT FROM dlqd_rate_buckets b
                        WHERE b.policy = w.policy AND b.scope = w.scope)
), locked AS MATERIALIZED (
    SELECT s.slot FROM dlqd_lock_slots s
     WHERE s.slot IN (SELECT slot FROM wanted)
     ORDER BY s.slot
       FOR UPDATE SKIP LOCKED
)
INSERT INTO dlqd_rate_buckets (policy, scope, tokens, updated_at)
SELECT w.policy, w.scope, w.burst, clock_timestamp()
  FROM wanted w JOIN locked l ON l.slot = w.slot
ON CONFLICT (policy, scope) DO NOTHING

-- name: buckets_take
-- Refill each bucket for the time since it was last touched, take what is
-- wanted (whole tokens, at most what it holds), and say how long until the
-- next token. Buckets another replica holds right now are skipped: no tokens.
WITH wanted AS (
    SELECT * FROM unnest(%(policies)s::text[], %(scopes)s::text[], %(rates)s::float8[],
                         %(bursts)s::float8[], %(wanted)s::int[])
             AS w(policy, scope, rate, burst, wanted)
), held AS (
    SELECT b.policy, b.scope, w.rate, w.wanted,
           least(w.burst, b.tokens + greatest(0, extract(epoch FROM clock_timestamp() - b.updated_at))
                                     * w.rate) AS available
      FROM dlqd_rate_buckets b
      JOIN wanted w ON w.policy = b.policy AND w.scope = b.scope
       FOR UPDATE OF b SKIP LOCKED
)
UPDATE dlqd_rate_buckets b
   SET tokens = h.available - least(floor(h.available), h.wanted), updated_at = clock_timestamp()
  FROM held h
 WHERE b.policy = h.policy AND b.scope = h.scope
RETURNING b.policy, b.scope, least(floor(h.available), h.wanted)::int AS granted,
          greatest(0, (1 - b.tokens) / h.rate)::float8 AS next_token_in

-- name: circuits_ensure
-- As buckets_ensure: never waits for another replica's uncommitted insert.
WITH wanted AS (
    SELECT p, dlqd_slot(jsonb_build_array('circuit', p)::text) AS slot
      FROM unnest(%(policies)s::text[]) AS p
     WHERE NOT EXISTS (SELECT FROM dlqd_circuits c WHERE c.policy = p)
), locked AS MATERIALIZED (
    SELECT s.slot FROM dlqd_lock_slots s
     WHERE s.slot IN (SELECT slot FROM wanted)
     ORDER BY s.slot
       FOR UPDATE SKIP LOCKED
)
INSERT INTO dlqd_circuits (policy)
SELECT w.p FROM wanted w JOIN locked l ON l.slot = w.slot
ON CONFLICT (policy) DO NOTHING

-- name: circuits_read
SELECT policy, open_until IS NOT NULL AS open,
       greatest(0, extract(epoch FROM open_until - now()))::float8 AS cool_down_left,
       coalesce(trial_until > now(), false) AS trial_running,
       consecutive_failures = 0 AND trial_until IS NULL AS clean
  FROM dlqd_circuits
 WHERE policy = ANY (%(policies)s::text[])

-- name: circuit_trial
-- The one trial of a half-open circuit, cluster-wide: whoever sets trial_until.
-- A replica already deciding (its transaction holds the row) is skipped, never waited for.
UPDATE dlqd_circuits SET trial_until = now() + %(lease)s::interval, updated_at = now()
 WHERE policy = (SELECT policy FROM dlqd_circuits
                  WHERE policy = %(policy)s AND open_until IS NOT NULL AND open_until <= now()
                    AND (trial_until IS NULL OR trial_until <= now())
                    FOR UPDATE SKIP LOCKED)
RETURNING policy

-- name: circuit_record
-- After a commit: `reset` when a row of the policy succeeded (then `failures`
-- counts evidence after the last success), else `failures` evidence failures
-- more. A failed trial reopens at once; any attempt ends a trial.
WITH before AS (
    SELECT policy, consecutive_failures, open_until, trial_until
      FROM dlqd_circuits WHERE policy = %(policy)s FOR UPDATE
), counted AS (
    SELECT b.*, CASE WHEN %(reset)s THEN 0 ELSE b.consecutive_failures END + %(failures)s AS n
      FROM before b
)
UPDATE dlqd_circuits c
   SET consecutive_failures = k.n,
       open_until = CASE
           WHEN %(failures)s > 0 AND (k.trial_until IS NOT NULL OR k.n >= %(threshold)s)
               THEN now() + %(cool_down)s::interval
           WHEN %(reset)s THEN NULL
           ELSE k.open_until END,
       trial_until = NULL,
       updated_at = now()
  FROM counted k
 WHERE c.policy = k.policy
RETURNING k.open_until IS NOT NULL AS was_open, c.open_until IS NOT NULL AS is_open


-- name: tenant_scope
-- A console request of a token bound to one tenant: the rest of this
-- transaction runs as role dlqd_tenant (no BYPASSRLS) with the tenant's
-- app_id set, so that row-level security shows it that tenant's rows only.
-- Returns what it replaces, for tenant_unscope at the end of the block (a
-- block inside a longer transaction must not leave the role switched).
WITH previous AS MATERIALIZED (
    SELECT current_setting('role') AS role,
           coalesce(current_setting('app.current_app_id', true), '') AS app_id
)
SELECT p.role AS previous_role, p.app_id AS previous_app_id,
       set_config('role', 'dlqd_tenant', true) AS role,
       set_config('app.current_app_id', %(app_id)s, true) AS app_id
  FROM previous p

-- name: tenant_unscope
SELECT set_config('role', %(role)s, true) AS role,
       set_config('app.current_app_id', %(app_id)s, true) AS app_id

-- name: tenant_role
-- What the console checks before it serves tokens bound to a tenant.
SELECT r.rolname IS NOT NULL AS present, coalesce(r.rolsuper, false) AS superuser,
       coalesce(r.rolbypassrls, false) AS bypassrls,
       r.rolname IS NOT NULL AND pg_has_role(current_user, 'dlqd_tenant', 'MEMBER') AS member
  FROM (SELECT 1) AS one
  LEFT JOIN pg_roles r ON r.rolname = 'dlqd_tenant'

-- fragment: redrive_columns
r.id, r.state, r.filter::text AS filter, r.scope_app_id, r.via, r.reason, r.actor, r.rate,
r.matched, r.replayed, r.failed, r.skipped, r.owner, r.error,
r.cancel_requested_at IS NOT NULL AS cancel_requested,
to_json(r.until_at) #>> '{}' AS until_at, to_json(r.cursor_at) #>> '{}' AS cursor_at,
r.cursor_id, r.created_at, r.started_at, r.finished_at, now() AS db_now

-- name: db_now
-- The server's clock, as text (a redrive's bound: the rows dead-lettered by then).
SELECT to_json(now()) #>> '{}' AS now

-- name: redrive_create
INSERT INTO dlqd_redrives AS r (filter, scope_app_id, via, reason, actor, rate, matched,
                                until_at)
VALUES (%(filter)s::jsonb, %(scope)s, %(via)s, %(reason)s, %(actor)s, %(rate)s, %(matched)s,
        %(until)s::timestamptz)
RETURNING {{redrive_columns}}

-- name: redrive_list
SELECT {{redrive_columns}}
  FROM dlqd_redrives r
 ORDER BY r.created_at DESC, r.id
 LIMIT %(limit)s

-- name: redrive_get
SELECT {{redrive_columns}} FROM dlqd_redrives r WHERE r.id = %(id)s

-- name: redrive_claim
-- A replica takes the oldest redrive that nobody runs (queued, or running
-- under a lease that has expired: its replica died), and runs it under a
-- lease of its own.
UPDATE dlqd_redrives r
   SET state = 'running', owner = %(owner)s, lease_until = now() + %(ttl)s::interval,
       started_at = coalesce(r.started_at, now())
  FROM (SELECT id FROM dlqd_redrives
         WHERE state IN ('queued', 'running') AND lease_until < now()
         ORDER BY created_at, id
         LIMIT 1
           FOR UPDATE SKIP LOCKED) c
 WHERE r.id = c.id
RETURNING {{redrive_columns}}

-- name: redrive_progress
-- In the transaction of each part of a chunk, its last statement: the counts
-- and the cursor move with the rows they count, and only while this replica
-- holds the lease (no row: it lost it, and the chunk rolls back).
UPDATE dlqd_redrives r
   SET replayed = r.replayed + %(replayed)s, failed = r.failed + %(failed)s,
       skipped = r.skipped + %(skipped)s,
       cursor_at = CASE WHEN r.cursor_at IS NULL
                          OR (r.cursor_at, r.cursor_id) < (%(cursor_at)s::timestamptz, %(cursor_id)s::uuid)
                        THEN %(cursor_at)s::timestamptz ELSE r.cursor_at END,
       cursor_id = CASE WHEN r.cursor_at IS NULL
                          OR (r.cursor_at, r.cursor_id) < (%(cursor_at)s::timestamptz, %(cursor_id)s::uuid)
                        THEN %(cursor_id)s::uuid ELSE r.cursor_id END,
       lease_until = greatest(r.lease_until, now() + %(ttl)s::interval)
 WHERE r.id = %(id)s AND r.owner = %(owner)s AND r.state = 'running'
RETURNING r.id

-- name: redrive_renew
UPDATE dlqd_redrives r
   SET lease_until = greatest(r.lease_until, now() + %(ttl)s::interval)
 WHERE r.id = %(id)s AND r.owner = %(owner)s AND r.state = 'running'
RETURNING r.cancel_requested_at IS NOT NULL AS cancel_requested

-- name: redrive_finish
UPDATE dlqd_redrives r
   SET state = %(state)s, error = %(error)s, finished_at = now(), lease_until = '-infinity'
 WHERE r.id = %(id)s AND r.owner = %(owner)s AND r.state = 'running'
RETURNING {{redrive_columns}}

-- name: redrive_cancel
-- Cancel: a redrive nobody runs (queued, or its replica died) ends now; one
-- that runs ends after the chunk in flight (its runner sees the request).
UPDATE dlqd_redrives r
   SET cancel_requested_at = coalesce(r.cancel_requested_at, now()),
       state = CASE WHEN r.state = 'queued' OR r.lease_until < now() THEN 'cancelled'
                    ELSE r.state END,
       finished_at = CASE WHEN r.state = 'queued' OR r.lease_until < now() THEN now()
                          ELSE r.finished_at END
 WHERE r.id = %(id)s AND r.state IN ('queued', 'running')
RETURNING {{redrive_columns}}

-- name: console_key
-- The console's session key: the first replica's random one, shared by all.
WITH made AS (
    INSERT INTO dlqd_console_keys (key) VALUES (%(key)s)
    ON CONFLICT (singleton) DO NOTHING
    RETURNING key
)
SELECT key FROM made
UNION ALL
SELECT key FROM dlqd_console_keys
 LIMIT 1

-- name: record_run
INSERT INTO dlqd_runs AS r (task, finished_at, ok, detail)
VALUES (%(task)s, now(), %(ok)s, %(detail)s::jsonb)
ON CONFLICT (task) DO UPDATE
   SET finished_at = excluded.finished_at, ok = excluded.ok, detail = excluded.detail

-- name: last_runs
SELECT task, finished_at, ok, detail::text AS detail FROM dlqd_runs

-- name: outcomes_by_hour
-- The console's chart: outcomes per hour over the last `hours` hours, from
-- the counts the replay log's trigger keeps (never the log itself).
-- Every hour is there, the empty ones with zeros, the current one last.
SELECT g.hour,
       coalesce(sum(h.n) FILTER (WHERE h.outcome = 'replayed'), 0)::bigint AS replayed,
       coalesce(sum(h.n) FILTER (WHERE h.outcome = 'failed'), 0)::bigint AS failed,
       coalesce(sum(h.n) FILTER (WHERE h.outcome = 'parked'), 0)::bigint AS parked
  FROM generate_series(date_trunc('hour', now()) - make_interval(hours => %(hours)s - 1),
                       date_trunc('hour', now()), interval '1 hour') AS g(hour)
  LEFT JOIN dlqd_replay_hours h ON h.hour = g.hour
 GROUP BY g.hour
 ORDER BY g.hour

-- name: outcomes_by_policy
-- Outcomes per policy over the last 24 hours ('' : manual replays without one).
SELECT h.policy, h.outcome, sum(h.n)::bigint AS n
  FROM dlqd_replay_hours h
 WHERE h.hour >= date_trunc('hour', now()) - interval '23 hours'
 GROUP BY h.policy, h.outcome

-- name: held_by_reason
-- Parked rows by why (a park policy, or the event), and waiting rows.
SELECT CASE WHEN s.state = 'parked_policy' THEN 'policy'
            WHEN s.state = 'parked' THEN s.parked_reason
            ELSE s.state END AS reason,
       count(*) AS n
  FROM dlqd_entry_state s
  JOIN job_dlq j ON j.id = s.dlq_id AND j.replayed_at IS NULL
 GROUP BY 1

-- name: circuits_all
SELECT policy, consecutive_failures AS failures,
       open_until IS NOT NULL AND open_until > now() AS open, open_until, updated_at
  FROM dlqd_circuits
 ORDER BY policy

-- name: redrive_release
UPDATE dlqd_redrives SET lease_until = '-infinity'
 WHERE id = %(id)s AND owner = %(owner)s AND state = 'running'

-- name: entry_errors
-- A row's error history for the console's timeline, newest first: each entry
-- masked like the payload, then its time and message where the job system
-- wrote them under a usual key (read from the masked entry).
SELECT e.n, r.value ->> coalesce(
           (SELECT k FROM unnest(ARRAY['at', 'time', 'timestamp', 'failed_at', 'occurred_at']) k
             WHERE jsonb_typeof(r.value) = 'object' AND r.value ? k LIMIT 1), '') AS at,
       r.value ->> coalesce(
           (SELECT k FROM unnest(ARRAY['error', 'message', 'reason', 'exception']) k
             WHERE jsonb_typeof(r.value) = 'object' AND r.value ? k LIMIT 1), '') AS message,
       CASE WHEN jsonb_typeof(r.value) = 'string' THEN r.value #>> '{}' END AS text_value,
       left(jsonb_pretty(r.value), 8000) AS pretty
  FROM job_dlq j
 CROSS JOIN LATERAL jsonb_array_elements(j.error_history) WITH ORDINALITY AS e(value, n)
 CROSS JOIN LATERAL (SELECT dlqd_redact(e.value, %(redact)s::text[]) AS value) r
 WHERE j.id = %(id)s
 ORDER BY e.n DESC
 LIMIT 50

-- name: visible_entries
-- Of these ids, the rows the caller can read (a tenant's: under row-level security).
SELECT id FROM job_dlq WHERE id = ANY (%(ids)s::uuid[])

-- fragment: counted
-- What is pending and held, per group and kind: the folded counts, the
-- deltas not folded yet (migration 012) and the inbox entries that count
-- their row themselves (023: a single-row insert's, until it is claimed or
-- the leader's fold adopts it). O(groups + unfolded deltas + uncounted entries).
SELECT c.app_id, c.type, c.error_reason, c.kind, sum(c.n) AS n
  FROM (SELECT app_id, type, error_reason, kind, n FROM dlqd_counts
        UNION ALL
        SELECT app_id, type, error_reason, kind, n FROM dlqd_count_deltas
        UNION ALL
        SELECT j.app_id, j.type, j.error_reason, 'pending', 1
          FROM dlqd_inbox i JOIN job_dlq j ON j.id = i.dlq_id
         WHERE NOT i.counted) c
 GROUP BY 1, 2, 3, 4

-- name: counts_ready
-- Whether the counts were reconciled once (until then: count the table).
SELECT at IS NOT NULL AS ready FROM dlqd_counts_reconciled

-- name: status_counts
-- The status from the counts: pending, parked and unmatched per group, and
-- each group's oldest pending row by one probe of job_dlq_pending_group_idx
-- (finite times only). Keys as labels (dlqd_label: over-long ones merge).
WITH counted AS (
    {{counted}}
), groups AS (
    SELECT app_id, type, error_reason,
           coalesce(sum(n) FILTER (WHERE kind = 'pending'), 0) AS pending,
           coalesce(sum(n) FILTER (WHERE left(kind, 7) = 'parked:'), 0) AS parked,
           coalesce(sum(n) FILTER (WHERE kind = 'unmatched'), 0) AS unmatched
      FROM counted
     GROUP BY 1, 2, 3
)
SELECT dlqd_label(g.app_id) AS app_id, dlqd_label(g.type) AS type,
       dlqd_label(g.error_reason) AS error_reason, sum(g.pending)::bigint AS pending,
       sum(g.parked)::bigint AS parked, sum(g.unmatched)::bigint AS unmatched,
       greatest(0, extract(epoch FROM now() - min(o.dlq_at)))::float8 AS oldest_age
  FROM groups g
  LEFT JOIN LATERAL (
      SELECT j.dlq_at FROM job_dlq j
       WHERE j.app_id = g.app_id AND j.type = g.type AND j.error_reason = g.error_reason
         AND j.replayed_at IS NULL AND j.dlq_at > '-infinity' AND j.dlq_at < 'infinity'
       ORDER BY j.dlq_at
       LIMIT 1
  ) o ON true
 WHERE g.pending > 0
 GROUP BY 1, 2, 3

-- name: held_counts
-- Held rows by kind (waiting, unmatched, parked:<why>), from the counts.
WITH counted AS (
    {{counted}}
)
SELECT kind, sum(n)::bigint AS n FROM counted WHERE kind <> 'pending' GROUP BY kind HAVING sum(n) <> 0

-- name: fold_counts
SELECT dlqd_fold_counts() AS folded

-- name: reconcile_counts
SELECT kind, corrected FROM dlqd_reconcile_counts()

-- name: wake_listen
-- This worker waits for notifications: inserters send them while its row is fresh.
INSERT INTO dlqd_wake AS w (worker, beat) VALUES (%(worker)s, now())
ON CONFLICT (worker) DO UPDATE SET beat = now()

-- name: wake_drain
-- This worker drains a backlog (it looks again at once, notified or not): while
-- no worker's row is fresh, inserters send no NOTIFY.
DELETE FROM dlqd_wake WHERE worker = %(worker)s

-- name: inbox_writers
-- The transactions writing the inbox now (an insert into job_dlq in flight),
-- but this session: a worker that starts listening waits for them to end, as
-- they may have skipped their NOTIFY while no worker listened.
SELECT coalesce(array_agg(DISTINCT l.virtualtransaction), '{}') AS vxids
  FROM pg_locks l
 WHERE l.locktype = 'relation' AND l.relation = 'dlqd_inbox'::regclass
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.mode = 'RowExclusiveLock' AND l.pid <> pg_backend_pid()

-- name: writers_running
SELECT count(*) AS n FROM pg_locks
 WHERE locktype = 'virtualxid' AND virtualxid = ANY (%(vxids)s::text[])

-- name: adapter_columns
-- An adapter's checks: the columns of a job system's table, their types as
-- format_type spells them with that schema on the search path.
SELECT a.attname AS name,
       regexp_replace(format_type(a.atttypid, a.atttypmod), '^.*\.', '') AS type
  FROM pg_attribute a
 WHERE a.attrelid = to_regclass(%(table)s) AND a.attnum > 0 AND NOT a.attisdropped

-- name: adapter_enum_labels
SELECT coalesce(array_agg(e.enumlabel::text ORDER BY e.enumsortorder), '{}') AS labels
  FROM pg_enum e
 WHERE e.enumtypid = to_regtype(%(type)s)

-- name: adapter_function_found
SELECT to_regprocedure(%(signature)s) IS NOT NULL AS found

-- name: adapter_capture_rights
-- Whether this role may install a capture: it calls dlqd_capture (only the
-- owner of dlqd's schema and superusers may), and puts a trigger on the table.
SELECT current_schema() AS dlqd_schema,
       has_function_privilege(
           'dlqd_capture(text, text, text, text, jsonb, text, integer, jsonb, jsonb)',
           'EXECUTE') AS may_capture,
       -- NULL when the table does not exist (the function is strict)
       has_table_privilege(to_regclass(%(table)s)::oid, 'TRIGGER') AS may_trigger

-- name: adapter_installed
-- The capture trigger on a job system's table, and its function's comment
-- (which dlqd version installed it).
SELECT t.tgname AS trigger, obj_description(t.tgfoid, 'pg_proc') AS installed_by
  FROM pg_trigger t
 WHERE t.tgrelid = to_regclass(%(table)s) AND t.tgname = 'dlqd_capture'

-- name: adapter_capture
-- Composed (dlqd/db/compose.py): an adapter's capture, installed in one
-- transaction. The function runs as its owner (it calls dlqd_capture, which
-- only the owner may), with a pinned search path; nobody but its owner may
-- attach it to a table (CREATE TRIGGER needs EXECUTE); its comment says which
-- dlqd made it. The adapter's file gives the pieces declare (its variables,
-- v_extra among them: what dlqd_adapter_jobs keeps), capture (its call of
-- dlqd_capture) and triggers; app_id is a constant or the operator's
-- expression over the row job (planned first).
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, {dlqd_schema}, pg_temp
AS $dlqd_capture$
DECLARE
    job     {jobs}%ROWTYPE := NEW;
    v_app   text;
    {declare}
BEGIN
    BEGIN
        v_app := ({app_id})::text;
    EXCEPTION WHEN OTHERS THEN
        -- the job is captured all the same, under the adapter's name, and says why
        v_extra := v_extra || jsonb_build_object('app_id_error', SQLERRM);
    END;
    {capture}
    RETURN NULL;
END
$dlqd_capture$;
REVOKE ALL ON FUNCTION {function}() FROM PUBLIC;
COMMENT ON FUNCTION {function}() IS {comment};
DROP TRIGGER IF EXISTS dlqd_capture ON {jobs};
DROP TRIGGER IF EXISTS dlqd_capture_update ON {jobs};
{triggers}

-- name: adapter_uninstall
-- Composed (dlqd/db/compose.py): the capture triggers and their function, and
-- nothing else (dlqd_capture_update: the adapters that capture updates apart).
DROP TRIGGER IF EXISTS dlqd_capture ON {jobs};
DROP TRIGGER IF EXISTS dlqd_capture_update ON {jobs};
DROP FUNCTION IF EXISTS {function}()

-- name: adapter_app_id_check
-- Composed: an --app-id expression planned over the job's row before it is installed.
SELECT ({app_id})::text AS app_id FROM {jobs} AS job LIMIT 0
