//! Server key material on disk: a static X25519 key pair per server and the cluster
//! secret shared by the auth server and every relay.
//!
//! Key file (mode 0600, created by the server when missing):
//! ```text
//! private <64 hex chars>
//! public <64 hex chars>
//! ```
//! Cluster secret file (mode 0600, made by `scripts/run.sh`): 64 hex characters (32
//! bytes), surrounding whitespace ignored.

use crate::hex;
use crate::noise::{StaticKeypair, KEY_LEN};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why key material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is malformed: {why}")]
    Malformed { path: PathBuf, why: &'static str },
}

fn decode_key(path: &Path, text: &str, why: &'static str) -> Result<Vec<u8>, KeyError> {
    match hex::decode(text.trim()) {
        Some(bytes) if bytes.len() == KEY_LEN => Ok(bytes),
        _ => Err(KeyError::Malformed {
            path: path.to_path_buf(),
            why,
        }),
    }
}

/// Loads the key pair at `path`, generating and writing a new one (mode 0600) when the
/// file does not exist. Returns the pair and whether it was generated.
pub fn load_or_create_keypair(path: &Path) -> Result<(StaticKeypair, bool), KeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mut private = None;
            let mut public = None;
            for line in text.lines() {
                match line.split_once(' ') {
                    Some(("private", v)) => {
                        private = Some(decode_key(path, v, "bad private key")?);
                    }
                    Some(("public", v)) => public = Some(decode_key(path, v, "bad public key")?),
                    _ if line.trim().is_empty() => {}
                    _ => {
                        return Err(KeyError::Malformed {
                            path: path.to_path_buf(),
                            why: "expected lines `private HEX` and `public HEX`",
                        })
                    }
                }
            }
            match (private, public) {
                (Some(private), Some(public)) => Ok((StaticKeypair { private, public }, false)),
                _ => Err(KeyError::Malformed {
                    path: path.to_path_buf(),
                    why: "missing the private or the public key line",
                }),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = StaticKeypair::generate();
            let text = format!(
                "private {}\npublic {}\n",
                hex::encode(&kp.private),
                hex::encode(&kp.public)
            );
            write_private_file(path, text.as_bytes())?;
            Ok((kp, true))
        }
        Err(source) => Err(KeyError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Loads the 32-byte cluster secret.
pub fn load_secret(path: &Path) -> Result<[u8; KEY_LEN], KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes = decode_key(path, &text, "expected 64 hex characters")?;
    let mut secret = [0u8; KEY_LEN];
    secret.copy_from_slice(&bytes);
    Ok(secret)
}

/// Creates directory `dir` and any missing parents, private to this user (mode 0700,
/// like `install -d -m 700`); an existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates `path` (and its parent directories) with mode 0600 and writes `bytes`; fails
/// if it already exists, so a racing second writer never clobbers a key.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let err = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Only the server's user may list its key directory.
        create_private_dir(dir).map_err(err)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_then_reloads_a_keypair() {
        let dir = std::env::temp_dir().join(format!("fastchat-keys-{}", std::process::id()));
        let path = dir.join("k/auth.key");
        let _ = std::fs::remove_dir_all(&dir);
        let (kp, created) = load_or_create_keypair(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(dir.join("k"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let (again, created) = load_or_create_keypair(&path).unwrap();
        assert!(!created);
        assert_eq!(kp.public, again.public);
        std::fs::write(dir.join("secret"), "zz\n").unwrap();
        assert!(load_secret(&dir.join("secret")).is_err());
        std::fs::write(dir.join("secret"), format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(load_secret(&dir.join("secret")).unwrap(), [0xab; 32]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
