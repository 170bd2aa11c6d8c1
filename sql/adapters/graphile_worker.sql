-- The Graphile Worker adapter (`dlqd adapters install graphile_worker`).
-- Its pieces (declare, capture, triggers) fill the capture function of
-- sql/queries.sql (adapter_capture); replay is its preset's statement. Composed
-- with psycopg.sql (dlqd/db/compose.py): {names} are identifiers and literals
-- dlqd quotes; a literal brace is written twice.
--
-- A job fails for good when a failed attempt leaves it unlocked with its
-- attempts used up (attempts >= max_attempts, last_error set), or when
-- permanently_fail_jobs() gives it its last error. A failed attempt with
-- attempts left (its run_at moved on) is not captured. The tables are
-- Graphile Worker's private ones: checked column by column before install.

-- name: declare
    v_task  text := (SELECT t.identifier FROM {tasks} t WHERE t.id = job.task_id);
    v_queue text := (SELECT q.queue_name FROM {queues} q WHERE q.id = job.job_queue_id);
    v_extra jsonb := jsonb_build_object(
        'schema', {schema_text}, 'queue', v_queue, 'priority', job.priority,
        'max_attempts', job.max_attempts, 'job_key', job.key, 'flags', job.flags,
        'payload_json', job.payload::text);

-- name: capture
    PERFORM dlqd_capture(
        'graphile_worker',
        coalesce(v_app, 'graphile_worker'),
        job.id::text,
        coalesce(v_task, 'unknown'),
        job.payload::jsonb,
        -- Graphile Worker keeps an error's message, not its class: its first line, shortened
        coalesce(nullif(left(split_part(job.last_error, E'\n', 1), 200), ''), 'failed'),
        job.attempts,
        jsonb_build_array(jsonb_build_object('at', job.updated_at, 'attempt', job.attempts,
                                             'error', job.last_error)),
        v_extra);

-- name: triggers
CREATE TRIGGER dlqd_capture AFTER UPDATE ON {jobs}
    FOR EACH ROW
    WHEN (NEW.attempts >= NEW.max_attempts AND NEW.locked_at IS NULL
          AND NEW.last_error IS NOT NULL
          AND (OLD.locked_at IS NOT NULL OR OLD.attempts < OLD.max_attempts))
    EXECUTE FUNCTION {function}();

-- name: replay
-- Re-enqueued through graphile_worker.add_jobs, as its client adds jobs (it
-- makes the task and queue if need be, and wakes the workers): the task,
-- exact payload, queue, priority, max attempts, job key and flags it had. A
-- job key still held by the failed job makes add_jobs reset that job and run
-- it again, as Graphile Worker does for any job added with a key.
SELECT count(*) FROM {schema}.add_jobs(ARRAY(
    SELECT ROW(r.type,
               coalesce((a.job ->> 'payload_json')::json, r.payload::json),
               coalesce({queue}, a.job ->> 'queue'),
               {run_at},
               coalesce({max_attempts}, (a.job ->> 'max_attempts')::smallint),
               a.job ->> 'job_key',
               coalesce({priority}, (a.job ->> 'priority')::smallint),
               ARRAY(SELECT jsonb_object_keys(
                         CASE WHEN jsonb_typeof(a.job -> 'flags') = 'object'
                              THEN a.job -> 'flags' ELSE '{{}}'::jsonb END)))
               ::{schema}.job_spec
      FROM replayed r
      LEFT JOIN dlqd_adapter_jobs a ON a.dlq_id = r.id AND a.system = 'graphile_worker'
     ORDER BY r.dlq_at, r.id))
