-- The Oban adapter (`dlqd adapters install oban`): Oban for Elixir, and its
-- Python port, whose oban_jobs differ in one column (errors: jsonb[] in
-- Elixir, jsonb in Python; to_jsonb reads both as a JSON array).
-- Its pieces (declare, capture, triggers) fill the capture function of
-- sql/queries.sql (adapter_capture); replay is its preset's statement. Composed
-- with psycopg.sql (dlqd/db/compose.py): {names} are identifiers and literals
-- dlqd quotes; a literal brace is written twice.
--
-- A job fails for good when Oban sets its state to 'discarded' (its attempts
-- used up, or discarded by its worker), the error appended in the same
-- UPDATE. A retry ('retryable'), a snooze and a cancel are not captured.

-- name: declare
    v_history jsonb := coalesce(to_jsonb(job.errors), '[]'::jsonb);
    v_text    text := v_history -> -1 ->> 'error';
    v_extra   jsonb := jsonb_build_object(
        'schema', {schema_text}, 'queue', job.queue, 'priority', job.priority,
        'max_attempts', job.max_attempts, 'meta', job.meta, 'tags', to_jsonb(job.tags));

-- name: capture
    PERFORM dlqd_capture(
        'oban',
        coalesce(v_app, 'oban'),
        job.id::text,
        job.worker,
        job.args,
        -- the error's class where its text names one: Elixir's "** (Class) ...",
        -- a Python traceback's last line "Class: ..."; else its first line
        coalesce(substring(v_text FROM '^\*\* \(([A-Za-z0-9_.]+)\)'),
                 CASE WHEN v_text LIKE 'Traceback%'
                      THEN substring(v_text FROM E'\n([A-Za-z_][A-Za-z0-9_.]*)(: [^\n]*)?\n?$') END,
                 nullif(left(split_part(v_text, E'\n', 1), 200), ''),
                 'discarded'),
        job.attempt,
        CASE WHEN jsonb_typeof(v_history) = 'array' THEN v_history ELSE '[]'::jsonb END,
        v_extra);

-- name: triggers
CREATE TRIGGER dlqd_capture AFTER UPDATE OF state ON {jobs}
    FOR EACH ROW
    WHEN (NEW.state::text = 'discarded' AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION {function}();

-- name: replay
-- A new job, inserted as Oban's own insert does: state 'available' (or
-- 'scheduled', with run_at_delay), the worker, args, queue, priority, max
-- attempts, meta and tags it had; timestamps in UTC, as Oban keeps them.
-- Oban's stager finds it at its next poll (about a second).
INSERT INTO {jobs} (args, worker, queue, priority, max_attempts, meta, tags, scheduled_at, state)
SELECT r.payload,
       r.type,
       coalesce({queue}, a.job ->> 'queue', 'default'),
       coalesce({priority}, (a.job ->> 'priority')::smallint, 0),
       coalesce({max_attempts}, (a.job ->> 'max_attempts')::smallint, 20),
       CASE WHEN jsonb_typeof(a.job -> 'meta') = 'object' THEN a.job -> 'meta'
            ELSE '{{}}'::jsonb END,
       ARRAY(SELECT jsonb_array_elements_text(
                 CASE WHEN jsonb_typeof(a.job -> 'tags') = 'array' THEN a.job -> 'tags'
                      ELSE '[]'::jsonb END)),
       timezone('UTC', coalesce({run_at}, now())),
       (CASE WHEN {run_at} IS NULL THEN 'available' ELSE 'scheduled' END)::{status_type}
  FROM replayed r
  LEFT JOIN dlqd_adapter_jobs a ON a.dlq_id = r.id AND a.system = 'oban'
 ORDER BY r.dlq_at, r.id
