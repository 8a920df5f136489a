//! Files on the client: encrypt a file in authenticated chunks with a fresh key, upload
//! them (resuming after a failover from what the relay has stored), announce the file
//! with an ordinary end-to-end message; on the receiving side download the chunks in
//! windows (resuming from the partial file), check size and SHA-256, and save the file
//! under a safe, new name in the downloads directory.

use crate::chat::{connection_lost, Chat, Event, Opened};
use crate::e2e::{self, FileOffer, FILE_CHUNK};
use crate::error::ClientError;
use crate::store::{DeliveryState, HistoryEntry, InboxEntry};
use fastchat_common::hex;
use fastchat_common::proto::{ClientToRelay, ErrorCode, RelayToClient};
use rsa::sha2::{Digest, Sha256};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Chunks in flight while uploading, and asked for at once while downloading.
const WINDOW: u32 = 16;

/// A file that arrived and was saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReceived {
    pub msg_id: i64,
    pub from: String,
    /// The group it was sent to, if any (names are not unique: this is the key).
    pub group_id: Option<i64>,
    pub group: Option<String>,
    /// The name the sender gave.
    pub name: String,
    pub size: u64,
    /// Where it was saved (inside the downloads directory).
    pub path: PathBuf,
    pub sha256: String,
    /// When the relay stored the announcement, unix ms.
    pub ts: u64,
}

impl FileReceived {
    /// The file in words, as the history keeps it and the UI shows it.
    pub fn describe(&self) -> String {
        format!(
            "file {} ({} bytes) saved to {}",
            self.name,
            self.size,
            self.path.display()
        )
    }
}

/// What sending a file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSent {
    pub file_id: i64,
    pub size: u64,
    pub chunks: u32,
    /// Chunks put on the wire, counting resends after a failover.
    pub chunks_uploaded: u32,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file name that is safe to create inside a directory: the last path component of
/// what the sender said, without control or bidirectional characters, never
/// `.`/`..`/empty, at most
/// 120 bytes.
pub fn safe_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut clean: String = last
        .chars()
        .filter(|c| !c.is_control() && !crate::text::is_bidi_control(*c))
        .collect();
    clean = clean.trim().trim_start_matches('.').to_string();
    while clean.len() > 120 {
        clean.pop();
    }
    if clean.is_empty() {
        "file".into()
    } else {
        clean
    }
}

/// Opens a partial download for appending (made 0600 if new), never through a
/// symbolic link: a link planted where the partial file goes would otherwise have the
/// download written wherever it points.
fn open_partial(path: &Path) -> Result<File, ClientError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path))
}

/// `dir/name`, or `dir/stem (n).ext` for the first n that does not exist.
fn unused_path(dir: &Path, name: &str) -> PathBuf {
    let candidate = dir.join(name);
    if !candidate.exists() {
        return candidate;
    }
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    (1..)
        .map(|n| dir.join(format!("{stem} ({n}){ext}")))
        .find(|p| !p.exists())
        .expect("some numbered name is free")
}

fn sha256_of(path: &Path) -> Result<(String, u64), ClientError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(&hasher.finalize()), size))
}

fn nonce_of(offer: &FileOffer) -> Option<[u8; 16]> {
    let bytes = hex::decode(&offer.nonce)?;
    bytes.try_into().ok()
}

/// What happens to a file a stranger sends — someone this user never wrote to and
/// shares no group with (a file sent to a group always comes from a fellow member).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrangerFiles {
    /// Download every file, as from anyone else.
    Accept,
    /// Download files up to this many bytes; hold larger ones until accepted.
    UpTo(u64),
    /// Hold every file until accepted ([`Chat::accept_file`]) or rejected.
    Ask,
}

/// Most held files from one sender, and in all: past them a stranger's file is refused.
pub const MAX_HELD_PER_SENDER: usize = 10;
pub const MAX_HELD: usize = 100;

/// Files from strangers up to this size download without asking, unless a client says
/// otherwise (the terminal UI asks for every one; `read` holds larger ones).
pub const STRANGER_FILE_CAP: u64 = 1024 * 1024;

/// A file announced by a stranger, held until this user accepts or rejects it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldFile {
    pub file_id: i64,
    pub msg_id: i64,
    pub from: String,
    /// The name the sender gave (a peer's text: clean it before showing).
    pub name: String,
    pub size: u64,
    /// When the relay stored the announcement, unix ms.
    pub ts: u64,
}

impl HeldFile {
    fn of(d: &PendingDownload) -> HeldFile {
        HeldFile {
            file_id: d.offer.file_id,
            msg_id: d.msg_id,
            from: d.from.clone(),
            name: d.offer.name.clone(),
            size: d.offer.size,
            ts: d.ts,
        }
    }
}

/// The files module's state in a [`Chat`].
pub(crate) struct FileState {
    /// Where received files are saved.
    dir: PathBuf,
    /// Outstanding `file_get` requests: request id → file id.
    requests: HashMap<u64, i64>,
    /// Downloads whose window the relay asked to wait for (`rate_limited`: its output
    /// to this session was full), and when to ask again.
    later: Vec<(Instant, i64)>,
    strangers: StrangerFiles,
}

impl FileState {
    pub(crate) fn new(dir: PathBuf) -> FileState {
        FileState {
            dir,
            requests: HashMap::new(),
            later: Vec::new(),
            strangers: StrangerFiles::UpTo(STRANGER_FILE_CAP),
        }
    }

    /// Whether `id` is an outstanding `file_get` (its replies belong to a download).
    pub(crate) fn asked(&self, id: u64) -> bool {
        self.requests.contains_key(&id)
    }
}

impl Chat {
    /// Sets where received files are saved.
    pub fn set_downloads(&mut self, dir: PathBuf) {
        self.files.dir = dir;
    }

    /// Sets what happens to files from strangers from now on (see [`StrangerFiles`]).
    pub fn set_stranger_files(&mut self, policy: StrangerFiles) {
        self.files.strangers = policy;
    }

    /// Whether `peer` is a stranger: this user never wrote to them (in the local
    /// history) and no group in the store has them in its verified roster.
    pub fn is_stranger(&self, peer: &str) -> Result<bool, ClientError> {
        if peer == self.user() || self.store.wrote_to(peer)? {
            return Ok(false);
        }
        for (group_id, g) in self.store.groups()? {
            // Only groups this user is in: an invitation (which anyone can send)
            // makes nobody a fellow member.
            if matches!(g.role.as_str(), "member" | "admin")
                && self
                    .store
                    .roster(group_id)?
                    .is_some_and(|r| r.is_member(peer))
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether a file of `size` bytes from `from` (to a group if `group_id`) waits for
    /// this user's choice instead of downloading.
    fn holds(&self, from: &str, group_id: Option<i64>, size: u64) -> Result<bool, ClientError> {
        let asks = match self.files.strangers {
            StrangerFiles::Accept => false,
            StrangerFiles::UpTo(cap) => size > cap,
            StrangerFiles::Ask => true,
        };
        Ok(asks && group_id.is_none() && self.is_stranger(from)?)
    }

    /// Whether as many files as allowed already wait for a choice, from `from` or in all.
    fn too_many_held(&self, from: &str) -> Result<bool, ClientError> {
        let held = self.held_files()?;
        Ok(held.len() >= MAX_HELD
            || held.iter().filter(|h| h.from == from).count() >= MAX_HELD_PER_SENDER)
    }

    /// Files from strangers waiting for this user's choice, oldest first.
    pub fn held_files(&self) -> Result<Vec<HeldFile>, ClientError> {
        Ok(self
            .store
            .downloads()?
            .iter()
            .filter(|d| d.held)
            .map(HeldFile::of)
            .collect())
    }

    /// Downloads a held file (it arrives as an [`Event::File`] from [`Chat::receive`]).
    /// `false` if no file of that id is held.
    pub fn accept_file(&mut self, file_id: i64) -> Result<bool, ClientError> {
        match self.store.download(file_id)? {
            Some(mut d) if d.held => {
                d.held = false;
                self.store.put_download(&d)?;
                self.request_window(file_id)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Rejects a held file: nothing is downloaded and the relay is told this user is
    /// done with it. `false` if no file of that id is held.
    pub fn reject_file(&mut self, file_id: i64) -> Result<bool, ClientError> {
        if !self.store.download(file_id)?.is_some_and(|d| d.held) {
            return Ok(false);
        }
        if self.store.take_download(file_id)?.is_none() {
            return Ok(false);
        }
        self.relay.queue(&ClientToRelay::FileDone { file_id });
        self.relay.flush()?;
        Ok(true)
    }

    /// Sends the file at `path` to a user (`to`) or a group (`group_id`), under `name`
    /// (default: the file's own name). Returns once every chunk is stored and the
    /// announcement is sent.
    pub fn send_file(
        &mut self,
        to: Option<&str>,
        group_id: Option<i64>,
        path: &Path,
        name: Option<&str>,
    ) -> Result<FileSent, ClientError> {
        let (sha256, size) = sha256_of(path)?;
        let chunks = size.div_ceil(FILE_CHUNK as u64) as u32;
        let key = e2e::new_file_key();
        let nonce: [u8; 16] = rand::random();
        let reply = self.file_request(|id| ClientToRelay::FileBegin {
            id,
            size,
            chunks,
            to: to.map(str::to_string),
            group_id,
        })?;
        let RelayToClient::FileReady { file_id, .. } = reply else {
            return Err(ClientError::Protocol(format!("{reply:?}")));
        };
        let uploaded = self.upload(file_id, path, &key, &nonce, chunks)?;
        let name = name.map(str::to_string).unwrap_or_else(|| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "file".into())
        });
        let offer = FileOffer {
            file_id,
            name,
            size,
            sha256,
            key,
            nonce: hex::encode(&nonce),
            chunks,
        };
        match (to, group_id) {
            (Some(to), _) => {
                self.send_pairwise_payload(to, "", None, Some(offer))?;
            }
            (None, Some(group_id)) => {
                self.send_group_payload(group_id, "", Some(offer))?;
            }
            (None, None) => return Err(ClientError::Usage("a file needs a recipient".into())),
        }
        Ok(FileSent {
            file_id,
            size,
            chunks,
            chunks_uploaded: uploaded,
        })
    }

    /// Sends a file request and waits for its reply, failing over if the relay goes.
    fn file_request(
        &mut self,
        make: impl Fn(u64) -> ClientToRelay,
    ) -> Result<RelayToClient, ClientError> {
        self.request(make, |f, id| {
            matches!(f,
                RelayToClient::FileReady { id: got, .. }
                | RelayToClient::FileStatus { id: got, .. } if *got == id)
        })
    }

    /// Uploads chunks with a window; after a failover asks what is stored and goes on
    /// from there. Returns how many chunks were put on the wire.
    fn upload(
        &mut self,
        file_id: i64,
        path: &Path,
        key: &str,
        nonce: &[u8; 16],
        chunks: u32,
    ) -> Result<u32, ClientError> {
        let mut file = File::open(path).map_err(io_err(path))?;
        let mut buf = vec![0u8; FILE_CHUNK];
        let mut uploaded = 0u32;
        let mut acked = 0u32;
        loop {
            match self.upload_from(
                &mut file,
                path,
                &mut buf,
                file_id,
                key,
                nonce,
                chunks,
                &mut acked,
                &mut uploaded,
            ) {
                Ok(()) => return Ok(uploaded),
                Err(e) if connection_lost(&e) => {
                    self.reconnect()?;
                    let reply =
                        self.file_request(|id| ClientToRelay::FileStatus { id, file_id })?;
                    if let RelayToClient::FileStatus { stored, .. } = reply {
                        acked = stored.min(chunks);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn upload_from(
        &mut self,
        file: &mut File,
        path: &Path,
        buf: &mut [u8],
        file_id: i64,
        key: &str,
        nonce: &[u8; 16],
        chunks: u32,
        acked: &mut u32,
        uploaded: &mut u32,
    ) -> Result<(), ClientError> {
        let mut in_flight: std::collections::VecDeque<u64> = Default::default();
        let mut next = *acked;
        while *acked < chunks {
            while next < chunks && next - *acked < WINDOW {
                file.seek(SeekFrom::Start(u64::from(next) * FILE_CHUNK as u64))
                    .map_err(io_err(path))?;
                let mut filled = 0;
                while filled < buf.len() {
                    let n = file.read(&mut buf[filled..]).map_err(io_err(path))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                let data = e2e::seal_chunk(key, nonce, next, chunks, &buf[..filled])?;
                let id = self.relay.next_id();
                self.relay.queue(&ClientToRelay::FilePut {
                    id,
                    file_id,
                    index: next,
                    data,
                });
                in_flight.push_back(id);
                next += 1;
                *uploaded += 1;
            }
            self.relay.flush()?;
            let Some(id) = in_flight.pop_front() else {
                break;
            };
            self.relay.wait_reply(
                id,
                |f| matches!(f, RelayToClient::FilePutOk { id: got, .. } if *got == id),
            )?;
            *acked += 1;
            self.report(crate::chat::Progress::Upload {
                done: *acked,
                total: chunks,
            });
        }
        Ok(())
    }

    /// A file announcement arrived: the download starts and goes on inside
    /// [`Chat::receive`], a window at a time, between other messages.
    pub(crate) fn receive_file(
        &mut self,
        m: &InboxEntry,
        group: Option<String>,
        mid: &str,
        offer: FileOffer,
    ) -> Result<Opened, ClientError> {
        let malformed = if nonce_of(&offer).is_none() {
            Some("a file announcement with a malformed nonce")
        } else if u64::from(offer.chunks) != offer.size.div_ceil(FILE_CHUNK as u64) {
            // The size is what the person is asked about and what the limits count:
            // the chunks must be exactly what it needs.
            Some("a file announcement whose chunk count does not match its size")
        } else {
            None
        };
        if let Some(why) = malformed {
            return Ok(Opened::Shown(Event::Undecryptable {
                msg_id: m.msg_id,
                from: m.from.clone(),
                group_id: m.group_id,
                why: why.into(),
                key_changed: false,
            }));
        }
        let file_id = offer.file_id;
        let held = self.holds(&m.from, m.group_id, offer.size)?;
        if held && self.too_many_held(&m.from)? {
            // A stranger cannot pile announcements up in the store: past the cap, the
            // file is refused at once (the relay lets go of it).
            self.relay.queue(&ClientToRelay::FileDone { file_id });
            self.relay.flush()?;
            return Ok(Opened::Shown(Event::Undecryptable {
                msg_id: m.msg_id,
                from: m.from.clone(),
                group_id: m.group_id,
                why: format!(
                    "file {:?} refused: {MAX_HELD_PER_SENDER} files from this sender (or {MAX_HELD} in all) already wait for your choice",
                    offer.name
                ),
                key_changed: false,
            }));
        }
        let download = PendingDownload {
            offer,
            msg_id: m.msg_id,
            from: m.from.clone(),
            group_id: m.group_id,
            group,
            ts: m.ts,
            mid: mid.to_string(),
            held,
        };
        self.store.add_download(&download)?;
        if held {
            return Ok(Opened::Shown(Event::FileHeld(HeldFile::of(&download))));
        }
        self.request_window(file_id)?;
        Ok(Opened::Nothing)
    }

    /// Downloads not finished yet.
    pub fn downloads_in_progress(&self) -> usize {
        self.store
            .downloads()
            .map_or(0, |d| d.iter().filter(|d| !d.held).count())
    }

    /// Asks again for every unfinished download (after a failover or a restart).
    /// A frame too long for this client arrived (and was skipped) while downloads had
    /// windows outstanding: those downloads are abandoned — rejected with a notice, and
    /// `file_done` sent — rather than asked for again and again.
    pub(crate) fn abandon_downloads(&mut self, why: &str) -> Result<Vec<Event>, ClientError> {
        let mut files: Vec<i64> = self.files.requests.values().copied().collect();
        files.sort_unstable();
        files.dedup();
        let mut events = Vec::new();
        for file_id in files {
            events.extend(self.finish_download(file_id, Err(why.to_string()))?);
        }
        Ok(events)
    }

    /// Asks again for the windows the relay asked to wait for, once their time came.
    pub(crate) fn ask_again_when_due(&mut self) -> Result<(), ClientError> {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) =
            self.files.later.drain(..).partition(|(at, _)| *at <= now);
        self.files.later = later;
        for (_, file_id) in due {
            if self.store.download(file_id)?.is_some_and(|d| !d.held) {
                self.request_window(file_id)?;
            }
        }
        Ok(())
    }

    /// When the next window waited for is due, if any.
    pub(crate) fn next_window_due(&self) -> Option<Instant> {
        self.files.later.iter().map(|(at, _)| *at).min()
    }

    pub(crate) fn resume_downloads(&mut self) -> Result<(), ClientError> {
        self.files.requests.clear();
        self.files.later.clear();
        let ids: Vec<i64> = self
            .store
            .downloads()?
            .iter()
            .filter(|d| !d.held)
            .map(|d| d.offer.file_id)
            .collect();
        for file_id in ids {
            self.request_window(file_id)?;
        }
        Ok(())
    }

    fn partial_path(&self, file_id: i64) -> PathBuf {
        self.files
            .dir
            .join(".partial")
            .join(format!("{file_id}.part"))
    }

    /// Chunks already in the partial file (a torn last chunk is cut off).
    fn chunks_held(&self, file_id: i64) -> Result<u32, ClientError> {
        let path = self.partial_path(file_id);
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let whole = len / FILE_CHUNK as u64;
        let offer_chunks = self.pending(file_id)?.map_or(0, |d| d.offer.chunks);
        if len % FILE_CHUNK as u64 == 0 {
            return Ok(whole as u32);
        }
        if whole + 1 == u64::from(offer_chunks) {
            // Only the last chunk may be short.
            return Ok(offer_chunks);
        }
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err(&path))?;
        file.set_len(whole * FILE_CHUNK as u64)
            .map_err(io_err(&path))?;
        Ok(whole as u32)
    }

    fn pending(&self, file_id: i64) -> Result<Option<PendingDownload>, ClientError> {
        Ok(self.store.download(file_id)?)
    }

    /// Asks for the next window of chunks of a download.
    fn request_window(&mut self, file_id: i64) -> Result<(), ClientError> {
        let from = self.chunks_held(file_id)?;
        let id = self.relay.next_id();
        self.files.requests.insert(id, file_id);
        self.relay.queue(&ClientToRelay::FileGet {
            id,
            file_id,
            from,
            count: WINDOW,
        });
        match self.relay.flush() {
            // The download is in the store: the reconnect that follows asks again.
            Err(e) if connection_lost(&e) => Ok(()),
            other => other,
        }
    }

    /// A chunk or the end of a window: written, and the next window asked for, or the
    /// download finished.
    pub(crate) fn file_frame(
        &mut self,
        frame: RelayToClient,
    ) -> Result<Option<Event>, ClientError> {
        match frame {
            RelayToClient::FileChunk {
                id,
                file_id,
                index,
                data,
            } => {
                if self.files.requests.get(&id) != Some(&file_id) {
                    return Ok(None);
                }
                let Some(pending) = self.pending(file_id)? else {
                    return Ok(None);
                };
                let nonce = nonce_of(&pending.offer).unwrap_or_default();
                if index != self.chunks_held(file_id)? {
                    return self.finish_download(file_id, Err("a chunk came out of order".into()));
                }
                let plain =
                    match e2e::open_chunk(
                        &pending.offer.key,
                        &nonce,
                        index,
                        pending.offer.chunks,
                        &data,
                    ) {
                        Ok(p) => p,
                        Err(_) => return self.finish_download(
                            file_id,
                            Err(
                                "a chunk failed authentication (altered, reordered or truncated)"
                                    .into(),
                            ),
                        ),
                    };
                let path = self.partial_path(file_id);
                if let Some(dir) = path.parent() {
                    fastchat_common::keys::create_private_dir(dir).map_err(io_err(dir))?;
                }
                let mut out = open_partial(&path)?;
                out.write_all(&plain).map_err(io_err(&path))?;
                Ok(None)
            }
            RelayToClient::FileEnd { id, file_id, sent } => {
                if self.files.requests.remove(&id) != Some(file_id) {
                    return Ok(None);
                }
                let Some(chunks) = self.pending(file_id)?.map(|d| d.offer.chunks) else {
                    return Ok(None);
                };
                let held = self.chunks_held(file_id)?;
                if held >= chunks {
                    self.finish_download(file_id, Ok(()))
                } else if sent == 0 {
                    self.finish_download(
                        file_id,
                        Err("the file is incomplete on the server or has expired".into()),
                    )
                } else {
                    self.request_window(file_id)?;
                    Ok(None)
                }
            }
            RelayToClient::Error(e) if e.id.is_some_and(|id| self.files.asked(id)) => {
                let file_id = self
                    .files
                    .requests
                    .remove(&e.id.unwrap_or_default())
                    .unwrap_or_default();
                if e.code == ErrorCode::RateLimited {
                    // Not this file's fault (the session's output is full, several
                    // downloads at once): the same window again, later.
                    let wait = e.retry_after_ms.unwrap_or(200).clamp(50, 10_000);
                    self.files
                        .later
                        .push((Instant::now() + Duration::from_millis(wait), file_id));
                    return Ok(None);
                }
                self.finish_download(file_id, Err(e.message))
            }
            _ => Ok(None),
        }
    }

    /// Checks and saves a complete download, or discards a failed one; either way tells
    /// the relay this client is done with the file.
    fn finish_download(
        &mut self,
        file_id: i64,
        outcome: Result<(), String>,
    ) -> Result<Option<Event>, ClientError> {
        // Taken out first: a crash from here on leaves the partial file, not a download
        // that resumes after it was shown.
        let Some(pending) = self.store.take_download(file_id)? else {
            return Ok(None);
        };
        self.files.requests.retain(|_, f| *f != file_id);
        let partial = self.partial_path(file_id);
        // An empty file has no chunks, so nothing made its partial file.
        if outcome.is_ok() && pending.offer.size == 0 && !partial.exists() {
            if let Some(dir) = partial.parent() {
                fastchat_common::keys::create_private_dir(dir).map_err(io_err(dir))?;
            }
            open_partial(&partial)?;
        }
        let checked = outcome.and_then(|()| match sha256_of(&partial) {
            Ok((sha, size)) if sha == pending.offer.sha256 && size == pending.offer.size => Ok(()),
            Ok(_) => Err("its size or SHA-256 does not match the announcement".to_string()),
            Err(e) => Err(e.to_string()),
        });
        self.relay.queue(&ClientToRelay::FileDone { file_id });
        self.relay.flush()?;
        let event = match checked {
            Err(why) => {
                let _ = fs::remove_file(&partial);
                Event::Undecryptable {
                    msg_id: pending.msg_id,
                    from: pending.from.clone(),
                    group_id: pending.group_id,
                    why: format!("file {:?} rejected: {why}", pending.offer.name),
                    key_changed: false,
                }
            }
            Ok(()) => {
                let name = safe_name(&pending.offer.name);
                let path = loop {
                    let target = unused_path(&self.files.dir, &name);
                    // A hard link never replaces an existing file.
                    match fs::hard_link(&partial, &target) {
                        Ok(()) => break target,
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(io_err(&target)(e)),
                    }
                };
                let _ = fs::remove_file(&partial);
                let file = FileReceived {
                    msg_id: pending.msg_id,
                    from: pending.from,
                    group_id: pending.group_id,
                    group: pending.group,
                    name: pending.offer.name,
                    size: pending.offer.size,
                    path,
                    sha256: pending.offer.sha256,
                    ts: pending.ts,
                };
                // Into the history, so the file is still listed after a restart.
                let peer = match file.group_id {
                    Some(g) => crate::groups::conversation(g),
                    None => file.from.clone(),
                };
                let mid = if pending.mid.is_empty() {
                    format!("file-{file_id}")
                } else {
                    pending.mid
                };
                self.store.push_history(&HistoryEntry {
                    peer,
                    group: file.group.clone(),
                    from: file.from.clone(),
                    text: file.describe(),
                    ts: file.ts,
                    msg_id: Some(file.msg_id),
                    mid,
                    outgoing: false,
                    state: DeliveryState::Received,
                    file: false,
                })?;
                Event::File(file)
            }
        };
        Ok(Some(event))
    }
}

/// A download in progress, kept in the store so it resumes after a restart.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PendingDownload {
    pub offer: FileOffer,
    pub msg_id: i64,
    pub from: String,
    /// The group it was sent to, if any.
    #[serde(default)]
    pub group_id: Option<i64>,
    pub group: Option<String>,
    pub ts: u64,
    /// The announcement's sender message id (for the history entry).
    #[serde(default)]
    pub mid: String,
    /// From a stranger, waiting for this user's choice: not downloading.
    #[serde(default)]
    pub held: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_download_is_never_written_through_a_link() {
        let dir = std::env::temp_dir().join(format!("fastchat-partial-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("bashrc");
        fs::write(&target, "mine").unwrap();
        let link = dir.join("7.part");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_partial(&link).is_err());
        assert_eq!(fs::read_to_string(&target).unwrap(), "mine");
        // A plain partial file opens and appends.
        let plain = dir.join("8.part");
        let _ = fs::remove_file(&plain);
        open_partial(&plain).unwrap().write_all(b"ab").unwrap();
        open_partial(&plain).unwrap().write_all(b"cd").unwrap();
        assert_eq!(fs::read_to_string(&plain).unwrap(), "abcd");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_with_bidi_controls_lose_them() {
        assert_eq!(safe_name("photo\u{202e}gpj.exe"), "photogpj.exe");
    }

    #[test]
    fn names_stay_inside_the_directory() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("/etc/shadow"), "shadow");
        assert_eq!(safe_name("..\\..\\win.ini"), "win.ini");
        assert_eq!(safe_name(".."), "file");
        assert_eq!(safe_name(""), "file");
        assert_eq!(safe_name("a/"), "file");
        assert_eq!(safe_name(".hidden"), "hidden");
        assert_eq!(safe_name("ok name.txt"), "ok name.txt");
        assert_eq!(safe_name("bell\u{7}.txt"), "bell.txt");
        assert!(safe_name(&"x".repeat(500)).len() <= 120);
    }

    #[test]
    fn numbered_names_never_overwrite() {
        let dir = std::env::temp_dir().join(format!("fastchat-names-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.txt"), "1").unwrap();
        assert_eq!(unused_path(&dir, "a.txt"), dir.join("a (1).txt"));
        fs::write(dir.join("a (1).txt"), "2").unwrap();
        assert_eq!(unused_path(&dir, "a.txt"), dir.join("a (2).txt"));
        assert_eq!(unused_path(&dir, "b"), dir.join("b"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn chunks_are_bound_to_file_place_and_length() {
        let key = e2e::new_file_key();
        let nonce = [7u8; 16];
        let token = e2e::seal_chunk(&key, &nonce, 3, 10, b"data").unwrap();
        assert_eq!(
            e2e::open_chunk(&key, &nonce, 3, 10, &token).unwrap(),
            b"data"
        );
        assert!(
            e2e::open_chunk(&key, &nonce, 4, 10, &token).is_err(),
            "reordered"
        );
        assert!(
            e2e::open_chunk(&key, &nonce, 3, 9, &token).is_err(),
            "truncated file"
        );
        assert!(
            e2e::open_chunk(&key, &[8u8; 16], 3, 10, &token).is_err(),
            "other file"
        );
        let mut altered = token.into_bytes();
        altered[40] ^= 1;
        let altered = String::from_utf8(altered).unwrap();
        assert!(
            e2e::open_chunk(&key, &nonce, 3, 10, &altered).is_err(),
            "altered"
        );
    }
}
