-- Schema version 2: a connection's provider settings (not secret), e.g. a MercadoPago account's currency.
ALTER TABLE connections ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
