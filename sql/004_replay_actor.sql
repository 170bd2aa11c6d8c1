-- 004: who replayed by hand, and why (`dlqd replay --reason`), kept in the log.
ALTER TABLE dlqd_replay_log ADD COLUMN actor text NULL, ADD COLUMN reason text NULL;
