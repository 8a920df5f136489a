//! `fastchat`: the FastChat client. Without a subcommand it opens the terminal UI
//! (see `fastchat_client::ui`): it logs in first — asking for the user and password
//! when flags and environment do not give them, offering to register an account that
//! does not exist here — then takes over the terminal. Subcommands are for people and
//! scripts: `register`, `send`, `read`, `group`, `verify`, `logout`, `passwd`.

use clap::{Parser, Subcommand};
use fastchat_client::chat::{self, Chat, Event, KeyStatus, Options};
use fastchat_client::error::ClientError;
use fastchat_client::files::{HeldFile, StrangerFiles};
use fastchat_client::text::{clean, one_record};
use fastchat_common::time;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// FastChat: end-to-end encrypted chat in the terminal.
///
/// Without a subcommand, opens the terminal UI (type /help there). The subcommands
/// are for scripts.
#[derive(Parser, Debug)]
#[command(name = "fastchat", version)]
struct Cli {
    /// The auth server.
    #[arg(
        long,
        global = true,
        env = "FASTCHAT_SERVER",
        default_value = "127.0.0.1:7400"
    )]
    server: String,
    /// Your user name.
    #[arg(long, global = true, env = "FASTCHAT_USER")]
    user: Option<String>,
    /// Where your keys, history and pinned server keys live
    /// [default: ~/.local/share/fastchat].
    #[arg(long, global = true, env = "FASTCHAT_DATA")]
    data_dir: Option<PathBuf>,
    /// Read the password from the first line of this file (else FASTCHAT_PASSWORD,
    /// else a prompt).
    #[arg(long, global = true)]
    password_file: Option<PathBuf>,
    /// Terminal UI: do not ring the bell for messages in other conversations.
    /// FASTCHAT_NO_BELL=1 (or true, yes, on) does the same; 0, false, no, off or empty
    /// leave the bell on.
    #[arg(
        long,
        env = "FASTCHAT_NO_BELL",
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    no_bell: bool,
    /// Terminal UI: where received files are saved [default: DATA_DIR/USER/downloads].
    #[arg(long, value_name = "DIR")]
    downloads: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an account: makes your key pair here and registers the public half.
    Register,
    /// Send an end-to-end encrypted message; succeeds once the server has stored it.
    Send {
        /// The recipient.
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        to: Option<String>,
        /// A group you are in (its name, or #ID when several share a name).
        #[arg(long)]
        group: Option<String>,
        /// Send this file instead of a text (end-to-end encrypted, in chunks).
        #[arg(long, value_name = "PATH", conflicts_with = "text")]
        file: Option<PathBuf>,
        /// The message (words are joined with spaces).
        #[arg(required_unless_present = "file", num_args = 1..)]
        text: Vec<String>,
    },
    /// Groups: create them, manage members, list them.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Print the messages waiting for you and acknowledge them.
    Read {
        /// Keep listening for new messages up to this many seconds.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Where received files are saved [default: DATA_DIR/USER/downloads].
        #[arg(long, value_name = "DIR")]
        downloads: Option<PathBuf>,
        /// Download files from strangers (people you never wrote to and share no group
        /// with) whatever their size, and those held earlier. Without it, their files
        /// over 1 MiB are held and listed.
        #[arg(long)]
        accept_files_from_strangers: bool,
    },
    /// Find messages in your local history that hold TEXT (case-insensitive). Works
    /// offline: only the store is read.
    Search {
        /// Only the chat with this user.
        #[arg(long, value_name = "PEER", conflicts_with = "group")]
        with: Option<String>,
        /// Only this group (its name, or #ID).
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// What to look for (words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Forget this machine's saved login: the server revokes its resumption credential.
    Logout,
    /// Change your password (the server revokes every saved login; the local store is
    /// re-encrypted). The new password comes from FASTCHAT_NEW_PASSWORD,
    /// --new-password-file, or a prompt.
    Passwd {
        /// Read the new password from the first line of this file.
        #[arg(long)]
        new_password_file: Option<PathBuf>,
    },
    /// Block USER: the server refuses their messages, files and group additions for
    /// you and stops their group messages. Prints who is blocked now.
    Block {
        #[arg(value_name = "USER")]
        peer: String,
    },
    /// Unblock USER. Prints who is still blocked.
    Unblock {
        #[arg(value_name = "USER")]
        peer: String,
    },
    /// List the users you blocked.
    Blocked,
    /// Show the safety number of your key and PEER's, to compare out of band.
    Verify {
        peer: String,
        /// Trust the key the server serves now, replacing a changed pinned key.
        #[arg(long)]
        accept_new_key: bool,
    },
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Create a group; you are its admin.
    Create { name: String },
    /// Add USER to the group (admins only); they get the group key from you. Someone
    /// you share no group with is invited instead: the group reaches them once they
    /// accept.
    Add {
        name: String,
        #[arg(value_name = "USER")]
        member: String,
    },
    /// Remove USER (admins only); the group key is rotated so they cannot read on.
    Remove {
        name: String,
        #[arg(value_name = "USER")]
        member: String,
    },
    /// Make USER an admin (admins only).
    Promote {
        name: String,
        #[arg(value_name = "USER")]
        member: String,
    },
    /// Leave the group (if you are its last admin, the longest-standing member
    /// becomes admin).
    Leave { name: String },
    /// Accept an invitation to the group (`fastchat group invitations` lists them);
    /// its messages reach you from then on. Invitations from people you wrote to or
    /// share a group with are accepted when they arrive.
    Accept { name: String },
    /// Decline an invitation to the group.
    Decline { name: String },
    /// List the invitations waiting for your answer.
    Invitations,
    /// List the group's members and their roles (marking any the relay lists that
    /// the group's signed roster does not show).
    Members { name: String },
    /// Print the proof kept when the server showed two histories of the group: both
    /// signed statements, as one JSON object per line.
    Evidence { name: String },
    /// List your groups.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.as_ref() {
        Some(command) => run(&cli, command),
        None => terminal_ui(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fastchat: {e}");
            ExitCode::FAILURE
        }
    }
}

fn options(cli: &Cli, confirm_password: bool) -> Result<Options, ClientError> {
    let user = cli
        .user
        .clone()
        .ok_or_else(|| ClientError::Usage("give --user NAME or set FASTCHAT_USER".into()))?;
    let data_dir = data_dir(cli)?;
    let password = password(cli, &user, confirm_password)?;
    Ok(Options {
        server: cli.server.clone(),
        data_dir,
        user,
        password,
    })
}

fn data_dir(cli: &Cli) -> Result<PathBuf, ClientError> {
    Ok(match &cli.data_dir {
        Some(d) => d.clone(),
        None => {
            let home = std::env::var_os("HOME")
                .ok_or_else(|| ClientError::Usage("HOME is not set; give --data-dir DIR".into()))?;
            PathBuf::from(home).join(".local/share/fastchat")
        }
    })
}

/// Reads a line with echo from the terminal (a user name, a yes/no answer).
fn ask(label: &str) -> Result<String, ClientError> {
    let mut err = std::io::stderr();
    let _ = write!(err, "{label}");
    let _ = err.flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|source| ClientError::Io {
            path: PathBuf::from("<stdin>"),
            source,
        })?;
    Ok(line.trim().to_string())
}

/// A login failure as one clear line for a person at the terminal.
fn login_failure(e: ClientError, opts: &Options) -> ClientError {
    use fastchat_client::store::StoreError;
    use fastchat_common::proto::ErrorCode;
    let say = |s: String| ClientError::Usage(s);
    match e {
        ClientError::Store(StoreError::WrongPassword) => say(format!(
            "wrong password for {} (the local store does not open with it)",
            opts.user
        )),
        ClientError::Refused {
            code: ErrorCode::BadCredentials,
            ..
        } => say(format!(
            "wrong password: the server refused the login of {}",
            opts.user
        )),
        ClientError::Unreachable { addr, why } => say(format!(
            "cannot reach the FastChat server at {addr} ({why}); is it running? \
             (choose another with --server or FASTCHAT_SERVER)"
        )),
        other => other,
    }
}

/// How many times the terminal UI asks for a password that does not open the account.
const PASSWORD_TRIES: u32 = 3;

/// The login failed because of the password (locally or at the server).
fn wrong_password(e: &ClientError) -> bool {
    use fastchat_client::store::StoreError;
    use fastchat_common::proto::ErrorCode;
    matches!(
        e,
        ClientError::Store(StoreError::WrongPassword)
            | ClientError::Refused {
                code: ErrorCode::BadCredentials,
                ..
            }
    )
}

/// The password came from the prompt (not a file or the environment), so asking again
/// makes sense.
fn prompted(cli: &Cli) -> bool {
    cli.password_file.is_none()
        && std::env::var_os("FASTCHAT_PASSWORD").is_none()
        && std::io::stdin().is_terminal()
}

/// The terminal UI: log in (or register) with normal prompts, then take the terminal.
fn terminal_ui(cli: &Cli) -> Result<(), ClientError> {
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        return Err(ClientError::Usage(
            "the terminal UI needs a terminal; for scripts use the subcommands \
             (register, send, read, group, verify; see fastchat --help)"
                .into(),
        ));
    }
    let user = match &cli.user {
        Some(u) => u.clone(),
        None => ask("User: ")?,
    };
    if !fastchat_common::proto::valid_user_name(&user) {
        return Err(ClientError::Usage(
            "user names are 1-32 characters of a-z, 0-9, '_', '.' and '-'".into(),
        ));
    }
    let data_dir = data_dir(cli)?;
    let exists = fastchat_client::store::Store::exists(&data_dir, &user);
    if !exists {
        let answer = ask(&format!(
            "No account {user} in {}. Register it? [y/N] ",
            data_dir.display()
        ))?;
        if !matches!(answer.to_ascii_lowercase().as_str(), "y" | "yes") {
            return Err(ClientError::Usage(
                "not registered; give --user with an account you have, or --data-dir where it lives"
                    .into(),
            ));
        }
    }
    let opts = Options {
        server: cli.server.clone(),
        password: password(cli, &user, !exists)?,
        data_dir,
        user,
    };
    if !exists {
        eprintln!("Making your key pair and registering {}…", opts.user);
        chat::register(&opts).map_err(|e| login_failure(e, &opts))?;
    }
    eprintln!("Logging in as {} at {}…", opts.user, opts.server);
    let mut opts = opts;
    let mut tries = 1;
    let mut session = loop {
        match Chat::login(&opts, true) {
            Ok(session) => break session,
            // A mistyped password at the prompt: ask again, like login(1) does.
            Err(e) if wrong_password(&e) && prompted(cli) && tries < PASSWORD_TRIES => {
                eprintln!("{}", login_failure(e, &opts));
                tries += 1;
                opts.password = prompt(&format!("Password for {}: ", opts.user))?;
            }
            Err(e) => return Err(login_failure(e, &opts)),
        }
    };
    if let Some(dir) = &cli.downloads {
        session.set_downloads(dir.clone());
    }
    fastchat_client::ui::run(
        session,
        fastchat_client::ui::Settings { bell: !cli.no_bell },
    )
}

fn password(cli: &Cli, user: &str, confirm: bool) -> Result<String, ClientError> {
    if let Some(path) = &cli.password_file {
        return first_line(path);
    }
    if let Ok(p) = std::env::var("FASTCHAT_PASSWORD") {
        return Ok(p);
    }
    let first = prompt(&format!("Password for {user}: "))?;
    if confirm && std::io::stdin().is_terminal() {
        let again = prompt("Repeat the password: ")?;
        if again != first {
            return Err(ClientError::Usage("the passwords differ".into()));
        }
    }
    Ok(first)
}

/// The first line of a file (a password file).
fn first_line(path: &PathBuf) -> Result<String, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClientError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// Reads a line without echo from a terminal, or plainly from a pipe.
fn prompt(label: &str) -> Result<String, ClientError> {
    let stdin = std::io::stdin();
    let io = |source| ClientError::Io {
        path: PathBuf::from("<stdin>"),
        source,
    };
    if stdin.is_terminal() {
        use termion::input::TermRead;
        let mut err = std::io::stderr();
        let _ = write!(err, "{label}");
        let _ = err.flush();
        let line = stdin.lock().read_passwd(&mut err).map_err(io)?;
        let _ = writeln!(err);
        line.ok_or_else(|| ClientError::Usage("no password given".into()))
    } else {
        let mut line = String::new();
        stdin.lock().read_line(&mut line).map_err(io)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}

/// A held file from a stranger: on stdout in JSON, as a note on stderr otherwise.
fn print_held(f: &HeldFile, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "msg_id": f.msg_id,
                "from": f.from,
                "held_file": {"file_id": f.file_id, "name": f.name, "size": f.size},
                "ts": time::rfc3339(f.ts),
            })
        );
    } else {
        eprintln!(
            "note: {} (someone you never wrote to) sent a file, held: {} ({} bytes); \
             `fastchat read --accept-files-from-strangers` downloads it",
            f.from,
            clean(&f.name, false),
            f.size
        );
    }
}

fn print_blocked(users: &[String]) {
    if users.is_empty() {
        println!("You have blocked no one.");
    } else {
        println!("Blocked: {}", users.join(", "));
    }
}

fn run(cli: &Cli, command: &Command) -> Result<(), ClientError> {
    match command {
        Command::Register => {
            let opts = options(cli, true)?;
            chat::register(&opts)?;
            println!(
                "Registered {}. Your private key is in {} (encrypted with your password).",
                opts.user,
                opts.data_dir.join(&opts.user).display()
            );
            Ok(())
        }
        Command::Send {
            to,
            group,
            file: Some(path),
            ..
        } => {
            let opts = options(cli, false)?;
            let mut chat = Chat::login(&opts, false)?;
            let group_id = match group {
                Some(name) => Some(chat.resolve_group(name)?.group_id),
                None => None,
            };
            let sent = chat.send_file(to.as_deref(), group_id, path, None)?;
            eprintln!(
                "sent {} ({} bytes in {} chunks)",
                path.display(),
                sent.size,
                sent.chunks
            );
            chat.close();
            Ok(())
        }
        Command::Send {
            to, group, text, ..
        } => {
            let opts = options(cli, false)?;
            let mut chat = Chat::login(&opts, false)?;
            match (to, group) {
                (Some(to), _) => {
                    let sent = chat.send_text(to, &text.join(" "))?;
                    eprintln!("sent to {to} (message {})", sent.msg_id);
                }
                (None, Some(name)) => {
                    let g = chat.resolve_group(name)?;
                    let sent = chat.send_group(g.group_id, &text.join(" "))?;
                    eprintln!("sent to {} ({} members)", g.name, g.members);
                    if !sent.full.is_empty() {
                        eprintln!(
                            "warning: not stored for {}: their mailboxes are full (too much \
                             waits for them); they will not get this message",
                            sent.full.join(", ")
                        );
                    }
                }
                (None, None) => {
                    return Err(ClientError::Usage("give --to USER or --group NAME".into()))
                }
            }
            chat.close();
            Ok(())
        }
        Command::Group(command) => {
            let opts = options(cli, false)?;
            let mut chat = Chat::login(&opts, false)?;
            group(&mut chat, command)?;
            chat.close();
            Ok(())
        }
        Command::Read {
            wait,
            json,
            downloads,
            accept_files_from_strangers,
        } => {
            let opts = options(cli, false)?;
            let mut chat = Chat::login(&opts, true)?;
            if let Some(dir) = downloads {
                chat.set_downloads(dir.clone());
            }
            if *accept_files_from_strangers {
                chat.set_stranger_files(StrangerFiles::Accept);
                for held in chat.held_files()? {
                    chat.accept_file(held.file_id)?;
                }
            } else {
                for held in chat.held_files()? {
                    print_held(&held, *json);
                }
            }
            read(&mut chat, *wait, *json)?;
            chat.close();
            Ok(())
        }
        Command::Search {
            with,
            group,
            json,
            text,
        } => {
            let opts = options(cli, false)?;
            search(
                &opts,
                with.as_deref(),
                group.as_deref(),
                *json,
                &text.join(" "),
            )
        }
        Command::Logout => {
            let opts = options(cli, false)?;
            if chat::logout(&opts)? {
                println!("Logged out: the saved login of {} is revoked.", opts.user);
            } else {
                println!("{} has no saved login here.", opts.user);
            }
            Ok(())
        }
        Command::Passwd { new_password_file } => {
            let opts = options(cli, false)?;
            let new = match (new_password_file, std::env::var("FASTCHAT_NEW_PASSWORD")) {
                (Some(path), _) => first_line(path)?,
                (None, Ok(p)) => p,
                (None, Err(_)) => {
                    let first = prompt("New password: ")?;
                    if std::io::stdin().is_terminal()
                        && prompt("Repeat the new password: ")? != first
                    {
                        return Err(ClientError::Usage("the passwords differ".into()));
                    }
                    first
                }
            };
            chat::change_password(&opts, &new)?;
            println!("Password changed; saved logins elsewhere are revoked.");
            Ok(())
        }
        Command::Block { peer } | Command::Unblock { peer } => {
            let opts = options(cli, false)?;
            let mut chat = Chat::login(&opts, false)?;
            let (now, verb) = match command {
                Command::Block { .. } => (chat.block(peer)?, "Blocked"),
                _ => (chat.unblock(peer)?, "Unblocked"),
            };
            println!("{verb} {peer}.");
            print_blocked(&now);
            Ok(())
        }
        Command::Blocked => {
            let opts = options(cli, false)?;
            let now = Chat::login(&opts, false)?.blocked()?;
            print_blocked(&now);
            Ok(())
        }
        Command::Verify {
            peer,
            accept_new_key,
        } => {
            let opts = options(cli, false)?;
            let mut chat = Chat::login(&opts, false)?;
            match chat.check_peer_key(peer)? {
                KeyStatus::Changed { server_pem } if *accept_new_key => {
                    chat.accept_new_key(peer, server_pem)?;
                    println!("Now trusting the new key of {peer}.");
                }
                KeyStatus::Changed { .. } => {
                    eprintln!(
                        "WARNING: the server serves a DIFFERENT key for {peer} than the one \
                         you pinned. The safety number below is for the PINNED key."
                    );
                }
                KeyStatus::NewlyPinned => println!("Pinned the key of {peer} (first contact)."),
                KeyStatus::Unchanged => {}
            }
            let number = chat.safety_number(peer)?;
            println!("Safety number for {} and {peer}:", chat.user());
            for row in number.split(' ').collect::<Vec<_>>().chunks(4) {
                println!("  {}", row.join(" "));
            }
            println!("It is the same on both sides; compare it with {peer} in person or by call.");
            chat.close();
            Ok(())
        }
    }
}

/// `fastchat search`: matches from the local store, oldest first.
fn search(
    opts: &Options,
    with: Option<&str>,
    group: Option<&str>,
    json: bool,
    text: &str,
) -> Result<(), ClientError> {
    let store = chat::open_local_store(opts)?;
    let conv = match (with, group) {
        (Some(peer), _) => Some(peer.to_string()),
        (None, Some(name)) => Some(local_group(&store, name)?),
        (None, None) => None,
    };
    let found = store.search(conv.as_deref(), text)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (_, h) in &found {
        let ts = time::rfc3339(h.ts);
        let line = if json {
            serde_json::json!({
                "msg_id": h.msg_id,
                "chat": h.peer,
                "group": h.group,
                "from": h.from,
                "text": h.text,
                "ts": ts,
                "outgoing": h.outgoing,
            })
            .to_string()
        } else {
            let place = h
                .group
                .as_deref()
                .map_or(h.peer.clone(), |g| format!("#{g}"));
            format!(
                "[{} {}] {place} {}: {}",
                &ts[..10],
                &ts[11..19],
                h.from,
                h.text
            )
        };
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
    if found.is_empty() {
        eprintln!("no message holds {text:?}");
    }
    Ok(())
}

/// A group of the local store by name or `#ID`, as its conversation (`#<id>`).
fn local_group(store: &fastchat_client::store::Store, name: &str) -> Result<String, ClientError> {
    let groups = store.groups()?;
    if let Some(id) = name.strip_prefix('#').and_then(|n| n.parse::<i64>().ok()) {
        if groups.contains_key(&id) {
            return Ok(format!("#{id}"));
        }
    }
    let ids: Vec<i64> = groups
        .iter()
        .filter(|(_, g)| g.name == name)
        .map(|(id, _)| *id)
        .collect();
    match ids[..] {
        [id] => Ok(format!("#{id}")),
        [] => Err(ClientError::Usage(format!(
            "no group called {name:?} in your history (see `fastchat group list`)"
        ))),
        _ => Err(ClientError::Usage(format!(
            "several groups are called {name:?}; name one by #ID: {}",
            ids.iter()
                .map(|id| format!("#{id}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn read(chat: &mut Chat, wait: Option<u64>, json: bool) -> Result<(), ClientError> {
    let start = Instant::now();
    let until = start + Duration::from_secs(wait.unwrap_or(0));
    // The backlog is always read to the end (bounded), then we listen until `until`.
    let backlog_deadline = start + Duration::from_secs(30);
    let mut synced = false;
    let stdout = std::io::stdout();
    loop {
        // Files still downloading keep `read` going (up to an hour).
        let downloading = chat.downloads_in_progress() > 0;
        let deadline = if downloading {
            (start + Duration::from_secs(3600)).max(until)
        } else if synced {
            until
        } else {
            backlog_deadline.max(until)
        };
        if Instant::now() >= deadline {
            break;
        }
        for event in chat.receive(deadline)? {
            let mut out = stdout.lock();
            match event {
                Event::Synced => synced = true,
                Event::Message(m) => {
                    let line = if json {
                        serde_json::json!({
                            "msg_id": m.msg_id,
                            "from": m.from,
                            "group": m.group,
                            "text": m.text,
                            "ts": time::rfc3339(m.ts),
                            "server_ts": time::rfc3339(m.server_ts),
                        })
                        .to_string()
                    } else {
                        let ts = time::rfc3339(m.ts);
                        // The sender's time; the relay's too when they are far apart.
                        let server = if m.ts.abs_diff(m.server_ts) > chat::CLOCK_SKEW_SHOWN_MS {
                            let s = time::rfc3339(m.server_ts);
                            format!(" (server {} {})", &s[..10], &s[11..19])
                        } else {
                            String::new()
                        };
                        let when = format!("[{} {}]{server}", &ts[..10], &ts[11..19]);
                        let text = one_record(&m.text);
                        match &m.group {
                            Some(g) => format!("{when} {} @ {}: {text}", m.from, clean(g, false)),
                            None => format!("{when} {}: {text}", m.from),
                        }
                    };
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
                Event::Group(n) => {
                    let line = if json {
                        serde_json::json!({
                            "msg_id": n.msg_id,
                            "from": n.event.by,
                            "group": n.group,
                            "event": n.event.event,
                            "user": n.event.user,
                            "by": n.event.by,
                            "waiting": n.waiting,
                            "ts": time::rfc3339(n.ts),
                        })
                        .to_string()
                    } else {
                        let ts = time::rfc3339(n.ts);
                        format!(
                            "[{} {}] * {}",
                            &ts[..10],
                            &ts[11..19],
                            clean(
                                &fastchat_client::groups::describe(&n.event, &n.group),
                                false
                            )
                        )
                    };
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                    // Still waiting (not accepted on arrival, as from people this
                    // user knows): say how to answer.
                    if n.waiting && !json {
                        eprintln!(
                            "fastchat: {} invited you to {} (#{}): `fastchat group accept '#{}'` \
                             or `fastchat group decline '#{}'`",
                            n.event.by,
                            clean(&n.group, false),
                            n.group_id,
                            n.group_id,
                            n.group_id
                        );
                    }
                }
                Event::FileHeld(f) => print_held(&f, json),
                Event::File(f) => {
                    let line = if json {
                        serde_json::json!({
                            "msg_id": f.msg_id,
                            "from": f.from,
                            "group": f.group,
                            "file": {
                                "name": f.name,
                                "size": f.size,
                                "path": f.path,
                                "sha256": f.sha256,
                            },
                            "ts": time::rfc3339(f.ts),
                        })
                        .to_string()
                    } else {
                        let ts = time::rfc3339(f.ts);
                        format!(
                            "[{} {}] {} sent a file: {} ({} bytes), saved as {}",
                            &ts[..10],
                            &ts[11..19],
                            f.from,
                            clean(&f.name, false),
                            f.size,
                            clean(&f.path.display().to_string(), false)
                        )
                    };
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
                // Receipts and resends are for the terminal UI's delivery marks, not
                // for `read`.
                Event::Delivered { .. } | Event::Stored { .. } => {}
                Event::Recovering { msg_id, from, .. } => {
                    eprintln!(
                        "note: message {msg_id} from {from} is being recovered (its key was \
                         asked for); it is shown when it arrives"
                    );
                }
                Event::Undecryptable {
                    msg_id,
                    from,
                    why,
                    key_changed,
                    ..
                } => {
                    eprintln!("warning: message {msg_id} from {from} could not be opened: {why}");
                    if key_changed {
                        eprintln!(
                            "warning: the server now serves a DIFFERENT key for {from} than the \
                             one pinned; compare safety numbers: fastchat verify {from}"
                        );
                    }
                }
            }
        }
        if synced && Instant::now() >= until && chat.downloads_in_progress() == 0 {
            break;
        }
    }
    Ok(())
}

/// The group named, which must be an invitation waiting for this user.
fn invitation(
    chat: &mut Chat,
    name: &str,
) -> Result<fastchat_common::proto::GroupSummary, ClientError> {
    let g = chat.resolve_group(name)?;
    if g.role != "invited" {
        return Err(ClientError::Usage(format!(
            "no invitation waits for you to {} (#{}): you are {}",
            g.name, g.group_id, g.role
        )));
    }
    Ok(g)
}

fn group(chat: &mut Chat, command: &GroupCommand) -> Result<(), ClientError> {
    let show = |g: &fastchat_common::proto::GroupSummary| {
        println!(
            "{} (#{}): {} members, you are {}",
            g.name, g.group_id, g.members, g.role
        )
    };
    match command {
        GroupCommand::Create { name } => {
            let g = chat.group_create(name)?;
            show(&g);
        }
        GroupCommand::Add { name, member } => {
            let g = chat.resolve_group(name)?;
            let added = chat.group_add(g.group_id, member)?;
            if added.invited {
                println!(
                    "invited {member} (you share no group): {} is theirs once they accept",
                    added.group.name
                );
            } else {
                println!("added {member}");
            }
            show(&added.group);
        }
        GroupCommand::Remove { name, member } => {
            let g = chat.resolve_group(name)?;
            let g = chat.group_remove(g.group_id, member)?;
            println!("removed {member}; the group key is rotated");
            show(&g);
        }
        GroupCommand::Promote { name, member } => {
            let g = chat.resolve_group(name)?;
            let g = chat.group_promote(g.group_id, member)?;
            println!("{member} is an admin");
            show(&g);
        }
        GroupCommand::Leave { name } => {
            let g = chat.resolve_group(name)?;
            chat.group_leave(g.group_id)?;
            println!("you left {}", g.name);
        }
        GroupCommand::Accept { name } => {
            let g = invitation(chat, name)?;
            let g = chat.group_accept(g.group_id)?;
            println!("you joined {}", g.name);
            show(&g);
        }
        GroupCommand::Decline { name } => {
            let g = invitation(chat, name)?;
            chat.group_decline(g.group_id)?;
            println!("you declined the invitation to {}", g.name);
        }
        GroupCommand::Invitations => {
            for g in chat.invitations()? {
                println!("{} (#{}): {} members", g.name, g.group_id, g.members);
            }
        }
        GroupCommand::Members { name } => {
            let g = chat.resolve_group(name)?;
            let (g, members) = chat.group_members(g.group_id)?;
            show(&g);
            let roster = match chat.roster(g.group_id) {
                Ok(r) => r,
                Err(ClientError::Protocol(why)) => {
                    eprintln!("{why}");
                    None
                }
                Err(e) => return Err(e),
            };
            for m in members {
                let role = match m.role.as_str() {
                    "admin" => " (admin)",
                    "invited" => " (invited, not yet accepted)",
                    _ => "",
                };
                let unsigned = if roster.as_ref().is_some_and(|r| r.is_member(&m.user)) {
                    ""
                } else {
                    " (NOT in the signed roster: gets no key)"
                };
                println!("  {}{role}{unsigned}", m.user);
            }
        }
        GroupCommand::Evidence { name } => {
            // By #ID without asking the relay (the group may be gone from there).
            let group_id = match name.strip_prefix('#').and_then(|n| n.parse::<i64>().ok()) {
                Some(id) => id,
                None => chat.resolve_group(name)?.group_id,
            };
            let forks = chat.store().roster_forks(group_id)?;
            if forks.is_empty() {
                eprintln!("no evidence kept for group #{group_id}");
            }
            for f in forks {
                let statement = |json: &str| {
                    serde_json::from_str::<serde_json::Value>(json).unwrap_or(json.into())
                };
                println!(
                    "{}",
                    serde_json::json!({
                        "group_id": f.group_id,
                        "seq": f.seq,
                        "ours": statement(&f.ours),
                        "theirs": statement(&f.theirs),
                        "seen_ms": f.seen_ms,
                    })
                );
            }
        }
        GroupCommand::List => {
            for g in chat.groups()? {
                show(&g);
            }
        }
    }
    Ok(())
}
