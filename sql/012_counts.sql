-- 012: counts that cost O(groups), and inserts that no NOTIFY serialises.
--
--   * dlqd_count_deltas: every change to what is pending and held, per group
--     (app_id, type, error_reason) and kind, appended in the transaction that
--     makes it: by the insert trigger, the finish of every replay, a trigger
--     on the schedule (dlqd_entry_state), a trigger on deletes of pending rows.
--     Append-only: no row that concurrent writers update, so no inserter waits
--     for another. The leader folds them into dlqd_counts every few seconds;
--     a reader sums both (O(groups) plus what is not folded yet).
--     kind: 'pending', 'waiting', 'unmatched', 'parked:<why>' (policy, manual,
--     max_failures, max_replays, invalid_row, http_4xx).
--   * dlqd_reconcile_counts(): what no trigger sees (a restore with triggers
--     off, an UPDATE by another role) is corrected by the leader's periodic
--     reconciliation, in one statement (one snapshot), as correcting deltas;
--     it returns what it corrected. Until it first ran (dlqd_counts_reconciled),
--     readers count the table itself, as before.
--   * dlqd_wake: a replayer that listens has a row here (renewed every 10 s,
--     fresh for 30 s); the insert trigger notifies only while some row is
--     fresh. A replayer draining a backlog takes its row away and looks again
--     by itself, so inserters send no NOTIFY, whose commit-time lock would
--     serialise every inserting transaction. When it listens again it waits
--     for the transactions that were writing the inbox meanwhile and looks
--     once more (dlqd/replay/presence.py).

CREATE TABLE dlqd_counts (
    app_id       text   NOT NULL,
    type         text   NOT NULL,
    error_reason text   NOT NULL,
    kind         text   NOT NULL,
    n            bigint NOT NULL,
    PRIMARY KEY (app_id, type, error_reason, kind)
);

CREATE TABLE dlqd_count_deltas (
    app_id       text   NOT NULL,
    type         text   NOT NULL,
    error_reason text   NOT NULL,
    kind         text   NOT NULL,
    n            bigint NOT NULL
);
-- appended and folded all day long: vacuum it often
ALTER TABLE dlqd_count_deltas SET (autovacuum_vacuum_scale_factor = 0,
                                   autovacuum_vacuum_threshold = 1000,
                                   autovacuum_analyze_scale_factor = 0,
                                   autovacuum_analyze_threshold = 1000);

-- at: when the counts were last reconciled (NULL: never, readers count the
-- table itself); its row is also what serialises two reconciliations.
CREATE TABLE dlqd_counts_reconciled (
    singleton boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    at        timestamptz NULL,
    corrected bigint      NOT NULL DEFAULT 0
);
INSERT INTO dlqd_counts_reconciled DEFAULT VALUES;

-- The kind a schedule row counts as.
CREATE FUNCTION dlqd_state_kind(state text, parked_reason text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE state WHEN 'waiting' THEN 'waiting'
                      WHEN 'unmatched' THEN 'unmatched'
                      WHEN 'parked_policy' THEN 'parked:policy'
                      ELSE 'parked:' || coalesce(parked_reason, 'unknown') END
$$;

CREATE TABLE dlqd_wake (
    worker text        PRIMARY KEY,  -- host:pid:token/index of dlqd run
    beat   timestamptz NOT NULL
);

-- The insert trigger: inbox entries, the pending deltas, and a wake-up while
-- some replayer listens (and the server's notification queue is not half full).
CREATE OR REPLACE FUNCTION job_dlq_notify_insert() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    INSERT INTO dlqd_inbox (dlq_id)
    SELECT id FROM new_rows WHERE replayed_at IS NULL ORDER BY dlq_at, id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
    SELECT app_id, type, error_reason, 'pending', count(*)
      FROM new_rows WHERE replayed_at IS NULL
     GROUP BY 1, 2, 3;
    IF EXISTS (SELECT FROM dlqd_wake WHERE beat > now() - interval '30 seconds')
       AND pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('dlqd_job_dlq', '{"op":"insert"}');
    END IF;
    RETURN NULL;
END
$$;
SELECT dlqd_pin_search_path('job_dlq_notify_insert()');

-- A pending row deleted (a purge past pending_retention, a delete by another
-- role): its pending and held counts go with it. Row-level, before the row
-- and its schedule go, for pending rows only (the purge of replayed rows, the
-- common case, never calls it).
CREATE FUNCTION dlqd_count_deleted() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
    SELECT OLD.app_id, OLD.type, OLD.error_reason, 'pending', -1
    UNION ALL
    SELECT OLD.app_id, OLD.type, OLD.error_reason, dlqd_state_kind(s.state, s.parked_reason), -1
      FROM dlqd_entry_state s WHERE s.dlq_id = OLD.id;
    RETURN OLD;
END
$$;
REVOKE ALL ON FUNCTION dlqd_count_deleted() FROM PUBLIC;
SELECT dlqd_pin_search_path('dlqd_count_deleted()');

CREATE TRIGGER job_dlq_count_deleted
    BEFORE DELETE ON job_dlq
    FOR EACH ROW WHEN (OLD.replayed_at IS NULL)
    EXECUTE FUNCTION dlqd_count_deleted();

-- TRUNCATE takes everything: the counts too.
CREATE FUNCTION dlqd_count_truncated() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    DELETE FROM dlqd_count_deltas;
    DELETE FROM dlqd_counts;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION dlqd_count_truncated() FROM PUBLIC;
SELECT dlqd_pin_search_path('dlqd_count_truncated()');

CREATE TRIGGER job_dlq_count_truncated
    AFTER TRUNCATE ON job_dlq
    FOR EACH STATEMENT EXECUTE FUNCTION dlqd_count_truncated();

-- The schedule's changes, per group and kind. The group comes from job_dlq
-- (read with the maintenance policy: the owner is subject to row-level
-- security); a schedule row deleted with its job_dlq row (the cascade of a
-- delete) finds none, and dlqd_count_deleted has counted it already.
CREATE FUNCTION dlqd_count_states() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    previous text := current_setting('dlqd.maintenance', true);
BEGIN
    PERFORM set_config('dlqd.maintenance', 'on', true);
    IF TG_OP = 'INSERT' THEN
        INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
        SELECT j.app_id, j.type, j.error_reason, dlqd_state_kind(s.state, s.parked_reason), count(*)
          FROM new_states s JOIN job_dlq j ON j.id = s.dlq_id
         GROUP BY 1, 2, 3, 4;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
        SELECT j.app_id, j.type, j.error_reason, dlqd_state_kind(s.state, s.parked_reason), -count(*)
          FROM old_states s JOIN job_dlq j ON j.id = s.dlq_id
         GROUP BY 1, 2, 3, 4;
    ELSE
        INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
        SELECT j.app_id, j.type, j.error_reason, c.kind, sum(c.n)
          FROM (SELECT dlq_id, dlqd_state_kind(state, parked_reason) AS kind, 1 AS n
                  FROM new_states
                UNION ALL
                SELECT dlq_id, dlqd_state_kind(state, parked_reason), -1 FROM old_states) c
          JOIN job_dlq j ON j.id = c.dlq_id
         GROUP BY 1, 2, 3, 4
        HAVING sum(c.n) <> 0;
    END IF;
    PERFORM set_config('dlqd.maintenance', coalesce(previous, ''), true);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION dlqd_count_states() FROM PUBLIC;
SELECT dlqd_pin_search_path('dlqd_count_states()');

CREATE TRIGGER dlqd_entry_state_count_inserted
    AFTER INSERT ON dlqd_entry_state REFERENCING NEW TABLE AS new_states
    FOR EACH STATEMENT EXECUTE FUNCTION dlqd_count_states();
CREATE TRIGGER dlqd_entry_state_count_updated
    AFTER UPDATE ON dlqd_entry_state REFERENCING OLD TABLE AS old_states NEW TABLE AS new_states
    FOR EACH STATEMENT EXECUTE FUNCTION dlqd_count_states();
CREATE TRIGGER dlqd_entry_state_count_deleted
    AFTER DELETE ON dlqd_entry_state REFERENCING OLD TABLE AS old_states
    FOR EACH STATEMENT EXECUTE FUNCTION dlqd_count_states();

-- Every replay finishes here (ordinary and express pages, manual replays,
-- redrives): the pending count goes down in the same statement.
CREATE OR REPLACE FUNCTION dlqd_finish_replayed(ids uuid[], policies text[], manual boolean,
                                                actor text, reason text, redrive uuid)
RETURNS TABLE (id uuid, lag_seconds float8)
LANGUAGE sql
AS $$
    WITH marked AS (
        UPDATE job_dlq j SET replayed_at = now()
         WHERE j.id = ANY (ids) AND j.replayed_at IS NULL
        RETURNING j.id, j.original_job_id, j.app_id, j.type, j.error_reason, j.dlq_at,
                  j.replayed_at
    ), cleared AS (
        DELETE FROM dlqd_entry_state s WHERE s.dlq_id IN (SELECT m.id FROM marked m)
    ), counted AS (
        INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
        SELECT m.app_id, m.type, m.error_reason, 'pending', -count(*)
          FROM marked m GROUP BY 1, 2, 3
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

-- The leader folds the deltas into the counts (zero counts go).
CREATE FUNCTION dlqd_fold_counts() RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    folded bigint;
BEGIN
    WITH moved AS (
        DELETE FROM dlqd_count_deltas RETURNING app_id, type, error_reason, kind, n
    ), summed AS (
        SELECT app_id, type, error_reason, kind, sum(n) AS n, count(*) AS rows
          FROM moved GROUP BY 1, 2, 3, 4
    ), applied AS (
        INSERT INTO dlqd_counts AS c (app_id, type, error_reason, kind, n)
        SELECT app_id, type, error_reason, kind, n FROM summed
         ORDER BY 1, 2, 3, 4
        ON CONFLICT (app_id, type, error_reason, kind) DO UPDATE SET n = c.n + excluded.n
    )
    SELECT coalesce(sum(rows), 0) INTO folded FROM summed;
    DELETE FROM dlqd_counts WHERE n = 0;
    RETURN folded;
END
$$;
REVOKE ALL ON FUNCTION dlqd_fold_counts() FROM PUBLIC;
SELECT dlqd_pin_search_path('dlqd_fold_counts()');

-- What the table holds against what was counted, in one statement (one
-- snapshot: a change and its deltas are in the same transaction, so both are
-- seen or neither); the differences are appended as deltas. Returns the rows
-- corrected per kind. O(pending rows): the leader runs it, not often.
CREATE FUNCTION dlqd_reconcile_counts()
RETURNS TABLE (kind text, corrected bigint)
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    previous text := current_setting('dlqd.maintenance', true);
BEGIN
    PERFORM set_config('dlqd.maintenance', 'on', true);
    -- one reconciliation at a time (two leaders for a moment would correct twice)
    PERFORM FROM dlqd_counts_reconciled FOR UPDATE;
    RETURN QUERY
    WITH actual AS (
        SELECT j.app_id, j.type, j.error_reason, 'pending'::text AS kind, count(*) AS n
          FROM job_dlq j WHERE j.replayed_at IS NULL GROUP BY 1, 2, 3
        UNION ALL
        SELECT j.app_id, j.type, j.error_reason, dlqd_state_kind(s.state, s.parked_reason),
               count(*)
          FROM dlqd_entry_state s JOIN job_dlq j ON j.id = s.dlq_id
         WHERE j.replayed_at IS NULL
         GROUP BY 1, 2, 3, 4
    ), counted AS (
        SELECT c.app_id, c.type, c.error_reason, c.kind, sum(c.n) AS n
          FROM (SELECT d.app_id, d.type, d.error_reason, d.kind, d.n FROM dlqd_counts d
                UNION ALL
                SELECT d.app_id, d.type, d.error_reason, d.kind, d.n FROM dlqd_count_deltas d) c
         GROUP BY 1, 2, 3, 4
    ), diff AS (
        SELECT coalesce(a.app_id, c.app_id) AS app_id, coalesce(a.type, c.type) AS type,
               coalesce(a.error_reason, c.error_reason) AS error_reason,
               coalesce(a.kind, c.kind) AS kind,
               coalesce(a.n, 0) - coalesce(c.n, 0) AS n
          FROM actual a
          FULL JOIN counted c USING (app_id, type, error_reason, kind)
         WHERE coalesce(a.n, 0) <> coalesce(c.n, 0)
    ), corrected AS (
        INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
        SELECT d.app_id, d.type, d.error_reason, d.kind, d.n FROM diff d
    ), marked AS (
        UPDATE dlqd_counts_reconciled
           SET at = now(), corrected = (SELECT coalesce(sum(abs(d.n)), 0) FROM diff d)
    )
    SELECT d.kind, sum(abs(d.n))::bigint FROM diff d GROUP BY d.kind;
    PERFORM set_config('dlqd.maintenance', coalesce(previous, ''), true);
END
$$;
REVOKE ALL ON FUNCTION dlqd_reconcile_counts() FROM PUBLIC;
SELECT dlqd_pin_search_path('dlqd_reconcile_counts()');

-- A tenant-bound console request reads its tenant's counts only.
ALTER TABLE dlqd_counts ENABLE ROW LEVEL SECURITY;
CREATE POLICY dlqd_tenant_scope ON dlqd_counts
    USING (current_user <> 'dlqd_tenant'
           OR app_id = current_setting('app.current_app_id', true))
    WITH CHECK (current_user <> 'dlqd_tenant');
ALTER TABLE dlqd_count_deltas ENABLE ROW LEVEL SECURITY;
CREATE POLICY dlqd_tenant_scope ON dlqd_count_deltas
    USING (current_user <> 'dlqd_tenant'
           OR app_id = current_setting('app.current_app_id', true))
    WITH CHECK (current_user <> 'dlqd_tenant');
