-- FastChat schema, version 1.
-- Per-user tables carry the user id in their key so they can be distributed by it
-- (Citus): messages by recipient_id, presence by user_id. users is small and shared.

CREATE TABLE users (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    -- The user's RSA public key (SubjectPublicKeyInfo PEM); the private key never
    -- leaves the client.
    pubkey        text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Which relay each logged-in user is on; one row per (user, relay) with a session.
CREATE TABLE presence (
    user_id  bigint NOT NULL,
    relay_id text NOT NULL,
    since    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, relay_id)
);

-- Messages waiting for their recipient's acknowledgement. body is end-to-end
-- ciphertext the servers cannot read.
CREATE TABLE messages (
    recipient_id bigint NOT NULL,
    id           bigserial NOT NULL,
    sender_id    bigint NOT NULL,
    body         text NOT NULL,
    sent_at_ms   bigint NOT NULL,
    PRIMARY KEY (recipient_id, id)
);
