-- Schema version 10: what a declared state file (proxy/state.py) manages. An owner, connection or agent
-- listed here was applied from the file named in source; removing it from the file revokes it. The
-- digest is what was declared, without secrets (for approvers: the groups and reviewers themselves).
CREATE TABLE declared (
    kind         TEXT NOT NULL,   -- owner, connection, agent, approvers
    id           TEXT NOT NULL,
    owner_id     TEXT NOT NULL,
    source       TEXT NOT NULL,
    digest       TEXT NOT NULL DEFAULT '',
    declared_at  REAL NOT NULL,
    PRIMARY KEY (kind, id)
);
