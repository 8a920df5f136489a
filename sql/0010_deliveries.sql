-- Deliveries from memory (PROTOCOL.md §3, "What `sent` means"): a direct message whose
-- recipient is online is pushed at once and not stored unless the recipient's client
-- leaves it unacknowledged for the relay's delivery window. Such a message carries a
-- delivery id, not a row id: 2^62 + (epoch mod 2^26) * 2^36 + n, where the epoch is
-- drawn from this sequence each time a relay starts, so no two relays and no two runs
-- of one relay hand out the same id (a client drops an id it has seen). Read once per
-- relay start, never on the message path.
CREATE SEQUENCE delivery_epochs;
