-- The River adapter (`dlqd adapters install river`).
-- Its pieces (declare, capture, triggers) fill the capture function of
-- sql/queries.sql (adapter_capture); replay is its preset's statement. Composed
-- with psycopg.sql (dlqd/db/compose.py): {names} are identifiers and literals
-- dlqd quotes; a literal brace is written twice.
--
-- A job fails for good when River's client sets its state to 'discarded'
-- (its attempts used up, the error appended to `errors` in the same UPDATE).
-- A retry sets it to 'retryable' and is not captured; nor is a job the
-- unique-job scheduler discards as a duplicate (marked in its metadata).

-- name: declare
    v_last  jsonb := job.errors[array_upper(job.errors, 1)];
    v_extra jsonb := jsonb_build_object(
        'schema', {schema_text}, 'queue', job.queue, 'priority', job.priority,
        'max_attempts', job.max_attempts, 'metadata', job.metadata,
        'tags', to_jsonb(job.tags));

-- name: capture
    PERFORM dlqd_capture(
        'river',
        coalesce(v_app, 'river'),
        job.id::text,
        job.kind,
        coalesce(job.args, '{{}}'::jsonb),
        -- River keeps an error's text, not its class: the first line, shortened
        coalesce(nullif(left(split_part(v_last ->> 'error', E'\n', 1), 200), ''), 'discarded'),
        job.attempt,
        coalesce(to_jsonb(job.errors), '[]'::jsonb),
        v_extra);

-- name: triggers
CREATE TRIGGER dlqd_capture AFTER UPDATE OF state ON {jobs}
    FOR EACH ROW
    WHEN (NEW.state::text = 'discarded' AND OLD.state IS DISTINCT FROM NEW.state
          AND NOT coalesce(NEW.metadata ? 'unique_key_conflict', false))
    EXECUTE FUNCTION {function}();

-- name: replay
-- A new job, inserted as River documents a raw insert (no SQL function):
-- state 'available' (or 'scheduled' with run_at_delay), the kind, args,
-- queue, priority, max attempts, metadata and tags it had. River's workers
-- find it at their next fetch poll.
INSERT INTO {jobs} (args, kind, max_attempts, priority, queue, metadata, tags, scheduled_at,
                    state)
SELECT r.payload,
       r.type,
       coalesce({max_attempts}, (a.job ->> 'max_attempts')::smallint, 25),
       coalesce({priority}, (a.job ->> 'priority')::smallint, 1),
       coalesce({queue}, a.job ->> 'queue', 'default'),
       coalesce(a.job -> 'metadata', '{{}}'::jsonb) - 'unique_key_conflict',
       ARRAY(SELECT jsonb_array_elements_text(
                 CASE WHEN jsonb_typeof(a.job -> 'tags') = 'array' THEN a.job -> 'tags'
                      ELSE '[]'::jsonb END))::varchar(255)[],
       coalesce({run_at}, now()),
       (CASE WHEN {run_at} IS NULL THEN 'available' ELSE 'scheduled' END)::{status_type}
  FROM replayed r
  LEFT JOIN dlqd_adapter_jobs a ON a.dlq_id = r.id AND a.system = 'river'
 ORDER BY r.dlq_at, r.id
