//! A logged-in client's delivery state: the backlog paged out at login with flow
//! control, and live messages held back until the backlog has gone out so the client
//! sees its messages oldest first.

use crate::message::Message;
use fastchat_common::proto::RelayToClient;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How long ids of the backlog are remembered after it is delivered.
const RECENTLY_PAGED_FOR: Duration = Duration::from_secs(10);

/// A backlog page holds at most this many bytes of message bodies (and at least one
/// message), whatever `--page-size` says; the next page is fetched once at most half of
/// this is unacknowledged. So a backlog of large messages flows at the client's pace
/// instead of piling up in the relay's output queue.
pub const PAGE_BYTES: usize = 1 << 20;

/// What a session needs next from the store.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing to do.
    Idle,
    /// Fetch the page after this message id.
    FetchAfter(i64),
}

/// Delivery state of one authenticated connection.
pub struct Session {
    pub user: String,
    pub user_id: i64,
    /// `false` for send-only sessions: nothing is delivered.
    pub receive: bool,
    /// Requests taken for work and not yet answered.
    pub in_flight: u32,
    /// Refusals for speed (`rate_limited`) it may still get: a client that keeps
    /// sending through its refusals is closed (see `Core::refuse_for_speed`).
    pub refusals: fastchat_common::limits::Bucket,
    /// The backlog is still being paged out.
    backlog: bool,
    /// A page request is with the workers.
    fetching: bool,
    /// Last message id delivered from the backlog.
    cursor: i64,
    /// Backlog messages delivered and not yet acknowledged, with their body sizes.
    unacked: HashMap<i64, usize>,
    /// Their total body size.
    unacked_bytes: usize,
    /// Every backlog id delivered this session, to drop live duplicates at the switch.
    paged: HashSet<i64>,
    /// After the backlog: the ids it delivered, kept a little longer. A message can be
    /// in a page and still have its live delivery on the way (its sender's worker
    /// committed it before the page was read but reports after); those are dropped.
    recently_paged: HashSet<i64>,
    backlog_done_at: Option<Instant>,
    /// The last page was full, so more may wait.
    more: bool,
    /// Live messages that arrived while the backlog was going out.
    deferred: Vec<Message>,
    /// Their total body size.
    deferred_bytes: usize,
    /// The next page is fetched once this few backlog messages are unacknowledged, so
    /// it is on its way while the client works through the rest (flow control that
    /// keeps the pipe full).
    prefetch_at: usize,
    /// This session's sends waiting for their replies, in request order, with the
    /// reply once it is known: a reply goes out only after those of earlier sends (a
    /// send held for its recipient's ack may be answered after a later one).
    replies: VecDeque<(u64, Option<RelayToClient>)>,
}

/// Refusals for speed a session may get per second, on average, and in a burst (a
/// client pipelining up to its in-flight cap may see a whole window refused at once);
/// past them it is closed.
pub const REFUSALS_PER_SEC: f64 = 100.0;
pub const REFUSALS_BURST: f64 = 4_096.0;

impl Session {
    /// A session whose first backlog page is being fetched.
    pub fn new(user: String, user_id: i64, receive: bool, page: usize) -> Session {
        Session {
            user,
            user_id,
            receive,
            in_flight: 0,
            refusals: fastchat_common::limits::Bucket::full(
                REFUSALS_BURST,
                std::time::Instant::now(),
            ),
            backlog: receive,
            fetching: receive,
            cursor: 0,
            unacked: HashMap::new(),
            unacked_bytes: 0,
            paged: HashSet::new(),
            recently_paged: HashSet::new(),
            backlog_done_at: None,
            more: false,
            deferred: Vec::new(),
            deferred_bytes: 0,
            prefetch_at: page / 2,
            replies: VecDeque::new(),
        }
    }

    /// A send `req` went to the workers: its reply keeps its place.
    pub fn send_waiting(&mut self, req: u64) {
        self.replies.push_back((req, None));
    }

    /// The reply to request `req`: what may go out now, in request order. A reply to a
    /// request that is not a waiting send (every other kind) goes out at once.
    pub fn reply(&mut self, req: u64, frame: RelayToClient) -> Vec<RelayToClient> {
        let Some(slot) = self
            .replies
            .iter_mut()
            .find(|(r, f)| *r == req && f.is_none())
        else {
            return vec![frame];
        };
        slot.1 = Some(frame);
        let mut out = Vec::new();
        while let Some((_, Some(_))) = self.replies.front() {
            if let Some((_, Some(frame))) = self.replies.pop_front() {
                out.push(frame);
            }
        }
        out
    }

    /// A page arrived: returns the messages to send now, and whether the backlog is
    /// finished (then `synced` follows them).
    pub fn page_arrived(&mut self, page: Vec<Message>, more: bool) -> (Vec<Message>, bool) {
        self.fetching = false;
        self.more = more;
        if let Some(last) = page.last() {
            self.cursor = last.msg_id;
        }
        for m in &page {
            if self.unacked.insert(m.msg_id, m.body.len()).is_none() {
                self.unacked_bytes += m.body.len();
            }
            self.paged.insert(m.msg_id);
        }
        // Live messages this page delivered need holding back no longer.
        if !self.deferred.is_empty() {
            let (paged, held) = (&self.paged, &mut self.deferred_bytes);
            self.deferred.retain(|m| {
                let keep = !paged.contains(&m.msg_id);
                if !keep {
                    *held -= m.body.len();
                }
                keep
            });
        }
        let mut out = page;
        if !more {
            out.extend(self.finish_backlog());
        }
        (out, !more)
    }

    fn finish_backlog(&mut self) -> Vec<Message> {
        self.backlog = false;
        self.backlog_done_at = Some(Instant::now());
        // Nothing held back was in a page: pages take theirs out as they arrive.
        self.recently_paged = std::mem::take(&mut self.paged);
        self.deferred_bytes = 0;
        std::mem::take(&mut self.deferred)
    }

    /// Forgets the backlog's ids once no live delivery of them can still be on the way.
    pub fn forget_backlog(&mut self, now: Instant) {
        if let Some(done) = self.backlog_done_at {
            if now.duration_since(done) >= RECENTLY_PAGED_FOR {
                self.recently_paged = HashSet::new();
                self.backlog_done_at = None;
            }
        }
    }

    /// Bytes of message bodies the relay holds back for this session (live messages
    /// waiting for the backlog to go out).
    pub fn held_bytes(&self) -> usize {
        self.deferred_bytes
    }

    /// Whether the stored backlog is still going out.
    pub fn in_backlog(&self) -> bool {
        self.backlog
    }

    /// A live message for this user: `Some` if it should go out now.
    pub fn live(&mut self, message: Message) -> Option<Message> {
        if !self.receive {
            return None;
        }
        if self.backlog {
            // Held back unless a page has delivered it already.
            if !self.paged.contains(&message.msg_id) {
                self.deferred_bytes += message.body.len();
                self.deferred.push(message);
            }
            return None;
        }
        if self.recently_paged.contains(&message.msg_id) {
            return None;
        }
        Some(message)
    }

    /// The client acknowledged messages; says whether to fetch the next page.
    pub fn acked(&mut self, ids: &[i64]) -> Next {
        for id in ids {
            if let Some(size) = self.unacked.remove(id) {
                self.unacked_bytes -= size;
            }
        }
        if self.backlog
            && self.more
            && !self.fetching
            && self.unacked.len() <= self.prefetch_at
            && self.unacked_bytes <= PAGE_BYTES / 2
        {
            self.fetching = true;
            return Next::FetchAfter(self.cursor);
        }
        Next::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: i64) -> Message {
        Message {
            msg_id: id,
            from: "a".into(),
            body: String::new(),
            ts: 0,
            group_id: None,
            group: None,
            event: None,
        }
    }

    fn ids(v: &[Message]) -> Vec<i64> {
        v.iter().map(|m| m.msg_id).collect()
    }

    fn sent(id: u64) -> RelayToClient {
        RelayToClient::Sent {
            id,
            msg_id: id as i64,
            ts: 0,
            full: Vec::new(),
        }
    }

    #[test]
    fn replies_to_sends_go_out_in_request_order() {
        let mut s = Session::new("b".into(), 2, true, 0);
        for req in [1, 2, 3] {
            s.send_waiting(req);
        }
        assert!(s.reply(2, sent(2)).is_empty(), "waits for 1");
        assert_eq!(s.reply(7, sent(7)), vec![sent(7)], "not a send: at once");
        assert_eq!(s.reply(1, sent(1)), vec![sent(1), sent(2)]);
        assert_eq!(s.reply(3, sent(3)), vec![sent(3)]);
        assert_eq!(s.reply(3, sent(3)), vec![sent(3)], "untracked now");
    }

    #[test]
    fn pages_then_live_in_order_without_duplicates() {
        let mut s = Session::new("b".into(), 2, true, 0);
        assert!(s.live(m(5)).is_none(), "held while the backlog goes out");
        let (out, done) = s.page_arrived(vec![m(1), m(2)], true);
        assert_eq!((ids(&out), done), (vec![1, 2], false));
        assert!(s.live(m(9)).is_none());
        assert_eq!(s.acked(&[1]), Next::Idle);
        assert_eq!(s.acked(&[2]), Next::FetchAfter(2));
        assert_eq!(s.acked(&[2]), Next::Idle, "one fetch at a time");
        let (out, done) = s.page_arrived(vec![m(5), m(7)], false);
        // 5 came in the page and live: sent once. 9 was live only: sent after the page.
        assert_eq!((ids(&out), done), (vec![5, 7, 9], true));
        assert_eq!(ids(&[s.live(m(10)).unwrap()]), vec![10]);
        // 7 came in the last page; its live delivery, arriving late, is dropped.
        assert!(s.live(m(7)).is_none());
        s.forget_backlog(Instant::now() + RECENTLY_PAGED_FOR);
        assert!(s.live(m(7)).is_some(), "forgotten after a while");
    }

    fn sized(id: i64, bytes: usize) -> Message {
        Message {
            body: "x".repeat(bytes),
            ..m(id)
        }
    }

    #[test]
    fn the_next_page_waits_until_half_a_page_of_bytes_is_acknowledged() {
        let mut s = Session::new("b".into(), 2, true, 1000);
        // Three messages of 300 KiB: few by count, most of a page by size.
        let big = 300 * 1024;
        s.page_arrived(vec![sized(1, big), sized(2, big), sized(3, big)], true);
        assert_eq!(s.acked(&[1]), Next::Idle, "600 KiB still out");
        assert_eq!(s.acked(&[2]), Next::FetchAfter(3), "300 KiB out: fetch");
        // Live messages held back during the backlog are counted, until a page
        // delivers them or the backlog ends.
        assert!(s.live(sized(9, 1000)).is_none());
        assert!(s.live(sized(4, 500)).is_none());
        assert_eq!(s.held_bytes(), 1500);
        let (out, _) = s.page_arrived(vec![sized(4, 500)], true);
        assert_eq!(ids(&out), vec![4]);
        assert_eq!(s.held_bytes(), 1000, "4 came in the page");
        let (out, done) = s.page_arrived(vec![], false);
        assert_eq!((ids(&out), done), (vec![9], true));
        assert_eq!(s.held_bytes(), 0);
    }

    #[test]
    fn send_only_sessions_receive_nothing() {
        let mut s = Session::new("b".into(), 2, false, 0);
        assert!(s.live(m(1)).is_none());
    }
}
