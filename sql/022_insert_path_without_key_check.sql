-- 022: an insert into job_dlq costs its inserter less.
--   * The inbox's foreign key to job_dlq goes. Its check ran for every
--     inserted row, in the inserting transaction: a query of job_dlq's
--     primary key and a KEY SHARE lock written on the row just inserted.
--     With eight concurrent inserters it cost more than the inbox entry
--     itself (bench/insert_bench.py). The insert trigger is the only writer
--     that needs no check (it files the rows of its own statement); the
--     others insert only rows they have just read from job_dlq.
--   * What the key's ON DELETE CASCADE did is done by the triggers that
--     already run: a pending row deleted takes its inbox entry with it
--     (dlqd_count_deleted), TRUNCATE takes every entry (dlqd_count_truncated),
--     and the leader's reconciliation (dlqd_reconcile_counts) removes the
--     entries of rows that someone else marked replayed and then deleted, the
--     one case that no trigger sees. The claims join job_dlq, so such an entry
--     is never replayed meanwhile.
--   * The insert trigger writes the inbox entries and the pending deltas in
--     one statement instead of two.
-- The search paths are pinned again (CREATE OR REPLACE resets them).

ALTER TABLE dlqd_inbox DROP CONSTRAINT IF EXISTS dlqd_inbox_dlq_id_fkey;

CREATE OR REPLACE FUNCTION job_dlq_notify_insert() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    WITH filed AS (
        INSERT INTO dlqd_inbox (dlq_id)
        SELECT id FROM new_rows WHERE replayed_at IS NULL ORDER BY dlq_at, id
    )
    INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
    SELECT app_id, type, error_reason, 'pending', count(*)
      FROM new_rows WHERE replayed_at IS NULL
     GROUP BY 1, 2, 3;
    -- FOUND: some row is pending. The wake-up only while some replayer
    -- listens (012) and the server's notification queue is not half full.
    IF FOUND AND EXISTS (SELECT FROM dlqd_wake WHERE beat > now() - interval '30 seconds')
       AND pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('dlqd_job_dlq', '{"op":"insert"}');
    END IF;
    RETURN NULL;
END
$$;
SELECT dlqd_pin_search_path('job_dlq_notify_insert()');

CREATE OR REPLACE FUNCTION dlqd_count_deleted() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
    SELECT OLD.app_id, OLD.type, OLD.error_reason, 'pending', -1
    UNION ALL
    SELECT OLD.app_id, OLD.type, OLD.error_reason, dlqd_state_kind(s.state, s.parked_reason), -1
      FROM dlqd_entry_state s WHERE s.dlq_id = OLD.id;
    DELETE FROM dlqd_inbox WHERE dlq_id = OLD.id;
    RETURN OLD;
END
$$;
SELECT dlqd_pin_search_path('dlqd_count_deleted()');

CREATE OR REPLACE FUNCTION dlqd_count_truncated() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    DELETE FROM dlqd_count_deltas;
    DELETE FROM dlqd_counts;
    DELETE FROM dlqd_inbox;
    RETURN NULL;
END
$$;
SELECT dlqd_pin_search_path('dlqd_count_truncated()');

CREATE OR REPLACE FUNCTION dlqd_reconcile_counts()
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
    -- inbox entries whose row is gone (marked replayed by someone else, then
    -- deleted: no trigger saw it); an entry and its row commit together, so
    -- one snapshot never shows an entry without a row that still exists
    DELETE FROM dlqd_inbox i WHERE NOT EXISTS (SELECT FROM job_dlq j WHERE j.id = i.dlq_id);
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
SELECT dlqd_pin_search_path('dlqd_reconcile_counts()');
