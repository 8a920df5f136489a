//! The client library's error type: every failure a person may see, worded for them.

use crate::e2e::E2eError;
use crate::store::StoreError;
use fastchat_common::link::LinkError;
use fastchat_common::proto::{ErrorCode, ErrorFrame};
use std::path::PathBuf;

/// What went wrong, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server at {addr}: {why}")]
    Unreachable { addr: String, why: String },
    #[error(
        "the auth server at {addr} presented a different key than the one pinned in {}.\n\
         This may be an attack. If the server's key really changed (ask its operator), \
         delete the line for {addr} from that file and try again.",
        file.display()
    )]
    ServerKeyChanged { addr: String, file: PathBuf },
    #[error("{message}")]
    Refused {
        code: ErrorCode,
        message: String,
        retry_after_ms: Option<u64>,
    },
    #[error("connection lost: {0}")]
    Link(#[from] LinkError),
    #[error("unexpected reply from the server: {0}")]
    Protocol(String),
    #[error("timed out waiting for the server")]
    Timeout,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("encryption error: {0}")]
    E2e(#[from] E2eError),
    #[error("no account for {user} in {} (register first, or use the --data-dir you registered with)", dir.display())]
    NoIdentity { user: String, dir: PathBuf },
    #[error(
        "WARNING: the server now serves a DIFFERENT public key for {peer} than the one you pinned.\n\
         Someone may be intercepting your messages. Nothing was sent.\n\
         Compare safety numbers with {peer} in person (`fastchat verify {peer}`); if {peer} \
         really has a new key, accept it with `fastchat verify {peer} --accept-new-key`."
    )]
    PeerKeyChanged { peer: String },
    #[error("{0}")]
    Usage(String),
    #[error("cannot use {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ClientError {
    /// The error a server's `error` frame stands for.
    pub fn from_frame(e: ErrorFrame) -> ClientError {
        ClientError::Refused {
            code: e.code,
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        }
    }

    /// Whether trying again later may work.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Refused { code, .. } => code.retryable(),
            ClientError::Unreachable { .. } | ClientError::Link(_) | ClientError::Timeout => true,
            _ => false,
        }
    }
}
