//! The terminal UI end to end: two real `fastchat` UIs in tmux against real servers.
//! Keys go in with `tmux send-keys`; the screens are read with `tmux capture-pane`.
//! Needs tmux (scripts/test.sh installs it).

mod harness;

use harness::{TestNet, PASSWORD};
use std::process::Command;
use std::time::{Duration, Instant};

/// A private tmux server (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start() -> Tmux {
        let found = Command::new("tmux").arg("-V").output();
        assert!(
            found.is_ok_and(|o| o.status.success()),
            "tmux is not installed: run scripts/test.sh (it installs it) or apt-get install tmux"
        );
        // One server per test: tests of this file run at once in one process.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Tmux {
            socket: format!("fastchat-tui-{}-{n}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `fastchat` for `user` in a detached session of `cols` × `rows`.
    fn open_ui(&self, net: &TestNet, user: &str, cols: u16, rows: u16) {
        let opts = net.opts(user);
        let command = format!(
            "env FASTCHAT_PASSWORD={} TERM=xterm-256color {} --server {} --user {user} --data-dir {}; sleep 600",
            quote(PASSWORD),
            quote(env!("CARGO_BIN_EXE_fastchat")),
            quote(&opts.server),
            quote(&opts.data_dir.display().to_string()),
        );
        self.run(&[
            "new-session",
            "-d",
            "-s",
            user,
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            &command,
        ]);
    }

    fn screen(&self, session: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", session])
    }

    /// Polls the screen until `found` holds; panics with the screen after `timeout`.
    fn wait_for(&self, session: &str, what: &str, found: impl Fn(&str) -> bool) -> String {
        let timeout = Duration::from_secs(60);
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen(session);
            if found(&screen) {
                return screen;
            }
            if Instant::now() > deadline {
                panic!("{session}'s screen never showed {what} within {timeout:?}:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, session: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", session];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Types `text` literally, then Enter.
    fn type_line(&self, session: &str, text: &str) {
        self.run(&["send-keys", "-t", session, "-l", text]);
        self.keys(session, &["Enter"]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

/// Single-quotes for the shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether the layout is whole: one line per row, a title bar naming the open chat on
/// top, the status line above the input line at the bottom, and the list's border on
/// every body row. `Err` says what is wrong.
fn layout(screen: &str, rows: usize, me: &str, open: &str) -> Result<(), String> {
    let lines: Vec<&str> = screen.lines().collect();
    if lines.len() != rows {
        return Err(format!("{} lines, not {rows}", lines.len()));
    }
    // capture-pane drops trailing spaces.
    if !lines[rows - 1].starts_with(&format!("[{open}]")) {
        return Err("no input line at the bottom".into());
    }
    if !lines[rows - 2].starts_with(&format!(" {me} @ 127.0.0.1:")) {
        return Err("no status line above the input line".into());
    }
    if !lines[0].contains(open) {
        return Err("no title bar on top".into());
    }
    if !lines[1..rows - 2].iter().all(|l| l.contains('│')) {
        return Err("the list border is broken".into());
    }
    Ok(())
}

fn assert_layout(screen: &str, rows: usize, me: &str, open: &str) {
    if let Err(e) = layout(screen, rows, me, open) {
        panic!("{e}:\n{screen}");
    }
}

#[test]
fn two_uis_chat_see_delivery_and_survive_a_resize() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let tmux = Tmux::start();
    tmux.open_ui(&net, "alice", 100, 30);
    tmux.open_ui(&net, "bob", 100, 30);
    for user in ["alice", "bob"] {
        tmux.wait_for(user, "the status line", |s| {
            s.contains(&format!(" {user} @ 127.0.0.1:")) && s.contains("connected")
        });
    }

    tmux.type_line("alice", "/msg bob");
    tmux.wait_for("alice", "the chat with bob", |s| {
        s.contains("bob: end-to-end encrypted")
    });
    tmux.type_line("alice", "hello bob, 日本語 😀");

    // bob: the new chat appears with an unread count; Alt-1 opens it.
    tmux.wait_for("bob", "an unread chat from alice", |s| {
        s.lines()
            .any(|l| l.starts_with("1 alice") && l.contains("(1)"))
    });
    tmux.keys("bob", &["M-1"]);
    let bob = tmux.wait_for("bob", "alice's message", |s| {
        s.contains("alice: hello bob, 日本語 😀")
    });
    assert_layout(&bob, 30, "bob", "alice");

    // alice: bob's device stored it, so it shows delivered (two ticks).
    let alice = tmux.wait_for("alice", "the delivered mark", |s| {
        s.contains("✓✓ alice: hello bob, 日本語 😀")
    });
    assert_layout(&alice, 30, "alice", "bob");

    // A reply goes the other way; alice's chat is open, so no unread count.
    tmux.type_line("bob", "hi alice");
    tmux.wait_for("alice", "bob's reply", |s| s.contains("bob: hi alice"));
    tmux.wait_for("bob", "the delivered reply", |s| {
        s.contains("✓✓ bob: hi alice")
    });

    // Resizing redraws the whole layout at the new size.
    tmux.run(&["resize-window", "-t", "alice", "-x", "60", "-y", "16"]);
    // (tmux shows its own reflow of the old screen until the UI redraws.)
    let alice = tmux.wait_for("alice", "the layout at 60x16", |s| {
        layout(s, 16, "alice", "bob").is_ok() && s.contains("bob: hi alice")
    });
    assert_layout(&alice, 16, "alice", "bob");
    assert!(alice.contains("bob: hi alice"), "{alice}");
    tmux.run(&["resize-window", "-t", "alice", "-x", "120", "-y", "40"]);
    let alice = tmux.wait_for("alice", "the layout at 120x40", |s| {
        layout(s, 40, "alice", "bob").is_ok() && s.contains("✓✓ alice: hello bob, 日本語 😀")
    });
    assert_layout(&alice, 40, "alice", "bob");

    // /quit leaves the UI cleanly: the shell's `sleep` is what remains.
    tmux.type_line("alice", "/quit");
    tmux.wait_for("alice", "the UI gone", |s| !s.contains("connected"));
}

#[test]
fn the_ui_shows_what_another_process_of_the_user_sent_and_searches_history() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let tmux = Tmux::start();
    tmux.open_ui(&net, "alice", 100, 30);
    tmux.wait_for("alice", "the status line", |s| {
        s.contains(" alice @ 127.0.0.1:") && s.contains("connected")
    });
    // A script (another process, the same store) sends while the UI is open.
    let (ok, _, err) = net.cli("alice", &["send", "--to", "bob", "sent by a cron job"]);
    assert!(ok, "{err}");
    tmux.wait_for("alice", "the chat the script wrote to", |s| {
        s.lines().any(|l| l.starts_with("1 bob"))
    });
    tmux.keys("alice", &["M-1"]);
    tmux.wait_for("alice", "the script's message in the chat", |s| {
        s.contains("alice: sent by a cron job")
    });
    // Search finds it in the local history.
    tmux.type_line("alice", "/search CRON");
    tmux.wait_for("alice", "the search result", |s| {
        s.contains("1 message(s) hold") && s.contains("<alice> sent by a cron job")
    });
}

/// `FASTCHAT_NO_BELL` takes the usual spellings (1/0, true/false, yes/no, on/off, empty)
/// and never breaks an invocation: a strict bool parser once refused `1` for every
/// command.
#[test]
fn the_no_bell_variable_accepts_the_usual_spellings() {
    let bin = env!("CARGO_BIN_EXE_fastchat");
    for value in ["1", "0", "true", "false", "yes", "no", "on", "off", ""] {
        let help = Command::new(bin)
            .arg("--help")
            .env("FASTCHAT_NO_BELL", value)
            .output()
            .expect("running fastchat");
        assert!(
            help.status.success(),
            "FASTCHAT_NO_BELL={value:?} --help: {}",
            String::from_utf8_lossy(&help.stderr)
        );
        // A subcommand gets past argument parsing to its own (usage) error.
        let verify = Command::new(bin)
            .args(["verify", "bob"])
            .env("FASTCHAT_NO_BELL", value)
            .env_remove("FASTCHAT_USER")
            .output()
            .expect("running fastchat");
        let err = String::from_utf8_lossy(&verify.stderr);
        assert!(
            err.contains("give --user NAME"),
            "FASTCHAT_NO_BELL={value:?} verify: {err}"
        );
    }
}

#[test]
fn the_ui_asks_about_a_strangers_file_and_blocks_from_the_chat() {
    let net = TestNet::start();
    net.register("bob");
    net.register("mallory");
    let src = net.home.join("note.txt");
    std::fs::write(&src, b"a small file").unwrap();
    let (ok, _, err) = net.cli(
        "mallory",
        &["send", "--to", "bob", "--file", src.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let tmux = Tmux::start();
    tmux.open_ui(&net, "bob", 120, 30);
    tmux.wait_for("bob", "the status line", |s| {
        s.contains(" bob @ 127.0.0.1:") && s.contains("connected")
    });
    let saved = net.opts("bob").data_dir.join("bob/downloads/note.txt");
    tmux.wait_for("bob", "mallory's chat", |s| {
        s.lines().any(|l| l.starts_with("1 mallory"))
    });
    tmux.keys("bob", &["M-1"]);
    let screen = tmux.wait_for("bob", "the held file's notice", |s| {
        s.contains("held because you never wrote to them") && s.contains("/accept-file")
    });
    assert!(!saved.exists(), "downloaded without asking:\n{screen}");
    let id: String = screen
        .split("/accept-file ")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    tmux.type_line("bob", &format!("/accept-file {id}"));
    tmux.wait_for("bob", "the saved file", |s| s.contains("saved to"));
    assert_eq!(std::fs::read(&saved).unwrap(), b"a small file");

    // A stranger's group addition is an invitation, shown in its window with how to
    // answer; nothing of the group arrives until bob accepts there.
    let cli_ok = |user: &str, args: &[&str]| {
        let (ok, out, err) = net.cli(user, args);
        assert!(ok, "fastchat {args:?}: {err}");
        out
    };
    cli_ok("mallory", &["group", "create", "offers"]);
    let out = cli_ok("mallory", &["group", "add", "offers", "bob"]);
    assert!(out.contains("invited bob"), "{out}");
    cli_ok(
        "mallory",
        &["send", "--group", "offers", "before you joined"],
    );
    tmux.wait_for("bob", "the group's window", |s| {
        s.lines().any(|l| l.starts_with("2 #offers"))
    });
    tmux.keys("bob", &["M-2"]);
    tmux.wait_for("bob", "the invitation", |s| {
        s.contains("mallory invited bob to offers") && s.contains("/group decline")
    });
    tmux.type_line("bob", "/group accept");
    tmux.wait_for("bob", "the acceptance", |s| s.contains("you joined offers"));
    cli_ok(
        "mallory",
        &["send", "--group", "offers", "after you joined"],
    );
    let screen = tmux.wait_for("bob", "the group's message", |s| {
        s.contains("after you joined")
    });
    assert!(!screen.contains("before you joined"), "{screen}");

    // /block in mallory's chat blocks mallory.
    tmux.type_line("bob", "/msg mallory");
    tmux.type_line("bob", "/block");
    tmux.wait_for("bob", "the block", |s| s.contains("blocked: mallory"));
    let (ok, _, err) = net.cli("mallory", &["send", "--to", "bob", "hello?"]);
    assert!(
        !ok && err.contains("does not accept messages from you"),
        "{err}"
    );
}
