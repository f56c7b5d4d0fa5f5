-- Schema version 2: who may decide a hold, their votes, and one-time approval links.
ALTER TABLE approvals ADD COLUMN approvers TEXT NOT NULL DEFAULT '[]';   -- JSON list; [] = any owner
ALTER TABLE approvals ADD COLUMN quorum INTEGER NOT NULL DEFAULT 1;
ALTER TABLE approvals ADD COLUMN veto INTEGER NOT NULL DEFAULT 1;        -- a deny vote refuses at once
ALTER TABLE approvals ADD COLUMN reviewers TEXT NOT NULL DEFAULT '[]';   -- JSON [{name, url, timeout}]

CREATE TABLE votes (
    approval_id  TEXT NOT NULL REFERENCES approvals(id),
    voter        TEXT NOT NULL,
    vote         TEXT NOT NULL,              -- approve | deny
    reason       TEXT NOT NULL DEFAULT '',
    via          TEXT NOT NULL,              -- cli, owner_api, link, reviewer
    at           REAL NOT NULL,
    PRIMARY KEY (approval_id, voter)
);

CREATE TABLE approval_links (
    token_hash   TEXT PRIMARY KEY,           -- SHA-256 of the link token; the token is only in the link
    approval_id  TEXT NOT NULL REFERENCES approvals(id),
    approver     TEXT NOT NULL,
    expires_at   REAL NOT NULL,
    used_at      REAL
);
CREATE INDEX approval_links_approval ON approval_links(approval_id);
