-- PaySentry embedded store, schema version 1.
-- Money is integer minor units. Times are unix seconds (REAL). Ids are prefixed random strings.

CREATE TABLE owners (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    token_hash   TEXT NOT NULL,              -- bcrypt of the owner token's secret part
    created_at   REAL NOT NULL
);

-- A provider account the owner connected; credentials are AES-GCM sealed, bound to this row's id.
CREATE TABLE connections (
    id           TEXT PRIMARY KEY,
    owner_id     TEXT NOT NULL REFERENCES owners(id),
    provider     TEXT NOT NULL,
    name         TEXT NOT NULL,
    upstream     TEXT NOT NULL,
    credentials  BLOB NOT NULL,
    created_at   REAL NOT NULL,
    revoked_at   REAL,
    UNIQUE (owner_id, name)
);

CREATE TABLE agents (
    id             TEXT PRIMARY KEY,
    owner_id       TEXT NOT NULL REFERENCES owners(id),
    connection_id  TEXT NOT NULL REFERENCES connections(id),
    name           TEXT NOT NULL,
    labels         TEXT NOT NULL DEFAULT '{}',
    token_hash     TEXT NOT NULL,            -- bcrypt of the agent token's secret part
    created_at     REAL NOT NULL,
    revoked_at     REAL
);
CREATE UNIQUE INDEX agents_owner_name ON agents(owner_id, name) WHERE revoked_at IS NULL;

-- One row per payment call the sidecar decided. state: denied, held, approved, rejected, expired,
-- forwarding, settled, failed.
CREATE TABLE authorizations (
    id               TEXT PRIMARY KEY,
    owner_id         TEXT NOT NULL,
    agent_id         TEXT NOT NULL REFERENCES agents(id),
    idempotency_key  TEXT NOT NULL,
    request_hash     TEXT NOT NULL,
    provider         TEXT NOT NULL,
    operation        TEXT NOT NULL,
    amount           INTEGER NOT NULL,
    currency         TEXT NOT NULL,
    destination      TEXT NOT NULL DEFAULT '',
    payment          TEXT NOT NULL,          -- the normalized payment, JSON, for review and replay
    decision         TEXT NOT NULL,
    rule             TEXT NOT NULL,
    policy           TEXT NOT NULL,
    message          TEXT NOT NULL,
    revision         TEXT NOT NULL,
    state            TEXT NOT NULL,
    charges          TEXT NOT NULL DEFAULT '[]',   -- what is reserved while state holds spend
    approval_id      TEXT,
    provider_ref     TEXT,
    response_status  INTEGER,
    response_body    BLOB,                   -- sealed; replayed to retries with the same key
    lease_expires_at REAL,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    UNIQUE (agent_id, idempotency_key)
);
CREATE INDEX authorizations_owner_created ON authorizations(owner_id, created_at);
CREATE INDEX authorizations_provider_ref ON authorizations(owner_id, provider_ref) WHERE provider_ref IS NOT NULL;
CREATE INDEX authorizations_lease ON authorizations(lease_expires_at) WHERE state = 'forwarding';

CREATE TABLE approvals (
    id                TEXT PRIMARY KEY,
    owner_id          TEXT NOT NULL,
    authorization_id  TEXT NOT NULL UNIQUE REFERENCES authorizations(id),
    state             TEXT NOT NULL,         -- pending, approved, denied, expired
    expires_at        REAL NOT NULL,
    decided_by        TEXT,
    reason            TEXT,
    created_at        REAL NOT NULL,
    decided_at        REAL
);
CREATE INDEX approvals_pending ON approvals(expires_at) WHERE state = 'pending';
CREATE INDEX approvals_owner_state ON approvals(owner_id, state);

-- Spend reserved or committed per agent, limit and window period.
CREATE TABLE spend (
    agent_id    TEXT NOT NULL,
    limit_name  TEXT NOT NULL,
    period      TEXT NOT NULL,
    currency    TEXT NOT NULL,
    amount      INTEGER NOT NULL DEFAULT 0,
    count       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, limit_name, period)
);

-- Append-only audit log, written in the same transaction as the change it records.
CREATE TABLE events (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    owner_id          TEXT NOT NULL,
    agent_id          TEXT,
    authorization_id  TEXT,
    type              TEXT NOT NULL,
    actor             TEXT NOT NULL,
    data              TEXT NOT NULL,
    at                REAL NOT NULL
);
CREATE INDEX events_owner_seq ON events(owner_id, seq);
CREATE INDEX events_authorization ON events(authorization_id);
CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
