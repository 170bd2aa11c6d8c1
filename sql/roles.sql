-- Roles for dlqd. Not a migration: roles are cluster-wide. Run it as a
-- superuser (or a role with CREATEROLE) after `dlqd migrate`, and again after
-- upgrades that add tables. Idempotent. Set passwords separately:
--   ALTER ROLE dlqd PASSWORD '...';
--
--   dlqd      the daemon and the CLI: sees every tenant's rows.
--   dlqd_app  job systems writing dead letters: one tenant per session,
--             chosen with SET app.current_app_id = '<app_id>'.
--   dlqd_tenant  no login: the console's requests of a token bound to one
--             tenant switch to it (SET LOCAL ROLE, with app.current_app_id),
--             so that row-level security shows them that tenant's rows only.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dlqd') THEN
        CREATE ROLE dlqd LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dlqd_app') THEN
        CREATE ROLE dlqd_app LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dlqd_tenant') THEN
        CREATE ROLE dlqd_tenant NOLOGIN;
    END IF;
END
$$;
-- whatever it was made with: no login, no way around row-level security
-- (where only a superuser may name those attributes, a role made without
-- superuser rights has neither; from PostgreSQL 16 a CREATEROLE role may
-- name CREATEDB only if it has it, and could not have given it either; the
-- console checks before it serves)
DO $$
BEGIN
    BEGIN
        ALTER ROLE dlqd_tenant NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    EXCEPTION WHEN insufficient_privilege THEN
        ALTER ROLE dlqd_tenant NOLOGIN;
        BEGIN
            ALTER ROLE dlqd_tenant NOCREATEDB;
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;
        END;
        BEGIN
            ALTER ROLE dlqd_tenant NOCREATEROLE;
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;
        END;
    END;
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_auth_members m
                    WHERE m.roleid = 'dlqd_tenant'::regrole AND m.member = 'dlqd'::regrole) THEN
        GRANT dlqd_tenant TO dlqd;
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

GRANT USAGE ON SCHEMA public TO dlqd, dlqd_app, dlqd_tenant;

-- Nobody but the schema's owner creates objects in dlqd's schema: a function
-- or operator a tenant could create there would be found by name resolution
-- in dlqd's own sessions (PostgreSQL 15 made this the default for public;
-- older servers grant CREATE to PUBLIC).
DO $$
BEGIN
    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC, dlqd, dlqd_app, dlqd_tenant',
                   current_schema());
END
$$;

-- The daemon reads, marks replayed (only that column), and purges through
-- SECURITY DEFINER functions: it holds no DELETE on job_dlq, and cannot
-- rewrite or erase its own audit trail (the replay log is insert-only).
REVOKE DELETE, INSERT, TRUNCATE ON job_dlq FROM dlqd;
GRANT SELECT ON job_dlq TO dlqd;
GRANT UPDATE (replayed_at) ON job_dlq TO dlqd;
GRANT EXECUTE ON FUNCTION job_dlq_purge(interval, interval, integer) TO dlqd;
GRANT SELECT ON dlqd_schema_migrations TO dlqd;

-- Its own state: the replay log (append-only), the schedule and the inbox.
DO $$
BEGIN
    IF to_regclass('dlqd_replay_log') IS NOT NULL THEN
        REVOKE UPDATE, DELETE, TRUNCATE ON dlqd_replay_log FROM dlqd;
        GRANT SELECT, INSERT ON dlqd_replay_log TO dlqd;
    END IF;
    IF to_regclass('dlqd_entry_state') IS NOT NULL THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON dlqd_entry_state, dlqd_inbox TO dlqd;
    END IF;
    IF to_regclass('dlqd_circuits') IS NOT NULL THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON dlqd_rate_buckets, dlqd_circuits TO dlqd;
    END IF;
    IF to_regprocedure('dlqd_trim_replay_log(interval, integer)') IS NOT NULL THEN
        GRANT EXECUTE ON FUNCTION dlqd_trim_replay_log(interval, integer) TO dlqd;
    END IF;
    IF to_regprocedure('dlqd_trim_replay_log_after(interval, integer, timestamptz)') IS NOT NULL THEN
        GRANT EXECUTE ON FUNCTION dlqd_trim_replay_log_after(interval, integer, timestamptz)
            TO dlqd;
    END IF;
    IF to_regprocedure('dlqd_finish_replayed(uuid[], text[], boolean, text, text)') IS NOT NULL THEN
        GRANT EXECUTE ON FUNCTION dlqd_finish_replayed(uuid[], text[], boolean, text, text) TO dlqd;
    END IF;
    IF to_regprocedure('dlqd_define_row_function(text, text)') IS NOT NULL THEN
        GRANT EXECUTE ON FUNCTION dlqd_define_row_function(text, text) TO dlqd;
    END IF;
    -- lock slots are locked FOR UPDATE (which needs UPDATE); the leader's lease is one row
    IF to_regclass('dlqd_lock_slots') IS NOT NULL THEN
        GRANT SELECT, UPDATE ON dlqd_lock_slots, dlqd_leader TO dlqd;
    END IF;
    -- redrives, the leader's runs, the console's session key; the hourly
    -- outcomes are written by the log's trigger alone
    IF to_regclass('dlqd_redrives') IS NOT NULL THEN
        GRANT SELECT, INSERT, UPDATE ON dlqd_redrives, dlqd_runs TO dlqd;
        GRANT SELECT, INSERT ON dlqd_console_keys TO dlqd;
        GRANT SELECT ON dlqd_replay_hours TO dlqd;
        GRANT EXECUTE ON FUNCTION dlqd_finish_replayed(uuid[], text[], boolean, text, text, uuid)
            TO dlqd;
        -- what a tenant-bound console request reads, under row-level security
        GRANT SELECT ON job_dlq, dlqd_entry_state, dlqd_inbox, dlqd_replay_log,
                        dlqd_replay_hours, dlqd_redrives TO dlqd_tenant;
    END IF;
    -- the counts: read by all, appended to by every replay's finish, folded
    -- and reconciled by the leader through the owner's functions; the wake flags
    IF to_regclass('dlqd_counts') IS NOT NULL THEN
        GRANT SELECT ON dlqd_counts, dlqd_count_deltas, dlqd_counts_reconciled TO dlqd, dlqd_tenant;
        GRANT INSERT ON dlqd_count_deltas TO dlqd;
        GRANT EXECUTE ON FUNCTION dlqd_fold_counts(), dlqd_reconcile_counts() TO dlqd;
        GRANT SELECT, INSERT, UPDATE, DELETE ON dlqd_wake TO dlqd;
    END IF;
    -- what the adapters' presets read to replay a captured job (written by
    -- the capture alone, as the owner)
    IF to_regclass('dlqd_adapter_jobs') IS NOT NULL THEN
        GRANT SELECT ON dlqd_adapter_jobs TO dlqd, dlqd_tenant;
    END IF;
END
$$;

-- Tenants write dead letters and read their own; row-level security limits
-- both to the tenant named by app.current_app_id.
GRANT SELECT, INSERT ON job_dlq TO dlqd_app;
