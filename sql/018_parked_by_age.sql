-- 018: parked rows listed in dead-letter order without walking the pending set.
--   `dlqd list --state parked` (and the console's parked view) walked the
--   pending rows in (dlq_at, id) order and kept the parked ones: with 1% of
--   10,000,000 pending rows parked it read 5,000 rows for a page of 50. A
--   parked schedule row now carries its row's dlq_at (parked_dlq_at), copied by
--   a trigger when the row is parked (a primary-key probe; schedule rows of other
--   states are written as before), and an index over the parked rows in
--   that order makes the page one range scan.
ALTER TABLE dlqd_entry_state ADD COLUMN parked_dlq_at timestamptz;
COMMENT ON COLUMN dlqd_entry_state.parked_dlq_at IS
    'job_dlq.dlq_at of a parked row (set when it is parked): the parked rows in dead-letter order.';

CREATE FUNCTION dlqd_entry_state_parked_at() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    SELECT j.dlq_at INTO NEW.parked_dlq_at FROM job_dlq j WHERE j.id = NEW.dlq_id;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION dlqd_entry_state_parked_at() FROM PUBLIC;
SELECT dlqd_pin_search_path('dlqd_entry_state_parked_at()');

CREATE TRIGGER dlqd_entry_state_parked_at
    BEFORE INSERT OR UPDATE OF state ON dlqd_entry_state
    FOR EACH ROW
    WHEN (NEW.state IN ('parked', 'parked_policy') AND NEW.parked_dlq_at IS NULL)
    EXECUTE FUNCTION dlqd_entry_state_parked_at();

UPDATE dlqd_entry_state s SET parked_dlq_at = j.dlq_at
  FROM job_dlq j
 WHERE j.id = s.dlq_id AND s.state IN ('parked', 'parked_policy');

ALTER TABLE dlqd_entry_state ADD CONSTRAINT dlqd_entry_state_parked_at_check
    CHECK (state NOT IN ('parked', 'parked_policy') OR parked_dlq_at IS NOT NULL);

CREATE INDEX dlqd_entry_state_parked_at_idx ON dlqd_entry_state (parked_dlq_at, dlq_id)
    WHERE state IN ('parked', 'parked_policy');
