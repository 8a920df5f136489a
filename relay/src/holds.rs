//! Messages delivered from memory and waiting for their recipient's `ack`
//! (PROTOCOL.md §3, "What `sent` means").
//!
//! A direct message whose recipient is online is pushed at once under a *delivery id*
//! and not stored: it is durable once the recipient's client has stored it, which its
//! `ack` says (clients store before they acknowledge). Its sender is answered `sent` on
//! that ack — here, or through the mesh when the recipient is on another relay. If no
//! ack comes within the delivery window (the session went, the client is slow, the
//! mesh link broke) the message is stored as any other and its sender answered after
//! that commit; the recipient may then get it twice, and shows it once (by its sender
//! message id). Nothing here is durable: a relay that dies loses only messages it never
//! answered `sent` for, which their senders' clients send again.
//!
//! Delivery ids are `DELIVERY_IDS + (epoch mod 2^26) * 2^36 + n`: the epoch is drawn
//! from a database sequence at each start, so no two relays, nor two runs of one, hand
//! out the same id to a recipient (whose client drops ids it has seen).

use fastchat_common::proto::DELIVERY_IDS;
use mio::Token;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Bits of a delivery id for the count within one epoch.
const COUNT_BITS: u32 = 36;
/// Bits of a delivery id for the epoch.
const EPOCH_BITS: u32 = 62 - COUNT_BITS;
/// Most deliveries from other relays remembered at once (their acks are passed back);
/// past it, such a delivery is not remembered and its relay stores it at the window's
/// end.
const MAX_REMOTE: usize = 1 << 20;
/// Most messages held at once. Past it, sends are stored first: the relay is busy
/// enough that a worker's batch shares its commit among many messages (cheaper per
/// message than holding), and acks come slowly enough that windows would end
/// anyway. Also bounds what holding can cost in memory.
pub const MAX_HELD: usize = 1_000;
/// How often the share of windows that ended unacknowledged is looked at, and how
/// long holding pauses when it was too high.
const REVIEW_EVERY: Duration = Duration::from_secs(1);
/// Holding pauses for a while when more than one held message in this many ended its
/// window unacknowledged: acks are late (the recipients, or the machine, are
/// saturated), and storing after the window would cost a message twice.
const TOO_LATE_ONE_IN: u64 = 10;
/// How long a delivery from another relay is remembered: its relay stores it after its
/// own window anyway, so an ack after this would be too late to matter.
const REMOTE_FOR: Duration = Duration::from_secs(10);

/// A message delivered from memory, as needed to answer its sender or to store it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The sender's connection and its request id.
    pub conn: Token,
    pub req: u64,
    pub sender_id: i64,
    pub sender: String,
    /// The recipient, by name (to store it as a send) and by id (whose ack counts).
    pub to: String,
    pub recipient_id: i64,
    pub body: String,
    pub ts: u64,
}

/// The relay's messages delivered from memory, and the deliveries other relays sent it.
pub struct Holds {
    window: Duration,
    epoch: i64,
    next: i64,
    waiting: HashMap<i64, Held>,
    /// Delivery ids in the order their windows end (the window is one length, so this
    /// is the order they were held in); ids already acknowledged are skipped.
    deadlines: VecDeque<(Instant, i64)>,
    /// Deliveries from other relays: delivery id → (the mesh link it came over, its
    /// recipient, when).
    remote: HashMap<i64, (Token, i64, Instant)>,
    remote_order: VecDeque<(Instant, i64)>,
    /// Messages held per (sender, recipient's name): a later send between them must
    /// not be stored before these are.
    pairs: HashMap<(i64, String), u32>,
    /// The current review period: when it began, messages held and windows ended in it.
    period: (Instant, u64, u64),
    /// Holding is paused until then (too many windows ended in the last period).
    paused_until: Option<Instant>,
}

impl Holds {
    /// Holds for `window` (zero: nothing is delivered from memory), with delivery ids of
    /// `epoch` (drawn at start).
    pub fn new(window: Duration, epoch: i64) -> Holds {
        Holds {
            window,
            epoch: epoch.rem_euclid(1 << EPOCH_BITS),
            next: 0,
            waiting: HashMap::new(),
            deadlines: VecDeque::new(),
            remote: HashMap::new(),
            remote_order: VecDeque::new(),
            pairs: HashMap::new(),
            period: (Instant::now(), 0, 0),
            paused_until: None,
        }
    }

    /// Whether messages may be delivered from memory at all.
    pub fn enabled(&self) -> bool {
        !self.window.is_zero() && self.next < (1 << COUNT_BITS)
    }

    /// Whether a new send may be held: enabled, fewer than [`MAX_HELD`] are, and
    /// holding is not paused.
    pub fn room(&self, now: Instant) -> bool {
        self.enabled()
            && self.waiting.len() < MAX_HELD
            && self.paused_until.is_none_or(|until| now >= until)
    }

    /// Counts a message held (`held`) or a window ended unacknowledged, and at the end
    /// of each review period pauses holding for the next if too many windows ended.
    fn review(&mut self, now: Instant, held: bool) {
        let (start, n_held, n_late) = &mut self.period;
        if held {
            *n_held += 1;
        } else {
            *n_late += 1;
        }
        if now.duration_since(*start) >= REVIEW_EVERY {
            if *n_late * TOO_LATE_ONE_IN > *n_held {
                self.paused_until = Some(now + REVIEW_EVERY);
            }
            self.period = (now, 0, 0);
        }
    }

    /// Whether holding is paused now (for the figures).
    pub fn paused(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|until| now < until)
    }

    /// A fresh delivery id, or `None` once this epoch's are used up (then everything
    /// is stored until the relay restarts: 2^36 deliveries).
    pub fn next_id(&mut self) -> Option<i64> {
        if !self.enabled() {
            return None;
        }
        let id = DELIVERY_IDS + (self.epoch << COUNT_BITS) + self.next;
        self.next += 1;
        Some(id)
    }

    /// Holds `held` under `id` until its recipient acknowledges it or the window ends.
    pub fn hold(&mut self, id: i64, held: Held, now: Instant) {
        self.review(now, true);
        *self
            .pairs
            .entry((held.sender_id, held.to.clone()))
            .or_default() += 1;
        self.waiting.insert(id, held);
        self.deadlines.push_back((now + self.window, id));
    }

    /// Takes `id` out of what is held.
    fn remove(&mut self, id: i64) -> Option<Held> {
        let held = self.waiting.remove(&id)?;
        let pair = (held.sender_id, held.to.clone());
        if let Some(n) = self.pairs.get_mut(&pair) {
            *n -= 1;
            if *n == 0 {
                self.pairs.remove(&pair);
            }
        }
        Some(held)
    }

    /// `user_id` acknowledged `id`: the message, if it was held here for them. An ack
    /// from anyone else changes nothing.
    pub fn acked(&mut self, user_id: i64, id: i64) -> Option<Held> {
        match self.waiting.get(&id) {
            Some(h) if h.recipient_id == user_id => self.remove(id),
            _ => None,
        }
    }

    /// The messages whose window has ended unacknowledged, in the order they were held.
    pub fn expired(&mut self, now: Instant) -> Vec<Held> {
        let mut out = Vec::new();
        while let Some(&(at, id)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(held) = self.remove(id) {
                self.review(now, false);
                out.push(held);
            }
        }
        out
    }

    /// Everything still held, in the order it was held (at shutdown).
    pub fn take_all(&mut self) -> Vec<Held> {
        let ids: Vec<i64> = self.deadlines.drain(..).map(|(_, id)| id).collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Whether messages from `sender_id` to `to` are held.
    pub fn holds_pair(&self, sender_id: i64, to: &str) -> bool {
        !self.pairs.is_empty() && self.pairs.contains_key(&(sender_id, to.to_string()))
    }

    /// What is held from `sender_id` to `to`, in the order it was held (to be stored
    /// before a later message between them that is stored).
    pub fn take_pair(&mut self, sender_id: i64, to: &str) -> Vec<Held> {
        if !self.holds_pair(sender_id, to) {
            return Vec::new();
        }
        let ids: Vec<i64> = self
            .deadlines
            .iter()
            .map(|(_, id)| *id)
            .filter(|id| {
                self.waiting
                    .get(id)
                    .is_some_and(|h| h.sender_id == sender_id && h.to == to)
            })
            .collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Forgets deliveries from other relays remembered too long (also when no more
    /// arrive).
    pub fn tick(&mut self, now: Instant) {
        self.forget_remote(now);
    }

    /// When the next window ends, if anything is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|(at, _)| *at)
    }

    /// Messages held now.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Remembers that `link`'s relay delivered `id` for `recipient_id` here, so that
    /// the recipient's ack goes back to it.
    pub fn arrived(&mut self, id: i64, link: Token, recipient_id: i64, now: Instant) {
        self.forget_remote(now);
        if self.remote.len() < MAX_REMOTE {
            self.remote.insert(id, (link, recipient_id, now));
            self.remote_order.push_back((now, id));
        }
    }

    /// `user_id` acknowledged `ids` (delivery ids): those other relays delivered here
    /// for them, by the link to pass the ack back on.
    pub fn remote_acked(&mut self, user_id: i64, ids: &[i64]) -> Vec<(Token, Vec<i64>)> {
        let mut by_link: Vec<(Token, Vec<i64>)> = Vec::new();
        for id in ids {
            let Some(&(link, recipient, _)) = self.remote.get(id) else {
                continue;
            };
            if recipient != user_id {
                continue;
            }
            self.remote.remove(id);
            match by_link.iter_mut().find(|(l, _)| *l == link) {
                Some((_, list)) => list.push(*id),
                None => by_link.push((link, vec![*id])),
            }
        }
        by_link
    }

    /// Forgets what other relays delivered over `link` (it closed).
    pub fn link_closed(&mut self, link: Token) {
        self.remote.retain(|_, (l, _, _)| *l != link);
    }

    fn forget_remote(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.remote_order.front() {
            if now.duration_since(at) < REMOTE_FOR {
                break;
            }
            self.remote_order.pop_front();
            if self.remote.get(&id).is_some_and(|(_, _, t)| *t == at) {
                self.remote.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastchat_common::proto::is_delivery_id;

    fn held(recipient_id: i64, req: u64) -> Held {
        Held {
            conn: Token(7),
            req,
            sender_id: 1,
            sender: "alice".into(),
            to: "bob".into(),
            recipient_id,
            body: "x".into(),
            ts: 0,
        }
    }

    #[test]
    fn ids_are_delivery_ids_distinct_across_epochs() {
        let window = Duration::from_millis(10);
        let (mut a, mut b) = (Holds::new(window, 1), Holds::new(window, 2));
        let ids: Vec<i64> = (0..3)
            .flat_map(|_| [a.next_id().unwrap(), b.next_id().unwrap()])
            .collect();
        assert!(ids.iter().all(|&id| is_delivery_id(id)));
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ids.len());
        assert!(Holds::new(Duration::ZERO, 1).next_id().is_none(), "off");
        let mut wrapped = Holds::new(window, (1 << EPOCH_BITS) + 3);
        assert!(is_delivery_id(wrapped.next_id().unwrap()));
    }

    #[test]
    fn only_the_recipient_acknowledges_and_windows_end_in_order() {
        let t0 = Instant::now();
        let mut h = Holds::new(Duration::from_millis(10), 1);
        let (x, y, z) = (
            h.next_id().unwrap(),
            h.next_id().unwrap(),
            h.next_id().unwrap(),
        );
        h.hold(x, held(2, 1), t0);
        h.hold(y, held(2, 2), t0 + Duration::from_millis(1));
        h.hold(z, held(3, 3), t0 + Duration::from_millis(2));
        assert_eq!(h.acked(3, y), None, "someone else's ack does nothing");
        assert_eq!(h.acked(2, y).map(|m| m.req), Some(2));
        assert_eq!(h.acked(2, y), None, "once");
        assert_eq!(h.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert!(h.expired(t0 + Duration::from_millis(9)).is_empty());
        let late: Vec<u64> = h
            .expired(t0 + Duration::from_millis(20))
            .iter()
            .map(|m| m.req)
            .collect();
        assert_eq!(late, vec![1, 3], "unacknowledged, in order");
        assert!(h.is_empty());
        assert_eq!(h.next_deadline(), None);
    }

    #[test]
    fn acks_of_deliveries_from_other_relays_go_back_to_them() {
        let t0 = Instant::now();
        let mut h = Holds::new(Duration::from_millis(10), 1);
        h.arrived(100, Token(1), 5, t0);
        h.arrived(101, Token(2), 5, t0);
        h.arrived(102, Token(1), 6, t0);
        assert!(h.remote_acked(6, &[100]).is_empty(), "not theirs");
        assert_eq!(
            h.remote_acked(5, &[100, 101, 999]),
            vec![(Token(1), vec![100]), (Token(2), vec![101])]
        );
        h.link_closed(Token(1));
        assert!(h.remote_acked(6, &[102]).is_empty(), "its link is gone");
        h.arrived(103, Token(2), 5, t0);
        h.arrived(104, Token(2), 5, t0 + REMOTE_FOR);
        assert!(
            h.remote_acked(5, &[103]).is_empty(),
            "forgotten after a while"
        );
        assert_eq!(h.remote_acked(5, &[104]), vec![(Token(2), vec![104])]);
    }

    #[test]
    fn what_one_sender_holds_for_one_recipient_is_taken_in_order() {
        let t0 = Instant::now();
        let mut h = Holds::new(Duration::from_millis(10), 1);
        let mut to_carol = held(3, 9);
        to_carol.to = "carol".into();
        for (req, m) in [(1, held(2, 1)), (9, to_carol), (2, held(2, 2))] {
            let id = h.next_id().unwrap();
            h.hold(id, Held { req, ..m }, t0);
        }
        assert!(h.holds_pair(1, "bob") && !h.holds_pair(2, "bob"));
        let reqs: Vec<u64> = h.take_pair(1, "bob").iter().map(|m| m.req).collect();
        assert_eq!(reqs, vec![1, 2]);
        assert!(!h.holds_pair(1, "bob") && h.holds_pair(1, "carol"));
        assert_eq!(h.len(), 1);
        assert!(h.expired(t0 + Duration::from_millis(20)).len() == 1);
        assert!(
            !h.holds_pair(1, "carol"),
            "counted down when the window ends"
        );
    }

    #[test]
    fn past_the_most_held_new_sends_are_stored_first() {
        let t0 = Instant::now();
        let mut h = Holds::new(Duration::from_millis(10), 1);
        for req in 0..MAX_HELD as u64 {
            assert!(h.room(t0));
            let id = h.next_id().unwrap();
            h.hold(id, held(2, req), t0);
        }
        assert!(!h.room(t0), "full");
        let (id, _) = (h.next_id().unwrap(), ());
        let _ = id;
        h.acked(2, h.deadlines[0].1);
        assert!(h.room(t0), "room again once one is acknowledged");
        assert!(!Holds::new(Duration::ZERO, 1).room(t0), "off");
    }

    #[test]
    fn holding_pauses_while_too_many_windows_end_unacknowledged() {
        let t0 = Instant::now();
        let window = Duration::from_millis(10);
        let mut h = Holds::new(window, 1);
        h.period = (t0, 0, 0);
        for req in 0..20 {
            let id = h.next_id().unwrap();
            h.hold(id, held(2, req), t0);
        }
        // Two in twenty late: not too many.
        let ids: Vec<i64> = h.deadlines.iter().map(|(_, id)| *id).collect();
        for id in &ids[2..] {
            h.acked(2, *id);
        }
        h.expired(t0 + window);
        let later = t0 + REVIEW_EVERY;
        let id = h.next_id().unwrap();
        h.hold(id, held(2, 99), later);
        assert!(h.room(later), "one in ten is the limit");
        // A period with most windows ending: paused for the next.
        for req in 0..5 {
            let id = h.next_id().unwrap();
            h.hold(id, held(2, req), later);
        }
        let end = later + REVIEW_EVERY;
        assert_eq!(h.expired(end).len(), 6);
        assert!(!h.room(end) && h.paused(end), "paused");
        assert!(h.room(end + REVIEW_EVERY), "for one period");
    }

    #[test]
    fn take_all_returns_what_is_held_in_order() {
        let t0 = Instant::now();
        let mut h = Holds::new(Duration::from_millis(10), 1);
        for req in 1..=3 {
            let id = h.next_id().unwrap();
            h.hold(id, held(2, req), t0);
        }
        let first = h.next_id().unwrap() - 3;
        h.acked(2, first + 1);
        let all: Vec<u64> = h.take_all().iter().map(|m| m.req).collect();
        assert_eq!(all, vec![1, 3]);
        assert!(h.is_empty());
    }
}
