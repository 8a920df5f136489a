//! Slash commands typed on the input line, parsed into [`Command`]s with errors that say
//! how to use them. A line that does not start with `/` is a message; `//` sends a
//! line that starts with a slash.

/// What a line of input asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A message for the open conversation.
    Say(String),
    /// `/msg USER [TEXT]`: open (or start) a chat, and send TEXT if given.
    Msg { user: String, text: Option<String> },
    /// `/file PATH`: send a file to the open conversation.
    File { path: String },
    /// `/group …`.
    Group(GroupCommand),
    /// `/verify USER [yes]`: show the safety number; `yes` marks the key verified.
    Verify { user: String, confirm: bool },
    /// `/accept-key USER`: trust the new key the server serves for USER.
    AcceptKey { user: String },
    /// `/block [USER]` (`None`: the open chat's peer) and `/unblock USER`.
    Block { user: Option<String>, block: bool },
    /// `/blocked`: list who is blocked.
    Blocked,
    /// `/accept-file ID` (`accept`) or `/reject-file ID`: a file a stranger sent.
    HeldFile { file_id: i64, accept: bool },
    /// `/retry`: send again my messages that failed (still pending).
    Retry,
    /// `/paste`: send the text last refused as too long for a message, as a file.
    Paste,
    /// `/search TEXT`: find TEXT in the local history (the open conversation's, or all
    /// from the status window).
    Search { text: String },
    /// `/help`.
    Help,
    /// `/quit`.
    Quit,
}

/// `/group` subcommands. `group` is a group's name or `#ID`; `None` means the open
/// conversation's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupCommand {
    Create {
        name: String,
    },
    Add {
        group: Option<String>,
        user: String,
    },
    Remove {
        group: Option<String>,
        user: String,
    },
    Promote {
        group: Option<String>,
        user: String,
    },
    Leave {
        group: Option<String>,
    },
    /// Answer an invitation: accept (`true`) or decline.
    Answer {
        group: Option<String>,
        accept: bool,
    },
    Members {
        group: Option<String>,
    },
    List,
}

/// The help text, one command per line.
pub const HELP: &[&str] = &[
    "/msg USER [TEXT]         open a chat with USER (and send TEXT)",
    "/file PATH               send a file to the open chat",
    "/group create NAME       create a group (you are its admin)",
    "/group add [GROUP] USER  add USER (admins); GROUP defaults to the open one",
    "/group remove [GROUP] USER / promote [GROUP] USER",
    "/group leave [GROUP] / members [GROUP] / list",
    "/group accept [GROUP] / decline [GROUP]  answer an invitation (list shows them)",
    "/verify USER [yes]       show the safety number; `yes` marks the key verified",
    "/accept-key USER         trust USER's new key after a key-change warning",
    "/block [USER]            refuse USER's messages, files and group additions (default: this chat)",
    "/unblock USER  /blocked  undo a block; list who is blocked",
    "/accept-file ID / reject-file ID  download or refuse a file a stranger sent",
    "/retry                   send again messages that failed (✗); also done on reconnect and login",
    "/paste                   send the text just refused as too long, as a file",
    "/search TEXT             find TEXT in the history (of the open chat; everywhere from status)",
    "/help   /quit",
    "Keys: Tab/Shift-Tab or Ctrl-N/Ctrl-P switch chats, Alt-1..9 jump, PgUp/PgDn scroll,",
    "Up/Down recall sent lines, Ctrl-W/Ctrl-U delete a word/to the start, Ctrl-L redraws,",
    "Ctrl-C quits (after a send in flight has finished).",
];

/// Parses one input line. Errors are one sentence for the user.
pub fn parse(line: &str) -> Result<Command, String> {
    if let Some(rest) = line.strip_prefix("//") {
        return Ok(Command::Say(format!("/{rest}")));
    }
    let Some(rest) = line.strip_prefix('/') else {
        return Ok(Command::Say(line.to_string()));
    };
    let (name, args) = match rest.split_once(' ') {
        Some((name, args)) => (name, args.trim()),
        None => (rest, ""),
    };
    let words: Vec<&str> = args.split_whitespace().collect();
    match name {
        "msg" | "query" => match args.split_once(' ') {
            _ if words.is_empty() => Err("usage: /msg USER [TEXT]".into()),
            Some((user, text)) if !text.trim().is_empty() => Ok(Command::Msg {
                user: user.to_string(),
                text: Some(text.trim_start().to_string()),
            }),
            _ => Ok(Command::Msg {
                user: words[0].to_string(),
                text: None,
            }),
        },
        "file" if !args.is_empty() => Ok(Command::File {
            path: args.to_string(),
        }),
        "file" => Err("usage: /file PATH".into()),
        "group" => parse_group(&words).map(Command::Group),
        "verify" => match words[..] {
            [user] => Ok(Command::Verify {
                user: user.into(),
                confirm: false,
            }),
            [user, "yes"] => Ok(Command::Verify {
                user: user.into(),
                confirm: true,
            }),
            _ => Err("usage: /verify USER, then /verify USER yes once the numbers match".into()),
        },
        "accept-key" => match words[..] {
            [user] => Ok(Command::AcceptKey { user: user.into() }),
            _ => Err("usage: /accept-key USER".into()),
        },
        "block" => match words[..] {
            [] => Ok(Command::Block {
                user: None,
                block: true,
            }),
            [user] => Ok(Command::Block {
                user: Some(user.into()),
                block: true,
            }),
            _ => Err("usage: /block [USER] (default: the open chat's peer)".into()),
        },
        "unblock" => match words[..] {
            [user] => Ok(Command::Block {
                user: Some(user.into()),
                block: false,
            }),
            _ => Err("usage: /unblock USER".into()),
        },
        "accept-file" | "reject-file" => match words[..] {
            [id] => match id.trim_start_matches('#').parse::<i64>() {
                Ok(file_id) if file_id > 0 => Ok(Command::HeldFile {
                    file_id,
                    accept: name == "accept-file",
                }),
                _ => Err(format!(
                    "{id:?} is not a file id (the number shown with the file)"
                )),
            },
            _ => Err(format!(
                "usage: /{name} ID (the number shown with the file)"
            )),
        },
        "blocked" if words.is_empty() => Ok(Command::Blocked),
        "blocked" => Err("usage: /blocked".into()),
        "paste" if words.is_empty() => Ok(Command::Paste),
        "paste" => Err("usage: /paste (after a text too long for a message)".into()),
        "retry" if words.is_empty() => Ok(Command::Retry),
        "retry" => Err("usage: /retry".into()),
        "search" if !words.is_empty() => Ok(Command::Search {
            text: args.trim().to_string(),
        }),
        "search" => Err("usage: /search TEXT".into()),
        "help" | "h" | "?" => Ok(Command::Help),
        "quit" | "exit" | "q" => Ok(Command::Quit),
        other => Err(format!(
            "unknown command /{other}; /help lists the commands (// sends a line starting with /)"
        )),
    }
}

fn parse_group(words: &[&str]) -> Result<GroupCommand, String> {
    let one_user = |rest: &[&str], usage: &str| -> Result<(Option<String>, String), String> {
        match rest {
            [user] => Ok((None, user.to_string())),
            [group, user] => Ok((Some(group.to_string()), user.to_string())),
            _ => Err(format!("usage: /group {usage} [GROUP] USER")),
        }
    };
    let group_only = |rest: &[&str], usage: &str| -> Result<Option<String>, String> {
        match rest {
            [] => Ok(None),
            [group] => Ok(Some(group.to_string())),
            _ => Err(format!("usage: /group {usage} [GROUP]")),
        }
    };
    match words {
        ["create", name] => Ok(GroupCommand::Create {
            name: name.to_string(),
        }),
        ["create", ..] => Err("usage: /group create NAME".into()),
        ["add", rest @ ..] => {
            one_user(rest, "add").map(|(group, user)| GroupCommand::Add { group, user })
        }
        ["remove", rest @ ..] => {
            one_user(rest, "remove").map(|(group, user)| GroupCommand::Remove { group, user })
        }
        ["promote", rest @ ..] => {
            one_user(rest, "promote").map(|(group, user)| GroupCommand::Promote { group, user })
        }
        ["leave", rest @ ..] => {
            group_only(rest, "leave").map(|group| GroupCommand::Leave { group })
        }
        ["accept", rest @ ..] => group_only(rest, "accept").map(|group| GroupCommand::Answer {
            group,
            accept: true,
        }),
        ["decline", rest @ ..] => group_only(rest, "decline").map(|group| GroupCommand::Answer {
            group,
            accept: false,
        }),
        ["members", rest @ ..] => {
            group_only(rest, "members").map(|group| GroupCommand::Members { group })
        }
        ["list"] => Ok(GroupCommand::List),
        _ => Err(
            "usage: /group create|add|remove|promote|leave|accept|decline|members|list …".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_defaults_to_the_open_chat() {
        assert_eq!(
            parse("/block"),
            Ok(Command::Block {
                user: None,
                block: true
            })
        );
        assert_eq!(
            parse("/unblock eve"),
            Ok(Command::Block {
                user: Some("eve".into()),
                block: false
            })
        );
        assert!(parse("/unblock").unwrap_err().contains("usage"));
        assert_eq!(parse("/blocked"), Ok(Command::Blocked));
        assert_eq!(
            parse("/accept-file 21"),
            Ok(Command::HeldFile {
                file_id: 21,
                accept: true
            })
        );
        assert!(parse("/reject-file x")
            .unwrap_err()
            .contains("not a file id"));
        assert!(parse("/reject-file").unwrap_err().contains("usage"));
    }

    #[test]
    fn paste_takes_no_arguments() {
        assert_eq!(parse("/paste"), Ok(Command::Paste));
        assert!(parse("/paste now").is_err());
    }

    #[test]
    fn plain_lines_are_messages() {
        assert_eq!(parse("hi there"), Ok(Command::Say("hi there".into())));
        assert_eq!(parse("//etc"), Ok(Command::Say("/etc".into())));
    }

    #[test]
    fn msg_with_and_without_text() {
        assert_eq!(
            parse("/msg bob"),
            Ok(Command::Msg {
                user: "bob".into(),
                text: None
            })
        );
        assert_eq!(
            parse("/msg bob hello  there"),
            Ok(Command::Msg {
                user: "bob".into(),
                text: Some("hello  there".into())
            })
        );
        assert!(parse("/msg").unwrap_err().contains("usage"));
    }

    #[test]
    fn group_commands_default_to_the_open_group() {
        assert_eq!(
            parse("/group add carol"),
            Ok(Command::Group(GroupCommand::Add {
                group: None,
                user: "carol".into()
            }))
        );
        assert_eq!(
            parse("/group remove crew carol"),
            Ok(Command::Group(GroupCommand::Remove {
                group: Some("crew".into()),
                user: "carol".into()
            }))
        );
        assert_eq!(
            parse("/group members"),
            Ok(Command::Group(GroupCommand::Members { group: None }))
        );
        assert!(parse("/group").unwrap_err().contains("create|add"));
        assert!(parse("/group create").unwrap_err().contains("NAME"));
    }

    #[test]
    fn verify_file_and_unknown() {
        assert_eq!(
            parse("/verify bob yes"),
            Ok(Command::Verify {
                user: "bob".into(),
                confirm: true
            })
        );
        assert_eq!(
            parse("/file /tmp/a b.txt"),
            Ok(Command::File {
                path: "/tmp/a b.txt".into()
            })
        );
        assert_eq!(parse("/quit"), Ok(Command::Quit));
        let e = parse("/frobnicate").unwrap_err();
        assert!(
            e.contains("unknown command /frobnicate") && e.contains("/help"),
            "{e}"
        );
    }
}
