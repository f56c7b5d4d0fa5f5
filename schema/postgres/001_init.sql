-- PaySentry on PostgreSQL, schema version 1: the same model as the embedded SQLite store (same tables,
-- same column order, so one set of queries serves both). Money is BIGINT minor units; times are unix
-- seconds (DOUBLE PRECISION); JSON is kept as TEXT written and read by PaySentry only.

CREATE TABLE owners (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    token_hash   TEXT NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL
);

CREATE TABLE connections (
    id                TEXT PRIMARY KEY,
    owner_id          TEXT NOT NULL REFERENCES owners(id),
    provider          TEXT NOT NULL,
    name              TEXT NOT NULL,
    upstream          TEXT NOT NULL,
    credentials       BYTEA NOT NULL,              -- AES-GCM sealed, bound to this row's id
    created_at        DOUBLE PRECISION NOT NULL,
    revoked_at        DOUBLE PRECISION,
    allowed_accounts  TEXT NOT NULL DEFAULT '[]',
    UNIQUE (owner_id, name)
);

CREATE TABLE agents (
    id             TEXT PRIMARY KEY,
    owner_id       TEXT NOT NULL REFERENCES owners(id),
    connection_id  TEXT NOT NULL REFERENCES connections(id),
    name           TEXT NOT NULL,
    labels         TEXT NOT NULL DEFAULT '{}',
    token_hash     TEXT NOT NULL,
    created_at     DOUBLE PRECISION NOT NULL,
    revoked_at     DOUBLE PRECISION
);
CREATE UNIQUE INDEX agents_owner_name ON agents(owner_id, name) WHERE revoked_at IS NULL;
CREATE INDEX agents_owner ON agents(owner_id, created_at);

CREATE TABLE authorizations (
    id               TEXT PRIMARY KEY,
    owner_id         TEXT NOT NULL,
    agent_id         TEXT NOT NULL REFERENCES agents(id),
    idempotency_key  TEXT NOT NULL,
    request_hash     TEXT NOT NULL,
    provider         TEXT NOT NULL,
    operation        TEXT NOT NULL,
    amount           BIGINT NOT NULL,
    currency         TEXT NOT NULL,
    destination      TEXT NOT NULL DEFAULT '',
    payment          TEXT NOT NULL,
    decision         TEXT NOT NULL,
    rule             TEXT NOT NULL,
    policy           TEXT NOT NULL,
    message          TEXT NOT NULL,
    revision         TEXT NOT NULL,
    state            TEXT NOT NULL,
    charges          TEXT NOT NULL DEFAULT '[]',
    approval_id      TEXT,
    provider_ref     TEXT,
    response_status  INTEGER,
    response_body    BYTEA,                        -- sealed
    lease_expires_at DOUBLE PRECISION,
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL,
    UNIQUE (agent_id, idempotency_key)
);
CREATE INDEX authorizations_owner_created ON authorizations(owner_id, created_at);
CREATE INDEX authorizations_created ON authorizations(created_at);
CREATE INDEX authorizations_provider_ref ON authorizations(owner_id, provider_ref) WHERE provider_ref IS NOT NULL;
CREATE INDEX authorizations_lease ON authorizations(lease_expires_at) WHERE state = 'forwarding';

CREATE TABLE approvals (
    id                TEXT PRIMARY KEY,
    owner_id          TEXT NOT NULL,
    authorization_id  TEXT NOT NULL UNIQUE REFERENCES authorizations(id),
    state             TEXT NOT NULL,
    expires_at        DOUBLE PRECISION NOT NULL,
    decided_by        TEXT,
    reason            TEXT,
    created_at        DOUBLE PRECISION NOT NULL,
    decided_at        DOUBLE PRECISION,
    approvers         TEXT NOT NULL DEFAULT '[]',
    quorum            INTEGER NOT NULL DEFAULT 1,
    veto              INTEGER NOT NULL DEFAULT 1,
    reviewers         TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX approvals_pending ON approvals(expires_at) WHERE state = 'pending';
CREATE INDEX approvals_owner_state ON approvals(owner_id, state);

CREATE TABLE votes (
    approval_id  TEXT NOT NULL REFERENCES approvals(id),
    voter        TEXT NOT NULL,
    vote         TEXT NOT NULL,
    reason       TEXT NOT NULL DEFAULT '',
    via          TEXT NOT NULL,
    at           DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (approval_id, voter)
);

CREATE TABLE approval_links (
    token_hash   TEXT PRIMARY KEY,
    approval_id  TEXT NOT NULL REFERENCES approvals(id),
    approver     TEXT NOT NULL,
    expires_at   DOUBLE PRECISION NOT NULL,
    used_at      DOUBLE PRECISION
);
CREATE INDEX approval_links_approval ON approval_links(approval_id);

CREATE TABLE spend (
    agent_id    TEXT NOT NULL,
    limit_name  TEXT NOT NULL,
    period      TEXT NOT NULL,
    currency    TEXT NOT NULL,
    amount      BIGINT NOT NULL DEFAULT 0,
    count       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, limit_name, period)
);
CREATE INDEX spend_period ON spend(limit_name, period);

CREATE TABLE events (
    seq               BIGSERIAL PRIMARY KEY,
    owner_id          TEXT NOT NULL,
    agent_id          TEXT,
    authorization_id  TEXT,
    type              TEXT NOT NULL,
    actor             TEXT NOT NULL,
    data              TEXT NOT NULL,
    at                DOUBLE PRECISION NOT NULL
);
CREATE INDEX events_owner_seq ON events(owner_id, seq);
CREATE INDEX events_authorization ON events(authorization_id);
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only';
END;
$$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();

CREATE TABLE webhook_events (
    connection_id  TEXT NOT NULL REFERENCES connections(id),
    event_id       TEXT NOT NULL,
    type           TEXT NOT NULL,
    provider_ref   TEXT,
    outcome        TEXT NOT NULL,
    received_at    DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (connection_id, event_id)
);
