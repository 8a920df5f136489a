//! Secrets stay secret: after a full session through the CLI (register, direct and
//! group texts, a file, read, a password change, logout) on two relays logging at debug
//! level, no password, plaintext, file name, cluster secret, server private key,
//! resumption credential or end-to-end key appears in any server log, no password or
//! key in the CLI's output; and every file holding one is mode 0600, in directories mode 0700.

mod harness;

use fastchat_client::chat::{Chat, Options};
use fastchat_client::store::Store;
use harness::{Settings, TestNet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Output of one CLI run.
struct Run {
    stdout: String,
    stderr: String,
}

/// The `fastchat` CLI as `user` with `password` (and extra environment).
fn command(
    net: &TestNet,
    user: &str,
    password: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fastchat"));
    c.arg("--server")
        .arg(&net.auth_addr)
        .arg("--user")
        .arg(user)
        .arg("--data-dir")
        .arg(data_dir(net, user))
        .args(args)
        .env("FASTCHAT_PASSWORD", password)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits for a CLI run; panics unless it succeeded.
fn finish(child: std::process::Child, what: &str) -> Run {
    let out = child.wait_with_output().expect("waiting for fastchat");
    let run = Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(out.status.success(), "fastchat {what}: {}", run.stderr);
    run
}

/// Runs the CLI as `user` with `password` (and extra environment) to the end.
fn cli(net: &TestNet, user: &str, password: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let child = command(net, user, password, args, env)
        .spawn()
        .expect("running fastchat");
    finish(child, &format!("{args:?} as {user}"))
}

fn data_dir(net: &TestNet, user: &str) -> PathBuf {
    net.home.join("clients").join(user)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The secrets in `user`'s store: resumption credentials, conversation and group keys,
/// and the identity's private key.
fn store_secrets(net: &TestNet, user: &str, password: &str) -> Vec<String> {
    let store = Store::open(&data_dir(net, user), user, password).expect("opening the store");
    let data = store.export().unwrap();
    assert!(
        !data.resume.is_empty(),
        "{user} keeps a resumption credential"
    );
    let mut secrets: Vec<String> = data.resume.values().map(|c| c.credential.clone()).collect();
    for conv in data.conversations.values() {
        secrets.extend(conv.keys.values().cloned());
    }
    secrets.push(data.identity_der.clone());
    secrets
}

#[test]
fn no_secret_is_logged_and_secret_files_are_private() {
    let net = TestNet::with(Settings {
        relays: 2,
        ..Settings::default()
    });
    let tag = fastchat_common::hex::encode(&rand::random::<[u8; 6]>());
    let alice_pw = format!("alice-password-{tag}");
    let alice_new_pw = format!("alice-new-password-{tag}");
    let bob_pw = format!("bob-password-{tag}");
    let carol_pw = format!("carol-password-{tag}");
    let direct = format!("direct-plaintext-{tag}");
    let grouped = format!("group-plaintext-{tag}");
    let later = format!("after-passwd-plaintext-{tag}");
    let file_body = format!("file-plaintext-{tag}\n").repeat(100);
    let file_name = format!("file-name-{tag}.txt");
    let src = net.home.join(&file_name);
    std::fs::write(&src, &file_body).unwrap();

    let mut runs = Vec::new();
    // Never in any log or CLI output.
    let mut secrets = vec![
        alice_pw.clone(),
        alice_new_pw.clone(),
        bob_pw.clone(),
        carol_pw.clone(),
    ];
    // Never in a server log (the CLI shows them to their own user, of course).
    let contents = [
        direct.clone(),
        grouped.clone(),
        later.clone(),
        format!("file-plaintext-{tag}"),
        file_name.clone(),
    ];
    let alice = |args: &[&str], pw: &str| cli(&net, "alice", pw, args, &[]);
    let bob = |args: &[&str]| cli(&net, "bob", &bob_pw, args, &[]);

    runs.push(alice(&["register"], &alice_pw));
    runs.push(bob(&["register"]));
    runs.push(cli(&net, "carol", &carol_pw, &["register"], &[]));
    // carol stays on one relay, so that bob, reading while alice writes, lands on the
    // other and alice's messages cross the mesh.
    let carol = Chat::login(
        &Options {
            server: net.auth_addr.clone(),
            data_dir: data_dir(&net, "carol"),
            user: "carol".into(),
            password: carol_pw.clone(),
        },
        true,
    )
    .expect("carol logs in");
    runs.push(alice(&["group", "create", "club"], &alice_pw));
    runs.push(alice(&["group", "add", "club", "bob"], &alice_pw));
    runs.push(bob(&["group", "accept", "club"]));
    let reader = command(&net, "bob", &bob_pw, &["read", "--wait", "15"], &[])
        .spawn()
        .expect("running fastchat");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(0..2).any(|i| net.relay(i).log().contains("bob connected")) {
        assert!(Instant::now() < deadline, "bob's reader connects");
        std::thread::sleep(Duration::from_millis(20));
    }
    runs.push(alice(&["send", "--to", "bob", &direct], &alice_pw));
    runs.push(alice(&["send", "--group", "club", &grouped], &alice_pw));
    runs.push(alice(
        &["send", "--to", "bob", "--file", src.to_str().unwrap()],
        &alice_pw,
    ));
    let read = finish(reader, "read as bob");
    assert!(
        read.stdout.contains(&direct) && read.stdout.contains(&grouped),
        "bob reads both texts: {}",
        read.stdout
    );
    runs.push(read);
    let forwarded: u64 = (0..2)
        .map(|i| net.relay_stats(i)["forwarded"].as_u64().unwrap_or(0))
        .sum();
    assert!(forwarded > 0, "alice's messages crossed the relay mesh");
    let downloads = data_dir(&net, "bob").join("bob/downloads");
    let saved = downloads.join(&file_name);
    assert_eq!(std::fs::read_to_string(&saved).unwrap(), file_body);

    secrets.extend(store_secrets(&net, "alice", &alice_pw));
    secrets.extend(store_secrets(&net, "bob", &bob_pw));
    runs.push(cli(
        &net,
        "alice",
        &alice_pw,
        &["passwd"],
        &[("FASTCHAT_NEW_PASSWORD", &alice_new_pw)],
    ));
    runs.push(alice(&["send", "--to", "bob", &later], &alice_new_pw));
    let read = bob(&["read", "--wait", "1"]);
    assert!(read.stdout.contains(&later), "{}", read.stdout);
    runs.push(read);
    secrets.extend(store_secrets(&net, "alice", &alice_new_pw));
    runs.push(alice(&["logout"], &alice_new_pw));
    runs.push(bob(&["logout"]));
    carol.close();
    secrets.extend(store_secrets(&net, "carol", &carol_pw));

    // Server key material, as the servers and the harness wrote it.
    let secret_file = net.home.join("cluster.secret");
    secrets.push(
        std::fs::read_to_string(&secret_file)
            .unwrap()
            .trim()
            .to_string(),
    );
    let key_dir = net.home.join("keys");
    let key_files: Vec<PathBuf> = std::fs::read_dir(&key_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(key_files.len(), 3, "auth and two relays: {key_files:?}");
    for path in &key_files {
        let text = std::fs::read_to_string(path).unwrap();
        let private = text
            .lines()
            .find_map(|l| l.strip_prefix("private "))
            .expect("a private key line");
        secrets.push(private.to_string());
    }
    for s in secrets.clone() {
        if s.bytes().all(|b| b.is_ascii_hexdigit()) {
            secrets.push(s.to_ascii_uppercase());
        }
    }
    secrets.retain(|s| s.len() >= 8);

    let mut server_logs = vec![("auth".to_string(), net.auth.log())];
    for i in 0..2 {
        server_logs.push((format!("relay-{}", i + 1), net.relay(i).log()));
    }
    assert!(
        server_logs[0].1.contains(" DEBUG "),
        "the servers log at debug level"
    );
    assert!(
        server_logs[0].1.contains("alice"),
        "the auth log names the user"
    );
    for (name, log) in &server_logs {
        for s in secrets.iter().chain(&contents) {
            assert!(!log.contains(s.as_str()), "the {name} log contains {s:?}");
        }
    }
    for (i, run) in runs.iter().enumerate() {
        for s in &secrets {
            assert!(
                !run.stdout.contains(s.as_str()) && !run.stderr.contains(s.as_str()),
                "the output of CLI run {i} contains {s:?}"
            );
        }
    }

    // File modes.
    assert_eq!(mode(&secret_file), 0o600, "cluster secret");
    assert_eq!(mode(&key_dir), 0o700, "server key directory");
    for path in &key_files {
        assert_eq!(mode(path), 0o600, "{}", path.display());
    }
    for user in ["alice", "bob", "carol"] {
        let dir = data_dir(&net, user);
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        assert_eq!(mode(&dir.join(user)), 0o700, "{user}'s store directory");
        assert_eq!(mode(&Store::path_for(&dir, user)), 0o600, "{user}'s store");
        let pins = fastchat_client::pins::pin_file(&dir);
        assert_eq!(mode(&pins), 0o600, "{}", pins.display());
    }
    assert_eq!(mode(&downloads), 0o700, "downloads directory");
    assert_eq!(mode(&saved), 0o600, "a downloaded file");
}
