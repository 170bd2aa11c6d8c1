-- The pg-boss adapter (`dlqd adapters install pgboss`), for pg-boss 10 and later.
-- Its pieces (declare, capture, triggers) fill the capture function of
-- sql/queries.sql (adapter_capture); replay is its preset's statement. Composed
-- with psycopg.sql (dlqd/db/compose.py): {names} are identifiers and literals
-- dlqd quotes; a literal brace is written twice.
--
-- pg-boss fails a job by deleting it and inserting it again, in one statement:
-- state 'retry' while retries are left, 'failed' when they are used up. So
-- the capture fires on an INSERT of a failed job (and on an UPDATE to
-- 'failed', should a version make one), on pgboss.job: its row triggers are
-- cloned onto every partition, those of queues created later included. A
-- retry, and the copy pg-boss files in a queue's own dead letter queue
-- (state 'created'), are not captured.

-- name: declare
    v_extra jsonb := jsonb_build_object(
        'schema', {schema_text}, 'queue', job.name, 'priority', job.priority,
        'singleton_key', job.singleton_key, 'group_id', job.group_id,
        'group_tier', job.group_tier, 'retry_limit', job.retry_limit);

-- name: capture
    PERFORM dlqd_capture(
        'pgboss',
        coalesce(v_app, 'pgboss'),
        job.id::text,
        job.name,
        coalesce(job.data, 'null'::jsonb),
        -- the error pg-boss keeps in output: its class (name), else its message's first line
        coalesce(nullif(left(job.output ->> 'name', 200), ''),
                 nullif(left(split_part(job.output ->> 'message', E'\n', 1), 200), ''),
                 'failed'),
        job.retry_count + 1,
        -- pg-boss keeps the last error only
        jsonb_build_array(jsonb_build_object(
            'at', coalesce(job.completed_on, now()), 'attempt', job.retry_count + 1,
            'error', job.output ->> 'name', 'message', job.output ->> 'message')),
        v_extra);

-- name: triggers
CREATE TRIGGER dlqd_capture AFTER INSERT ON {jobs}
    FOR EACH ROW
    WHEN (NEW.state::text = 'failed')
    EXECUTE FUNCTION {function}();
CREATE TRIGGER dlqd_capture_update AFTER UPDATE OF state ON {jobs}
    FOR EACH ROW
    WHEN (NEW.state::text = 'failed' AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION {function}();

-- name: replay
-- A new job of the queue it came from, inserted as pg-boss's own send does:
-- the queue's settings (retries, delays, expiry, retention, policy, dead
-- letter, heartbeat) from pgboss.queue, the data, priority, singleton key and
-- group it had. A queue that no longer exists fails the replay (its name is
-- NULL), which is retried and, in the end, parked: never silently dropped.
-- pg-boss's workers find the job at their next poll.
INSERT INTO {jobs} (id, name, data, priority, start_after, created_on, singleton_key, group_id,
                    group_tier, expire_seconds, deletion_seconds, keep_until, retry_limit,
                    retry_delay, retry_backoff, retry_delay_max, policy, dead_letter,
                    heartbeat_seconds)
SELECT gen_random_uuid(),
       q.name,
       nullif(r.payload, 'null'::jsonb),
       coalesce({priority}, (a.job ->> 'priority')::integer, 0),
       s.start_after,
       {schema}.job_now(),
       a.job ->> 'singleton_key',
       a.job ->> 'group_id',
       a.job ->> 'group_tier',
       q.expire_seconds,
       q.deletion_seconds,
       s.start_after + q.retention_seconds * interval '1s',
       coalesce({max_attempts} - 1, q.retry_limit),
       q.retry_delay,
       q.retry_backoff,
       q.retry_delay_max,
       q.policy,
       q.dead_letter,
       q.heartbeat_seconds
  FROM replayed r
  LEFT JOIN dlqd_adapter_jobs a ON a.dlq_id = r.id AND a.system = 'pgboss'
  LEFT JOIN {queues} q ON q.name = coalesce({queue}, a.job ->> 'queue', r.type)
 CROSS JOIN LATERAL (SELECT coalesce({run_at}, {schema}.job_now()) AS start_after) s
 ORDER BY r.dlq_at, r.id
