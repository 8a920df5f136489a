//! Mailbox limits: how many messages wait for a recipient, counted now and then and
//! counted up between, and which sends of a batch a full mailbox refuses.

use super::*;

/// What a worker knows of how many messages wait for a recipient: counted in the
/// database now and then (counting stops at the limit, so a full mailbox costs at most
/// one index range of that length), and counted up by the worker's own inserts in
/// between. Acknowledgements and other workers' inserts show at the next count, so the
/// limit is kept to within what arrives between counts.
pub(super) struct Mailbox {
    pub(super) waiting: i64,
    pub(super) counted_at: Instant,
}

/// A count is used this long before the database is asked again...
pub(super) const MAILBOX_RECOUNT: Duration = Duration::from_secs(10);
/// ...or this long, for a mailbox at its limit (its owner may be reading it down).
pub(super) const FULL_MAILBOX_RECOUNT: Duration = Duration::from_secs(1);

impl Worker {
    /// Takes the sends whose recipient's mailbox is full out of `direct` (job position,
    /// recipient) and returns their positions: counts what is stale in one statement,
    /// then admits sends in order while there is room, counting them in.
    pub(super) fn full_mailboxes(
        &mut self,
        conn: &mut DbConn,
        st: &Prepared,
        direct: &mut Vec<(usize, i64)>,
    ) -> Result<HashSet<usize>, postgres::Error> {
        let now = Instant::now();
        let mut incoming: HashMap<i64, i64> = HashMap::new();
        for (_, r) in direct.iter() {
            *incoming.entry(*r).or_default() += 1;
        }
        let stale: Vec<i64> = incoming
            .iter()
            .filter(|(r, k)| match self.mailboxes.get(r) {
                None => true,
                Some(m) => {
                    let age = now.duration_since(m.counted_at);
                    age >= MAILBOX_RECOUNT
                        || (m.waiting + **k > self.max_pending && age >= FULL_MAILBOX_RECOUNT)
                }
            })
            .map(|(r, _)| *r)
            .collect();
        if !stale.is_empty() {
            if self.mailboxes.len() > USER_CACHE_LIMIT {
                self.mailboxes.clear();
            }
            for row in conn.query(&st.waiting, &[&stale, &self.max_pending])? {
                self.mailboxes.insert(
                    row.get(0),
                    Mailbox {
                        waiting: row.get(1),
                        counted_at: now,
                    },
                );
            }
        }
        let mut refused = HashSet::new();
        direct.retain(|(i, r)| match self.mailboxes.get_mut(r) {
            Some(m) if m.waiting >= self.max_pending => {
                refused.insert(*i);
                false
            }
            Some(m) => {
                m.waiting += 1;
                true
            }
            None => true,
        });
        Ok(refused)
    }
}
