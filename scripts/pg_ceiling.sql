-- PostgreSQL's own ceiling for the relay's message lifecycle, run by pgbench
-- (scripts/pg_ceiling.sh): a batch of ~200-byte rows inserted with one multi-row
-- statement and one commit, then deleted by key with one statement and one commit —
-- what a relay does for messages that are stored and later acknowledged. Each pgbench
-- client writes its own key range, as each relay worker writes its own recipients.
\set base :client_id * 1000000
INSERT INTO load_ceiling (recipient_id, sender_id, body, sent_at_ms)
    SELECT :base + g, 1, repeat('x', 200), 0 FROM generate_series(0, :batch - 1) AS g;
DELETE FROM load_ceiling WHERE recipient_id >= :base AND recipient_id < :base + :batch;
