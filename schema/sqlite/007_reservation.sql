-- Schema version 7: the spend gate's reservations whose decisions this authorization recorded,
-- comma-separated (its own id, then a fresh one for each same-key retry that decided the row again), so a
-- reservation a sidecar left pending is known recorded only if its own decision committed.
ALTER TABLE authorizations ADD COLUMN reservation TEXT;
