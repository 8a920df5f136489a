//! The screen model: everything the terminal UI shows, as plain data, changed only by
//! the methods here — conversations and their lines, unread counts, the selection,
//! scrolling, delivery marks of my own messages, the connection state and the input
//! line. No terminal and no network: [`super::render`] draws it, [`super::app`] feeds it.

use super::input::Input;
use crate::store::{DeliveryState, GroupState, HistoryEntry, HistoryRow};
use std::collections::BTreeMap;

/// The id of the status conversation (command output, connection news).
pub const STATUS: &str = "*";

/// How many messages of each of the conversations used last are loaded at start.
pub const HISTORY_ON_START: usize = 200;
/// How many of the conversations written to last get [`HISTORY_ON_START`] lines at start.
pub const RECENT_ON_START: usize = 10;
/// Lines loaded at start for every other conversation.
pub const OTHERS_ON_START: usize = 5;

/// Most lines a conversation keeps on screen; older ones are dropped from the model
/// (the store keeps every message).
pub const MAX_LINES: usize = 2_000;

/// Delivery progress of one of my messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Typed, not yet stored by the server.
    Pending,
    /// The server stored it.
    Stored,
    /// The recipient's device stored it (a receipt came).
    Delivered,
    /// Sending failed (the reason is shown below it).
    Failed,
}

/// What a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineKind {
    /// A message; `mark` is set for my own.
    Message { from: String, mark: Option<Mark> },
    /// News: a group change, a saved file, command output.
    Info,
    /// Something that must not be missed (a changed key, an unreadable message).
    Warning,
}

/// One entry of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Unix ms.
    pub ts: u64,
    pub kind: LineKind,
    pub text: String,
    /// My message id, for my own messages (to match receipts).
    pub mid: Option<String>,
    /// The UI's id of a message being sent.
    pub local: Option<u64>,
    /// The store's history row it came from (loaded lines), for paging older ones in.
    pub row: Option<i64>,
}

/// A direct chat, a group, or the status conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The peer's name, `#<group id>`, or [`STATUS`].
    pub id: String,
    /// What the list shows.
    pub title: String,
    pub group_id: Option<i64>,
    pub lines: Vec<Line>,
    pub unread: usize,
    /// Time of the newest message, unix ms (orders the list).
    pub last: u64,
    /// The peer's key changed and is not accepted yet.
    pub key_warning: bool,
    /// The store may hold older lines than those here (PageUp at the top loads them).
    pub more_older: bool,
}

impl Conversation {
    /// Adds a line, dropping the oldest past [`MAX_LINES`] (in chunks, so a full
    /// conversation does not shift every line on every message).
    fn push_line(&mut self, line: Line) {
        self.lines.push(line);
        if self.lines.len() > MAX_LINES + MAX_LINES / 10 {
            let excess = self.lines.len() - MAX_LINES;
            self.lines.drain(..excess);
            self.more_older = true;
        }
    }

    fn new(id: &str, title: &str, group_id: Option<i64>) -> Conversation {
        Conversation {
            id: id.to_string(),
            title: title.to_string(),
            group_id,
            lines: Vec::new(),
            unread: 0,
            last: 0,
            key_warning: false,
            more_older: false,
        }
    }
}

/// The link to the relay, as the status line shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    Connected,
    Reconnecting,
    /// Gave up (the reason).
    Offline(String),
}

/// Everything on the screen.
#[derive(Debug, Clone)]
pub struct Model {
    pub me: String,
    pub relay: String,
    pub connection: Connection,
    conversations: Vec<Conversation>,
    selected: String,
    /// Rows scrolled up from the bottom of the open conversation.
    pub scroll: usize,
    /// Rows of the message pane at the last render (a page, for PageUp/PageDown).
    pub page: usize,
    pub input: Input,
    /// A transient note for the status line (an upload's progress).
    pub note: Option<String>,
    next_local: u64,
}

impl Model {
    /// An empty model with only the status conversation, open.
    pub fn new(me: &str, relay: &str) -> Model {
        Model {
            me: me.to_string(),
            relay: relay.to_string(),
            connection: Connection::Connected,
            conversations: vec![Conversation::new(STATUS, "status", None)],
            selected: STATUS.to_string(),
            scroll: 0,
            page: 10,
            input: Input::default(),
            note: None,
            next_local: 1,
        }
    }

    /// Loads the stored history: the last [`HISTORY_ON_START`] lines of each
    /// conversation, and every group known (even without messages).
    pub fn load(&mut self, history: &[HistoryRow], groups: &BTreeMap<i64, GroupState>) {
        for (id, g) in groups {
            if g.role != "none" {
                self.conversation(&format!("#{id}"), &format!("#{}", g.name), Some(*id));
            }
        }
        let mut by_conv: BTreeMap<&str, Vec<&HistoryRow>> = BTreeMap::new();
        for row in history {
            by_conv.entry(row.1.peer.as_str()).or_default().push(row);
        }
        for (id, entries) in by_conv {
            let group_id = id.strip_prefix('#').and_then(|g| g.parse::<i64>().ok());
            let title = match (
                group_id,
                entries.iter().rev().find_map(|(_, h)| h.group.clone()),
            ) {
                (Some(gid), name) => groups
                    .get(&gid)
                    .map(|g| g.name.clone())
                    .or(name)
                    .map_or_else(|| id.to_string(), |n| format!("#{n}")),
                (None, _) => id.to_string(),
            };
            let conv = self.conversation(id, &title, group_id);
            let skip = entries.len().saturating_sub(HISTORY_ON_START);
            for (row, h) in &entries[skip..] {
                conv.last = conv.last.max(h.ts);
                conv.lines.push(history_line(h, Some(*row)));
            }
            // Only a page was loaded: there may be more (asking costs one query).
            conv.more_older = true;
        }
        // Start in the most recent conversation.
        if let Some(first) = self.ordered().first() {
            let id = first.id.clone();
            self.select(&id);
        }
    }

    /// Shows history entries another process of this user wrote (a `send` in another
    /// terminal, a reader): each in its conversation, after what is there.
    pub fn external(&mut self, entries: &[HistoryEntry]) {
        for h in entries {
            let group_id = h.peer.strip_prefix('#').and_then(|g| g.parse::<i64>().ok());
            let title = match (&h.group, group_id) {
                (Some(name), Some(_)) => format!("#{name}"),
                _ => h.peer.clone(),
            };
            let title = self.get(&h.peer).map_or(title, |c| c.title.clone());
            self.push(&h.peer, &title, group_id, history_line(h, None));
        }
    }

    /// The open conversation's oldest loaded history row, if PageUp at the top should
    /// load older lines from the store (`scroll` is already at `max_scroll`).
    pub fn older_wanted(&self, max_scroll: usize) -> Option<(String, i64)> {
        let conv = self.selected();
        if !conv.more_older || self.scroll < max_scroll {
            return None;
        }
        let row = conv.lines.iter().find_map(|l| l.row)?;
        Some((conv.id.clone(), row))
    }

    /// Older lines of conversation `id` from the store (`rows` oldest first, all older
    /// than what it shows); `complete`: there are none older. The view stays where it
    /// was (scrolling counts from the bottom).
    pub fn prepend(&mut self, id: &str, rows: &[HistoryRow], complete: bool) {
        let Some(conv) = self.conversations.iter_mut().find(|c| c.id == id) else {
            return;
        };
        let first = conv.lines.iter().find_map(|l| l.row).unwrap_or(i64::MAX);
        let older: Vec<Line> = rows
            .iter()
            .filter(|(row, _)| *row < first)
            .map(|(row, h)| history_line(h, Some(*row)))
            .collect();
        conv.lines.splice(0..0, older);
        conv.more_older = !complete;
    }

    /// The conversation `id`, made (titled `title`) if new.
    pub fn conversation(
        &mut self,
        id: &str,
        title: &str,
        group_id: Option<i64>,
    ) -> &mut Conversation {
        let index = match self.conversations.iter().position(|c| c.id == id) {
            Some(i) => i,
            None => {
                self.conversations
                    .push(Conversation::new(id, title, group_id));
                self.conversations.len() - 1
            }
        };
        &mut self.conversations[index]
    }

    /// The conversation `id`, if there is one.
    pub fn get(&self, id: &str) -> Option<&Conversation> {
        self.conversations.iter().find(|c| c.id == id)
    }

    /// Conversations as listed: most recent first, the status conversation last.
    pub fn ordered(&self) -> Vec<&Conversation> {
        let mut list: Vec<&Conversation> = self.conversations.iter().collect();
        list.sort_by(|a, b| {
            (a.id == STATUS)
                .cmp(&(b.id == STATUS))
                .then(b.last.cmp(&a.last))
                .then(a.title.cmp(&b.title))
        });
        list
    }

    /// The open conversation.
    pub fn selected(&self) -> &Conversation {
        self.get(&self.selected)
            .or_else(|| self.conversations.first())
            .expect("the status conversation always exists")
    }

    /// Opens conversation `id` (if it exists): its unread count is cleared.
    pub fn select(&mut self, id: &str) {
        if let Some(c) = self.conversations.iter_mut().find(|c| c.id == id) {
            c.unread = 0;
            if self.selected != id {
                self.selected = id.to_string();
                self.scroll = 0;
            }
        }
    }

    /// Opens the next (`step` 1) or previous (`step` -1) conversation of the list,
    /// wrapping around.
    pub fn cycle(&mut self, step: isize) {
        let ids: Vec<String> = self.ordered().iter().map(|c| c.id.clone()).collect();
        let at = ids.iter().position(|id| *id == self.selected).unwrap_or(0);
        let n = ids.len() as isize;
        let next = (at as isize + step).rem_euclid(n) as usize;
        self.select(&ids[next]);
    }

    /// Opens the `index`th conversation of the list (0-based), if there is one.
    pub fn jump(&mut self, index: usize) {
        if let Some(id) = self.ordered().get(index).map(|c| c.id.clone()) {
            self.select(&id);
        }
    }

    /// Adds a line to a conversation (made if new). Returns true when it calls for the
    /// user's attention: a message from someone else in a conversation not open.
    pub fn push(&mut self, id: &str, title: &str, group_id: Option<i64>, line: Line) -> bool {
        let selected = self.selected == id;
        let me = self.me.clone();
        let conv = self.conversation(id, title, group_id);
        let attention = match &line.kind {
            LineKind::Message { from, .. } => *from != me,
            LineKind::Warning => true,
            LineKind::Info => false,
        };
        if matches!(line.kind, LineKind::Message { .. }) {
            conv.last = conv.last.max(line.ts);
        }
        conv.push_line(line);
        if attention && !selected {
            conv.unread += 1;
        }
        attention && !selected
    }

    /// Adds a news line to the open conversation.
    pub fn info(&mut self, text: &str, ts: u64) {
        let id = self.selected().id.clone();
        let title = self.selected().title.clone();
        self.push(&id, &title, None, info_line(text, ts));
    }

    /// Adds my message to conversation `id`, pending; returns its UI id.
    pub fn outgoing(&mut self, id: &str, text: &str, ts: u64) -> u64 {
        let local = self.next_local;
        self.next_local += 1;
        let me = self.me.clone();
        let conv = self.conversation(id, id, None);
        conv.last = conv.last.max(ts);
        conv.push_line(Line {
            ts,
            kind: LineKind::Message {
                from: me,
                mark: Some(Mark::Pending),
            },
            text: text.to_string(),
            mid: None,
            local: Some(local),
            row: None,
        });
        self.scroll = 0;
        local
    }

    /// The server stored my message `local`; `mid` names it in receipts.
    pub fn stored(&mut self, local: u64, mid: Option<String>) {
        if let Some(line) = self.line_by_local(local) {
            line.mid = mid;
            if let LineKind::Message { mark, .. } = &mut line.kind {
                if *mark == Some(Mark::Pending) {
                    *mark = Some(Mark::Stored);
                }
            }
        }
    }

    /// Sending my message `local` failed; `mid` names it if it is kept for a resend
    /// (then a later [`Model::stored_mids`] finds it).
    pub fn failed(&mut self, local: u64, mid: Option<String>) {
        if let Some(line) = self.line_by_local(local) {
            if mid.is_some() {
                line.mid = mid;
            }
            if let LineKind::Message { mark, .. } = &mut line.kind {
                *mark = Some(Mark::Failed);
            }
        }
    }

    /// My messages `mids`, pending or failed before, were sent again and are stored.
    pub fn stored_mids(&mut self, mids: &[String]) {
        self.mark_mids(mids, Mark::Stored, |m| {
            matches!(m, Some(Mark::Pending | Mark::Failed))
        });
    }

    /// Receipts came for my messages `mids`: they are delivered. Returns how many
    /// lines changed.
    pub fn delivered(&mut self, mids: &[String]) -> usize {
        self.mark_mids(mids, Mark::Delivered, |m| m != Some(Mark::Delivered))
    }

    /// Sets the mark of my messages named in `mids` whose mark `from` accepts; returns
    /// how many changed.
    fn mark_mids(
        &mut self,
        mids: &[String],
        to: Mark,
        from: impl Fn(Option<Mark>) -> bool,
    ) -> usize {
        let mut changed = 0;
        for line in self
            .conversations
            .iter_mut()
            .flat_map(|c| c.lines.iter_mut())
        {
            if line.mid.as_ref().is_some_and(|m| mids.contains(m)) {
                if let LineKind::Message { mark, .. } = &mut line.kind {
                    if from(*mark) {
                        *mark = Some(to);
                        changed += 1;
                    }
                }
            }
        }
        changed
    }

    fn line_by_local(&mut self, local: u64) -> Option<&mut Line> {
        self.conversations
            .iter_mut()
            .flat_map(|c| c.lines.iter_mut())
            .find(|l| l.local == Some(local))
    }

    /// Scrolls the open conversation a page up (older).
    pub fn page_up(&mut self) {
        self.scroll += self.page.max(1).saturating_sub(1).max(1);
    }

    /// Scrolls a page down (newer), to the bottom at most.
    pub fn page_down(&mut self) {
        self.scroll = self
            .scroll
            .saturating_sub(self.page.max(1).saturating_sub(1).max(1));
    }

    /// Unread messages in all conversations.
    pub fn unread_total(&self) -> usize {
        self.conversations.iter().map(|c| c.unread).sum()
    }

    /// Sets or clears the key-change warning flag of conversation `id`.
    pub fn set_key_warning(&mut self, id: &str, on: bool) {
        if let Some(c) = self.conversations.iter_mut().find(|c| c.id == id) {
            c.key_warning = on;
        }
    }
}

/// A news line.
pub fn info_line(text: &str, ts: u64) -> Line {
    Line {
        ts,
        kind: LineKind::Info,
        text: text.to_string(),
        mid: None,
        local: None,
        row: None,
    }
}

/// A warning line.
pub fn warning_line(text: &str, ts: u64) -> Line {
    Line {
        ts,
        kind: LineKind::Warning,
        text: text.to_string(),
        mid: None,
        local: None,
        row: None,
    }
}

/// A message line from someone else.
pub fn message_line(from: &str, text: &str, ts: u64) -> Line {
    Line {
        ts,
        kind: LineKind::Message {
            from: from.to_string(),
            mark: None,
        },
        text: text.to_string(),
        mid: None,
        local: None,
        row: None,
    }
}

/// The line a history entry shows as (an event: a news line; a message: with its
/// sender and, if mine, its delivery mark).
fn history_line(h: &HistoryEntry, row: Option<i64>) -> Line {
    let kind = if h.mid.is_empty() && !h.outgoing {
        LineKind::Info
    } else {
        LineKind::Message {
            from: h.from.clone(),
            mark: h.outgoing.then_some(match h.state {
                DeliveryState::Pending => Mark::Pending,
                DeliveryState::Stored => Mark::Stored,
                DeliveryState::Delivered | DeliveryState::Received => Mark::Delivered,
            }),
        }
    };
    Line {
        ts: h.ts,
        kind,
        text: h.text.clone(),
        mid: h.outgoing.then(|| h.mid.clone()),
        local: None,
        row,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, from: &str, text: &str) -> HistoryRow {
        (
            id,
            HistoryEntry {
                peer: "bob".into(),
                group: None,
                from: from.into(),
                text: text.into(),
                ts: id as u64,
                msg_id: Some(id),
                mid: format!("{id:032x}"),
                outgoing: from == "alice",
                state: DeliveryState::Received,
                file: false,
            },
        )
    }

    fn texts(m: &Model, id: &str) -> Vec<String> {
        m.get(id)
            .unwrap()
            .lines
            .iter()
            .map(|l| l.text.clone())
            .collect()
    }

    #[test]
    fn page_up_at_the_top_loads_older_lines_from_the_store_once() {
        let mut m = Model::new("alice", "relay");
        m.load(
            &[
                row(10, "bob", "c"),
                row(11, "alice", "d"),
                row(12, "bob", "e"),
            ],
            &BTreeMap::new(),
        );
        assert_eq!(m.selected().id, "bob");
        // Not at the top yet: nothing to load.
        assert_eq!(m.older_wanted(5), None);
        m.scroll = 5;
        assert_eq!(m.older_wanted(5), Some(("bob".to_string(), 10)));
        m.prepend(
            "bob",
            &[
                row(3, "bob", "a"),
                row(7, "alice", "b"),
                row(11, "x", "dup"),
            ],
            false,
        );
        assert_eq!(
            texts(&m, "bob"),
            ["a", "b", "c", "d", "e"],
            "older first, nothing twice"
        );
        assert_eq!(m.older_wanted(5), Some(("bob".to_string(), 3)));
        m.prepend("bob", &[], true);
        assert_eq!(m.older_wanted(5), None, "the store has no older lines");
    }

    #[test]
    fn history_another_process_wrote_is_shown_in_its_conversation() {
        let mut m = Model::new("alice", "relay");
        let (_, mine) = row(4, "alice", "sent from a script");
        m.external(&[mine]);
        assert_eq!(texts(&m, "bob"), ["sent from a script"]);
        let line = &m.get("bob").unwrap().lines[0];
        assert!(line.mid.is_some(), "my own line, so receipts can mark it");
    }

    #[test]
    fn unread_counts_grow_elsewhere_and_clear_on_open() {
        let mut m = Model::new("alice", "relay");
        assert!(m.push("bob", "bob", None, message_line("bob", "hi", 10)));
        assert!(m.push("bob", "bob", None, message_line("bob", "there", 11)));
        assert!(!m.push("bob", "bob", None, info_line("news", 12)));
        assert_eq!(m.get("bob").unwrap().unread, 2);
        assert_eq!(m.unread_total(), 2);
        m.select("bob");
        assert_eq!(m.get("bob").unwrap().unread, 0);
        // In the open conversation: no unread, no bell.
        assert!(!m.push("bob", "bob", None, message_line("bob", "again", 13)));
        assert_eq!(m.unread_total(), 0);
    }

    #[test]
    fn list_is_most_recent_first_with_status_last_and_cycles() {
        let mut m = Model::new("alice", "relay");
        m.push("bob", "bob", None, message_line("bob", "1", 10));
        m.push("#3", "#crew", Some(3), message_line("carol", "2", 30));
        m.push("dave", "dave", None, message_line("dave", "3", 20));
        let titles: Vec<&str> = m.ordered().iter().map(|c| c.title.as_str()).collect();
        assert_eq!(titles, ["#crew", "dave", "bob", "status"]);
        m.jump(0);
        assert_eq!(m.selected().id, "#3");
        m.cycle(1);
        assert_eq!(m.selected().id, "dave");
        m.cycle(-1);
        m.cycle(-1);
        assert_eq!(m.selected().id, STATUS);
        m.jump(42);
        assert_eq!(m.selected().id, STATUS);
    }

    #[test]
    fn my_messages_go_pending_stored_delivered() {
        let mut m = Model::new("alice", "relay");
        let local = m.outgoing("bob", "hello", 5);
        let mark = |m: &Model| match &m.get("bob").unwrap().lines[0].kind {
            LineKind::Message { mark, .. } => *mark,
            _ => None,
        };
        assert_eq!(mark(&m), Some(Mark::Pending));
        m.stored(local, Some("m1".into()));
        assert_eq!(mark(&m), Some(Mark::Stored));
        assert_eq!(m.delivered(&["other".into()]), 0);
        assert_eq!(m.delivered(&["m1".into()]), 1);
        assert_eq!(mark(&m), Some(Mark::Delivered));
        // A late "stored" does not take it back.
        m.stored(local, Some("m1".into()));
        assert_eq!(mark(&m), Some(Mark::Delivered));
        let failed = m.outgoing("bob", "nope", 6);
        m.failed(failed, Some("m2".into()));
        assert!(matches!(
            m.get("bob").unwrap().lines[1].kind,
            LineKind::Message {
                mark: Some(Mark::Failed),
                ..
            }
        ));
        // Sent again later (reconnect, login, /retry): stored.
        m.stored_mids(&["m2".into()]);
        assert!(matches!(
            m.get("bob").unwrap().lines[1].kind,
            LineKind::Message {
                mark: Some(Mark::Stored),
                ..
            }
        ));
    }

    #[test]
    fn conversations_keep_at_most_max_lines() {
        let mut m = Model::new("alice", "relay");
        for i in 0..(MAX_LINES * 3) {
            m.push(
                "bob",
                "bob",
                None,
                message_line("bob", &i.to_string(), i as u64),
            );
            assert!(m.get("bob").unwrap().lines.len() <= MAX_LINES + MAX_LINES / 10);
        }
        let bob = m.get("bob").unwrap();
        assert_eq!(
            bob.lines.last().unwrap().text,
            (MAX_LINES * 3 - 1).to_string()
        );
        assert!(bob.lines.len() >= MAX_LINES);
    }

    #[test]
    fn history_loads_into_conversations() {
        let entry = |peer: &str, from: &str, text: &str, ts: u64, state| HistoryEntry {
            peer: peer.into(),
            group: peer.starts_with('#').then(|| "crew".to_string()),
            from: from.into(),
            text: text.into(),
            ts,
            msg_id: Some(1),
            mid: format!("mid-{ts}"),
            outgoing: from == "alice",
            state,
            file: false,
        };
        let history = vec![
            (
                1,
                entry("bob", "alice", "hi bob", 1, DeliveryState::Delivered),
            ),
            (
                2,
                entry("bob", "bob", "hi alice", 2, DeliveryState::Received),
            ),
            (
                3,
                entry("#4", "carol", "in the group", 3, DeliveryState::Received),
            ),
        ];
        let mut groups = BTreeMap::new();
        groups.insert(
            4,
            GroupState {
                name: "crew".into(),
                epoch: 1,
                role: "member".into(),
                members: Some(3),
            },
        );
        let mut m = Model::new("alice", "relay");
        m.load(&history, &groups);
        let titles: Vec<&str> = m.ordered().iter().map(|c| c.title.as_str()).collect();
        assert_eq!(titles, ["#crew", "bob", "status"]);
        assert_eq!(m.selected().id, "#4", "the most recent is open");
        let bob = m.get("bob").unwrap();
        assert_eq!(bob.lines.len(), 2);
        assert_eq!(
            bob.lines[0].kind,
            LineKind::Message {
                from: "alice".into(),
                mark: Some(Mark::Delivered)
            }
        );
        assert_eq!(bob.unread, 0, "history is not unread");
    }
}
