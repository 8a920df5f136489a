//! What the simulated recipients acknowledge, written durably before they say so.
//!
//! A relay answers a sender `sent` on the recipient's `ack` of a message delivered from
//! memory (PROTOCOL.md §3, "What `sent` means"), so an `ack` must mean "stored", as it
//! does for the real client (its SQLite store commits first). The driver stands in for
//! many clients: once per poll turn it appends the messages its sessions are about to
//! acknowledge (id and body) to one file and waits for `fdatasync`, then sends the acks. One sync per
//! turn for every session is cheaper than each client's own commit would be, and says
//! so in the figures (`acks`: "durable").

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// An append-only file of acknowledged messages (id, body length, body; little-endian).
pub struct AckLog {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// Syncs made, and ids written.
    pub syncs: u64,
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
        Ok(AckLog {
            path: path.to_path_buf(),
            file,
            buf: Vec::new(),
            syncs: 0,
            ids: 0,
        })
    }

    /// Adds a message to what the next [`AckLog::commit`] writes: its id, its body's
    /// length (4 bytes) and its body, as a client's store keeps the whole message.
    pub fn record(&mut self, msg_id: i64, body: &str) {
        self.buf.extend_from_slice(&msg_id.to_le_bytes());
        self.buf
            .extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(body.as_bytes());
        self.ids += 1;
    }

    /// Writes what was recorded and waits until it is on disk; nothing to do if
    /// nothing was recorded.
    pub fn commit(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.buf)?;
        self.file.sync_data()?;
        self.buf.clear();
        self.syncs += 1;
        Ok(())
    }
}

impl Drop for AckLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_what_was_recorded_once() {
        let path = std::env::temp_dir().join(format!("acklog-test-{}", std::process::id()));
        let mut log = AckLog::create(&path).unwrap();
        log.commit().unwrap();
        assert_eq!(log.syncs, 0, "nothing recorded, nothing synced");
        log.record(1, "ab");
        log.record(1 << 62, "");
        log.commit().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 14 + 12);
        assert_eq!(&bytes[12..14], b"ab");
        assert_eq!(&bytes[14..22], &(1i64 << 62).to_le_bytes());
        assert_eq!((log.syncs, log.ids), (1, 2));
        drop(log);
        assert!(!path.exists(), "removed when done");
    }
}
