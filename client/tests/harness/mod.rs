//! The shared integration-test harness: one private PostgreSQL cluster per test
//! process, a fresh database per test, real `fastchat-auth` and `fastchat-relay`
//! processes on OS-chosen loopback ports, and client helpers.
//!
//! PostgreSQL refuses to run as root; when the tests run as root the cluster is made
//! and run by the `postgres` user. A watchdog process stops the cluster and removes it
//! when the test process exits, however it exits.
//!
//! A test that stops PostgreSQL makes a cluster of its own ([`Cluster::private`],
//! then [`TestNet::on`]) so other tests of its process keep theirs; it may then
//! [`Cluster::stop`] and [`Cluster::start`] it.

#![allow(dead_code, unused_imports)]

mod cluster;
mod faults;
mod network;
mod processes;
mod raw;

pub use cluster::*;
pub use faults::*;
pub use network::*;
pub use processes::*;
pub use raw::*;

use fastchat_client::chat::{self, Chat, Options};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "correct horse battery";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` every 50 ms until it returns `want`, and fails with the last value after
/// 20 s: for effects the servers apply after they answer (an acknowledgement's delete,
/// a download's release), which a loaded machine may take a while to show.
pub fn eventually<T: PartialEq + std::fmt::Debug>(what: &str, want: T, mut f: impl FnMut() -> T) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = f();
        if got == want {
            return;
        }
        if Instant::now() >= deadline {
            assert_eq!(got, want, "{what} (waited 20 s)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Receives until `n` messages arrived or `timeout` passed.
pub fn receive_n(
    chat: &mut Chat,
    n: usize,
    timeout: Duration,
) -> Vec<fastchat_client::chat::Received> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        for e in chat.receive(deadline).expect("receiving") {
            if let fastchat_client::chat::Event::Message(m) = e {
                got.push(m);
            }
        }
    }
    got
}

/// Texts a session showed, by (sender, text), with how often each was shown.
pub type Shown = std::collections::HashMap<(String, String), usize>;

/// Counts the texts among `events` into `shown`.
pub fn record(shown: &mut Shown, events: Vec<fastchat_client::chat::Event>) {
    for e in events {
        if let fastchat_client::chat::Event::Message(m) = e {
            *shown.entry((m.from, m.text)).or_insert(0) += 1;
        }
    }
}

/// `admin` adds `member`'s user to the group, and `member` takes up the invitation
/// that makes when the two share no group: the user is a member afterwards.
pub fn add_member(admin: &mut Chat, group_id: i64, member: &mut Chat) {
    let user = member.user().to_string();
    let added = admin.group_add(group_id, &user).unwrap();
    if added.invited {
        member.group_accept(group_id).unwrap();
    }
}
