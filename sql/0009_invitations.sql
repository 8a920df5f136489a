-- Invitations (PROTOCOL.md §3, `group_add`): a user added to a group by someone they
-- share no group with is invited, not added. Nothing of the group is stored for them
-- until they accept (`group_accept`), and they may decline (`group_decline`); a user
-- has at most --max-invitations waiting. A small shared table beside group_members
-- (a Citus reference table like it); never read on the message path.
--
-- seq is drawn from group_members' joined_seq sequence at invitation and becomes the
-- member's joined_seq at acceptance, so the relay's order of standing is the order of
-- the signed roster's `add` statements (the inviter signs the `add` at invitation).
-- role becomes 'admin' when the last admin leaves while the longest-standing name on
-- the roster is still an invitation, as the roster says (PROTOCOL.md §7.9).
CREATE TABLE group_invites (
    user_id    bigint NOT NULL,
    group_id   bigint NOT NULL,
    invited_by bigint NOT NULL,
    role       text NOT NULL DEFAULT 'member' CHECK (role IN ('admin', 'member')),
    seq        bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, group_id)
);
CREATE INDEX group_invites_by_group ON group_invites (group_id);
