-- Schema version 5: the latest reconciliation of each connection with the provider's own records
-- (report: JSON, what was seen, matched, fixed and left unexplained), shared by every replica.
CREATE TABLE reconciliations (
    connection_id  TEXT PRIMARY KEY REFERENCES connections(id),
    owner_id       TEXT NOT NULL,
    ran_at         DOUBLE PRECISION NOT NULL,
    report         TEXT NOT NULL
);
CREATE INDEX reconciliations_owner ON reconciliations(owner_id);
