-- 010: the console and redrives.
--   * dlqd_redrives: a redrive is a durable task (replay every pending row a
--     filter matches, at a rate, cancellable), run by one replica at a time
--     under a lease, resumed from its keyset cursor after a crash;
--   * the replay log says which redrive replayed a row;
--   * dlqd_replay_hours: replays, failures and parks per hour, tenant and
--     policy, kept by a trigger on the log in the transaction that logs them
--     (the console's 24-hour chart and per-policy counts read it, never the log);
--   * dlqd_runs: when the leader's purge last ran, and what it did;
--   * dlqd_console_keys: the key that signs the console's session cookies,
--     shared by every replica;
--   * dlqd_redact(): masks secrets in a document before it leaves Postgres;
--   * row-level security on dlqd's own tables: a console request of a token
--     bound to one tenant runs as role dlqd_tenant (sql/roles.sql) with
--     app.current_app_id set, and sees only that tenant's rows, here as in
--     job_dlq. Other roles are unaffected: dlqd has BYPASSRLS (or the
--     fallback policy below lets it see all), the owner is not forced.

CREATE TABLE dlqd_redrives (
    id                  uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    state               text        NOT NULL DEFAULT 'queued'
                                    CONSTRAINT dlqd_redrives_state_check
                                    CHECK (state IN ('queued', 'running', 'done', 'cancelled', 'failed')),
    -- the filter as `dlqd list` takes it: globs per key column, states,
    -- policies, a payload containment document, an error substring
    filter              jsonb       NOT NULL CHECK (jsonb_typeof(filter) = 'object'),
    -- a tenant-bound token's tenant: the redrive selects its rows as that
    -- tenant (row-level security), and replays no other tenant's row
    scope_app_id        text        NULL,
    via                 text        NULL,
    reason              text        NULL,
    actor               text        NOT NULL,
    rate                float8      NULL CHECK (rate IS NULL OR rate > 0),
    -- rows that matched when it was created; what it has done since
    matched             bigint      NOT NULL DEFAULT 0,
    replayed            bigint      NOT NULL DEFAULT 0,
    failed              bigint      NOT NULL DEFAULT 0,
    skipped             bigint      NOT NULL DEFAULT 0,
    -- it replays rows dead-lettered up to its creation, in (dlq_at, id) order;
    -- the cursor is the last row done, written in the transaction that did it
    until_at            timestamptz NOT NULL DEFAULT now(),
    cursor_at           timestamptz NULL,
    cursor_id           uuid        NULL,
    -- the replica running it, until when (renewed while it runs)
    owner               text        NULL,
    lease_until         timestamptz NOT NULL DEFAULT '-infinity',
    cancel_requested_at timestamptz NULL,
    error               text        NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz NULL,
    finished_at         timestamptz NULL
);
CREATE INDEX dlqd_redrives_active_idx ON dlqd_redrives (created_at)
    WHERE state IN ('queued', 'running');
CREATE INDEX dlqd_redrives_created_idx ON dlqd_redrives (created_at DESC, id);

ALTER TABLE dlqd_replay_log ADD COLUMN redrive_id uuid NULL;

-- Every finish goes through the six-argument form (the redrive, if any); the
-- five-argument form stays for a daemon of the release before.
CREATE FUNCTION dlqd_finish_replayed(ids uuid[], policies text[], manual boolean,
                                     actor text, reason text, redrive uuid)
RETURNS TABLE (id uuid, lag_seconds float8)
LANGUAGE sql
AS $$
    WITH marked AS (
        UPDATE job_dlq j SET replayed_at = now()
         WHERE j.id = ANY (ids) AND j.replayed_at IS NULL
        RETURNING j.id, j.original_job_id, j.app_id, j.dlq_at, j.replayed_at
    ), cleared AS (
        DELETE FROM dlqd_entry_state s WHERE s.dlq_id IN (SELECT m.id FROM marked m)
    ), logged AS (
        INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, policy, outcome, manual,
                                     actor, reason, redrive_id)
        SELECT m.id, m.original_job_id, m.app_id, u.policy, 'replayed', manual, actor, reason,
               redrive
          FROM marked m
          JOIN unnest(ids, policies) WITH ORDINALITY AS u(id, policy, n) ON u.id = m.id
         ORDER BY u.n
    )
    SELECT m.id, CASE WHEN isfinite(m.dlq_at)
                      THEN extract(epoch FROM m.replayed_at - m.dlq_at)::float8 END
      FROM marked m
$$;
REVOKE ALL ON FUNCTION dlqd_finish_replayed(uuid[], text[], boolean, text, text, uuid) FROM PUBLIC;
CREATE OR REPLACE FUNCTION dlqd_finish_replayed(ids uuid[], policies text[], manual boolean,
                                                actor text, reason text)
RETURNS TABLE (id uuid, lag_seconds float8)
LANGUAGE sql
AS $$ SELECT * FROM dlqd_finish_replayed(ids, policies, manual, actor, reason, NULL::uuid) $$;

-- Outcomes per hour. The trigger adds a statement's log rows in one upsert,
-- in key order (concurrent writers lock the same rows in the same order).
CREATE TABLE dlqd_replay_hours (
    hour    timestamptz NOT NULL,
    app_id  text        NOT NULL,
    policy  text        NOT NULL,  -- '' for a manual replay through replay.default_target
    outcome text        NOT NULL,
    n       bigint      NOT NULL,
    PRIMARY KEY (hour, app_id, policy, outcome)
);

CREATE FUNCTION dlqd_count_outcomes() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    INSERT INTO dlqd_replay_hours AS h (hour, app_id, policy, outcome, n)
    SELECT date_trunc('hour', at), app_id, coalesce(policy, ''), outcome, count(*)
      FROM new_rows
     GROUP BY 1, 2, 3, 4
     ORDER BY 1, 2, 3, 4
    ON CONFLICT (hour, app_id, policy, outcome) DO UPDATE SET n = h.n + excluded.n;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION dlqd_count_outcomes() FROM PUBLIC;
SELECT dlqd_pin_search_path('dlqd_count_outcomes()');

CREATE TRIGGER dlqd_replay_log_count_outcomes
    AFTER INSERT ON dlqd_replay_log
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dlqd_count_outcomes();

-- The log's trim also trims the hours (same retention).
CREATE OR REPLACE FUNCTION dlqd_trim_replay_log(older_than interval, batch_size integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    deleted bigint;
BEGIN
    IF older_than IS NULL OR batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'dlqd_trim_replay_log: older_than and a batch_size >= 1 are required';
    END IF;
    WITH doomed AS (
        SELECT id FROM dlqd_replay_log
         WHERE at < now() - older_than
         ORDER BY at
         LIMIT batch_size
    )
    DELETE FROM dlqd_replay_log l USING doomed d WHERE l.id = d.id;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    DELETE FROM dlqd_replay_hours WHERE hour < date_trunc('hour', now() - older_than);
    RETURN deleted;
END
$$;
SELECT dlqd_pin_search_path('dlqd_trim_replay_log(interval, integer)');

-- Runs of the leader's periodic work: when each last finished, and its result.
CREATE TABLE dlqd_runs (
    task        text        PRIMARY KEY,
    finished_at timestamptz NOT NULL,
    ok          boolean     NOT NULL,
    detail      jsonb       NOT NULL DEFAULT '{}'::jsonb
);

-- The console's session key (random, made by the first replica that serves
-- the console). Deleting the row signs every browser out.
CREATE TABLE dlqd_console_keys (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    key        bytea       NOT NULL CHECK (length(key) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- A key matches when its letters and digits, lowercased, contain one of
-- `patterns` (given the same way: "api_key" matches apiKey, X-Api-Key).
CREATE FUNCTION dlqd_redacted_key(key text, patterns text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT EXISTS (SELECT FROM unnest(patterns) p
                    WHERE p <> '' AND strpos(regexp_replace(lower(key), '[^a-z0-9]', '', 'g'), p) > 0)
$$;

-- `doc` with the value of every key that matches `patterns` replaced by
-- "•••", at any depth; below 64 levels of nesting a whole subtree is masked
-- (fails closed: nothing deep slips through, no stack is exhausted).
CREATE FUNCTION dlqd_redact(doc jsonb, patterns text[], depth integer DEFAULT 0) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    result jsonb;
BEGIN
    IF doc IS NULL OR patterns IS NULL OR cardinality(patterns) = 0 THEN
        RETURN doc;
    END IF;
    IF jsonb_typeof(doc) NOT IN ('object', 'array') THEN
        RETURN doc;
    END IF;
    IF depth >= 64 THEN
        RETURN to_jsonb('•••'::text);
    END IF;
    IF jsonb_typeof(doc) = 'object' THEN
        SELECT coalesce(jsonb_object_agg(e.key,
                   CASE WHEN dlqd_redacted_key(e.key, patterns) THEN to_jsonb('•••'::text)
                        ELSE dlqd_redact(e.value, patterns, depth + 1) END), '{}'::jsonb)
          INTO result
          FROM jsonb_each(doc) e;
    ELSE
        SELECT coalesce(jsonb_agg(dlqd_redact(e.value, patterns, depth + 1) ORDER BY e.n),
                        '[]'::jsonb)
          INTO result
          FROM jsonb_array_elements(doc) WITH ORDINALITY AS e(value, n);
    END IF;
    RETURN result;
END
$$;
SELECT dlqd_pin_search_path('dlqd_redact(jsonb, text[], integer)');
SELECT dlqd_pin_search_path('dlqd_redacted_key(text, text[])');

-- Row-level security on dlqd's own tables, for role dlqd_tenant alone (a
-- role name compared as text: the role may not exist yet when this runs).
ALTER TABLE dlqd_entry_state ENABLE ROW LEVEL SECURITY;
CREATE POLICY dlqd_tenant_scope ON dlqd_entry_state
    USING (current_user <> 'dlqd_tenant' OR EXISTS (SELECT FROM job_dlq j WHERE j.id = dlq_id))
    WITH CHECK (current_user <> 'dlqd_tenant');
ALTER TABLE dlqd_inbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY dlqd_tenant_scope ON dlqd_inbox
    USING (current_user <> 'dlqd_tenant' OR EXISTS (SELECT FROM job_dlq j WHERE j.id = dlq_id))
    WITH CHECK (current_user <> 'dlqd_tenant');
ALTER TABLE dlqd_replay_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY dlqd_tenant_scope ON dlqd_replay_log
    USING (current_user <> 'dlqd_tenant'
           OR app_id = current_setting('app.current_app_id', true))
    WITH CHECK (current_user <> 'dlqd_tenant');
ALTER TABLE dlqd_replay_hours ENABLE ROW LEVEL SECURITY;
CREATE POLICY dlqd_tenant_scope ON dlqd_replay_hours
    USING (current_user <> 'dlqd_tenant'
           OR app_id = current_setting('app.current_app_id', true))
    WITH CHECK (current_user <> 'dlqd_tenant');
ALTER TABLE dlqd_redrives ENABLE ROW LEVEL SECURITY;
CREATE POLICY dlqd_tenant_scope ON dlqd_redrives
    USING (current_user <> 'dlqd_tenant'
           OR scope_app_id = current_setting('app.current_app_id', true))
    WITH CHECK (current_user <> 'dlqd_tenant');
