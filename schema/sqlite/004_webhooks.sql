-- Schema version 4: provider webhook events received, so that a replayed event changes nothing.
-- outcome: voided (spend released), recorded, unmatched (no authorization with that provider id), ignored.
CREATE TABLE webhook_events (
    connection_id  TEXT NOT NULL REFERENCES connections(id),
    event_id       TEXT NOT NULL,
    type           TEXT NOT NULL,
    provider_ref   TEXT,
    outcome        TEXT NOT NULL,
    received_at    REAL NOT NULL,
    PRIMARY KEY (connection_id, event_id)
);
