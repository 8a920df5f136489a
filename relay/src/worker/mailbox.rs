//! What may wait in the store, and who pays for it: a recipient's **mailbox** (its
//! unacknowledged deliveries, direct and group, by count and by bytes) and a sender's
//! **storage quota** (the bytes of the messages they sent that still wait, and of the
//! files they uploaded that are still kept). Both are counted in the database now and
//! then (a count stops at a limit, so a full mailbox or a heavy sender costs at most
//! one index range of that length) and counted up by the worker's own inserts in
//! between. Acknowledgements and other workers' inserts show at the next count, so the
//! limits hold to within what arrives between counts.

use super::*;

/// The limits on what waits (relay flags).
#[derive(Clone, Copy, Debug)]
pub struct StoreLimits {
    /// Most deliveries waiting for one recipient...
    pub max_pending: i64,
    /// ...and most bytes of their bodies.
    pub max_pending_bytes: i64,
    /// Most bytes one user's waiting messages (counted per recipient) and kept files
    /// may take (and at most [`MAX_SENDER_ROWS`] waiting messages).
    pub max_stored_bytes: i64,
}

/// Most messages one sender may have waiting, whatever their size: the count of a
/// sender's rows stops here, which bounds what one count reads.
pub const MAX_SENDER_ROWS: i64 = 1_000_000;

/// A count of rows and bytes for one user, and when the database was last asked.
pub(super) struct Tally {
    pub(super) count: i64,
    pub(super) bytes: i64,
    pub(super) counted_at: Instant,
}

/// A count is used this long before the database is asked again...
pub(super) const RECOUNT: Duration = Duration::from_secs(10);
/// ...or this long, when the user is at a limit (their messages may be read down).
pub(super) const FULL_RECOUNT: Duration = Duration::from_secs(1);

/// Tallies of one kind (mailboxes, or senders' storage), by user id; `eager`: counted
/// again every [`FULL_RECOUNT`] near a limit (mailboxes, read down by one person), else
/// only every [`RECOUNT`] (a sender's storage: a count can read up to
/// [`MAX_SENDER_ROWS`] rows, and a sender at the limit could force one a second).
pub(super) struct Tallies {
    counts: HashMap<i64, Tally>,
    eager: bool,
}

impl Tallies {
    pub(super) fn new(eager: bool) -> Tallies {
        Tallies {
            counts: HashMap::new(),
            eager,
        }
    }

    /// The users of `incoming` (user → rows and bytes about to be added) whose tally
    /// must be counted again: unknown, old, or near the limits and a second old.
    fn stale(
        &self,
        incoming: &HashMap<i64, (i64, i64)>,
        max_count: i64,
        max_bytes: i64,
    ) -> Vec<i64> {
        let now = Instant::now();
        incoming
            .iter()
            .filter(|(u, (n, b))| match self.counts.get(u) {
                None => true,
                Some(t) => {
                    let age = now.duration_since(t.counted_at);
                    let near = t.count + n > max_count || t.bytes + b > max_bytes;
                    age >= RECOUNT || (self.eager && near && age >= FULL_RECOUNT)
                }
            })
            .map(|(u, _)| *u)
            .collect()
    }

    /// Counts the stale users of `incoming` with `statement` (users, row limit →
    /// user, rows, bytes).
    fn refresh(
        &mut self,
        conn: &mut DbConn,
        statement: &Statement,
        incoming: &HashMap<i64, (i64, i64)>,
        max_count: i64,
        max_bytes: i64,
    ) -> Result<(), postgres::Error> {
        // Cleared first, so every user of this batch is counted again (an unknown
        // user fits any limit).
        if self.counts.len() > USER_CACHE_LIMIT {
            self.counts.clear();
        }
        let stale = self.stale(incoming, max_count, max_bytes);
        if stale.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        for row in conn.query(statement, &[&stale, &max_count])? {
            self.counts.insert(
                row.get(0),
                Tally {
                    count: row.get(1),
                    bytes: row.get(2),
                    counted_at: now,
                },
            );
        }
        Ok(())
    }

    /// Whether `count` more rows of `bytes` fit for `user` (unknown users fit: the
    /// database had no row of theirs to count).
    fn fits(&self, user: i64, count: i64, bytes: i64, max_count: i64, max_bytes: i64) -> bool {
        self.counts
            .get(&user)
            .is_none_or(|t| t.count + count <= max_count && t.bytes + bytes <= max_bytes)
    }

    fn add(&mut self, user: i64, count: i64, bytes: i64) {
        if let Some(t) = self.counts.get_mut(&user) {
            t.count += count;
            t.bytes += bytes;
        }
    }
}

/// A send the limits looked at: who it is for, and what it may store.
pub(super) struct Wanted {
    /// Job position.
    pub(super) job: usize,
    pub(super) sender: i64,
    pub(super) bytes: i64,
    /// The recipients: one for a direct send, the other members for a group send.
    pub(super) recipients: Vec<i64>,
    pub(super) direct: bool,
}

/// What the limits decided for one send.
pub(super) enum Admitted {
    /// Store it for these recipients; `full` were left out (their mailboxes are full:
    /// only for a group send, whose other members still get it).
    Store {
        recipients: Vec<i64>,
        full: Vec<i64>,
    },
    /// A direct send to a full mailbox: nothing stored.
    MailboxFull,
    /// The sender's quota is used up: nothing stored.
    OverQuota,
}

impl Worker {
    /// Decides, in job order, what each send may store: recipients with room (by
    /// count and bytes), then the sender's quota for all of them; counts what it
    /// admits in.
    pub(super) fn admit(
        &mut self,
        conn: &mut DbConn,
        st: &Prepared,
        wanted: &[Wanted],
    ) -> Result<Vec<Admitted>, postgres::Error> {
        let l = self.limits;
        let mut to_recipients: HashMap<i64, (i64, i64)> = HashMap::new();
        let mut from_senders: HashMap<i64, (i64, i64)> = HashMap::new();
        for w in wanted {
            for r in &w.recipients {
                let e = to_recipients.entry(*r).or_default();
                e.0 += 1;
                e.1 += w.bytes;
            }
            let e = from_senders.entry(w.sender).or_default();
            e.0 += w.recipients.len() as i64;
            e.1 += w.bytes * w.recipients.len() as i64;
        }
        self.mailboxes.refresh(
            conn,
            &st.waiting,
            &to_recipients,
            l.max_pending,
            l.max_pending_bytes,
        )?;
        self.senders.refresh(
            conn,
            &st.usage,
            &from_senders,
            MAX_SENDER_ROWS,
            l.max_stored_bytes,
        )?;
        Ok(wanted
            .iter()
            .map(|w| {
                let (room, full): (Vec<i64>, Vec<i64>) = w.recipients.iter().partition(|r| {
                    self.mailboxes
                        .fits(**r, 1, w.bytes, l.max_pending, l.max_pending_bytes)
                });
                if w.direct && room.is_empty() {
                    return Admitted::MailboxFull;
                }
                let n = room.len() as i64;
                if !self.senders.fits(
                    w.sender,
                    n,
                    w.bytes * n,
                    MAX_SENDER_ROWS,
                    l.max_stored_bytes,
                ) {
                    return Admitted::OverQuota;
                }
                for r in &room {
                    self.mailboxes.add(*r, 1, w.bytes);
                }
                self.senders.add(w.sender, n, w.bytes * n);
                Admitted::Store {
                    recipients: room,
                    full,
                }
            })
            .collect())
    }
}

/// A user's storage (rows, bytes) for the quota: their waiting messages, counted up to
/// a row limit, and the files they uploaded that are kept. The file operations' check,
/// outside any batch.
pub(super) const USAGE: &str = "
    SELECT s, w.n, w.b + coalesce((SELECT sum(f.size) FROM files f WHERE f.owner_id = s), 0)::int8
    FROM unnest($1::int8[]) AS s,
    LATERAL (SELECT count(*) AS n, coalesce(sum(octet_length(x.body)), 0)::int8 AS b
             FROM (SELECT m.body FROM messages m WHERE m.sender_id = s LIMIT $2) x) w";

/// Deliveries (rows, bytes) waiting for each recipient, counted up to a row limit.
pub(super) const WAITING: &str = "
    SELECT r, w.n, w.b
    FROM unnest($1::int8[]) AS r,
    LATERAL (SELECT count(*) AS n, coalesce(sum(octet_length(x.body)), 0)::int8 AS b
             FROM (SELECT m.body FROM messages m WHERE m.recipient_id = r LIMIT $2) x) w";
