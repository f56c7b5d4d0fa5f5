-- Schema version 9: a declared state file manages approvers one by one (kind 'approver', their ids), as
-- it manages agents; the per-owner digest of approver groups and reviewers it used to record is dropped
-- (groups and automated reviewers are declared in the policy files).
DELETE FROM declared WHERE kind = 'approvers';
