//! The real terminal: raw mode and the alternate screen as one RAII guard that puts
//! the terminal back however the UI ends — a return, an error, or a panic (a panic hook
//! restores it before the panic message is printed, so the message is readable).
//! Draws a rendered [`Screen`] with termion escape sequences.

use super::render::{Screen, Style};
use std::io::{self, Stdout, Write};
use std::os::fd::AsRawFd;
use std::sync::{Mutex, Once};
use termion::raw::{IntoRawMode, RawTerminal};
use termion::screen::{AlternateScreen, IntoAlternateScreen};
use termion::{clear, color, cursor, style};

/// The terminal settings from before raw mode, for the panic hook.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts the terminal back as it was: the saved settings, the main screen, a visible
/// cursor, default colours. Safe to call more than once.
fn restore() {
    let fd = io::stdout().as_raw_fd();
    if let Ok(saved) = SAVED.lock() {
        if let Some(termios) = saved.as_ref() {
            // SAFETY: tcsetattr reads a termios we got from tcgetattr for this terminal.
            unsafe {
                libc::tcsetattr(fd, libc::TCSANOW, termios);
            }
        }
    }
    let mut out = io::stdout();
    let _ = write!(
        out,
        "{}{}{}",
        style::Reset,
        cursor::Show,
        termion::screen::ToMainScreen
    );
    let _ = out.flush();
}

/// Raw mode plus the alternate screen, for as long as it lives.
pub struct Terminal {
    out: AlternateScreen<RawTerminal<Stdout>>,
    size: (usize, usize),
}

impl Terminal {
    /// Enters raw mode and the alternate screen, and installs the panic hook.
    pub fn enter() -> io::Result<Terminal> {
        let fd = io::stdout().as_raw_fd();
        // SAFETY: termios is plain data; tcgetattr fills it for a valid descriptor.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut termios) } == 0 {
            if let Ok(mut saved) = SAVED.lock() {
                *saved = Some(termios);
            }
        }
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        let out = io::stdout().into_raw_mode()?.into_alternate_screen()?;
        Ok(Terminal { out, size: (0, 0) })
    }

    /// The terminal's size: (columns, rows).
    pub fn size() -> (usize, usize) {
        termion::terminal_size()
            .map(|(c, r)| (usize::from(c), usize::from(r)))
            .unwrap_or((80, 24))
    }

    /// Draws every row of `screen` and places the cursor. After a size change the
    /// screen is cleared first, so nothing of the old layout stays.
    pub fn draw(&mut self, screen: &Screen) -> io::Result<()> {
        let mut buf = String::new();
        let size = (
            screen.rows.first().map_or(0, |r| {
                r.pieces.iter().map(|(_, s)| super::wrap::width(s)).sum()
            }),
            screen.rows.len(),
        );
        if size != self.size {
            buf.push_str(&format!("{}", clear::All));
            self.size = size;
        }
        buf.push_str(&format!("{}", cursor::Hide));
        for (i, row) in screen.rows.iter().enumerate() {
            buf.push_str(&format!("{}", cursor::Goto(1, i as u16 + 1)));
            for (style, text) in &row.pieces {
                buf.push_str(escape(*style));
                buf.push_str(text);
                buf.push_str(&format!("{}", style::Reset));
            }
        }
        let (col, row) = screen.cursor;
        buf.push_str(&format!(
            "{}{}",
            cursor::Goto(col as u16 + 1, row as u16 + 1),
            cursor::Show
        ));
        self.out.write_all(buf.as_bytes())?;
        self.out.flush()
    }

    /// Forgets what is on the screen, so the next draw clears it first and draws every
    /// row again (Ctrl-L, after another program scribbled on the terminal).
    pub fn invalidate(&mut self) {
        self.size = (usize::MAX, usize::MAX);
    }

    /// Rings the terminal bell.
    pub fn bell(&mut self) {
        let _ = self.out.write_all(b"\x07");
        let _ = self.out.flush();
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = write!(self.out, "{}{}", style::Reset, cursor::Show);
        let _ = self.out.flush();
        // The fields' own drops leave the alternate screen and raw mode.
    }
}

/// The escape sequence that starts a style.
fn escape(style: Style) -> &'static str {
    use std::sync::OnceLock;
    static TABLE: OnceLock<[String; 8]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        [
            String::new(),
            format!("{}", style::Invert),
            format!("{}{}", style::Invert, style::Bold),
            format!("{}", style::Bold),
            format!("{}", color::Fg(color::LightBlack)),
            format!("{}", color::Fg(color::Cyan)),
            format!("{}{}", style::Bold, color::Fg(color::Green)),
            format!(
                "{}{}{}",
                style::Bold,
                color::Fg(color::White),
                color::Bg(color::Red)
            ),
        ]
    });
    let i = match style {
        Style::Plain => 0,
        Style::Bar => 1,
        Style::Selected => 2,
        Style::Unread => 3,
        Style::Dim => 4,
        Style::Me => 5,
        Style::Peer => 6,
        Style::Warning => 7,
    };
    &table[i]
}
