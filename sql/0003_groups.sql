-- Groups. groups and group_members are small, shared tables (Citus reference tables);
-- messages carries the group for group messages and membership events, one row per
-- recipient, still keyed by recipient_id.
CREATE TABLE groups (
    id         bigserial PRIMARY KEY,
    name       text NOT NULL,
    created_by bigint NOT NULL,
    -- The key epoch: bumped when a member leaves or is removed, so the remaining
    -- members' clients rotate the group key.
    epoch      integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE group_members (
    group_id   bigint NOT NULL,
    user_id    bigint NOT NULL,
    role       text NOT NULL CHECK (role IN ('admin', 'member')),
    -- Order of joining: the longest-standing member is promoted when the last admin
    -- leaves.
    joined_seq bigserial NOT NULL,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX group_members_by_user ON group_members (user_id);

ALTER TABLE messages ADD COLUMN group_id bigint;
-- A membership event written by the server (body: the event as JSON), not ciphertext.
ALTER TABLE messages ADD COLUMN system boolean NOT NULL DEFAULT false;
