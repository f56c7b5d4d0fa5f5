-- Schema version 9: every x402 authorization PaySentry signed, by its nonce (unique), without the
-- signature (a bearer credential, never stored): what resolution reads to learn an in-doubt payment's fate.
CREATE TABLE x402_authorizations (
    nonce             TEXT PRIMARY KEY,
    authorization_id  TEXT NOT NULL REFERENCES authorizations(id),
    owner_id          TEXT NOT NULL,
    agent_id          TEXT NOT NULL,
    network           TEXT NOT NULL,
    asset             TEXT NOT NULL,
    payer             TEXT NOT NULL,
    pay_to            TEXT NOT NULL,
    amount            INTEGER NOT NULL,
    valid_after       INTEGER NOT NULL,
    valid_before      INTEGER NOT NULL,
    signed_at         REAL NOT NULL
);
CREATE INDEX x402_authorizations_authorization ON x402_authorizations(authorization_id);
