-- The PgQueuer adapter (`dlqd adapters install pgqueuer`).
-- Its pieces (declare, capture, triggers) fill the capture function of
-- sql/queries.sql (adapter_capture); replay is its preset's statement. Composed
-- with psycopg.sql (dlqd/db/compose.py): {names} are identifiers and literals
-- dlqd quotes; a literal brace is written twice.
--
-- Only an entrypoint with on_failure="hold" keeps a job that failed for good:
-- its worker sets the job's status to 'failed' and, in the same statement,
-- logs the traceback (pgqueuer_log). The default, on_failure="delete",
-- deletes the job and its payload: there is nothing to capture. A retry
-- (RetryRequested) sets the status back to 'queued' and is not captured.
-- The payload is bytea: job_dlq holds it as JSON when it is JSON text (as a
-- base64 string otherwise), and the exact bytes are kept for the replay.

-- name: declare
    v_payload jsonb;
    v_last    jsonb;
    v_history jsonb;
    v_extra   jsonb := jsonb_build_object(
        'schema', {schema_text}, 'priority', job.priority, 'dedupe_key', job.dedupe_key,
        'headers', job.headers, 'payload_base64', encode(job.payload, 'base64'));

-- name: capture
    BEGIN
        v_payload := coalesce(convert_from(job.payload, 'UTF8')::jsonb, 'null'::jsonb);
    EXCEPTION WHEN OTHERS THEN
        v_payload := to_jsonb(encode(job.payload, 'base64'));
    END;
    -- the failure's traceback, logged by the same statement; the retries' before it
    SELECT l.traceback INTO v_last
      FROM {log} l
     WHERE l.job_id = job.id AND l.status::text = 'failed'
     ORDER BY l.created DESC, l.id DESC
     LIMIT 1;
    SELECT jsonb_agg(jsonb_build_object(
               'at', coalesce(l.traceback ->> 'timestamp', l.created::text),
               'error', coalesce(l.traceback ->> 'exception_type', l.status::text),
               'message', l.traceback ->> 'exception_message',
               'status', l.status::text)
           ORDER BY l.created, l.id)
      INTO v_history
      FROM {log} l
     WHERE l.job_id = job.id AND l.traceback IS NOT NULL;
    PERFORM dlqd_capture(
        'pgqueuer',
        coalesce(v_app, 'pgqueuer'),
        job.id::text,
        job.entrypoint,
        v_payload,
        coalesce(v_last ->> 'exception_type', 'failed'),
        -- attempts counts the retries; the run that failed for good is one more
        job.attempts + 1,
        coalesce(v_history, '[]'::jsonb),
        v_extra);

-- name: triggers
CREATE TRIGGER dlqd_capture AFTER UPDATE OF status ON {jobs}
    FOR EACH ROW
    WHEN (NEW.status::text = 'failed' AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION {function}();

-- name: replay
-- A new queued job, inserted as PgQueuer's own enqueue does (its trigger
-- wakes the workers): the entrypoint, priority, headers, dedupe key and exact
-- payload bytes it had; a row dlqd did not capture sends its payload as JSON.
INSERT INTO {jobs} (priority, entrypoint, payload, headers, dedupe_key, execute_after, status)
SELECT coalesce({priority}, (a.job ->> 'priority')::integer, 0),
       r.type,
       CASE WHEN a.job ? 'payload_base64'
            THEN decode(a.job ->> 'payload_base64', 'base64')
            ELSE convert_to(r.payload::text, 'UTF8') END,
       nullif(a.job -> 'headers', 'null'::jsonb),
       a.job ->> 'dedupe_key',
       coalesce({run_at}, now()),
       'queued'::{status_type}
  FROM replayed r
  LEFT JOIN dlqd_adapter_jobs a ON a.dlq_id = r.id AND a.system = 'pgqueuer'
 ORDER BY r.dlq_at, r.id
