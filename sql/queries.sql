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

-- name: list_pending
-- Keyset pagination on (dlq_at, id), served by job_dlq_pending_dlq_at_id_idx.
SELECT id, original_job_id, app_id, type, payload, error_reason, attempts,
       error_history, dlq_at, replayed_at, request_id, user_id
  FROM job_dlq
 WHERE replayed_at IS NULL
   AND (%(after_dlq_at)s::timestamptz IS NULL OR (dlq_at, id) > (%(after_dlq_at)s, %(after_id)s::uuid))
   AND (%(app_id)s::text IS NULL OR app_id = %(app_id)s)
   AND (%(type)s::text IS NULL OR type = %(type)s)
   AND (%(error_reason)s::text IS NULL OR error_reason = %(error_reason)s)
 ORDER BY dlq_at, id
 LIMIT %(limit)s

-- name: migrations_lock
SELECT pg_advisory_lock(hashtextextended('dlqd:migrate', 0))

-- name: migrations_unlock
SELECT pg_advisory_unlock(hashtextextended('dlqd:migrate', 0))

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
SELECT at, policy, outcome, error, manual
  FROM dlqd_replay_log
 WHERE dlq_id = %(id)s
 ORDER BY at, id

-- name: ping
SELECT current_setting('server_version_num')::int AS server_version_num

-- name: inbox_entries
-- Rows inserted since dlqd last looked, in insertion order. Locked (inbox and
-- row) so that replicas split them and a manual replay waits for us. Driven by
-- the inbox's primary key; a candidates CTE would be simpler to plan but lets
-- replicas collide on the same unlocked candidates.
SELECT j.id, j.original_job_id, j.app_id, j.type, j.payload, j.error_reason, j.attempts,
       j.error_history, j.dlq_at, j.replayed_at, j.request_id, j.user_id,
       coalesce(s.failures, 0) AS failures, s.last_failure_at, s.last_error, s.state,
       i.seq, now() AS db_now
  FROM dlqd_inbox i
  JOIN job_dlq j ON j.id = i.dlq_id
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
SELECT j.id, j.original_job_id, j.app_id, j.type, j.payload, j.error_reason, j.attempts,
       j.error_history, j.dlq_at, j.replayed_at, j.request_id, j.user_id,
       s.failures, s.last_failure_at, s.last_error, s.state, c.fingerprint,
       NULL::bigint AS seq, now() AS db_now
  FROM candidates c
  JOIN dlqd_entry_state s ON s.dlq_id = c.dlq_id
  JOIN job_dlq j ON j.id = c.dlq_id
 WHERE s.state <> 'parked' AND s.fingerprint <> %(fingerprint)s AND j.replayed_at IS NULL
 ORDER BY c.fingerprint, c.dlq_id
   FOR UPDATE OF s, j SKIP LOCKED

-- name: delete_inbox
DELETE FROM dlqd_inbox WHERE seq = ANY (%(seqs)s::bigint[])

-- name: enqueue_orphans
-- Safety net for rows that reached job_dlq without the trigger (restores with
-- session_replication_role = replica, a disabled trigger): pending rows with
-- neither an inbox entry nor a schedule go to the inbox.
INSERT INTO dlqd_inbox (dlq_id)
SELECT j.id
  FROM job_dlq j
 WHERE j.replayed_at IS NULL
   AND NOT EXISTS (SELECT FROM dlqd_entry_state s WHERE s.dlq_id = j.id)
   AND NOT EXISTS (SELECT FROM dlqd_inbox i WHERE i.dlq_id = j.id)
 ORDER BY j.dlq_at, j.id
ON CONFLICT (dlq_id) DO NOTHING

-- name: due_entries
-- Scheduled rows whose time has come, oldest due first, skipping the policies
-- and tenants that are throttled right now (dlqd_entry_state_due_idx).
SELECT j.id, j.original_job_id, j.app_id, j.type, j.payload, j.error_reason, j.attempts,
       j.error_history, j.dlq_at, j.replayed_at, j.request_id, j.user_id,
       s.failures, s.last_failure_at, s.last_error, s.policy AS scheduled_policy,
       now() AS db_now
  FROM dlqd_entry_state s
  JOIN job_dlq j ON j.id = s.dlq_id
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
SELECT original_job_id, count(*) AS replays
  FROM dlqd_replay_log
 WHERE outcome = 'replayed' AND original_job_id = ANY (%(original_job_ids)s::text[])
 GROUP BY original_job_id

-- name: lock_original_jobs
-- Serialises replicas replaying returns of the same original job, so that
-- max_replays holds. Keys arrive sorted: no deadlock between replicas.
SELECT count(pg_advisory_xact_lock(hashtextextended('dlqd:job:' || k, 0)))
  FROM unnest(%(original_job_ids)s::text[]) WITH ORDINALITY AS u(k, n)

-- name: finish_replayed
-- One round trip for the rows whose target succeeded: set replayed_at, drop
-- their schedule, log the replay.
WITH marked AS (
    UPDATE job_dlq SET replayed_at = now()
     WHERE id = ANY (%(ids)s::uuid[]) AND replayed_at IS NULL
    RETURNING id, original_job_id, app_id, replayed_at
), cleared AS (
    DELETE FROM dlqd_entry_state WHERE dlq_id IN (SELECT id FROM marked)
), logged AS (
    INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, policy, outcome, manual)
    SELECT m.id, m.original_job_id, m.app_id, u.policy, 'replayed', %(manual)s
      FROM marked m
      JOIN unnest(%(ids)s::uuid[], %(policies)s::text[]) AS u(id, policy) ON u.id = m.id
)
SELECT id, replayed_at FROM marked

-- name: log_outcomes
INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, policy, outcome, error, manual)
SELECT * FROM unnest(%(dlq_ids)s::uuid[], %(original_job_ids)s::text[], %(app_ids)s::text[],
                     %(policies)s::text[], %(outcomes)s::text[], %(errors)s::text[],
                     %(manual)s::boolean[])

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

-- name: notify_many
SELECT count(pg_notify(%(channel)s, m::text)) FROM jsonb_array_elements(%(messages)s) AS m

-- name: status_groups
-- Index-only over job_dlq_pending_group_idx.
SELECT app_id, type, error_reason, count(*) AS pending,
       extract(epoch FROM now() - min(dlq_at))::float8 AS oldest_age
  FROM job_dlq
 WHERE replayed_at IS NULL
 GROUP BY app_id, type, error_reason

-- name: status_attempts
-- Only when a policy matches on attempts (attempts is not in the covering index).
SELECT app_id, type, error_reason, attempts, count(*) AS pending
  FROM job_dlq
 WHERE replayed_at IS NULL
 GROUP BY app_id, type, error_reason, attempts

-- name: status_event_parked
-- From the (small) parked set, never from job_dlq.
WITH parked AS MATERIALIZED (
    SELECT dlq_id FROM dlqd_entry_state WHERE state = 'parked'
)
SELECT j.app_id, j.type, j.error_reason, j.attempts, count(*) AS parked
  FROM parked p
  JOIN job_dlq j ON j.id = p.dlq_id
 WHERE j.replayed_at IS NULL
 GROUP BY j.app_id, j.type, j.error_reason, j.attempts

-- name: notification_queue_usage
SELECT pg_notification_queue_usage()::float8 AS usage

-- name: entry_state
SELECT state, policy, fingerprint, due_at, failures, last_error, last_failure_at,
       parked_reason, updated_at
  FROM dlqd_entry_state
 WHERE dlq_id = %(id)s

-- name: lock_entries
-- Manual replay waits for a daemon's batch in flight instead of skipping it,
-- then finds the row replayed and counts it as skipped.
SELECT id, original_job_id, app_id, type, payload, error_reason, attempts,
       error_history, dlq_at, replayed_at, request_id, user_id, now() AS db_now
  FROM job_dlq
 WHERE id = ANY (%(ids)s::uuid[])
 ORDER BY dlq_at, id
   FOR UPDATE

-- name: purge_batch
SELECT job_dlq_purge(%(replayed_before)s, %(pending_before)s, %(batch_size)s) AS deleted

-- name: purge_count
SELECT count(*) AS n
  FROM job_dlq
 WHERE (replayed_at IS NOT NULL AND replayed_at < now() - %(replayed_before)s::interval)
    OR (%(pending_before)s::interval IS NOT NULL
        AND replayed_at IS NULL AND dlq_at < now() - %(pending_before)s::interval)

-- name: get_entries
SELECT id, original_job_id, app_id, type, payload, error_reason, attempts,
       error_history, dlq_at, replayed_at, request_id, user_id
  FROM job_dlq
 WHERE id = ANY (%(ids)s::uuid[])
