-- The Procrastinate adapter (`dlqd adapters install procrastinate`).
-- Its pieces (declare, capture, triggers) fill the capture function of
-- sql/queries.sql (adapter_capture); replay is its preset's statement. Composed
-- with psycopg.sql (dlqd/db/compose.py): {names} are identifiers and literals
-- dlqd quotes; a literal brace is written twice.
--
-- A job fails for good when procrastinate_finish_job_v1 (or a retry of an
-- aborting job) sets its status to 'failed' by an UPDATE; a retry sets it
-- back to 'todo' and is not captured. Procrastinate records no error text:
-- error_reason is 'failed', and error_history lists the job's failed
-- attempts from procrastinate_events (retries, then this failure).

-- name: declare
    v_extra jsonb := jsonb_build_object(
        'schema', {schema_text}, 'queue', job.queue_name, 'priority', job.priority,
        'lock', job.lock, 'queueing_lock', job.queueing_lock);

-- name: capture
    PERFORM dlqd_capture(
        'procrastinate',
        coalesce(v_app, 'procrastinate'),
        job.id::text,
        job.task_name,
        job.args,
        'failed',
        job.attempts,
        coalesce((SELECT jsonb_agg(jsonb_build_object('at', e.at, 'error', 'failed',
                                                      'event', e.type::text)
                                   ORDER BY e.at, e.id)
                    FROM {events} e
                   WHERE e.job_id = job.id AND e.type::text = 'deferred_for_retry'),
                 '[]'::jsonb)
            || jsonb_build_array(jsonb_build_object('at', now(), 'error', 'failed',
                                                    'event', 'failed')),
        v_extra);

-- name: triggers
CREATE TRIGGER dlqd_capture AFTER UPDATE OF status ON {jobs}
    FOR EACH ROW
    WHEN (NEW.status::text = 'failed' AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION {function}();

-- name: replay
-- Re-enqueued through Procrastinate's own function, as its client defers a
-- job: the queue, priority, lock and queueing lock it had (or the target's
-- overrides); a row dlqd did not capture goes to queue 'default'.
SELECT {schema}.procrastinate_defer_jobs_v1(ARRAY(
    SELECT ROW(coalesce({queue}, a.job ->> 'queue', 'default'),
               r.type,
               coalesce({priority}, (a.job ->> 'priority')::integer, 0),
               a.job ->> 'lock',
               a.job ->> 'queueing_lock',
               r.payload,
               {run_at})::{schema}.procrastinate_job_to_defer_v1
      FROM replayed r
      LEFT JOIN dlqd_adapter_jobs a ON a.dlq_id = r.id AND a.system = 'procrastinate'
     ORDER BY r.dlq_at, r.id))
