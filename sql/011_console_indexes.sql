-- dlqd: no-transaction
-- 011: the console's payload search (`payload @> '{"to": "x@example.com"}'`)
-- over the pending set, built without blocking the job systems' inserts
-- (CREATE INDEX CONCURRENTLY, so this file runs outside a transaction, one
-- statement at a time; an index a failed run left invalid is dropped and
-- built again by the next run).

CREATE INDEX CONCURRENTLY IF NOT EXISTS job_dlq_pending_payload_idx
    ON job_dlq USING gin (payload jsonb_path_ops) WHERE replayed_at IS NULL;
