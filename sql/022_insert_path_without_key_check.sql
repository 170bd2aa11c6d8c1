-- 022: the inbox's foreign key to job_dlq goes.
--   Its check ran for every inserted row, in the inserting transaction: a
--   query of job_dlq's primary key and a KEY SHARE lock written on the row
--   just inserted. With eight concurrent inserters it cost more than the
--   inbox entry itself (bench/insert_bench.py). The insert trigger is the
--   only writer that needs no check (it files the rows of its own
--   statement); the others insert only rows they have just read from job_dlq.
--   What the key's ON DELETE CASCADE did is done by triggers: a pending row
--   deleted takes its inbox entry with it (dlqd_count_deleted, below);
--   TRUNCATE and the entries of rows that someone else marked replayed and
--   then deleted are migration 023's (dlqd_count_truncated and the
--   reconciliation). The claims join job_dlq, so an entry without its row is
--   never replayed meanwhile.
-- The search path is pinned again (CREATE OR REPLACE resets it).

ALTER TABLE dlqd_inbox DROP CONSTRAINT IF EXISTS dlqd_inbox_dlq_id_fkey;

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
