//! The UI's main loop: it owns the [`Model`], turns keys into edits and requests,
//! backend updates into model changes, and redraws only when something changed: after
//! a key, an update, or a resize (the size is checked every 200 ms). Ctrl-L clears and
//! redraws everything. On quit it waits (up to [`QUIT_WAIT`]) for the backend to finish
//! what was asked before — requests run in order, so a send typed just before quitting
//! completes — with the screen still up, saying so in the status line.

use super::backend::{self, Request, Update};
use super::commands::{self, Command, HELP};
use super::keys::{self, Action};
use super::model::{info_line, message_line, warning_line, Connection, Model, STATUS};
use super::render::render;
use super::term::Terminal;
use crate::chat::{Chat, Event, Progress};
use crate::error::ClientError;
use crossbeam_channel::{select, Receiver, Sender};
use fastchat_common::proto::valid_user_name;
use fastchat_common::time;
use std::path::PathBuf;
use std::time::Duration;
use termion::input::TermRead;

/// How long quitting waits for a send in flight before giving up on it (it stays
/// pending in the history and is sent again at the next login).
pub const QUIT_WAIT: Duration = Duration::from_secs(10);

/// How the UI behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Ring the terminal bell for messages in conversations not open.
    pub bell: bool,
}

/// The local time zone's offset from UTC now, in seconds.
fn utc_offset_s() -> i64 {
    let now = (time::now_ms() / 1000) as libc::time_t;
    // SAFETY: localtime_r writes into the tm we own; both pointers are valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return 0;
    }
    tm.tm_gmtoff
}

/// Runs the terminal UI with a logged-in session until the user quits.
pub fn run(chat: Chat, settings: Settings) -> Result<(), ClientError> {
    let mut model = Model::new(chat.user(), chat.relay_addr());
    // The newest page of the conversations used last, a few lines of the others; older
    // lines stay in the store (PageUp at the top loads them, /search finds them).
    let recent = chat.store().recent_history(
        super::model::RECENT_ON_START,
        super::model::HISTORY_ON_START,
        super::model::OTHERS_ON_START,
    )?;
    model.load(&recent, &chat.store().groups()?);
    let now = time::now_ms();
    let status = model
        .get(STATUS)
        .map(|c| c.title.clone())
        .unwrap_or_default();
    model.push(
        STATUS,
        &status,
        None,
        info_line(
            &format!(
                "logged in as {} on {}. /msg USER starts a chat, /help lists the commands.",
                chat.user(),
                chat.relay_addr()
            ),
            now,
        ),
    );
    // Key changes seen before (by this or an earlier session) and not accepted yet.
    let changed_keys = chat.changed_keys();
    let paste_dir = chat.user_dir().join("pastes");
    let (requests, updates, backend) = backend::spawn(chat);
    let keys = spawn_key_reader();
    let (quit_tx, quit_rx) = crossbeam_channel::bounded::<()>(1);
    // SIGTERM / SIGHUP (Ctrl-C is a key in raw mode): leave cleanly.
    let _ = ctrlc::set_handler(move || {
        let _ = quit_tx.try_send(());
    });
    let io = |source| ClientError::Io {
        path: PathBuf::from("<terminal>"),
        source,
    };
    let mut term = Terminal::enter().map_err(io)?;
    let offset = utc_offset_s();
    let mut size = Terminal::size();
    let mut app = App {
        model,
        requests,
        bell: settings.bell,
        ring: false,
        quit: false,
        clear: false,
        max_scroll: 0,
        paging: false,
        paste_dir,
        pending_paste: None,
    };
    for peer in changed_keys {
        app.key_warning(&peer);
    }
    let mut dirty = true;
    loop {
        if dirty {
            if std::mem::take(&mut app.clear) {
                term.invalidate();
            }
            draw(&mut app, &mut term, size, offset).map_err(io)?;
            dirty = false;
        }
        select! {
            recv(keys) -> key => {
                dirty = true;
                match key {
                    Ok(key) => app.key(key),
                    Err(_) => app.quit = true,
                }
            },
            recv(updates) -> update => {
                dirty = true;
                match update {
                    Ok(update) => app.update(update),
                    Err(_) => app.quit = true,
                }
            },
            recv(quit_rx) -> _ => app.quit = true,
            default(Duration::from_millis(200)) => {}
        }
        // Take whatever else is waiting before drawing again.
        while let Ok(update) = updates.try_recv() {
            app.update(update);
            dirty = true;
        }
        let now = Terminal::size();
        if now != size {
            size = now;
            dirty = true;
        }
        if app.quit {
            break;
        }
    }
    // Requests run in order: the backend ends after whatever was asked before.
    let _ = app.requests.send(Request::Quit);
    let deadline = std::time::Instant::now() + QUIT_WAIT;
    if !backend.is_finished() {
        app.model.note = Some("sending… (quitting when done)".into());
        let _ = draw(&mut app, &mut term, size, offset);
    }
    while !backend.is_finished() && std::time::Instant::now() < deadline {
        // Keep the status current (a reconnect, an upload's progress).
        if let Ok(update) = updates.recv_timeout(Duration::from_millis(50)) {
            app.update(update);
            app.model.note = Some("sending… (quitting when done)".into());
            let _ = draw(&mut app, &mut term, size, offset);
        }
    }
    if backend.is_finished() {
        let _ = backend.join();
    }
    drop(term);
    Ok(())
}

/// Renders the model for a terminal of `size` and puts it on the screen.
fn draw(
    app: &mut App,
    term: &mut Terminal,
    size: (usize, usize),
    offset: i64,
) -> std::io::Result<()> {
    let screen = render(&app.model, size.0, size.1, offset);
    app.model.page = screen.page;
    app.model.scroll = app.model.scroll.min(screen.max_scroll);
    app.max_scroll = screen.max_scroll;
    term.draw(&screen)?;
    if std::mem::take(&mut app.ring) {
        term.bell();
    }
    Ok(())
}

/// Reads keys on their own thread (reading blocks).
fn spawn_key_reader() -> Receiver<termion::event::Key> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for key in std::io::stdin().keys() {
            match key {
                Ok(key) => {
                    if tx.send(key).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    rx
}

/// The UI's state between events.
struct App {
    model: Model,
    requests: Sender<Request>,
    bell: bool,
    /// Ring the bell after the next draw.
    ring: bool,
    quit: bool,
    /// Clear the whole terminal before the next draw (Ctrl-L).
    clear: bool,
    /// How far the open conversation could be scrolled at the last draw.
    max_scroll: usize,
    /// Older lines were asked of the store and have not come yet.
    paging: bool,
    /// Where a text too long for a message is kept (0700) for `/paste`.
    paste_dir: PathBuf,
    /// The last such text, saved, that `/paste` sends as a file.
    pending_paste: Option<PathBuf>,
}

impl App {
    fn key(&mut self, key: termion::event::Key) {
        let Some(action) = keys::action(key) else {
            return;
        };
        let input = &mut self.model.input;
        match action {
            Action::Insert(c) => input.insert(c),
            Action::Backspace => input.backspace(),
            Action::Delete => input.delete(),
            Action::Left => input.left(),
            Action::Right => input.right(),
            Action::Home => input.home(),
            Action::End => input.end(),
            Action::DeleteWord => input.delete_word(),
            Action::DeleteToStart => input.delete_to_start(),
            Action::RecallOlder => input.recall_older(),
            Action::RecallNewer => input.recall_newer(),
            Action::NextConversation => self.model.cycle(1),
            Action::PreviousConversation => self.model.cycle(-1),
            Action::Jump(i) => self.model.jump(i),
            Action::PageUp => {
                // At the top of what is loaded: the next page comes from the store.
                if let Some((conv, before)) = self.model.older_wanted(self.max_scroll) {
                    if !self.paging {
                        self.paging = true;
                        self.request(Request::Older { conv, before });
                    }
                }
                self.model.page_up();
            }
            Action::PageDown => self.model.page_down(),
            Action::Redraw => self.clear = true,
            Action::Quit => self.quit = true,
            Action::Submit => {
                let line = self.model.input.take();
                if !line.trim().is_empty() {
                    self.submit(&line);
                }
            }
        }
    }

    fn request(&mut self, request: Request) {
        if self.requests.send(request).is_err() {
            self.model.connection = Connection::Offline("the session ended".into());
        }
    }

    fn submit(&mut self, line: &str) {
        let now = time::now_ms();
        let command = match commands::parse(line) {
            Ok(c) => c,
            Err(e) => {
                self.model.info(&e, now);
                return;
            }
        };
        match command {
            Command::Say(text) => self.say(text),
            Command::Msg { user, text } => {
                if !valid_user_name(&user) {
                    self.model.info(
                        &format!("{user:?} is not a user name (1-32 of a-z, 0-9, _ . -)"),
                        now,
                    );
                    return;
                }
                self.model.conversation(&user, &user, None);
                self.model.select(&user);
                self.request(Request::Open { peer: user });
                if let Some(text) = text {
                    self.say(text);
                }
            }
            Command::File { path } => self.send_file(expand_home(&path), now),
            Command::Paste => match self.pending_paste.take() {
                Some(path) => self.send_file(path, now),
                None => self.model.info(
                    "nothing to paste: /paste follows a text too long for a message",
                    now,
                ),
            },
            Command::Group(command) => {
                let open_group = self.model.selected().group_id;
                self.request(Request::Group {
                    open_group,
                    command,
                });
            }
            Command::Verify { user, .. }
            | Command::AcceptKey { user }
            | Command::Block {
                user: Some(user), ..
            } if !valid_user_name(&user) => {
                self.model.info(
                    &format!("{user:?} is not a user name (1-32 of a-z, 0-9, _ . -)"),
                    now,
                );
            }
            Command::Retry => self.request(Request::Retry),
            Command::Search { text } => {
                let open = self.model.selected().id.clone();
                let conv = (open != STATUS).then_some(open);
                self.request(Request::Search { conv, text });
            }
            Command::Verify { user, confirm } => {
                self.model.conversation(&user, &user, None);
                self.model.select(&user);
                self.request(Request::Verify {
                    peer: user,
                    confirm,
                });
            }
            Command::AcceptKey { user } => self.request(Request::AcceptKey { peer: user }),
            Command::Block { user, block } => {
                let open = self.model.selected();
                let user = match user {
                    Some(user) => user,
                    // The open chat's peer: a direct conversation's id is the peer.
                    None if open.id != STATUS && open.group_id.is_none() => open.id.clone(),
                    None => {
                        return self
                            .model
                            .info("usage: /block USER (or /block in a chat with them)", now)
                    }
                };
                self.request(Request::Block { user, block });
            }
            Command::Blocked => self.request(Request::Blocked),
            Command::HeldFile { file_id, accept } => {
                self.request(Request::HeldFile { file_id, accept })
            }
            Command::Help => {
                for line in HELP {
                    self.model.info(line, now);
                }
            }
            Command::Quit => self.quit = true,
        }
    }

    /// A message for the open conversation.
    fn say(&mut self, text: String) {
        let now = time::now_ms();
        let conv = self.model.selected().clone();
        if conv.id == STATUS {
            self.model
                .info("this is the status window: open a chat with /msg USER", now);
            return;
        }
        // Said here, before the text shows as outgoing: an empty or overlong text is
        // never sent (a long paste goes as a file: /file PATH).
        if text.trim().is_empty() {
            return;
        }
        if let Err(e) = crate::chat::check_text(&text) {
            let message = match self.save_paste(&text, now) {
                Ok(path) => format!(
                    "{e} It is saved as {}: /paste sends it to this chat as a file.",
                    path.display()
                ),
                Err(why) => format!("{e} ({why})"),
            }
            .replace(
                " Nothing was sent; send it as a file instead (`send --file`).",
                "",
            );
            self.model.info(&message, now);
            return;
        }
        let local = self.model.outgoing(&conv.id, &text, now);
        match conv.group_id {
            Some(group_id) => self.request(Request::SendGroup {
                local,
                group_id,
                text,
            }),
            None => self.request(Request::SendText {
                local,
                to: conv.id,
                text,
            }),
        }
    }

    /// Sends the file at `path` to the open conversation.
    fn send_file(&mut self, path: PathBuf, now: u64) {
        let conv = self.model.selected().clone();
        if conv.id == STATUS {
            self.model
                .info("open a chat first (/msg USER), then /file PATH", now);
            return;
        }
        if !path.is_file() {
            self.model
                .info(&format!("no file at {}", path.display()), now);
            return;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let local = self
            .model
            .outgoing(&conv.id, &format!("[file] {name}"), now);
        let (to, group_id) = match conv.group_id {
            Some(g) => (None, Some(g)),
            None => (Some(conv.id.clone()), None),
        };
        self.model.note = Some(format!("sending {name}…"));
        self.request(Request::SendFile {
            local,
            to,
            group_id,
            path,
        });
    }

    /// Keeps a text too long for a message in a private file, for `/paste`.
    fn save_paste(&mut self, text: &str, now: u64) -> Result<PathBuf, String> {
        fastchat_common::keys::create_private_dir(&self.paste_dir)
            .map_err(|e| format!("cannot keep it in {}: {e}", self.paste_dir.display()))?;
        let path = self.paste_dir.join(format!("paste-{now}.txt"));
        fastchat_common::keys::write_private_file(&path, text.as_bytes())
            .map_err(|e| format!("cannot keep it: {e}"))?;
        self.pending_paste = Some(path.clone());
        Ok(path)
    }

    fn push(&mut self, conv: &str, title: &str, group_id: Option<i64>, line: super::model::Line) {
        if self.model.push(conv, title, group_id, line) && self.bell {
            self.ring = true;
        }
    }

    /// The conversation of `conv` (`None`: the open one).
    fn target(&self, conv: Option<String>) -> (String, String) {
        match conv {
            Some(id) => {
                let title = self
                    .model
                    .get(&id)
                    .map_or_else(|| id.clone(), |c| c.title.clone());
                (id, title)
            }
            None => (
                self.model.selected().id.clone(),
                self.model.selected().title.clone(),
            ),
        }
    }

    fn key_warning(&mut self, peer: &str) {
        self.model.conversation(peer, peer, None);
        self.model.set_key_warning(peer, true);
        let text = format!(
            "WARNING: the server now serves a DIFFERENT key for {peer} than the one you pinned.\n\
             Someone may be intercepting your messages. Nothing is sent to {peer} until you decide.\n\
             Compare safety numbers with {peer} in person: /verify {peer}\n\
             If {peer} really has a new key: /accept-key {peer}"
        );
        self.push(peer, peer, None, warning_line(&text, time::now_ms()));
        if self.bell {
            self.ring = true;
        }
    }

    fn update(&mut self, update: Update) {
        let now = time::now_ms();
        match update {
            Update::Event(event) => self.event(event),
            Update::Sent { local, mid } => self.model.stored(local, mid),
            Update::SendFailed {
                local,
                conv,
                mid,
                error,
                key_changed,
            } => {
                self.model.failed(local, mid.clone());
                self.model.note = None;
                let (id, title) = self.target(Some(conv));
                let retry = if mid.is_some() {
                    " (it is sent again when the connection is back, at the next login, or now with /retry)"
                } else {
                    ""
                };
                self.push(
                    &id,
                    &title,
                    None,
                    warning_line(&format!("✗ not sent: {error}{retry}"), now),
                );
                if let Some(peer) = key_changed {
                    self.key_warning(&peer);
                }
            }
            Update::Info { conv, text } => {
                let (id, title) = self.target(conv);
                self.model.push(&id, &title, None, info_line(&text, now));
            }
            Update::Warning { conv, text } => {
                let (id, title) = self.target(conv);
                self.push(&id, &title, None, warning_line(&text, now));
            }
            Update::KeyChanged { peer } => {
                if !self.model.get(&peer).is_some_and(|c| c.key_warning) {
                    self.key_warning(&peer);
                }
            }
            Update::KeyAccepted { peer } => self.model.set_key_warning(&peer, false),
            Update::GroupOpened {
                group_id,
                name,
                open,
            } => {
                let id = format!("#{group_id}");
                self.model
                    .conversation(&id, &format!("#{name}"), Some(group_id));
                if open {
                    self.model.select(&id);
                }
            }
            Update::Progress(Progress::Reconnecting) => {
                self.model.connection = Connection::Reconnecting;
            }
            Update::Progress(Progress::Reconnected { relay }) | Update::Online { relay } => {
                self.model.connection = Connection::Connected;
                self.model.relay = relay;
            }
            Update::Progress(Progress::Upload { done, total }) => {
                self.model.note = (done < total).then(|| {
                    format!(
                        "sending file: {}%",
                        u64::from(done) * 100 / u64::from(total)
                    )
                });
            }
            Update::Offline(why) => self.model.connection = Connection::Offline(why),
            Update::Older {
                conv,
                rows,
                complete,
            } => {
                self.paging = false;
                self.model.prepend(&conv, &rows, complete);
            }
            Update::External(entries) => {
                // Rung like any message: another process wrote it, the user has not seen it.
                for h in &entries {
                    if !h.outgoing && self.model.selected().id != h.peer && self.bell {
                        self.ring = true;
                    }
                }
                self.model.external(&entries);
            }
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Message(m) => {
                let (id, title) = match (m.group_id, &m.group) {
                    (Some(g), name) => (
                        format!("#{g}"),
                        format!("#{}", name.clone().unwrap_or_else(|| g.to_string())),
                    ),
                    (None, _) => (m.from.clone(), m.from.clone()),
                };
                let group_id = m.group_id;
                self.push(&id, &title, group_id, message_line(&m.from, &m.text, m.ts));
            }
            Event::File(f) => {
                let (id, title) = match f.group_id {
                    Some(g) => {
                        let id = format!("#{g}");
                        let title = self.model.get(&id).map_or_else(
                            || format!("#{}", f.group.clone().unwrap_or_else(|| g.to_string())),
                            |c| c.title.clone(),
                        );
                        (id, title)
                    }
                    None => (f.from.clone(), f.from.clone()),
                };
                self.push(
                    &id,
                    &title,
                    f.group_id,
                    message_line(&f.from, &f.describe(), f.ts),
                );
            }
            Event::FileHeld(f) => {
                let text = format!(
                    "{} sent a file, held because you never wrote to them: {} ({} bytes). \
                     /accept-file {id} downloads it, /reject-file {id} refuses it",
                    f.from,
                    f.name,
                    f.size,
                    id = f.file_id
                );
                self.push(&f.from, &f.from, None, warning_line(&text, f.ts));
            }
            Event::Group(n) => {
                let id = format!("#{}", n.group_id);
                let text = crate::groups::describe(&n.event, &n.group);
                let line = if n.waiting {
                    warning_line(
                        &format!(
                            "{text}: nothing of it reaches you until you accept. \
                             /group accept joins it, /group decline turns it down (in this window)"
                        ),
                        n.ts,
                    )
                } else {
                    info_line(&text, n.ts)
                };
                self.push(&id, &format!("#{}", n.group), Some(n.group_id), line);
            }
            Event::Undecryptable {
                msg_id,
                from,
                group_id,
                why,
                key_changed,
            } => {
                // A group message goes to its group, not the sender's direct chat.
                let (id, title) = match group_id {
                    Some(g) => {
                        let id = format!("#{g}");
                        let title = self
                            .model
                            .get(&id)
                            .map_or_else(|| id.clone(), |c| c.title.clone());
                        (id, title)
                    }
                    None => (from.clone(), from.clone()),
                };
                self.push(
                    &id,
                    &title,
                    group_id,
                    warning_line(
                        &format!("a message from {from} (#{msg_id}) could not be opened: {why}"),
                        time::now_ms(),
                    ),
                );
                if key_changed && !self.model.get(&from).is_some_and(|c| c.key_warning) {
                    self.key_warning(&from);
                }
            }
            Event::Recovering {
                msg_id,
                from,
                group_id,
            } => {
                let id = group_id.map_or_else(|| from.clone(), |g| format!("#{g}"));
                let title = self
                    .model
                    .get(&id)
                    .map_or_else(|| id.clone(), |c| c.title.clone());
                self.model.push(
                    &id,
                    &title,
                    group_id,
                    info_line(
                        &format!("a message from {from} (#{msg_id}) is being recovered: its key was asked for"),
                        time::now_ms(),
                    ),
                );
            }
            Event::Stored { mids } => self.model.stored_mids(&mids),
            Event::Delivered { mids, .. } => {
                self.model.delivered(&mids);
            }
            Event::Synced => {}
        }
    }
}

/// `~/x` → `$HOME/x`.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(dir: &std::path::Path) -> (App, crossbeam_channel::Receiver<Request>) {
        let (requests, sent) = crossbeam_channel::unbounded();
        let mut model = Model::new("alice", "relay");
        model.conversation("bob", "bob", None);
        model.select("bob");
        let app = App {
            model,
            requests,
            bell: false,
            ring: false,
            quit: false,
            clear: false,
            max_scroll: 0,
            paging: false,
            paste_dir: dir.join("pastes"),
            pending_paste: None,
        };
        (app, sent)
    }

    #[test]
    fn a_text_too_long_for_a_message_is_offered_as_a_file() {
        let dir = std::env::temp_dir().join(format!("fastchat-paste-{}", std::process::id()));
        let (mut app, sent) = app(&dir);
        let long = "x".repeat(crate::chat::MAX_TEXT_BYTES + 1);
        app.submit(&long);
        assert!(sent.try_recv().is_err(), "nothing sent as a message");
        let saved = app.pending_paste.clone().expect("kept for /paste");
        assert_eq!(std::fs::read_to_string(&saved).unwrap(), long);
        app.submit("/paste");
        match sent.try_recv() {
            Ok(Request::SendFile { to, path, .. }) => {
                assert_eq!((to.as_deref(), path), (Some("bob"), saved));
            }
            Ok(_) => panic!("another request"),
            Err(_) => panic!("/paste sent nothing"),
        }
        // Empty lines send nothing.
        app.submit("   ");
        assert!(sent.try_recv().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
