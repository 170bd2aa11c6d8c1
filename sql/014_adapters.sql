-- 014: adapters. A job system's jobs that failed for good are captured into
-- job_dlq by a trigger on that system's table (`dlqd adapters install`), and
-- replayed into it by a preset target.
--   * what replaying such a job needs and job_dlq has no column for (its
--     queue, priority, lock, ...) is kept beside the row, in dlqd_adapter_jobs,
--     as the system named it; the contract's columns stay as they are;
--   * the capture goes through dlqd_capture, a SECURITY DEFINER function no
--     one but the owner may call: a job system's role needs no right on
--     job_dlq, and no tenant can write another tenant's rows through it.

CREATE TABLE dlqd_adapter_jobs (
    dlq_id uuid PRIMARY KEY REFERENCES job_dlq (id) ON DELETE CASCADE,
    system text NOT NULL,
    job    jsonb NOT NULL CHECK (jsonb_typeof(job) = 'object')
);
COMMENT ON TABLE dlqd_adapter_jobs IS
    'What replaying a captured job needs beyond job_dlq (queue, priority, ...), by adapter.';

ALTER TABLE dlqd_adapter_jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY dlqd_tenant_scope ON dlqd_adapter_jobs
    USING (current_user <> 'dlqd_tenant' OR EXISTS (SELECT FROM job_dlq j WHERE j.id = dlq_id))
    WITH CHECK (current_user <> 'dlqd_tenant');

-- One captured job: its job_dlq row (the insert trigger files it in the inbox
-- and wakes the daemon) and what its replay needs. Runs as the owner of
-- job_dlq, which sees and writes every tenant's rows only while
-- dlqd.maintenance is on (003): on for the two inserts, then as it was.
CREATE FUNCTION dlqd_capture(
    p_system          text,
    p_app_id          text,
    p_original_job_id text,
    p_type            text,
    p_payload         jsonb,
    p_error_reason    text,
    p_attempts        integer,
    p_error_history   jsonb,
    p_job             jsonb
) RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    v_id   uuid;
    v_was  text := current_setting('dlqd.maintenance', true);
BEGIN
    PERFORM set_config('dlqd.maintenance', 'on', true);
    INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts,
                         error_history)
    VALUES (p_original_job_id, p_app_id, p_type, p_payload, p_error_reason,
            greatest(coalesce(p_attempts, 0), 0),
            CASE WHEN jsonb_typeof(p_error_history) = 'array' THEN p_error_history
                 ELSE '[]'::jsonb END)
    RETURNING id INTO v_id;
    INSERT INTO dlqd_adapter_jobs (dlq_id, system, job) VALUES (v_id, p_system, p_job);
    PERFORM set_config('dlqd.maintenance', coalesce(v_was, ''), true);
    RETURN v_id;
END
$$;
REVOKE ALL ON FUNCTION dlqd_capture(text, text, text, text, jsonb, text, integer, jsonb, jsonb)
    FROM PUBLIC;
SELECT dlqd_pin_search_path(
    'dlqd_capture(text, text, text, text, jsonb, text, integer, jsonb, jsonb)');
