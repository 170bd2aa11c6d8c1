-- 023: a single-row insert writes one row of dlqd's, not two.
--   A job system dead-letters one job per transaction. Until now each such
--   insert wrote its inbox entry and a pending delta (012): two heap inserts
--   in the inserter's transaction, each about a sixth of what the insert
--   costs eight concurrent inserters (bench/insert_bench.py). Now the entry
--   of a single-row insert *is* its pending count:
--   * dlqd_inbox.counted: false for such an entry, whose row no delta counts
--     yet. Readers add the uncounted entries to the counts (an index range
--     of dlqd_inbox_uncounted_idx joined to job_dlq by primary key).
--   * Whoever takes an uncounted entry out of the inbox (a claim, an express
--     page, a park, a deleted row) turns it into a delta of +1, in the same
--     transaction: the inbox's delete trigger. The sum of counts, deltas
--     and uncounted entries never moves but with the table.
--   * Entries still there at the leader's next fold are adopted: marked
--     counted and turned into deltas (dlqd_fold_counts), a page of them per
--     fold, so that readers stay O(groups) when the inbox grows (no daemon
--     claiming, a backlog). Entries claimed within a fold interval, the
--     usual case, are never updated.
--   * A statement of several rows still writes the deltas of its rows (one
--     per group) and files its entries counted: a bulk insert is not left to
--     the adoption.
--   Other writers of the inbox (the sweep, an unpark) file counted entries:
--   their rows are counted already (or reconciled), as before.
--   Without the foreign key (022), TRUNCATE takes every entry
--   (dlqd_count_truncated) and the reconciliation removes the entries of rows
--   that someone else marked replayed and then deleted, the one case no
--   trigger sees.
-- The search paths are pinned again (CREATE OR REPLACE resets them).

ALTER TABLE dlqd_inbox ADD COLUMN counted boolean NOT NULL DEFAULT true;
CREATE INDEX dlqd_inbox_uncounted_idx ON dlqd_inbox (seq) WHERE NOT counted;
-- inbox_seen: the highest inbox seq at the last fold; the next fold adopts
-- the uncounted entries up to it (older than one fold interval)
ALTER TABLE dlqd_counts_reconciled ADD COLUMN inbox_seen bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION job_dlq_notify_insert() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    pending bigint;
BEGIN
    SELECT count(*) INTO pending FROM new_rows WHERE replayed_at IS NULL;
    IF pending = 0 THEN
        RETURN NULL;
    ELSIF pending = 1 THEN
        -- the entry is the count
        INSERT INTO dlqd_inbox (dlq_id, counted)
        SELECT id, false FROM new_rows WHERE replayed_at IS NULL;
    ELSE
        WITH filed AS (
            INSERT INTO dlqd_inbox (dlq_id, counted)
            SELECT id, true FROM new_rows WHERE replayed_at IS NULL ORDER BY dlq_at, id
        )
        INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
        SELECT app_id, type, error_reason, 'pending', count(*)
          FROM new_rows WHERE replayed_at IS NULL
         GROUP BY 1, 2, 3;
    END IF;
    -- the wake-up only while some replayer listens (012) and the server's
    -- notification queue is not half full
    IF EXISTS (SELECT FROM dlqd_wake WHERE beat > now() - interval '30 seconds')
       AND pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('dlqd_job_dlq', '{"op":"insert"}');
    END IF;
    RETURN NULL;
END
$$;
SELECT dlqd_pin_search_path('job_dlq_notify_insert()');

-- Uncounted entries taken out of the inbox become deltas, by the group of
-- their row (read with the maintenance policy: the owner is subject to
-- row-level security). An entry whose row is gone counted nothing and adds
-- nothing.
CREATE FUNCTION dlqd_count_taken_entries() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    previous text := current_setting('dlqd.maintenance', true);
BEGIN
    IF NOT EXISTS (SELECT FROM taken t WHERE NOT t.counted) THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('dlqd.maintenance', 'on', true);
    INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
    SELECT j.app_id, j.type, j.error_reason, 'pending', count(*)
      FROM taken t JOIN job_dlq j ON j.id = t.dlq_id
     WHERE NOT t.counted
     GROUP BY 1, 2, 3;
    PERFORM set_config('dlqd.maintenance', coalesce(previous, ''), true);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION dlqd_count_taken_entries() FROM PUBLIC;
SELECT dlqd_pin_search_path('dlqd_count_taken_entries()');

CREATE TRIGGER dlqd_inbox_count_taken
    AFTER DELETE ON dlqd_inbox REFERENCING OLD TABLE AS taken
    FOR EACH STATEMENT EXECUTE FUNCTION dlqd_count_taken_entries();

-- TRUNCATE: the entries first (their rows are gone: they add nothing).
CREATE OR REPLACE FUNCTION dlqd_count_truncated() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    DELETE FROM dlqd_inbox;
    DELETE FROM dlqd_count_deltas;
    DELETE FROM dlqd_counts;
    RETURN NULL;
END
$$;
SELECT dlqd_pin_search_path('dlqd_count_truncated()');

-- The fold adopts the uncounted entries that a whole fold interval left in
-- the inbox (up to 50,000 a fold; the ones a claim holds are skipped: it
-- takes them), then folds the deltas.
CREATE OR REPLACE FUNCTION dlqd_fold_counts() RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    previous text := current_setting('dlqd.maintenance', true);
    folded bigint;
BEGIN
    PERFORM set_config('dlqd.maintenance', 'on', true);
    WITH seen AS (
        SELECT inbox_seen FROM dlqd_counts_reconciled
    ), oldest AS (
        SELECT i.seq FROM dlqd_inbox i
         WHERE NOT i.counted AND i.seq <= (SELECT inbox_seen FROM seen)
         ORDER BY i.seq
         LIMIT 50000
           FOR UPDATE SKIP LOCKED
    ), adopted AS (
        UPDATE dlqd_inbox i SET counted = true
         WHERE i.seq IN (SELECT o.seq FROM oldest o)
        RETURNING i.dlq_id
    )
    INSERT INTO dlqd_count_deltas (app_id, type, error_reason, kind, n)
    SELECT j.app_id, j.type, j.error_reason, 'pending', count(*)
      FROM adopted a JOIN job_dlq j ON j.id = a.dlq_id
     GROUP BY 1, 2, 3;
    UPDATE dlqd_counts_reconciled r
       SET inbox_seen = s.seq
      FROM (SELECT max(i.seq) AS seq FROM dlqd_inbox i) s
     WHERE s.seq > r.inbox_seen;  -- no write on a fold that saw nothing new
    PERFORM set_config('dlqd.maintenance', coalesce(previous, ''), true);

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
SELECT dlqd_pin_search_path('dlqd_fold_counts()');

-- The reconciliation counts the uncounted entries with the counts.
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
                SELECT d.app_id, d.type, d.error_reason, d.kind, d.n FROM dlqd_count_deltas d
                UNION ALL
                SELECT j.app_id, j.type, j.error_reason, 'pending', 1
                  FROM dlqd_inbox i JOIN job_dlq j ON j.id = i.dlq_id
                 WHERE NOT i.counted) c
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
