-- 016: max_replays on express pages.
--   * an express page counts a job's replays within the log's retention in its
--     statement, and replays under the job's lock slot (taken SKIP LOCKED, as
--     the ordinary path takes it; a slot another replica holds defers the job
--     to the ordinary path);
--   * one statement cannot see what commits after it started, so every
--     transaction that replays under a slot stamps it with its transaction id
--     (writer): a page whose snapshot does not see the stamp's transaction
--     (it committed a replay of that job meanwhile) defers the job too, and
--     the ordinary path recounts it under the lock, in a statement of its own.
ALTER TABLE dlqd_lock_slots ADD COLUMN writer xid8;
COMMENT ON COLUMN dlqd_lock_slots.writer IS
    'The last transaction that replayed a job under max_replays with this slot locked.';
