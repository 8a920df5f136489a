-- Resumption credentials: a client that logged in with its password may log in again
-- with the credential instead, costing the server no argon2. Only a SHA-256 hash of the
-- credential is kept. Revoked at logout and on password change; expire on their own.
CREATE TABLE resume_credentials (
    user_id    bigint NOT NULL,
    hash       bytea NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, hash)
);
