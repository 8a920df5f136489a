//! End-to-end encrypted chat on top of a relay session and the local store.
//!
//! Sending: pin the peer's key on first use (refuse a changed one), make and offer a
//! conversation key if there is none, seal the text, and report success only when the
//! relay says the message is durable.
//!
//! Receiving: store the raw messages, acknowledge them, and only then decrypt, so
//! neither what the client sends back nor when depends on a decryption. Duplicates are
//! dropped by server message id and by the sender's message id inside the ciphertext.

use crate::connect::{AuthLink, RelayLink, RelayTarget};
use crate::e2e::{self, ConversationKey, Envelope, Identity, PeerKey, TextPayload};
use crate::error::ClientError;
use crate::replay::{Verdict, MAX_JUMP, WINDOW};
use crate::store::{
    DeliveryState, HistoryEntry, InboxEntry, MakeCurrent, PeerEntry, ResumeCredential, Store,
};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use fastchat_common::proto::{
    valid_user_name, ClientToRelay, ErrorCode, ErrorFrame, GroupEvent, RelayToClient,
};
use fastchat_common::time;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Who is chatting, where, and with which password.
#[derive(Clone, Debug)]
pub struct Options {
    /// The auth server, `HOST:PORT`.
    pub server: String,
    /// Where the store and the pinned server keys live.
    pub data_dir: PathBuf,
    pub user: String,
    pub password: String,
}

/// A decrypted incoming message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub msg_id: i64,
    pub from: String,
    pub group_id: Option<i64>,
    pub group: Option<String>,
    pub text: String,
    /// When the sender wrote it (its clock, sealed inside), unix ms.
    pub ts: u64,
    /// When the relay stored it, unix ms (shown too when far from `ts`).
    pub server_ts: u64,
    /// The sender's message id.
    pub mid: String,
}

/// Most message ids in one `ack` (PROTOCOL.md §3: the relay closes a link that sends
/// more).
pub const MAX_ACK_IDS: usize = 10_000;

/// How the reason of a message refused for its context starts.
pub(crate) const REFUSED: &str = "refused: ";

/// How far the sender's and the relay's times of a message may differ before both are
/// shown.
pub const CLOCK_SKEW_SHOWN_MS: u64 = 5 * 60 * 1000;

/// What [`Chat::receive`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new text.
    Message(Received),
    /// A message that could not be opened (bad signature, unknown key, tampered...).
    Undecryptable {
        msg_id: i64,
        from: String,
        /// The group it was sent to, if it was a group message.
        group_id: Option<i64>,
        why: String,
        /// The server now serves a different key for `from` than the pinned one (checked
        /// when a direct message from `from` does not open): the likely reason.
        key_changed: bool,
    },
    /// A message did not open here (its key is missing) and is being recovered: its
    /// key was asked for (see the recovery module). It shows as a [`Event::Message`]
    /// once recovered, or as [`Event::Undecryptable`] past the recovery bound.
    Recovering {
        msg_id: i64,
        from: String,
        group_id: Option<i64>,
    },
    /// A group membership change.
    Group(GroupNotice),
    /// A file arrived, was checked and saved.
    File(crate::files::FileReceived),
    /// A stranger announced a file: it is held, not downloaded, until this user
    /// accepts it ([`Chat::accept_file`]) or rejects it.
    FileHeld(crate::files::HeldFile),
    /// The recipient's device has stored messages we sent (a delivery receipt came
    /// from `peer`): their history entries, named by our message ids (`mid`), are now
    /// [`DeliveryState::Delivered`].
    Delivered { peer: String, mids: Vec<String> },
    /// Messages we sent earlier that were still pending (a failed send) were sent
    /// again and are stored now: their history entries, by our message ids (`mid`), are
    /// [`DeliveryState::Stored`].
    Stored { mids: Vec<String> },
    /// Everything that was waiting at login has been delivered.
    Synced,
}

/// A membership change as members see it, in order with the group's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupNotice {
    pub msg_id: i64,
    pub group_id: i64,
    pub group: String,
    pub event: GroupEvent,
    /// When the relay stored it, unix ms.
    pub ts: u64,
    /// An invitation of this user that waits for their answer (`group_accept` or
    /// `group_decline`); false once accepted on arrival (from someone they know).
    pub waiting: bool,
}

/// Where a message goes.
#[derive(Debug, Clone)]
pub(crate) enum SendTarget {
    User(String),
    Group(i64),
}

/// What opening one stored message gave.
pub(crate) enum Opened {
    /// Something to show.
    Shown(Event),
    /// Nothing to show (a key, a duplicate).
    Nothing,
    /// Not openable yet (its key is not here): keep it, try again later and ask for
    /// the key (what it needs, when known).
    Held(Option<crate::recovery::Need>),
}

/// A message the relay has stored durably.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub msg_id: i64,
    pub ts: u64,
    /// A group message: members it was not stored for, their mailboxes being full.
    pub full: Vec<String>,
}

/// What a session reports while it works, for a terminal UI (see
/// [`Chat::set_progress_hook`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The relay link failed; connecting again (through the auth server).
    Reconnecting,
    /// Connected again, to this relay.
    Reconnected { relay: String },
    /// A file upload stored `done` of `total` chunks.
    Upload { done: u32, total: u32 },
}

/// Called with each [`Progress`] report, on the thread that uses the [`Chat`].
pub type ProgressHook = Box<dyn FnMut(Progress) + Send>;

/// Whether the server's key for a peer matches the pinned one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStatus {
    /// First contact: the server's key is pinned now.
    NewlyPinned,
    /// Same as pinned.
    Unchanged,
    /// The server serves a different key than the pinned one.
    Changed { server_pem: String },
}

/// Creates the account: an RSA identity made here, registered at the auth server, kept
/// in a new encrypted store. The private key never leaves this machine.
pub fn register(opts: &Options) -> Result<(), ClientError> {
    // Checked before the (slow) key generation, and again by `register_with`.
    check_new_account(opts)?;
    register_with(opts, &Identity::generate()?)
}

/// The name is valid and has no account in this data directory yet.
fn check_new_account(opts: &Options) -> Result<(), ClientError> {
    if !valid_user_name(&opts.user) {
        return Err(ClientError::Usage(
            "user names are 1-32 characters of a-z, 0-9, '_', '.' and '-'".into(),
        ));
    }
    if Store::exists(&opts.data_dir, &opts.user) {
        return Err(ClientError::Usage(format!(
            "{} already has an account in {}",
            opts.user,
            opts.data_dir.display()
        )));
    }
    Ok(())
}

/// Like [`register`] with an identity made elsewhere (the load tester and tests share
/// one among simulated users: key generation is not what they measure).
pub fn register_with(opts: &Options, identity: &Identity) -> Result<(), ClientError> {
    check_new_account(opts)?;
    let mut auth = AuthLink::connect(&opts.server, &opts.data_dir)?;
    auth.register(&opts.user, &opts.password, &identity.public_pem())?;
    Store::create(
        &opts.data_dir,
        &opts.user,
        &opts.password,
        &B64.encode(identity.to_pkcs8_der()),
    )?;
    Ok(())
}

/// Opens the local store only (no login), checking the password locally: for reading
/// the history offline (`fastchat search`).
pub fn open_local_store(opts: &Options) -> Result<Store, ClientError> {
    open_store(opts)
}

/// Opens the store, checking the password locally.
fn open_store(opts: &Options) -> Result<Store, ClientError> {
    if !Store::exists(&opts.data_dir, &opts.user) {
        return Err(ClientError::NoIdentity {
            user: opts.user.clone(),
            dir: opts.data_dir.clone(),
        });
    }
    Ok(Store::open(&opts.data_dir, &opts.user, &opts.password)?)
}

/// Revokes this machine's resumption credential at the auth server and forgets it.
/// Returns whether there was one.
pub fn logout(opts: &Options) -> Result<bool, ClientError> {
    let mut store = open_store(opts)?;
    let Some(saved) = store.resume(&opts.server)? else {
        return Ok(false);
    };
    let mut auth = AuthLink::connect(&opts.server, &opts.data_dir)?;
    auth.logout(&opts.user, &saved.credential)?;
    store.set_resume(&opts.server, None)?;
    Ok(true)
}

/// Changes the password at the auth server (which revokes every resumption credential)
/// and re-encrypts the local store with the new one.
pub fn change_password(opts: &Options, new_password: &str) -> Result<(), ClientError> {
    let mut store = open_store(opts)?;
    let mut auth = AuthLink::connect(&opts.server, &opts.data_dir)?;
    auth.change_password(&opts.user, &opts.password, new_password)?;
    store.clear_resume()?;
    store.change_password(new_password)?;
    Ok(())
}

/// A logged-in, end-to-end encrypting chat session. When its relay goes away it fails
/// over to another one by itself (see [`Chat::reconnect`]).
pub struct Chat {
    // What every feature works with.
    pub(crate) store: Store,
    pub(crate) identity: Identity,
    pub(crate) relay: RelayLink,
    // Each feature's own state, whose fields only its module touches.
    /// Downloads and their outstanding requests (the files module).
    pub(crate) files: crate::files::FileState,
    /// Receipts owed and sent (the receipts module).
    pub(crate) receipts: crate::receipts::ReceiptState,
    /// How messages that do not open are recovered (the recovery module).
    pub(crate) recovery: crate::recovery::RecoveryState,
    // The session's own, for this file only.
    opts: Options,
    receive: bool,
    /// The relays the auth server listed at the last login, for direct failover.
    relays: Vec<RelayTarget>,
    failovers: u32,
    /// When the last failover completed.
    last_failover: Option<Instant>,
    /// Told about reconnects and upload progress, if set.
    progress: Option<ProgressHook>,
    /// Peers whose key the server served unchanged in this session (see
    /// [`Chat::check_peer_key`]).
    keys_checked: std::collections::HashSet<String>,
    /// Events of messages already out of the inbox whose batch then failed (a lost
    /// link, a store error): returned by the next [`Chat::receive`], never dropped.
    undelivered: Vec<Event>,
    /// Messages refused because what was sealed inside them (sender, recipient, group)
    /// is not what they came with.
    refusals: u64,
}

/// The most text one message holds, in bytes as sent (UTF-8, with `"`, `\` and control
/// characters escaped as in JSON): sealed, it stays well inside a relay's default body
/// limit (49,152 bytes), so a relay never has to refuse a text a person typed.
pub const MAX_TEXT_BYTES: usize = 32_000;

/// Refuses, before anything is encrypted or sent, a text nobody should send: an empty
/// one, or one too long for a message (said in characters, with what to do instead).
pub fn check_text(text: &str) -> Result<(), ClientError> {
    if text.trim().is_empty() {
        return Err(ClientError::Usage(
            "the message is empty: nothing was sent".into(),
        ));
    }
    let size = serde_json::to_string(text).map_or(usize::MAX, |j| j.len() - 2);
    if size > MAX_TEXT_BYTES {
        return Err(ClientError::Usage(format!(
            "the message is too long: a message holds at most {MAX_TEXT_BYTES} characters              of plain text (accented letters and emoji count 2 to 4, line breaks 2), and this              one counts {size}. Nothing was sent; send it as a file instead (`send --file`)."
        )));
    }
    Ok(())
}

/// Most conversation keys kept for one peer: offers beyond it are refused.
pub const MAX_KEYS_PER_PEER: u64 = 256;

/// How long a session keeps trying to reach a relay again before giving up.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// How many listed relays a failover tries directly before going to the auth server.
pub const DIRECT_ATTEMPTS: usize = 2;

/// A failover this soon after the last one goes through the auth server (which backs
/// off), so a relay that takes sessions and then drops them cannot make a client spin.
pub const DIRECT_COOLDOWN: Duration = Duration::from_secs(5);

/// The saved resumption credential for `opts.server`, if it is good for another minute.
fn saved_credential(opts: &Options, store: &Store) -> Option<String> {
    let now = time::now_ms();
    store
        .resume(&opts.server)
        .ok()
        .flatten()
        .filter(|c| c.expires_ms > now + 60_000)
        .map(|c| c.credential.clone())
}

/// Logs in at the auth server — with the stored resumption credential when there is a
/// valid one, else with the password — and connects to the relay it picks. Also returns
/// the relays the auth server listed for direct failover.
fn establish(
    opts: &Options,
    store: &mut Store,
    receive: bool,
) -> Result<(RelayLink, Vec<RelayTarget>), ClientError> {
    let mut auth = AuthLink::connect(&opts.server, &opts.data_dir)?;
    let redirect = match saved_credential(opts, store) {
        Some(credential) => match auth.resume(&opts.user, &credential) {
            Ok(r) => r,
            Err(ClientError::Refused {
                code: ErrorCode::BadCredentials,
                ..
            }) => {
                store.set_resume(&opts.server, None)?;
                auth.login(&opts.user, &opts.password)?
            }
            Err(e) => return Err(e),
        },
        None => auth.login(&opts.user, &opts.password)?,
    };
    if let Some((credential, expires_ms)) = redirect.credential.clone() {
        store.set_resume(
            &opts.server,
            Some(&ResumeCredential {
                credential,
                expires_ms,
            }),
        )?;
    }
    Ok((RelayLink::connect(&redirect, receive)?, redirect.relays))
}

/// The connection failed, not the request: a new session may succeed.
pub(crate) fn connection_lost(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Link(_) | ClientError::Timeout | ClientError::Unreachable { .. }
    )
}

/// Worth another attempt while failing over (a relay may be gone, a ticket may have
/// expired on the way, the store may be restarting).
fn worth_retrying(e: &ClientError) -> bool {
    e.retryable()
        || matches!(
            e,
            ClientError::Refused {
                code: ErrorCode::BadTicket,
                ..
            }
        )
}

impl Chat {
    /// Opens the local store with the password, logs in at the auth server and connects
    /// to the relay it picks. `receive: false` makes a send-only session.
    pub fn login(opts: &Options, receive: bool) -> Result<Chat, ClientError> {
        let store = open_store(opts)?;
        let der = B64
            .decode(store.identity_der())
            .map_err(|e| ClientError::Protocol(format!("stored identity is not base64: {e}")))?;
        let identity = Identity::from_pkcs8_der(&der)?;
        let mut store = store;
        let (relay, relays) = establish(opts, &mut store, receive)?;
        Chat {
            opts: opts.clone(),
            receive,
            store,
            identity,
            relay,
            relays,
            failovers: 0,
            last_failover: None,
            files: crate::files::FileState::new(opts.data_dir.join(&opts.user).join("downloads")),
            receipts: crate::receipts::ReceiptState::default(),
            recovery: crate::recovery::RecoveryState::default(),
            progress: None,
            keys_checked: std::collections::HashSet::new(),
            undelivered: Vec::new(),
            refusals: 0,
        }
        .resuming_downloads()
    }

    /// Picks up downloads an earlier run did not finish and sends again what is still
    /// pending (receiving sessions only: a send-only session is a script's one-shot).
    fn resuming_downloads(mut self) -> Result<Chat, ClientError> {
        if self.receive {
            self.resume_downloads()?;
            // Best effort: what fails stays pending for the next try.
            let _ = self.resend_pending();
        }
        Ok(self)
    }

    /// Connects again after the relay link failed. First in one handshake: the saved
    /// resumption credential presented straight to another relay the auth server
    /// listed (so failover works while the auth server is down, and a storm of
    /// reconnects costs it nothing). Otherwise back through the auth server, with
    /// exponential backoff and jitter, until [`FAILOVER_TIMEOUT`]; it picks a live relay.
    pub fn reconnect(&mut self) -> Result<(), ClientError> {
        let lost = self.relay.relay_addr.clone();
        self.relay.close();
        self.report(Progress::Reconnecting);
        if let Some(relay) = self.resume_directly(&lost) {
            return self.reconnected(relay);
        }
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        let mut backoff = Duration::from_millis(100);
        loop {
            match establish(&self.opts, &mut self.store, self.receive) {
                Ok((relay, relays)) => {
                    self.relays = relays;
                    return self.reconnected(relay);
                }
                Err(e) if worth_retrying(&e) && Instant::now() + backoff < deadline => {
                    let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1);
                    std::thread::sleep(backoff + Duration::from_millis(jitter));
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Tries up to [`DIRECT_ATTEMPTS`] listed relays other than `lost`, starting at a
    /// random one so a dead relay's clients spread over the rest. `None` without a
    /// saved credential, right after another failover (then the auth server's path,
    /// with its backoff, is taken), or when none of them took it. A credential a relay
    /// refuses is forgotten: it was revoked or expired.
    fn resume_directly(&mut self, lost: &str) -> Option<RelayLink> {
        if self
            .last_failover
            .is_some_and(|t| t.elapsed() < DIRECT_COOLDOWN)
        {
            return None;
        }
        let credential = saved_credential(&self.opts, &self.store)?;
        let others: Vec<RelayTarget> = self
            .relays
            .iter()
            .filter(|r| r.addr != lost)
            .cloned()
            .collect();
        if others.is_empty() {
            return None;
        }
        let start = rand::random::<u64>() as usize % others.len();
        for relay in others
            .iter()
            .cycle()
            .skip(start)
            .take(others.len().min(DIRECT_ATTEMPTS))
        {
            match RelayLink::resume(relay, &self.opts.user, &credential, self.receive) {
                Ok(link) => return Some(link),
                Err(ClientError::Refused {
                    code: ErrorCode::BadCredentials,
                    ..
                }) => {
                    // Best effort: the auth server's path logs in with the password.
                    let _ = self.store.set_resume(&self.opts.server, None);
                    return None;
                }
                Err(_) => {}
            }
        }
        None
    }

    /// Takes `relay` as the session's new link.
    fn reconnected(&mut self, relay: RelayLink) -> Result<(), ClientError> {
        self.relay = relay;
        // Request ids start again on the new link: the old link's unanswered receipts
        // must not swallow new replies.
        self.receipts.link_changed();
        self.failovers += 1;
        self.last_failover = Some(Instant::now());
        let relay = self.relay.relay_addr.clone();
        self.report(Progress::Reconnected { relay });
        if self.receive {
            self.resume_downloads()?;
        }
        Ok(())
    }

    /// Sets the hook told about reconnects and upload progress (a UI's status line).
    pub fn set_progress_hook(&mut self, hook: ProgressHook) {
        self.progress = Some(hook);
    }

    /// Tells the progress hook, if there is one.
    pub(crate) fn report(&mut self, progress: Progress) {
        if let Some(hook) = self.progress.as_mut() {
            hook(progress);
        }
    }

    /// Marks the pinned key of `peer` as verified (the user compared safety numbers).
    pub fn mark_verified(&mut self, peer: &str) -> Result<(), ClientError> {
        self.store
            .update_peer(peer, |p| p.verified = true)?
            .ok_or_else(|| ClientError::Usage(format!("no key pinned for {peer} yet")))?;
        Ok(())
    }

    /// How many messages this session refused because the sender, recipient or group
    /// sealed inside did not match how they came (a reflected, re-attributed or
    /// re-routed message: the server's doing).
    pub fn integrity_refusals(&self) -> u64 {
        self.refusals
    }

    /// How many times this session has reconnected after losing its relay.
    pub fn failovers(&self) -> u32 {
        self.failovers
    }

    /// The logged-in user's name.
    /// This user's directory in the data directory (the store, downloads, pastes).
    pub fn user_dir(&self) -> PathBuf {
        self.opts.data_dir.join(&self.opts.user)
    }

    pub fn user(&self) -> &str {
        &self.relay.user
    }

    /// The relay this session is on.
    pub fn relay_addr(&self) -> &str {
        &self.relay.relay_addr
    }

    /// The local store (history, pinned keys).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Compares the server's key for `peer` with the pin, pinning it on first contact.
    pub fn check_peer_key(&mut self, peer: &str) -> Result<KeyStatus, ClientError> {
        let server_pem = loop {
            match self.relay.fetch_key(peer) {
                Err(e) if connection_lost(&e) => self.reconnect()?,
                other => break other?,
            }
        };
        PeerKey::from_pem(&server_pem)?;
        // What was seen is remembered (`key_changed`), so a warning outlives the session.
        // Compared and marked in one transaction, with the pin as it is now (another
        // process may have just accepted a new key).
        let marked = self.store.update_peer(peer, |p| {
            p.key_changed = p.pubkey_pem.trim() != server_pem.trim();
        })?;
        let status = match marked {
            Some(pinned) if !pinned.key_changed => KeyStatus::Unchanged,
            Some(_) => KeyStatus::Changed { server_pem },
            None => {
                let entry = PeerEntry {
                    pubkey_pem: server_pem.clone(),
                    verified: false,
                    key_changed: false,
                };
                // Another process may have pinned one meanwhile: that one counts.
                let pinned = self.store.pin_peer(peer, &entry)?;
                if pinned.pubkey_pem.trim() == server_pem.trim() {
                    KeyStatus::NewlyPinned
                } else {
                    KeyStatus::Changed { server_pem }
                }
            }
        };
        if matches!(status, KeyStatus::Changed { .. }) {
            self.keys_checked.remove(peer);
        } else {
            self.keys_checked.insert(peer.to_string());
        }
        Ok(status)
    }

    /// Like [`Chat::check_peer_key`], but once per peer per session: a key the server
    /// served unchanged earlier in this session is not fetched again before a send
    /// (again after a message from the peer failed to open, which checks anew).
    fn check_peer_key_once(&mut self, peer: &str) -> Result<KeyStatus, ClientError> {
        if self.keys_checked.contains(peer) {
            return Ok(KeyStatus::Unchanged);
        }
        self.check_peer_key(peer)
    }

    /// Peers whose key the server was last seen to have changed (not accepted yet): a
    /// UI raises its warning for them at start.
    pub fn changed_keys(&self) -> Vec<String> {
        self.store
            .peers()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, p)| p.key_changed)
            .map(|(name, _)| name)
            .collect()
    }

    /// Pins the key the server serves now for `peer`, replacing a changed one.
    pub fn accept_new_key(&mut self, peer: &str, server_pem: String) -> Result<(), ClientError> {
        // Keys wrapped for the old identity must not be used for new messages, nor
        // for receipts: the new identity holds none of them. (They stay, to read old
        // messages.) One transaction with the new pin.
        self.store.replace_peer_key(
            peer,
            &PeerEntry {
                pubkey_pem: server_pem,
                verified: false,
                key_changed: false,
            },
        )?;
        self.keys_checked.insert(peer.to_string());
        Ok(())
    }

    /// The safety number of my key and the pinned key of `peer`: the same on both sides.
    pub fn safety_number(&self, peer: &str) -> Result<String, ClientError> {
        let pinned = self
            .store
            .peer(peer)?
            .ok_or_else(|| ClientError::Usage(format!("no key pinned for {peer} yet")))?;
        Ok(e2e::safety_number(
            &self.identity.public_pem(),
            &pinned.pubkey_pem,
        )?)
    }

    /// The pinned key of `peer`, fetching and pinning it on first contact.
    pub(crate) fn pinned_key(&mut self, peer: &str) -> Result<PeerKey, ClientError> {
        if let Some(entry) = self.store.peer(peer)? {
            return Ok(PeerKey::from_pem(&entry.pubkey_pem)?);
        }
        self.check_peer_key(peer)?;
        self.pinned_key(peer)
    }

    /// Encrypts `text` for `to` and sends it; returns once the relay has it durably.
    pub fn send_text(&mut self, to: &str, text: &str) -> Result<Sent, ClientError> {
        check_text(text)?;
        self.send_pairwise(to, text, None)
    }

    /// Sends a pairwise payload (a text, or a group key grant) to `to`.
    pub(crate) fn send_pairwise(
        &mut self,
        to: &str,
        text: &str,
        group_key: Option<e2e::GroupKeyGrant>,
    ) -> Result<Sent, ClientError> {
        self.send_pairwise_payload(to, text, group_key, None)
    }

    /// Sends a pairwise payload: a text, a group key grant or a file announcement.
    pub(crate) fn send_pairwise_payload(
        &mut self,
        to: &str,
        text: &str,
        group_key: Option<e2e::GroupKeyGrant>,
        file: Option<e2e::FileOffer>,
    ) -> Result<Sent, ClientError> {
        let record = group_key.is_none();
        let payload = TextPayload {
            group_key,
            file,
            mid: e2e::new_message_id(),
            ts: time::now_ms(),
            text: text.to_string(),
        };
        self.send_sealed_pairwise(to, payload, record)
    }

    /// Seals `payload` for `to` (offering a conversation key first if needed) and
    /// sends it; `record` puts it into the history first (pending).
    fn send_sealed_pairwise(
        &mut self,
        to: &str,
        payload: TextPayload,
        record: bool,
    ) -> Result<Sent, ClientError> {
        if !valid_user_name(to) {
            return Err(ClientError::Refused {
                code: ErrorCode::UnknownUser,
                message: format!("there is no user called {to:?}"),
                retry_after_ms: None,
            });
        }
        match self.check_peer_key_once(to) {
            Ok(KeyStatus::Changed { .. }) => {
                return Err(ClientError::PeerKeyChanged {
                    peer: to.to_string(),
                })
            }
            Ok(_) => {}
            // The server could not look the key up now (its database is away, say):
            // a pinned key is enough to send, and the send itself retries.
            Err(e) if e.retryable() && self.store.peer(to)?.is_some() => {}
            Err(e) => return Err(e),
        }
        let peer_key = self.pinned_key(to)?;
        // Looked for and, if there is none, made in one transaction (so processes of
        // this user agree on one key), committed before the offer leaves.
        let (key, _) = self
            .store
            .current_or_new_key(to, ConversationKey::generate)?;
        let offered = self.store.conversation(to)?.shared.contains(&key.id);
        let mut bodies = Vec::new();
        if !offered {
            let offer = e2e::make_offer(&self.identity, self.user(), to, &peer_key, &key)?;
            bodies.push(offer.to_body());
        }
        let ctx = e2e::Context::direct(self.user(), to).stamped(self.store.next_stamp(to)?);
        bodies.push(e2e::seal_text_in(&key, &payload, &ctx)?.to_body());
        if record {
            self.record_outgoing(to, None, &payload)?;
        }
        let sent = self.deliver(&SendTarget::User(to.to_string()), &bodies)?;
        self.store.mark_shared(to, &key.id)?;
        self.record_stored(&payload.mid, &sent)?;
        Ok(sent)
    }

    /// The relay has stored a message we sent: its history entry says so.
    pub(crate) fn record_stored(&mut self, mid: &str, sent: &Sent) -> Result<(), ClientError> {
        Ok(self.store.mark_stored(mid, sent.msg_id)?)
    }

    /// Sends again my messages still pending in the history — a send that failed, or a
    /// crash before the relay answered — oldest first, each with its original `mid` (and
    /// time), so a recipient that already has one drops the copy. Direct messages go to
    /// their peer, group messages to their group. A pending file announcement is not
    /// resent (it is not kept; the file must be sent again). A message refused for good
    /// (an unknown user, a changed key, no longer a member) stays pending and is tried
    /// at the next login; a lost connection stops the round. Returns the `mid`s now
    /// stored. Runs at login (receiving sessions) and after a reconnect in
    /// [`Chat::receive`]; a UI may call it any time (`/retry`).
    pub fn resend_pending(&mut self) -> Result<Vec<String>, ClientError> {
        let pending: Vec<HistoryEntry> = self
            .store
            .pending_outgoing()?
            .into_iter()
            .filter(|h| !h.file)
            .collect();
        let mut stored = Vec::new();
        for h in pending {
            let payload = TextPayload {
                group_key: None,
                file: None,
                mid: h.mid.clone(),
                ts: h.ts,
                text: h.text.clone(),
            };
            let group = h.peer.strip_prefix('#').and_then(|g| g.parse::<i64>().ok());
            let result = match group {
                Some(group_id) => self.send_sealed_group(group_id, payload, false),
                None => self.send_sealed_pairwise(&h.peer, payload, false),
            };
            match result {
                // The send marked the entry stored.
                Ok(_) => stored.push(h.mid),
                Err(e) if connection_lost(&e) => return Err(e),
                Err(_) => {}
            }
        }
        Ok(stored)
    }

    /// Sends a request and waits for the reply `is_reply` recognises (or an error naming
    /// the request), failing over if the relay goes; the request is sent again on the
    /// new session.
    pub(crate) fn request(
        &mut self,
        make: impl Fn(u64) -> ClientToRelay,
        is_reply: impl Fn(&RelayToClient, u64) -> bool,
    ) -> Result<RelayToClient, ClientError> {
        loop {
            let id = self.relay.next_id();
            self.relay.queue(&make(id));
            let result = self
                .relay
                .flush()
                .and_then(|()| self.relay.wait_reply(id, |f| is_reply(f, id)));
            match result {
                Err(e) if connection_lost(&e) => self.reconnect()?,
                other => return other,
            }
        }
    }

    /// Puts a message we are sending into the history (pending) and saves.
    pub(crate) fn record_outgoing(
        &mut self,
        peer: &str,
        group: Option<String>,
        payload: &TextPayload,
    ) -> Result<(), ClientError> {
        let from = self.user().to_string();
        let text = match &payload.file {
            Some(f) => format!("[file] {}", f.name),
            None => payload.text.clone(),
        };
        self.store.push_history(&HistoryEntry {
            peer: peer.to_string(),
            group,
            from,
            text,
            ts: payload.ts,
            msg_id: None,
            mid: payload.mid.clone(),
            outgoing: true,
            state: DeliveryState::Pending,
            file: payload.file.is_some(),
        })?;
        Ok(())
    }

    /// Sends the bodies in order until the relay has stored every one, failing over and
    /// resending what was not acknowledged (the same ciphertext, so the recipient shows
    /// it once). Returns the last one's receipt.
    pub(crate) fn deliver(
        &mut self,
        to: &SendTarget,
        bodies: &[String],
    ) -> Result<Sent, ClientError> {
        let mut stored: Vec<Option<Sent>> = vec![None; bodies.len()];
        let mut store_retries = 0u32;
        loop {
            match self.try_deliver(to, bodies, &mut stored) {
                Ok(()) => {
                    return stored
                        .pop()
                        .flatten()
                        .ok_or_else(|| ClientError::Protocol("nothing to send".into()))
                }
                Err(e) if connection_lost(&e) => self.reconnect()?,
                Err(ClientError::Refused {
                    code: ErrorCode::StoreFailed,
                    ..
                }) if store_retries < 5 => {
                    store_retries += 1;
                    std::thread::sleep(Duration::from_millis(200 << store_retries));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_deliver(
        &mut self,
        to: &SendTarget,
        bodies: &[String],
        stored: &mut [Option<Sent>],
    ) -> Result<(), ClientError> {
        let mut waiting = Vec::new();
        for (i, body) in bodies.iter().enumerate() {
            if stored[i].is_none() {
                let id = self.relay.next_id();
                let (to, group_id) = match to {
                    SendTarget::User(u) => (Some(u.clone()), None),
                    SendTarget::Group(g) => (None, Some(*g)),
                };
                self.relay.queue(&ClientToRelay::Send {
                    id,
                    to,
                    group_id,
                    body: body.clone(),
                });
                waiting.push((i, id));
            }
        }
        self.relay.flush()?;
        for (i, id) in waiting {
            let reply = self.relay.wait_reply(
                id,
                |f| matches!(f, RelayToClient::Sent { id: got, .. } if *got == id),
            )?;
            if let RelayToClient::Sent {
                msg_id, ts, full, ..
            } = reply
            {
                stored[i] = Some(Sent { msg_id, ts, full });
            }
        }
        Ok(())
    }

    /// Key `key_id` of conversation `conv` (a peer, or a group's `#<id>`), if held. Read
    /// from the store each time, so a key another process of this user kept is found.
    pub(crate) fn conversation_key(
        &self,
        conv: &str,
        key_id: &str,
    ) -> Result<Option<ConversationKey>, ClientError> {
        Ok(self.store.conversation_key(conv, key_id)?)
    }

    /// Waits until `deadline` for messages; returns as soon as some arrived (and
    /// whatever else was immediately available). Empty at the deadline — or earlier,
    /// after at most [`crate::connect::KEEPALIVE`], when it pings the relay: call it
    /// in a loop.
    ///
    /// If the relay goes away, the session fails over and returns no events; the new
    /// relay delivers whatever was not acknowledged.
    pub fn receive(&mut self, deadline: Instant) -> Result<Vec<Event>, ClientError> {
        let result = match self.receive_once(deadline) {
            Err(e) if connection_lost(&e) || worth_retrying(&e) => {
                self.reconnect()?;
                // What a failed send left pending goes now (best effort).
                let mids = self.resend_pending().unwrap_or_default();
                Ok(if mids.is_empty() {
                    Vec::new()
                } else {
                    vec![Event::Stored { mids }]
                })
            }
            other => other,
        };
        // What an interrupted batch opened comes first.
        result.map(|events| {
            let mut all = std::mem::take(&mut self.undelivered);
            all.extend(events);
            all
        })
    }

    /// A frame this client could not take: it was skipped (the link goes on), and the
    /// downloads that had windows outstanding — what it most likely belonged to — are
    /// abandoned with a notice, never asked for again in a loop. Any other error is
    /// returned as it is.
    fn frame_refused(&mut self, e: ClientError) -> Result<Vec<Event>, ClientError> {
        match crate::connect::too_long(&e) {
            Some(why) => self.abandon_downloads(&why),
            None => Err(e),
        }
    }

    fn receive_once(&mut self, deadline: Instant) -> Result<Vec<Event>, ClientError> {
        // A session that only listens still speaks up now and then (idle timeout):
        // no wait here outlasts the keepalive interval (callers loop to their deadline).
        self.relay.keep_alive()?;
        self.ask_again_when_due()?;
        let deadline = deadline
            .min(Instant::now() + crate::connect::KEEPALIVE)
            .min(self.next_window_due().unwrap_or(deadline));
        let mut frames = Vec::new();
        match self.relay.recv(Some(deadline)) {
            Ok(Some(frame)) => frames.push(frame),
            // Quiet: held messages whose next request (or giving up) is due go now.
            Ok(None) => return self.recovery_due(),
            Err(e) => return self.frame_refused(e),
        }
        loop {
            match self
                .relay
                .recv(Some(Instant::now() + Duration::from_millis(2)))
            {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                // What came before it is handled below; the long frame itself is gone.
                Err(e) if crate::connect::too_long(&e).is_some() => {
                    let abandoned = self.frame_refused(e)?;
                    self.undelivered.extend(abandoned);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let mut events = Vec::new();
        let mut acks = Vec::new();
        let mut batch = Vec::new();
        let mut synced = false;
        for frame in frames {
            match frame {
                RelayToClient::Msg(m) => {
                    acks.push(m.msg_id);
                    batch.push(m);
                }
                RelayToClient::Synced {} => synced = true,
                RelayToClient::Sent { id, .. }
                | RelayToClient::Error(ErrorFrame { id: Some(id), .. })
                    if self.receipts.answered(id) => {}
                RelayToClient::Error(e) if e.id.is_some_and(|id| self.files.asked(id)) => {
                    if let Some(event) = self.file_frame(RelayToClient::Error(e))? {
                        events.push(event);
                    }
                }
                RelayToClient::Error(e) => return Err(ClientError::from_frame(e)),
                frame @ (RelayToClient::FileChunk { .. } | RelayToClient::FileEnd { .. }) => {
                    if let Some(event) = self.file_frame(frame)? {
                        events.push(event);
                    }
                }
                _ => {}
            }
        }
        if !acks.is_empty() {
            // Stored (committed, one transaction) first, acknowledged second, decrypted
            // last.
            self.store.store_batch(&batch)?;
            // The relay takes at most MAX_ACK_IDS ids per `ack`.
            for chunk in acks.chunks(MAX_ACK_IDS) {
                self.relay.queue(&ClientToRelay::Ack {
                    msg_ids: chunk.to_vec(),
                });
            }
            self.relay.flush()?;
        }
        events.extend(self.open_inbox()?);
        // Receipts for the texts that opened (they are named by the mids inside).
        // Best effort, and never at the cost of this batch's events: a link that
        // failed under the receipts shows (and is reconnected) at the next read.
        let _ = self.send_receipts();
        if synced {
            events.push(Event::Synced);
        }
        Ok(events)
    }

    /// Opens everything stored and not yet opened, in order. A message whose key is not
    /// here (yet) is tried again once the rest is open (its key may be further on), then
    /// held and recovered (see the recovery module). Each message leaves the inbox only
    /// once what it showed is in the history. Then does the group key work the batch
    /// calls for (see [`Chat::after_events`]).
    fn open_inbox(&mut self) -> Result<Vec<Event>, ClientError> {
        let mut events = Vec::new();
        match self.open_inbox_into(&mut events) {
            Ok(()) => Ok(events),
            Err(e) => {
                // Those messages are out of the inbox: their events must still be seen.
                self.undelivered.extend(events);
                Err(e)
            }
        }
    }

    fn open_inbox_into(&mut self, events: &mut Vec<Event>) -> Result<(), ClientError> {
        let mut waiting = Vec::new();
        for row in self.store.inbox()? {
            if let Some(need) = self.open_row(&row, events)? {
                waiting.push((row, need));
            }
        }
        let mut held = Vec::new();
        for (row, first_need) in waiting {
            if let Some(need) = self.open_row(&row, events)? {
                held.push((row, need.or(first_need)));
            }
        }
        self.recover(held, events)?;
        self.check_keys_of_unopened(events);
        self.after_events(events)?;
        Ok(())
    }

    /// Opens one stored message: what it shows goes to `events` and it leaves the
    /// inbox; or it stays, and what it waits for is returned (`Some`).
    fn open_row(
        &mut self,
        row: &crate::store::InboxRow,
        events: &mut Vec<Event>,
    ) -> Result<Option<Option<crate::recovery::Need>>, ClientError> {
        match self.open(row.entry.clone(), row.held)? {
            Opened::Held(need) => return Ok(Some(need)),
            Opened::Shown(event) => {
                if matches!(&event, Event::Undecryptable { why, .. } if why.starts_with(REFUSED)) {
                    self.refusals += 1;
                }
                self.store.inbox_done(row.entry.msg_id)?;
                events.push(event);
            }
            Opened::Nothing => self.store.inbox_done(row.entry.msg_id)?,
        }
        Ok(None)
    }

    /// Opens the inbox again if a held message's next recovery step is due.
    fn recovery_due(&mut self) -> Result<Vec<Event>, ClientError> {
        let now = time::now_ms();
        if self
            .store
            .inbox()?
            .iter()
            .any(|row| row.held && row.next_try_ms <= now)
        {
            return self.open_inbox();
        }
        Ok(Vec::new())
    }

    /// A direct message that did not open may mean the peer's key changed (a new
    /// install, or someone in the middle): compare the server's key with the pin, once
    /// per peer per batch, and say so in the event. Only public keys are compared; no
    /// decryption result is sent anywhere.
    fn check_keys_of_unopened(&mut self, events: &mut [Event]) {
        let mut checked: std::collections::BTreeMap<String, bool> = Default::default();
        for event in events.iter_mut() {
            if let Event::Undecryptable {
                from,
                group_id: None,
                key_changed,
                ..
            } = event
            {
                if !valid_user_name(from) || *from == self.relay.user {
                    continue;
                }
                // A later send checks the key anew too.
                self.keys_checked.remove(from.as_str());
                let changed = match checked.get(from.as_str()) {
                    Some(c) => *c,
                    None => {
                        let c = matches!(self.check_peer_key(from), Ok(KeyStatus::Changed { .. }));
                        checked.insert(from.clone(), c);
                        c
                    }
                };
                *key_changed = changed;
            }
        }
    }

    /// Decrypts one stored message (`held`: it waited for its key).
    fn open(&mut self, m: InboxEntry, held: bool) -> Result<Opened, ClientError> {
        if let (Some(event), Some(group_id)) = (m.event.clone(), m.group_id) {
            return self.group_event(&m, group_id, event);
        }
        // A sender that is not a user name (say `#5`, a group's conversation) could
        // reach keys and history kept under that name: nothing from it is opened.
        if !valid_user_name(&m.from) {
            return Ok(Opened::Shown(Event::Undecryptable {
                msg_id: m.msg_id,
                from: m.from.clone(),
                group_id: m.group_id,
                why: format!("the sender {:?} is not a user name", m.from),
                key_changed: false,
            }));
        }
        let undecryptable = |why: String| {
            Ok(Opened::Shown(Event::Undecryptable {
                msg_id: m.msg_id,
                from: m.from.clone(),
                group_id: m.group_id,
                why,
                key_changed: false,
            }))
        };
        let envelope = match Envelope::from_body(&m.body) {
            Ok(e) => e,
            Err(e) => return undecryptable(e.to_string()),
        };
        match envelope {
            Envelope::Offer {
                key_id,
                wrapped,
                sig,
                ..
            } => {
                let sender = match self.pinned_key(&m.from) {
                    Ok(k) => k,
                    Err(ClientError::Refused { message, .. }) => return undecryptable(message),
                    Err(e) => return Err(e),
                };
                let me = self.user().to_string();
                match e2e::open_offer(
                    &self.identity,
                    &m.from,
                    &me,
                    &sender,
                    &key_id,
                    &wrapped,
                    &sig,
                ) {
                    Ok(key) => {
                        // A peer offers a key once per conversation, and again after a
                        // reinstall: thousands are a store-filling attack, refused (a
                        // key already kept is not counted again).
                        if self.store.conversation_key(&m.from, &key.id)?.is_none()
                            && self.store.key_count(&m.from)? >= MAX_KEYS_PER_PEER
                        {
                            return undecryptable(format!(
                                "{} has offered more than {MAX_KEYS_PER_PEER} keys; this one is refused",
                                m.from
                            ));
                        }
                        self.store
                            .add_key(&m.from, &key, None, true, MakeCurrent::IfNone)?;
                        Ok(Opened::Nothing)
                    }
                    Err(e) => undecryptable(format!(
                        "a key offer from {} failed verification against the pinned key: {e}",
                        m.from
                    )),
                }
            }
            Envelope::Text { key_id, token, .. } => {
                let Some(key) = self.conversation_key(&m.from, &key_id)? else {
                    // Lost, or not here yet: held, and asked for (see the recovery module).
                    return Ok(Opened::Held(Some(crate::recovery::Need::Direct { key_id })));
                };
                let me = self.user().to_string();
                let ctx = e2e::Context::direct(&m.from, &me);
                let (payload, stamp) = match e2e::open_text_in(&key, &token, &ctx) {
                    Ok(p) => p,
                    Err(e) => return undecryptable(e.to_string()),
                };
                let from = m.from.clone();
                if let Some(instead) = self.not_fresh(&m, &from, &stamp, held)? {
                    return Ok(instead);
                }
                let opened = self.open_pairwise(m, payload)?;
                // Marked once acted on: a crash in between opens it again (idempotent).
                self.store.replay_mark(&from, &from, &stamp)?;
                Ok(opened)
            }
            Envelope::GroupText {
                group_id,
                key_id,
                token,
                epoch,
                ..
            } => {
                // A group text comes through its group, never as a direct message (a
                // removed member keeping an old key cannot slip one into the group).
                if m.group_id != Some(group_id) {
                    return undecryptable(format!(
                        "refused: a text for group #{group_id} that did not come through the group"
                    ));
                }
                self.open_group_text(m, held, group_id, epoch, &key_id, &token)
            }
            Envelope::Receipt { key_id, token, .. } => self.open_receipt(&m, &key_id, &token),
            Envelope::KeyRequest {
                key_id,
                group_id,
                msg_ids,
                ts,
                sig,
                ..
            } => {
                let request = e2e::KeyRequest {
                    key_id,
                    group_id,
                    msg_ids,
                    ts,
                };
                // Best effort: a request that cannot be answered now (a refused send, a
                // changed key) must not hold up the inbox; the requester asks again.
                let _ = self.answer_key_request(&m, request, &sig);
                Ok(Opened::Nothing)
            }
        }
    }

    /// What to do instead of acting on `m`, a payload of its sender in `conv` with
    /// `stamp`, if it is not fresh (`None`: it is; see the replay module): one acted on
    /// already is a duplicate and is dropped quietly (the relay may deliver a re-sent
    /// copy twice); one out of the window is refused as a replay, and said.
    pub(crate) fn not_fresh(
        &self,
        m: &InboxEntry,
        conv: &str,
        stamp: &e2e::Stamp,
        held: bool,
    ) -> Result<Option<Opened>, ClientError> {
        let n = stamp.n;
        let why = match self.store.replay_verdict(&m.from, conv, stamp, held)? {
            Verdict::Fresh => return Ok(None),
            Verdict::Seen => return Ok(Some(Opened::Nothing)),
            Verdict::TooOld => format!(
                "{REFUSED}a replay (counter {n} from {} is {WINDOW} or more below the newest)",
                m.from
            ),
            Verdict::TooFar => format!(
                "{REFUSED}a forged counter ({n} from {} is more than {MAX_JUMP} above the newest)",
                m.from
            ),
        };
        Ok(Some(Opened::Shown(Event::Undecryptable {
            msg_id: m.msg_id,
            from: m.from.clone(),
            group_id: m.group_id,
            why,
            key_changed: false,
        })))
    }

    /// Acts on an opened pairwise text: a group key grant, a file announcement, or a
    /// text to show.
    fn open_pairwise(
        &mut self,
        m: InboxEntry,
        payload: TextPayload,
    ) -> Result<Opened, ClientError> {
        // Opened: a text owes a receipt, a duplicate too (receipts are
        // idempotent); a group key grant does not (nothing to mark).
        if payload.group_key.is_none() {
            self.owe_receipt(&m.from, None, &payload.mid);
        }
        let seen = format!("{}/{}", m.from, payload.mid);
        // A grant or a file is acted on first and then remembered (both are
        // idempotent), so a crash in between repeats it rather than losing it.
        if let Some(grant) = payload.group_key {
            if self.store.seen_mid(&seen)? {
                return Ok(Opened::Nothing);
            }
            let notice = self.accept_grant(&m.from, grant)?;
            self.store.remember_mid(&seen)?;
            return Ok(notice.map_or(Opened::Nothing, |mut e| {
                if let Event::Undecryptable { msg_id, .. } = &mut e {
                    *msg_id = m.msg_id;
                }
                Opened::Shown(e)
            }));
        }
        if let Some(offer) = payload.file {
            if self.store.seen_mid(&seen)? {
                return Ok(Opened::Nothing);
            }
            let mid = payload.mid.clone();
            let opened = self.receive_file(&m, None, &mid, offer)?;
            self.store.remember_mid(&seen)?;
            return Ok(opened);
        }
        let peer = m.from.clone();
        self.show_received(m, peer, None, None, payload)
    }

    /// A received text goes into the history (under `peer`: the sender, or the group's
    /// conversation) and out as an event — unless the history has it already (the same
    /// sender and `mid`): then nothing is shown.
    pub(crate) fn show_received(
        &mut self,
        m: InboxEntry,
        peer: String,
        group_id: Option<i64>,
        group: Option<String>,
        payload: TextPayload,
    ) -> Result<Opened, ClientError> {
        let new = self.store.record_received(&HistoryEntry {
            peer,
            group: group.clone(),
            from: m.from.clone(),
            text: payload.text.clone(),
            ts: payload.ts,
            msg_id: Some(m.msg_id),
            mid: payload.mid.clone(),
            outgoing: false,
            state: DeliveryState::Received,
            file: false,
        })?;
        if !new {
            return Ok(Opened::Nothing);
        }
        Ok(Opened::Shown(Event::Message(Received {
            msg_id: m.msg_id,
            from: m.from,
            group_id,
            group,
            text: payload.text,
            ts: payload.ts,
            server_ts: m.ts,
            mid: payload.mid,
        })))
    }

    /// Ends the session.
    pub fn close(self) {
        self.relay.close();
    }
}
