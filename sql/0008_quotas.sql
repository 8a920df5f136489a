-- Storage quotas (relay --max-stored-bytes-per-user): a user's waiting messages are
-- counted by sender, their kept files by owner, now and then (the relay caches the
-- counts between). On Citus, messages are distributed by recipient, so the count by
-- sender reaches every shard; it runs every 10 s per active sender, off the per-message
-- path.
CREATE INDEX messages_by_sender ON messages (sender_id);
CREATE INDEX files_by_owner ON files (owner_id);
