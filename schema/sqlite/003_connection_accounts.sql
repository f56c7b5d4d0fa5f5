-- Schema version 3: connected accounts an owner allows agents to act for (the Stripe-Account header).
ALTER TABLE connections ADD COLUMN allowed_accounts TEXT NOT NULL DEFAULT '[]';
