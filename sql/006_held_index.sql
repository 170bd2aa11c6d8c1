-- 006: rows the daemon holds back (parked by policy or event, unmatched), as a
-- small index of their own: `dlqd status` and the metrics read them from here,
-- without consulting the policies, so every operator sees the same answer.
CREATE INDEX dlqd_entry_state_held_idx ON dlqd_entry_state (dlq_id) WHERE state <> 'waiting';
