//! The backend thread: it owns the blocking [`Chat`], runs what the UI asks
//! ([`Request`]s) one at a time, and between requests listens for messages (a short
//! `receive`), sending everything that happened back as [`Update`]s. The UI thread never
//! blocks on the network, so typing stays responsive while a send is in flight.

use super::commands::GroupCommand;
use crate::chat::{Chat, Event, KeyStatus, Progress};
use crate::error::ClientError;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long one `receive` waits before the backend looks for requests again.
const LISTEN: Duration = Duration::from_millis(100);

/// What the UI asks the backend to do.
#[derive(Debug, Clone)]
pub enum Request {
    /// A conversation with `peer` was opened: check (pin) their key.
    Open {
        peer: String,
    },
    /// Send my message `local` (the UI's id) to a user.
    SendText {
        local: u64,
        to: String,
        text: String,
    },
    /// Send my message `local` to a group.
    SendGroup {
        local: u64,
        group_id: i64,
        text: String,
    },
    /// Send a file to a user or a group.
    SendFile {
        local: u64,
        to: Option<String>,
        group_id: Option<i64>,
        path: PathBuf,
    },
    /// A `/group` command; `open_group` is the open conversation's group, if any.
    Group {
        open_group: Option<i64>,
        command: GroupCommand,
    },
    Verify {
        peer: String,
        confirm: bool,
    },
    AcceptKey {
        peer: String,
    },
    /// `/block USER` (`block`) or `/unblock USER`.
    Block {
        user: String,
        block: bool,
    },
    /// `/blocked`.
    Blocked,
    /// `/accept-file ID` (`accept`) or `/reject-file ID`.
    HeldFile {
        file_id: i64,
        accept: bool,
    },
    /// `/retry`: send again my messages still pending (a failed send).
    Retry,
    /// PageUp at the top: the lines of `conv` older than history row `before`.
    Older {
        conv: String,
        before: i64,
    },
    /// `/search`: find `text` in the history of `conv` (all if `None`).
    Search {
        conv: Option<String>,
        text: String,
    },
    /// Finish what was asked before (requests run in order), then end the session.
    Quit,
}

/// What the backend tells the UI.
#[derive(Debug, Clone)]
pub enum Update {
    Event(Event),
    /// My message `local` is stored by the server; `mid` names it in receipts.
    Sent {
        local: u64,
        mid: Option<String>,
    },
    /// Sending my message `local` to conversation `conv` failed. `mid` names it if it
    /// made it into the history (then it stays pending there and is sent again after a
    /// reconnect, at the next login, or on `/retry`). `key_changed`: the peer whose key
    /// changed, if that was the reason (for a group: one member, not the group).
    SendFailed {
        local: u64,
        conv: String,
        mid: Option<String>,
        error: String,
        key_changed: Option<String>,
    },
    /// News for a conversation (`None`: the open one).
    Info {
        conv: Option<String>,
        text: String,
    },
    /// A warning for a conversation (`None`: the open one).
    Warning {
        conv: Option<String>,
        text: String,
    },
    /// The server serves a new key for `peer`.
    KeyChanged {
        peer: String,
    },
    /// The new key of `peer` is trusted now.
    KeyAccepted {
        peer: String,
    },
    /// A group to show (created, or listed).
    GroupOpened {
        group_id: i64,
        name: String,
        open: bool,
    },
    Progress(Progress),
    /// Older lines of `conv` from the store, oldest first; `complete`: there are no
    /// older ones.
    Older {
        conv: String,
        rows: Vec<crate::store::HistoryRow>,
        complete: bool,
    },
    /// History another process of this user wrote (a `send` in another terminal).
    External(Vec<crate::store::HistoryEntry>),
    /// The session cannot reach any relay (it keeps trying).
    Offline(String),
    /// Connected again after being offline.
    Online {
        relay: String,
    },
}

/// Starts the backend thread with `chat`. The handle lets the UI wait, at quit, for
/// the requests it already made (a send in flight) to finish.
pub fn spawn(
    mut chat: Chat,
) -> (
    Sender<Request>,
    Receiver<Update>,
    std::thread::JoinHandle<()>,
) {
    let (req_tx, req_rx) = crossbeam_channel::unbounded::<Request>();
    let (up_tx, up_rx) = crossbeam_channel::unbounded::<Update>();
    let hook_tx = up_tx.clone();
    chat.set_progress_hook(Box::new(move |p| {
        let _ = hook_tx.send(Update::Progress(p));
    }));
    // The UI asks about every file from a stranger; those held earlier are shown again.
    chat.set_stranger_files(crate::files::StrangerFiles::Ask);
    for held in chat.held_files().unwrap_or_default() {
        let _ = up_tx.send(Update::Event(Event::FileHeld(held)));
    }
    let handle = std::thread::spawn(move || run(chat, req_rx, up_tx));
    (req_tx, up_rx, handle)
}

fn run(mut chat: Chat, requests: Receiver<Request>, updates: Sender<Update>) {
    let mut offline = false;
    // History rows up to here are on screen; newer ones another process wrote are sent.
    let mut shown = chat.store().last_history_id().unwrap_or(0);
    loop {
        loop {
            match requests.try_recv() {
                Ok(Request::Quit) | Err(TryRecvError::Disconnected) => {
                    chat.close();
                    return;
                }
                Ok(request) => handle(&mut chat, request, &updates),
                Err(TryRecvError::Empty) => break,
            }
        }
        if let Ok(rows) = chat.store().history_from_others(shown) {
            if let Some((last, _)) = rows.last() {
                shown = *last;
                let _ = updates.send(Update::External(rows.into_iter().map(|(_, h)| h).collect()));
            }
        }
        match chat.receive(Instant::now() + LISTEN) {
            Ok(events) => {
                if offline {
                    offline = false;
                    let relay = chat.relay_addr().to_string();
                    let _ = updates.send(Update::Online { relay });
                }
                for event in events {
                    let _ = updates.send(Update::Event(event));
                }
            }
            Err(e) => {
                // Receive tries to reconnect itself; it failed for now. Try again soon.
                offline = true;
                let _ = updates.send(Update::Offline(e.to_string()));
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
}

/// The `mid` of the message I sent in `conv` that a send added to the history after
/// row `before` (none if the send failed before recording it).
fn added_mid(chat: &Chat, conv: &str, before: i64) -> Option<String> {
    chat.store()
        .history_page(conv, None, 8)
        .ok()?
        .into_iter()
        .rev()
        .find(|(id, h)| *id > before && h.outgoing)
        .map(|(_, h)| h.mid)
}

/// The newest history row now.
fn last_row(chat: &Chat) -> i64 {
    chat.store().last_history_id().unwrap_or(0)
}

/// Lines loaded from the store per PageUp past the top.
const OLDER_PAGE: usize = 200;

/// Most search results shown in the UI (the newest).
const SEARCH_SHOWN: usize = 50;

fn info(updates: &Sender<Update>, conv: Option<&str>, text: String) {
    let _ = updates.send(Update::Info {
        conv: conv.map(str::to_string),
        text,
    });
}

fn warn(updates: &Sender<Update>, conv: Option<&str>, text: String) {
    let _ = updates.send(Update::Warning {
        conv: conv.map(str::to_string),
        text,
    });
}

fn handle(chat: &mut Chat, request: Request, updates: &Sender<Update>) {
    match request {
        Request::Open { peer } => match chat.check_peer_key(&peer) {
            Ok(KeyStatus::Changed { .. }) => {
                let _ = updates.send(Update::KeyChanged { peer });
            }
            Ok(KeyStatus::NewlyPinned) => info(
                updates,
                Some(&peer),
                format!("first contact: {peer}'s key is pinned; /verify {peer} to compare safety numbers"),
            ),
            Ok(KeyStatus::Unchanged) => {}
            Err(e) => warn(updates, Some(&peer), e.to_string()),
        },
        Request::SendText { local, to, text } => {
            let before = last_row(chat);
            let result = chat.send_text(&to, &text);
            sent(chat, updates, local, &to, before, result.map(|_| ()));
        }
        Request::SendGroup {
            local,
            group_id,
            text,
        } => {
            let before = last_row(chat);
            let result = chat.send_group(group_id, &text);
            let conv = format!("#{group_id}");
            if let Ok(s) = &result {
                if !s.full.is_empty() {
                    let text = format!(
                        "not stored for {}: their mailboxes are full; they will not get it",
                        s.full.join(", ")
                    );
                    let _ = updates.send(Update::Warning {
                        conv: Some(conv.clone()),
                        text,
                    });
                }
            }
            sent(chat, updates, local, &conv, before, result.map(|_| ()));
        }
        Request::SendFile {
            local,
            to,
            group_id,
            path,
        } => {
            let conv = match (&to, group_id) {
                (Some(to), _) => to.clone(),
                (None, Some(g)) => format!("#{g}"),
                (None, None) => return,
            };
            let before = last_row(chat);
            let result = chat.send_file(to.as_deref(), group_id, &path, None);
            let _ = updates.send(Update::Progress(Progress::Upload { done: 0, total: 0 }));
            if let Ok(f) = &result {
                info(
                    updates,
                    Some(&conv),
                    format!("sent {} ({} bytes)", path.display(), f.size),
                );
            }
            sent(chat, updates, local, &conv, before, result.map(|_| ()));
        }
        Request::Group {
            open_group,
            command,
        } => match group(chat, open_group, command, updates) {
            Ok(()) => {}
            // A member's key changed (handing them the group key): warn about them.
            Err(ClientError::PeerKeyChanged { peer }) => {
                let _ = updates.send(Update::KeyChanged { peer });
            }
            Err(e) => warn(updates, None, e.to_string()),
        },
        Request::Retry => match chat.resend_pending() {
            Ok(mids) if mids.is_empty() => {
                info(updates, None, "nothing left to send again".into());
            }
            Ok(mids) => {
                info(updates, None, format!("sent {} pending message(s) again", mids.len()));
                let _ = updates.send(Update::Event(Event::Stored { mids }));
            }
            Err(e) => warn(updates, None, format!("still not sent: {e}")),
        },
        Request::Block { user, block } => {
            let result = if block {
                chat.block(&user)
            } else {
                chat.unblock(&user)
            };
            match result {
                Ok(now) => {
                    let done = if block { "blocked" } else { "unblocked" };
                    info(updates, None, format!("{done} {user}; {}", blocked_list(&now)));
                }
                Err(e) => warn(updates, None, e.to_string()),
            }
        }
        Request::HeldFile { file_id, accept } => {
            let result = if accept {
                chat.accept_file(file_id)
            } else {
                chat.reject_file(file_id)
            };
            match result {
                Ok(true) if accept => info(updates, None, format!("downloading file {file_id}")),
                Ok(true) => info(updates, None, format!("file {file_id} refused")),
                Ok(false) => warn(updates, None, format!("no file {file_id} is waiting for you")),
                Err(e) => warn(updates, None, e.to_string()),
            }
        }
        Request::Blocked => match chat.blocked() {
            Ok(now) => info(updates, None, blocked_list(&now)),
            Err(e) => warn(updates, None, e.to_string()),
        },
        Request::Verify { peer, confirm } => {
            if let Err(e) = verify(chat, &peer, confirm, updates) {
                warn(updates, Some(&peer), e.to_string());
            }
        }
        Request::AcceptKey { peer } => match chat.check_peer_key(&peer) {
            Ok(KeyStatus::Changed { server_pem }) => match chat.accept_new_key(&peer, server_pem) {
                Ok(()) => {
                    let _ = updates.send(Update::KeyAccepted { peer: peer.clone() });
                    info(
                        updates,
                        Some(&peer),
                        format!("now trusting {peer}'s new key; compare safety numbers: /verify {peer}"),
                    );
                }
                Err(e) => warn(updates, Some(&peer), e.to_string()),
            },
            Ok(_) => {
                let _ = updates.send(Update::KeyAccepted { peer: peer.clone() });
                info(updates, Some(&peer), format!("{peer}'s key has not changed"));
            }
            Err(e) => warn(updates, Some(&peer), e.to_string()),
        },
        Request::Older { conv, before } => {
            match chat.store().history_page(&conv, Some(before), OLDER_PAGE) {
                Ok(rows) => {
                    let complete = rows.len() < OLDER_PAGE;
                    let _ = updates.send(Update::Older {
                        conv,
                        rows,
                        complete,
                    });
                }
                Err(e) => warn(updates, Some(&conv), e.to_string()),
            }
        }
        Request::Search { conv, text } => match chat.store().search(conv.as_deref(), &text) {
            Ok(found) if found.is_empty() => {
                info(updates, None, format!("no message holds {text:?}"));
            }
            Ok(found) => {
                let skip = found.len().saturating_sub(SEARCH_SHOWN);
                let mut lines = vec![format!(
                    "{} message(s) hold {text:?}{}:",
                    found.len(),
                    if skip > 0 { " (the newest shown)" } else { "" }
                )];
                for (_, h) in &found[skip..] {
                    let when = fastchat_common::time::rfc3339(h.ts);
                    let place = h.group.as_deref().map_or(h.peer.clone(), |g| format!("#{g}"));
                    lines.push(format!("{when} {place} <{}> {}", h.from, h.text));
                }
                info(updates, None, lines.join("\n"));
            }
            Err(e) => warn(updates, None, e.to_string()),
        },
        Request::Quit => {}
    }
}

/// Reports how a send went.
fn sent(
    chat: &Chat,
    updates: &Sender<Update>,
    local: u64,
    conv: &str,
    history_before: i64,
    result: Result<(), ClientError>,
) {
    let mid = added_mid(chat, conv, history_before);
    let update = match result {
        Ok(()) => Update::Sent { local, mid },
        Err(e) => Update::SendFailed {
            local,
            conv: conv.to_string(),
            mid,
            key_changed: match &e {
                ClientError::PeerKeyChanged { peer } => Some(peer.clone()),
                _ => None,
            },
            error: e.to_string(),
        },
    };
    let _ = updates.send(update);
}

fn verify(
    chat: &mut Chat,
    peer: &str,
    confirm: bool,
    updates: &Sender<Update>,
) -> Result<(), ClientError> {
    if let KeyStatus::Changed { .. } = chat.check_peer_key(peer)? {
        let _ = updates.send(Update::KeyChanged {
            peer: peer.to_string(),
        });
        if confirm {
            return Err(ClientError::Usage(format!(
                "{peer}'s key changed: accept the new key first (/accept-key {peer}), then verify it"
            )));
        }
    }
    if confirm {
        chat.mark_verified(peer)?;
        info(
            updates,
            Some(peer),
            format!("{peer}'s key is marked verified"),
        );
        return Ok(());
    }
    let number = chat.safety_number(peer)?;
    let verified = chat
        .store()
        .peer(peer)
        .ok()
        .flatten()
        .is_some_and(|p| p.verified);
    let rows: Vec<String> = number
        .split(' ')
        .collect::<Vec<_>>()
        .chunks(4)
        .map(|r| r.join(" "))
        .collect();
    info(
        updates,
        Some(peer),
        format!(
            "safety number for {} and {peer}{}:\n{}\nCompare it with {peer} in person or by call; if it matches, type /verify {peer} yes",
            chat.user(),
            if verified { " (verified before)" } else { "" },
            rows.join("\n")
        ),
    );
    Ok(())
}

fn group(
    chat: &mut Chat,
    open_group: Option<i64>,
    command: GroupCommand,
    updates: &Sender<Update>,
) -> Result<(), ClientError> {
    let resolve = |chat: &mut Chat, name: Option<String>| -> Result<(i64, String), ClientError> {
        match name {
            Some(name) => {
                let g = chat.resolve_group(&name)?;
                Ok((g.group_id, g.name))
            }
            None => {
                let id = open_group.ok_or_else(|| {
                    ClientError::Usage("open a group first, or name one: /group … GROUP".into())
                })?;
                let name = chat
                    .store()
                    .group(id)
                    .ok()
                    .flatten()
                    .map_or_else(|| format!("#{id}"), |g| g.name);
                Ok((id, name))
            }
        }
    };
    let conv = |id: i64| Some(format!("#{id}"));
    match command {
        GroupCommand::Create { name } => {
            let g = chat.group_create(&name)?;
            let _ = updates.send(Update::GroupOpened {
                group_id: g.group_id,
                name: g.name.clone(),
                open: true,
            });
            info(
                updates,
                conv(g.group_id).as_deref(),
                format!(
                    "created {} (#{}); add people with /group add USER",
                    g.name, g.group_id
                ),
            );
        }
        GroupCommand::Add { group, user } => {
            let (id, name) = resolve(chat, group)?;
            let added = chat.group_add(id, &user)?;
            let text = if added.invited {
                format!("invited {user} to {name} (you share no group): it reaches them once they accept")
            } else {
                format!("added {user} to {name}")
            };
            info(updates, conv(id).as_deref(), text);
        }
        GroupCommand::Remove { group, user } => {
            let (id, name) = resolve(chat, group)?;
            chat.group_remove(id, &user)?;
            info(
                updates,
                conv(id).as_deref(),
                format!("removed {user} from {name}; the group key is rotated"),
            );
        }
        GroupCommand::Promote { group, user } => {
            let (id, name) = resolve(chat, group)?;
            chat.group_promote(id, &user)?;
            info(
                updates,
                conv(id).as_deref(),
                format!("{user} is an admin of {name}"),
            );
        }
        GroupCommand::Leave { group } => {
            let (id, name) = resolve(chat, group)?;
            chat.group_leave(id)?;
            info(updates, conv(id).as_deref(), format!("you left {name}"));
        }
        GroupCommand::Answer { group, accept } => {
            let (id, name) = resolve(chat, group)?;
            let text = if accept {
                chat.group_accept(id)?;
                let _ = updates.send(Update::GroupOpened {
                    group_id: id,
                    name: name.clone(),
                    open: false,
                });
                format!("you joined {name}")
            } else {
                chat.group_decline(id)?;
                format!("you declined the invitation to {name}")
            };
            info(updates, conv(id).as_deref(), text);
        }
        GroupCommand::Members { group } => {
            let (id, _) = resolve(chat, group)?;
            let (g, members) = chat.group_members(id)?;
            let list: Vec<String> = members
                .iter()
                .map(|m| match m.role.as_str() {
                    "admin" => format!("{} (admin)", m.user),
                    "invited" => format!("{} (invited)", m.user),
                    _ => m.user.clone(),
                })
                .collect();
            info(
                updates,
                conv(id).as_deref(),
                format!("members of {}: {}", g.name, list.join(", ")),
            );
        }
        GroupCommand::List => {
            let groups = chat.groups()?;
            if groups.is_empty() {
                info(
                    updates,
                    None,
                    "you are in no group; /group create NAME".into(),
                );
            }
            for g in groups {
                let _ = updates.send(Update::GroupOpened {
                    group_id: g.group_id,
                    name: g.name.clone(),
                    open: false,
                });
                info(
                    updates,
                    None,
                    format!(
                        "{} (#{}): {} members, you are {}",
                        g.name, g.group_id, g.members, g.role
                    ),
                );
            }
        }
    }
    Ok(())
}

/// "blocked: a, b" or "you have blocked no one".
fn blocked_list(users: &[String]) -> String {
    if users.is_empty() {
        "you have blocked no one".into()
    } else {
        format!("blocked: {}", users.join(", "))
    }
}
