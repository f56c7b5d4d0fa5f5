-- Schema version 3: calls whose outcome is unknown stay reserved and are resolved from the provider.
-- request: the call as forwarded (sealed: method, path, headers but credentials, body), re-sent with the
-- same idempotency key to learn the provider's answer; attempts: how often it was re-sent.
ALTER TABLE authorizations ADD COLUMN request BYTEA;
ALTER TABLE authorizations ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
DROP INDEX IF EXISTS authorizations_lease;
CREATE INDEX authorizations_unresolved ON authorizations(lease_expires_at) WHERE state IN ('forwarding', 'in_doubt');
