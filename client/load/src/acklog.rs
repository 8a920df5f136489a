//! What the simulated recipients acknowledge, written durably before they say so.
//!
//! A relay answers a sender `sent` on the recipient's `ack` of a message delivered from
//! memory (PROTOCOL.md §3, "What `sent` means"), so an `ack` must mean "stored", as it
//! does for the real client (its SQLite store commits first). The driver stands in for
//! many clients: each poll turn it hands the messages its sessions are about to
//! acknowledge (id and body) to a writer thread, which appends them to one file and
//! waits for `fdatasync` (everything handed over meanwhile in one sync, as one store
//! commit covers a client's batch); only then are those acks sent. The driver's loop
//! goes on meanwhile, as many clients' stores would work side by side. The figures
//! say `"acks": "durable"` and count the syncs.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Acknowledgements by session index, waiting for (or released by) a sync.
pub type Acks = Vec<(usize, Vec<i64>)>;

/// An append-only file of acknowledged messages (id, body length, body; little-endian)
/// and the thread that writes it.
pub struct AckLog {
    path: PathBuf,
    to_writer: Option<Sender<(Vec<u8>, Acks)>>,
    synced: Receiver<Acks>,
    writer: Option<JoinHandle<()>>,
    buf: Vec<u8>,
    /// Batches handed over and not yet released.
    waiting: usize,
    syncs: Arc<AtomicU64>,
    /// Messages recorded.
    pub ids: u64,
}

impl AckLog {
    /// A fresh log at `path` (truncated; removed when the log is dropped).
    pub fn create(path: &Path) -> std::io::Result<AckLog> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        let (to_writer, from_driver) = channel::<(Vec<u8>, Acks)>();
        let (to_driver, synced) = channel();
        let syncs = Arc::new(AtomicU64::new(0));
        let writer = {
            let syncs = syncs.clone();
            std::thread::Builder::new()
                .name("ack-log".into())
                .spawn(move || write_loop(file, from_driver, to_driver, &syncs))?
        };
        Ok(AckLog {
            path: path.to_path_buf(),
            to_writer: Some(to_writer),
            synced,
            writer: Some(writer),
            buf: Vec::new(),
            waiting: 0,
            syncs,
            ids: 0,
        })
    }

    /// Adds a message to what the next [`AckLog::submit`] hands over: its id, its
    /// body's length (4 bytes) and its body, as a client's store keeps the whole message.
    pub fn record(&mut self, msg_id: i64, body: &str) {
        self.buf.extend_from_slice(&msg_id.to_le_bytes());
        self.buf
            .extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(body.as_bytes());
        self.ids += 1;
    }

    /// Hands what was recorded, and the acks it covers, to the writer.
    pub fn submit(&mut self, acks: Acks) {
        if acks.is_empty() && self.buf.is_empty() {
            return;
        }
        if let Some(tx) = &self.to_writer {
            if tx.send((std::mem::take(&mut self.buf), acks)).is_ok() {
                self.waiting += 1;
            }
        }
    }

    /// The acks whose messages are on disk now.
    pub fn synced(&mut self) -> Acks {
        let mut out = Acks::new();
        while let Ok(acks) = self.synced.try_recv() {
            self.waiting -= 1;
            out.extend(acks);
        }
        out
    }

    /// Waits until everything handed over is on disk; its acks.
    pub fn wait_all(&mut self) -> Acks {
        let mut out = Acks::new();
        while self.waiting > 0 {
            match self.synced.recv() {
                Ok(acks) => {
                    self.waiting -= 1;
                    out.extend(acks);
                }
                Err(_) => break,
            }
        }
        out
    }

    /// Syncs made so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

/// The writer: takes everything handed over since its last sync, writes it, syncs,
/// and releases the acks (one release per batch handed over). A write that fails
/// releases nothing: those messages are delivered again.
fn write_loop(
    mut file: File,
    from_driver: Receiver<(Vec<u8>, Acks)>,
    to_driver: Sender<Acks>,
    syncs: &AtomicU64,
) {
    while let Ok(first) = from_driver.recv() {
        let mut batches = vec![first];
        while let Ok(more) = from_driver.try_recv() {
            batches.push(more);
        }
        let bytes: usize = batches.iter().map(|(b, _)| b.len()).sum();
        let mut all = Vec::with_capacity(bytes);
        for (b, _) in &batches {
            all.extend_from_slice(b);
        }
        if file
            .write_all(&all)
            .and_then(|()| file.sync_data())
            .is_err()
        {
            eprintln!("the ack log could not be written: nothing acknowledged");
            return;
        }
        syncs.fetch_add(1, Ordering::Relaxed);
        for (_, acks) in batches {
            if to_driver.send(acks).is_err() {
                return;
            }
        }
    }
}

impl Drop for AckLog {
    fn drop(&mut self) {
        self.to_writer = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_released_once_what_they_cover_is_written() {
        let path = std::env::temp_dir().join(format!("acklog-test-{}", std::process::id()));
        let mut log = AckLog::create(&path).unwrap();
        log.submit(Acks::new());
        assert!(log.wait_all().is_empty(), "nothing handed over");
        log.record(1, "ab");
        log.record(1 << 62, "");
        log.submit(vec![(0, vec![1]), (3, vec![1 << 62])]);
        assert_eq!(log.wait_all(), vec![(0, vec![1]), (3, vec![1 << 62])]);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 14 + 12);
        assert_eq!(&bytes[12..14], b"ab");
        assert_eq!(&bytes[14..22], &(1i64 << 62).to_le_bytes());
        assert_eq!((log.syncs(), log.ids), (1, 2));
        assert!(log.synced().is_empty());
        drop(log);
        assert!(!path.exists(), "removed when done");
    }
}
