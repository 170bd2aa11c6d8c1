-- 008: tenant isolation made true.
--   * SECURITY DEFINER code resolves names through a pinned search_path:
--     pg_catalog first, dlqd's own schema, the caller's temporary schema last,
--     so no temporary table, function or operator of a tenant is ever reached
--     (PostgreSQL searches pg_temp first for relations unless it is named);
--   * the wake-up carries nothing about the rows (any role may LISTEN), and is
--     skipped while the server's notification queue is half full, so a session
--     that LISTENs and never reads cannot make the job system's inserts fail;
--   * locks dlqd takes are rows of its own tables, which tenants cannot lock:
--     no advisory lock key a tenant can compute stalls a replay.

-- Pins a function's search_path to pg_catalog, the schema dlqd is migrated
-- into, pg_temp. Every migration that creates a SECURITY DEFINER function calls it.
CREATE FUNCTION dlqd_pin_search_path(fn regprocedure) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp',
                   fn, current_schema());
END
$$;
REVOKE ALL ON FUNCTION dlqd_pin_search_path(regprocedure) FROM PUBLIC;

CREATE OR REPLACE FUNCTION job_dlq_notify_insert() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    INSERT INTO dlqd_inbox (dlq_id)
    SELECT id FROM new_rows WHERE replayed_at IS NULL ORDER BY dlq_at, id;
    -- FOUND: the INSERT above took at least one row. The queue check: a full
    -- queue fails the inserting transaction at COMMIT; the inbox (and the
    -- daemon's poll) makes the wake-up optional.
    IF FOUND AND pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('dlqd_job_dlq', '{"op":"insert"}');
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION job_dlq_notify_insert() FROM PUBLIC;

SELECT dlqd_pin_search_path('job_dlq_notify_insert()');
SELECT dlqd_pin_search_path('job_dlq_purge(interval, interval, integer)');
SELECT dlqd_pin_search_path('dlqd_trim_replay_log(interval, integer)');

-- Lock slots: a replay of a row under max_replays, and the creation of a rate
-- bucket or a circuit row, lock the slot of their key (a hash of it) FOR UPDATE
-- SKIP LOCKED, and defer what another replica holds. Rows of a table only dlqd
-- may update: tenants cannot lock them (advisory locks need no privilege at all).
CREATE TABLE dlqd_lock_slots (
    slot integer PRIMARY KEY CHECK (slot >= 0 AND slot < 4096)
);
INSERT INTO dlqd_lock_slots (slot) SELECT generate_series(0, 4095);

-- The slot of a key (inlined into the queries that lock slots).
CREATE FUNCTION dlqd_slot(key text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ((hashtextextended(key, 0) % 4096 + 4096) % 4096)::integer $$;

-- The leader's lease: one row, renewed by the leader, taken over by a
-- follower once it has expired (by the server's clock alone). A row only dlqd
-- may write: no tenant can hold leadership away from the replicas.
CREATE TABLE dlqd_leader (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    holder     text        NULL,      -- host:pid/token of the leader, NULL: none
    expires_at timestamptz NOT NULL DEFAULT '-infinity',
    elected_at timestamptz NULL
);
INSERT INTO dlqd_leader DEFAULT VALUES;

-- A tenant's value as a label or a status key: at most 128 characters, a
-- longer one cut with a marker (a 100,000-character type made /metrics 147 MB).
CREATE FUNCTION dlqd_label(value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN length(value) > 128 THEN left(value, 127) || '…' ELSE value END $$;

-- A notify target's message, the one definition of its shape: the row's id,
-- original job id, tenant and type; with only_id, the id alone (any role may
-- LISTEN on any channel: a consumer reads the row by id, under its own rights).
CREATE FUNCTION dlqd_notify_message(id uuid, original_job_id text, app_id text, type text,
                                    only_id boolean)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN only_id THEN json_build_object('id', id)
                ELSE json_build_object('id', id, 'original_job_id', original_job_id,
                                       'app_id', app_id, 'type', type) END::text
$$;
