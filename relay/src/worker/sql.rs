//! The relay's statements: prepared once per connection, and the reads and writes
//! that are not a batch's own (group rows, pending pages, stale presence).

use super::*;

/// Most bytes of bodies one catch-up delivers again (a live session acknowledges as it
/// goes, so it holds little; more waits for its next login), well inside the hard
/// output limit's least value.
pub(super) const CATCH_UP_BYTES: usize = 2 * PAGE_BYTES;

/// The relay's hot statements, prepared once per connection.
pub struct Prepared {
    pub(super) locate: Statement,
    pub(super) probe: Statement,
    pub(super) names: Statement,
    pub(super) store: Statement,
    pub(super) waiting: Statement,
    pub(super) usage: Statement,
    pub(super) member: Statement,
    pub(super) members: Statement,
    pub(super) group_insert: Statement,
    pub(super) presence: Statement,
    pub(super) key: Statement,
    pub(super) pending: Statement,
    pub(super) resume: Statement,
}

impl Prepared {
    pub(super) fn new(conn: &mut DbConn) -> Result<Prepared, postgres::Error> {
        Ok(Prepared {
            locate: conn.prepare(LOCATE)?,
            // Direct sends that may be delivered from memory, before anything is
            // decided for them: whether the recipient blocked the sender (one
            // primary-key probe) and every relay where the recipient has sessions
            // (none: offline, so it is stored). Reads only: a batch of such sends
            // writes nothing and commits no WAL.
            probe: conn.prepare(
                "SELECT EXISTS (SELECT 1 FROM blocks k WHERE k.user_id = x.r AND k.blocked_id = x.s),
                        ARRAY(SELECT p.relay_id FROM presence p WHERE p.user_id = x.r)
                 FROM unnest($1::int8[], $2::int8[]) WITH ORDINALITY AS x(r, s, o)
                 ORDER BY x.o",
            )?,
            names: conn.prepare("SELECT name, id FROM users WHERE name = ANY($1)")?,
            // The batch's direct messages and acknowledgements in one statement (one
            // round trip, and its own transaction when the batch has nothing else).
            // Acknowledgements delete exact (recipient, id) pairs with a plan shape no
            // plan choice can change: one primary-key probe per pair inside a
            // subquery, then a TID scan (a join with `unnest` let a generic plan, or
            // stale statistics, scan the whole table). Ids are drawn in input order
            // (after the sort: PostgreSQL evaluates volatile output columns last), one
            // per send, also for a send the recipient blocked: that one is not stored
            // (one primary-key probe of `blocks` per send) and is answered `blocked`.
            store: conn.prepare(
                "WITH acked AS (
                     DELETE FROM messages WHERE ctid = ANY (ARRAY(
                         SELECT (SELECT m.ctid FROM messages m
                                 WHERE m.recipient_id = a.r AND m.id = a.i)
                         FROM unnest($5::int8[], $6::int8[]) AS a(r, i)))
                 )
,
                 x AS (
                     SELECT nextval('messages_id_seq') AS id, r, s, b, t,
                            EXISTS (SELECT 1 FROM blocks k
                                    WHERE k.user_id = r AND k.blocked_id = s) AS blocked
                     FROM unnest($1::int8[], $2::int8[], $3::text[], $4::int8[])
                          WITH ORDINALITY AS x(r, s, b, t, o)
                     ORDER BY o
                 ),
                 stored AS (
                     INSERT INTO messages (recipient_id, id, sender_id, body, sent_at_ms)
                     SELECT r, id, s, b, t FROM x WHERE NOT blocked
                 )
                 SELECT id, blocked FROM x",
            )?,
            waiting: conn.prepare(super::mailbox::WAITING)?,
            usage: conn.prepare(super::mailbox::USAGE)?,
            members: conn.prepare(
                "SELECT gm.user_id FROM group_members gm
                 WHERE gm.group_id = $1 AND gm.user_id <> $2 AND NOT EXISTS
                     (SELECT 1 FROM blocks k WHERE k.user_id = gm.user_id AND k.blocked_id = $2)
                 ORDER BY gm.joined_seq",
            )?,
            member: conn.prepare("SELECT g.name FROM group_members gm JOIN groups g ON g.id = gm.group_id WHERE gm.group_id = $1 AND gm.user_id = $2")?,
            // One row per admitted member, ids drawn in the order given (the members'
            // order of joining). Membership and blocks are read again here, inside the
            // batch's transaction: the limits step read them before it, and a member
            // removed, a sender put out or a block made in between must hold.
            group_insert: conn.prepare(
                "INSERT INTO messages (recipient_id, id, sender_id, body, sent_at_ms, group_id)
                 SELECT r, nextval('messages_id_seq'), $2, $3, $4, $1
                 FROM unnest($5::int8[]) WITH ORDINALITY AS x(r, o)
                 WHERE EXISTS (SELECT 1 FROM group_members s WHERE s.group_id = $1 AND s.user_id = $2)
                   AND EXISTS (SELECT 1 FROM group_members m WHERE m.group_id = $1 AND m.user_id = x.r)
                   AND NOT EXISTS (SELECT 1 FROM blocks k WHERE k.user_id = x.r AND k.blocked_id = $2)
                 ORDER BY o
                 RETURNING id, recipient_id",
            )?,
            // A batch's presence changes in one statement: the users whose last change
            // in the batch is a login ($1), and those whose last is a logout ($2);
            // no user is in both, nor twice in one.
            presence: conn.prepare(
                "WITH gone AS (
                     DELETE FROM presence WHERE user_id = ANY($2::int8[]) AND relay_id = $3
                 )
                 INSERT INTO presence (user_id, relay_id) SELECT u, $3 FROM unnest($1::int8[]) u
                 ON CONFLICT (user_id, relay_id) DO UPDATE SET since = now()",
            )?,
            key: conn.prepare("SELECT pubkey FROM users WHERE name = $1")?,
            resume: conn.prepare(credential::LOOKUP)?,
            // The page is cut from the recipient's index range first, then joined: a
            // prepared statement's generic plan cannot see the LIMIT, and joining first
            // would read the whole backlog for every page.
            pending: conn.prepare(
                "SELECT m.id, u.name, m.body, m.sent_at_ms, m.group_id, g.name, m.system
                 FROM (SELECT * FROM messages WHERE recipient_id = $1 AND id > $2
                       ORDER BY id LIMIT $3) m
                 JOIN users u ON u.id = m.sender_id
                 LEFT JOIN groups g ON g.id = m.group_id
                 ORDER BY m.id",
            )?,
        })
    }
}

pub(super) const LOCATE: &str =
    "SELECT user_id, relay_id FROM presence WHERE user_id = ANY($1) AND relay_id <> $2";

pub(super) type Held = fastchat_common::db::Held<Prepared>;

/// Stores the batch's group messages the limits admitted: one row per admitted
/// member, one statement per message. `groups`: (job position, group, recipients), in
/// job order; returns the rows of each, in the same order.
pub(super) fn store_group(
    tx: &mut postgres::Transaction<'_>,
    st: &Prepared,
    jobs: &[Job],
    groups: &[(usize, i64, &[i64])],
    now: u64,
) -> Result<Vec<Vec<Inserted>>, postgres::Error> {
    let mut all = Vec::with_capacity(groups.len());
    for &(i, group_id, recipients) in groups {
        let Job::Send {
            sender_id, body, ..
        } = &jobs[i]
        else {
            continue;
        };
        let rows = if recipients.is_empty() {
            Vec::new()
        } else {
            tx.query(
                &st.group_insert,
                &[&group_id, sender_id, body, &(now as i64), &recipients],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
        };
        all.push(rows);
    }
    Ok(all)
}

/// Pending messages of `user_id` after id `after`, oldest first.
/// Up to `page` messages stored for `user_id` after id `after`, oldest first, cut after
/// `max_bytes` of bodies if given (at least one is returned). The flag: more may wait
/// (the page was full or cut).
pub(super) fn fetch_pending(
    conn: &mut DbConn,
    pending: &Statement,
    user_id: i64,
    after: i64,
    page: i64,
    max_bytes: Option<usize>,
) -> Result<(Vec<Message>, bool), postgres::Error> {
    let rows = conn.query(pending, &[&user_id, &after, &page])?;
    let full = rows.len() as i64 >= page;
    let mut bytes = 0usize;
    let keep = rows
        .iter()
        .take_while(|r| {
            let size = r.get::<_, &str>(2).len();
            let fits = bytes == 0 || max_bytes.is_none_or(|max| bytes + size <= max);
            bytes += size;
            fits
        })
        .count();
    let cut = keep < rows.len();
    let messages = rows[..keep]
        .iter()
        .map(|r| {
            let system: bool = r.get(6);
            let body: String = r.get(2);
            let event = if system {
                serde_json::from_str::<GroupEvent>(&body).ok()
            } else {
                None
            };
            Message {
                msg_id: r.get(0),
                from: r.get(1),
                body: if system { String::new() } else { body },
                ts: r.get::<_, i64>(3) as u64,
                group_id: r.get(4),
                group: r.get(5),
                event,
            }
        })
        .collect();
    Ok((messages, full || cut))
}

/// Removes presence rows a previous run of this relay left behind.
pub fn clear_stale_presence(
    db: &DbPool,
    relay_id: &str,
) -> Result<u64, Box<dyn std::error::Error>> {
    Ok(db
        .get()?
        .execute("DELETE FROM presence WHERE relay_id = $1", &[&relay_id])?)
}

/// A fresh epoch for this run's delivery ids (see `crate::holds`): drawn once at start.
pub fn delivery_epoch(db: &DbPool) -> Result<i64, Box<dyn std::error::Error>> {
    Ok(db
        .get()?
        .query_one("SELECT nextval('delivery_epochs')", &[])?
        .get(0))
}
