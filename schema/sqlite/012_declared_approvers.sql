-- Schema version 12: a declared state file manages approvers one by one (kind 'approver', their ids), as
-- it manages agents; the per-owner digest of approver groups and reviewers it used to record is dropped
-- (groups and automated reviewers are declared in the policy files).
DELETE FROM declared WHERE kind = 'approvers';

-- The sweep deletes rolling windows' stale buckets by limit and period (proxy.windows.stale_buckets);
-- PostgreSQL has had this index since version 1.
CREATE INDEX IF NOT EXISTS spend_period ON spend(limit_name, period);
