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
