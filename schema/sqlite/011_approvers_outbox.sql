-- Schema version 11: approvers as principals (each with a token of their own, bcrypt-hashed), and the
-- durable outbox of hold notifications (written in the transaction that creates the hold).
CREATE TABLE approvers (
    id          TEXT PRIMARY KEY,
    owner_id    TEXT NOT NULL REFERENCES owners(id),
    name        TEXT NOT NULL,               -- as policies name them: approvers: [alice]
    token_hash  TEXT NOT NULL,               -- bcrypt of the approver token's secret part
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
CREATE UNIQUE INDEX approvers_owner_name ON approvers(owner_id, name) WHERE revoked_at IS NULL;

CREATE TABLE notifications (
    id               TEXT PRIMARY KEY,       -- the webhook-id: the same on every retry
    owner_id         TEXT NOT NULL,
    approval_id      TEXT NOT NULL REFERENCES approvals(id),
    url              TEXT NOT NULL,
    state            TEXT NOT NULL,          -- pending | delivered | failed
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,          -- also the claim: a sender moves it past its attempt
    last_error       TEXT NOT NULL DEFAULT '',
    created_at       REAL NOT NULL,
    done_at          REAL
);
CREATE INDEX notifications_due ON notifications(next_attempt_at) WHERE state = 'pending';
