-- Blocking (PROTOCOL.md §3, `block`): user_id refuses direct messages, files and
-- group additions from blocked_id, and is not sent blocked_id's group messages. The
-- relay checks it where it stores, so a blocked user's traffic never reaches the
-- blocker. Per-user (distributed by user_id on Citus, like presence); the check on the
-- message path is a primary-key probe per stored row.
CREATE TABLE blocks (
    user_id    bigint NOT NULL,
    blocked_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, blocked_id)
);
