//! Pinned auth server keys, like SSH's `known_hosts`: `{data_dir}/known_servers`, one
//! line per server, `HOST:PORT HEXKEY`. The first connection pins the key; a later
//! different key is refused. The file is read and extended under an exclusive `flock`,
//! so processes and threads connecting at once (a load tester, two terminals) never
//! read a line half written or pin a server twice.

use crate::error::ClientError;
use fastchat_common::hex;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The pin file under `data_dir`.
pub fn pin_file(data_dir: &Path) -> PathBuf {
    data_dir.join("known_servers")
}

/// Checks `key` against the pin for `addr`, pinning it if there is none yet.
pub fn check_or_pin(data_dir: &Path, addr: &str, key: &[u8]) -> Result<(), ClientError> {
    let file = pin_file(data_dir);
    let io_err = |source| ClientError::Io {
        path: file.clone(),
        source,
    };
    // The data directory holds the user's store too: private to the user (0700).
    fastchat_common::keys::create_private_dir(data_dir).map_err(|e| ClientError::Io {
        path: data_dir.to_path_buf(),
        source: e,
    })?;
    let opened = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(&file);
    // A pin file provisioned read-only still checks (but cannot learn new servers).
    let (mut f, writable) = match opened {
        Ok(f) => (f, None),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            (std::fs::File::open(&file).map_err(io_err)?, Some(e))
        }
        Err(e) => return Err(io_err(e)),
    };
    lock(
        &f,
        if writable.is_none() {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        },
    )
    .map_err(io_err)?;
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(io_err)?;
    let key_hex = hex::encode(key);
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(a), Some(k)) = (parts.next(), parts.next()) {
            if a == addr {
                return if k.eq_ignore_ascii_case(&key_hex) {
                    Ok(())
                } else {
                    Err(ClientError::ServerKeyChanged {
                        addr: addr.to_string(),
                        file,
                    })
                };
            }
        }
    }
    if let Some(e) = writable {
        return Err(io_err(e));
    }
    // A file that does not end its last line (edited by hand) gets its line ended.
    let sep = if text.is_empty() || text.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    f.write_all(format!("{sep}{addr} {key_hex}\n").as_bytes())
        .map_err(io_err)?;
    Ok(())
}

/// Takes an advisory lock on `f` (`LOCK_EX` or `LOCK_SH`), held until `f` is closed.
fn lock(f: &std::fs::File, how: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor `f` owns; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), how) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_on_first_use_and_refuses_a_change() {
        let dir = std::env::temp_dir().join(format!("fastchat-pins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        check_or_pin(&dir, "127.0.0.1:7400", &[1; 32]).unwrap();
        check_or_pin(&dir, "127.0.0.1:7400", &[1; 32]).unwrap();
        check_or_pin(&dir, "127.0.0.1:7500", &[2; 32]).unwrap();
        let err = check_or_pin(&dir, "127.0.0.1:7400", &[2; 32]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("known_servers"), "{text}");
        assert!(matches!(err, ClientError::ServerKeyChanged { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_last_line_without_its_newline_is_not_glued_to() {
        let dir = std::env::temp_dir().join(format!("fastchat-pins-nl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let other = format!("10.0.0.1:7400 {}", hex::encode(&[3; 32]));
        std::fs::write(pin_file(&dir), &other).unwrap();
        check_or_pin(&dir, "127.0.0.1:7400", &[1; 32]).unwrap();
        check_or_pin(&dir, "127.0.0.1:7400", &[1; 32]).unwrap();
        check_or_pin(&dir, "10.0.0.1:7400", &[3; 32]).unwrap();
        let text = std::fs::read_to_string(pin_file(&dir)).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn many_connecting_at_once_pin_once_and_agree() {
        // The chaos test's setup once failed here: a thread read another's line half
        // written and took it for a changed key.
        let dir = std::env::temp_dir().join(format!("fastchat-pins-race-{}", std::process::id()));
        for round in 0..20 {
            let _ = std::fs::remove_dir_all(&dir);
            let start = std::sync::Barrier::new(16);
            std::thread::scope(|s| {
                for _ in 0..16 {
                    s.spawn(|| {
                        start.wait();
                        check_or_pin(&dir, "127.0.0.1:7400", &[7; 32]).unwrap()
                    });
                }
            });
            let text = std::fs::read_to_string(pin_file(&dir)).unwrap();
            assert_eq!(text.lines().count(), 1, "round {round}: {text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
