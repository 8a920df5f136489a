-- Signed group rosters (PROTOCOL.md §7.9): each membership statement, signed by the
-- member who made it and naming the previous one's hash, in order. The relay stores
-- and serves the chain and appends only at its head; clients verify it and trust it,
-- not group_members, for who may get the group key. Distributed with groups (Citus)
-- by group_id.
CREATE TABLE group_roster (
    group_id bigint NOT NULL,
    seq      integer NOT NULL,
    hash     text NOT NULL,
    body     text NOT NULL,
    PRIMARY KEY (group_id, seq)
);
