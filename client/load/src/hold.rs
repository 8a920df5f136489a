//! Idle sessions held by child processes: one process may keep only as many sockets
//! as its descriptor limit allows (20,000 here), so the `idle` scenario starts copies
//! of itself (the hidden `hold` scenario). Each reads the users and their resumption
//! credentials from its standard input (one JSON line), logs its share of sessions in,
//! says `ready`, and holds them until its standard input closes.

use crate::setup::{Session, User};
use crate::Cli;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};

/// A child process holding sessions.
pub struct Holder {
    child: Child,
    /// Read up to its `ready` line, then kept open so the child can still write.
    stdout: BufReader<ChildStdout>,
}

/// Starts enough child processes to hold `total` sessions of `users` users, at most
/// `per_process` each, and waits until every one holds its share.
pub fn spread(
    cli: &Cli,
    users: &[User],
    total: usize,
    threads: usize,
    per_process: usize,
) -> Result<Vec<Holder>, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let mut holders = Vec::new();
    let mut from = 0;
    while from < total {
        let count = per_process.min(total - from);
        let mut child = Command::new(&exe)
            .arg("--server")
            .arg(&cli.server)
            .arg("--home")
            .arg(&cli.home)
            .arg("--setup-threads")
            .arg(cli.setup_threads.to_string())
            .arg("--json")
            .arg("hold")
            .args(["--from", &from.to_string()])
            .args(["--count", &count.to_string()])
            .args(["--threads", &threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or("the holding process has no standard output")?;
        let stdin = child
            .stdin
            .as_mut()
            .ok_or("the holding process has no standard input")?;
        writeln!(stdin, "{}", serde_json::to_string(users)?)?;
        stdin.flush()?;
        holders.push(Holder {
            child,
            stdout: BufReader::new(stdout),
        });
        from += count;
    }
    // They log in concurrently; each says `ready` once its sessions are open.
    for (i, h) in holders.iter_mut().enumerate() {
        let mut line = String::new();
        h.stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            let status = h.child.wait()?;
            return Err(
                format!("holding process {i} failed ({status}) before it was ready").into(),
            );
        }
    }
    Ok(holders)
}

/// Closes every holder's standard input (they drop their sessions and exit) and waits.
pub fn release(holders: Vec<Holder>) -> Result<(), Box<dyn std::error::Error>> {
    let mut children: Vec<Child> = holders
        .into_iter()
        .map(|mut h| {
            drop(h.child.stdin.take());
            h.child
        })
        .collect();
    for child in &mut children {
        let status = child.wait()?;
        if !status.success() {
            return Err(format!("a holding process ended with {status}").into());
        }
    }
    Ok(())
}

/// In the child: the users the parent sent.
pub fn read_users() -> Result<Vec<User>, Box<dyn std::error::Error>> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(serde_json::from_str(&line)?)
}

/// In the child: says `ready`, then holds `sessions` until standard input closes.
pub fn serve(sessions: Vec<Session>) -> Result<(), Box<dyn std::error::Error>> {
    let mut out = std::io::stdout();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?;
    drop(sessions);
    Ok(())
}
