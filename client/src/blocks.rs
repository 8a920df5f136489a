//! Blocking: the relay refuses a blocked user's direct messages, files and group
//! additions for this user and stops sending their group messages (PROTOCOL.md §3,
//! `block`). The list lives on the server, so it holds on every device and at once.

use crate::chat::Chat;
use crate::error::ClientError;
use fastchat_common::proto::{ClientToRelay, RelayToClient};

impl Chat {
    fn block_request(
        &mut self,
        make: impl Fn(u64) -> ClientToRelay,
    ) -> Result<Vec<String>, ClientError> {
        match self.request(
            make,
            |f, id| matches!(f, RelayToClient::Blocked { id: got, .. } if *got == id),
        )? {
            RelayToClient::Blocked { users, .. } => Ok(users),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Blocks `user`; returns everyone blocked now, by name.
    pub fn block(&mut self, user: &str) -> Result<Vec<String>, ClientError> {
        self.block_request(|id| ClientToRelay::Block {
            id,
            user: user.to_string(),
        })
    }

    /// Unblocks `user` (no error if they were not blocked); returns who stays blocked.
    pub fn unblock(&mut self, user: &str) -> Result<Vec<String>, ClientError> {
        self.block_request(|id| ClientToRelay::Unblock {
            id,
            user: user.to_string(),
        })
    }

    /// Everyone this user blocked, by name.
    pub fn blocked(&mut self) -> Result<Vec<String>, ClientError> {
        self.block_request(|id| ClientToRelay::BlockList { id })
    }
}
