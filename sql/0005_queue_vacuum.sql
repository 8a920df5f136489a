-- messages is a queue: every row is inserted, delivered, acknowledged and deleted
-- within moments. With the default autovacuum trigger (20 % of the table dead) the
-- dead rows pile up by the million under load, every index probe and page read then
-- steps over them, and PostgreSQL's CPU per message doubles to triples (measured; see
-- BENCHMARKS.md). Vacuum it after a fixed number of dead rows instead, without the
-- cost-based pauses, so it keeps up with the traffic. It does not cut the emptied
-- end of the table off: that takes an exclusive lock on the busiest table, and the
-- space is used again moments later anyway.
ALTER TABLE messages SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 20000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 50000,
    vacuum_truncate = false
);
