-- Roles for dlqd. Not a migration: roles are cluster-wide. Run it as a
-- superuser (or a role with CREATEROLE) after `dlqd migrate`, and again after
-- upgrades that add tables. Idempotent. Set passwords separately:
--   ALTER ROLE dlqd PASSWORD '...';
--
--   dlqd      the daemon and the CLI: sees every tenant's rows.
--   dlqd_app  job systems writing dead letters: one tenant per session,
--             chosen with SET app.current_app_id = '<app_id>'.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dlqd') THEN
        CREATE ROLE dlqd LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dlqd_app') THEN
        CREATE ROLE dlqd_app LOGIN;
    END IF;
END
$$;

-- dlqd sees every row. Prefer BYPASSRLS; where a managed platform refuses that
-- attribute, fall back to a permissive policy for the dlqd role alone.
DO $$
BEGIN
    BEGIN
        ALTER ROLE dlqd BYPASSRLS;
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'BYPASSRLS refused; creating policy dlqd_all_rows instead';
        IF NOT EXISTS (SELECT FROM pg_policies
                        WHERE tablename = 'job_dlq' AND policyname = 'dlqd_all_rows') THEN
            CREATE POLICY dlqd_all_rows ON job_dlq TO dlqd USING (true) WITH CHECK (true);
        END IF;
    END;
END
$$;

GRANT USAGE ON SCHEMA public TO dlqd, dlqd_app;

-- The daemon reads, marks replayed (only that column), and purges.
GRANT SELECT, DELETE ON job_dlq TO dlqd;
GRANT UPDATE (replayed_at) ON job_dlq TO dlqd;
GRANT EXECUTE ON FUNCTION job_dlq_purge(interval, interval, integer) TO dlqd;
GRANT SELECT ON dlqd_schema_migrations TO dlqd;

-- Its own state tables (replay log, schedule, inbox), when present.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['dlqd_replay_log', 'dlqd_entry_state', 'dlqd_inbox'] LOOP
        IF to_regclass(t) IS NOT NULL THEN
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO dlqd', t);
        END IF;
    END LOOP;
END
$$;

-- Tenants write dead letters and read their own; row-level security limits
-- both to the tenant named by app.current_app_id.
GRANT SELECT, INSERT ON job_dlq TO dlqd_app;
