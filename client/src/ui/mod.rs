//! The terminal UI of `fastchat` (run without a subcommand): a conversation list, a
//! message pane with delivery marks, an input line and a status line, on termion in raw
//! mode and the alternate screen.
//!
//! How it is put together:
//! - [`model`]: everything on screen as plain data (conversations, unread counts,
//!   selection, scrolling, delivery marks), changed only through its methods;
//! - [`render`]: the model drawn for a fixed width × height as rows of styled text
//!   (pure; the unit tests read the screen as strings), with [`wrap`] measuring text in
//!   terminal columns;
//! - [`input`]: the line editor and its recall history; [`keys`]: key → action;
//!   [`commands`]: `/command` parsing;
//! - [`term`]: the terminal itself (raw mode and alternate screen as an RAII guard, a
//!   panic hook that restores the terminal);
//! - [`backend`]: a thread that owns the blocking [`crate::chat::Chat`] and talks to
//!   the UI over channels; [`app`]: the main loop tying it together.

pub mod app;
pub mod backend;
pub mod commands;
pub mod input;
pub mod keys;
pub mod model;
pub mod render;
pub mod term;
pub mod wrap;

pub use app::{run, Settings};
