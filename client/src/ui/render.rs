//! Draws the [`Model`] for a terminal of a given size, as rows of styled text — pure,
//! so tests can read the screen as strings. [`super::term`] puts the rows on a real
//! terminal.
//!
//! ```text
//! ┌ title bar: the open conversation ─────────────────────────────┐  row 0
//! │ 1 bob (2) │ 12:01 ✓✓ alice: hi                                 │
//! │ 2 #crew   │ 12:02    bob: hello, a long message wraps under    │  body
//! │ 3 status  │          itself                                    │
//! │ status bar: user @ relay │ connected │ unread                  │  row h-2
//! │ [bob] input line                                                │  row h-1
//! ```
//!
//! Every row is exactly the terminal's width in columns (wide characters counted as two),
//! so nothing wraps or leaves debris behind on a resize.

use super::model::{Connection, Conversation, LineKind, Mark, Model, STATUS};
use super::wrap::{char_width, clean, fit, truncate, width, wrap};

/// How a piece of a row looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    /// Title and status bars (reverse video).
    Bar,
    /// The open conversation in the list.
    Selected,
    /// A conversation with unread messages.
    Unread,
    /// Times, borders, news lines.
    Dim,
    /// My name.
    Me,
    /// Someone else's name.
    Peer,
    /// Key changes and other things that must not be missed.
    Warning,
}

/// One screen row: styled pieces whose widths add up to the terminal width.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row {
    pub pieces: Vec<(Style, String)>,
}

impl Row {
    /// The row's text without styles.
    pub fn text(&self) -> String {
        self.pieces.iter().map(|(_, s)| s.as_str()).collect()
    }

    fn push(&mut self, style: Style, s: impl Into<String>) {
        self.pieces.push((style, s.into()));
    }

    fn width(&self) -> usize {
        self.pieces.iter().map(|(_, s)| width(s)).sum()
    }

    /// Pads (or cuts) the row to `cols` columns. A loop, not a recursion: a cut row
    /// is padded once and done.
    fn finish(mut self, cols: usize, pad: Style) -> Row {
        if self.width() > cols {
            let mut out = Row::default();
            let mut left = cols;
            for (style, s) in self.pieces {
                if left == 0 {
                    break;
                }
                let cut = truncate(&s, left).to_string();
                left = left.saturating_sub(width(&cut));
                out.push(style, cut);
            }
            self = out;
        }
        let w = self.width();
        if w < cols {
            self.push(pad, " ".repeat(cols - w));
        }
        self
    }
}

/// A drawn screen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screen {
    pub rows: Vec<Row>,
    /// Where the cursor goes: (column, row), 0-based.
    pub cursor: (usize, usize),
    /// The most the open conversation can be scrolled up, in rows.
    pub max_scroll: usize,
    /// Rows of the message pane.
    pub page: usize,
}

impl Screen {
    /// Every row as plain text.
    pub fn text(&self) -> Vec<String> {
        self.rows.iter().map(Row::text).collect()
    }
}

/// Columns before a message's text: `HH:MM ✓✓ `.
const PREFIX: usize = 9;

/// Draws `model` for a `cols` × `rows` terminal. `utc_offset_s` shifts times to local.
pub fn render(model: &Model, cols: usize, rows: usize, utc_offset_s: i64) -> Screen {
    if cols < 20 || rows < 5 {
        let mut out: Vec<Row> = (0..rows)
            .map(|_| Row::default().finish(cols, Style::Plain))
            .collect();
        if let Some(first) = out.first_mut() {
            *first = Row {
                pieces: vec![(Style::Plain, fit("terminal too small", cols))],
            };
        }
        return Screen {
            rows: out,
            cursor: (0, 0),
            max_scroll: 0,
            page: 1,
        };
    }
    let open = model.selected();
    let body = rows - 3;
    let list_w = if cols >= 50 {
        (cols / 5).clamp(14, 24)
    } else {
        0
    };
    let pane_w = if list_w > 0 { cols - list_w - 1 } else { cols };

    let mut out = Vec::with_capacity(rows);
    out.push(title_bar(open, cols));
    let list = conversation_list(model, list_w, body);
    let (pane, max_scroll) = message_pane(model, open, pane_w, body, utc_offset_s);
    for (i, pane_row) in pane.into_iter().enumerate() {
        let mut row = Row::default();
        if list_w > 0 {
            row.pieces.extend(list[i].pieces.clone());
            row.push(Style::Dim, "│");
        }
        row.pieces.extend(pane_row.pieces);
        out.push(row.finish(cols, Style::Plain));
    }
    out.push(status_bar(model, cols));
    let (input, cursor_col) = input_line(model, open, cols);
    out.push(input);
    Screen {
        rows: out,
        cursor: (cursor_col, rows - 1),
        max_scroll,
        page: body,
    }
}

fn title_bar(open: &Conversation, cols: usize) -> Row {
    let mut row = Row::default();
    if open.key_warning {
        row.push(
            Style::Warning,
            format!(
                " !! {}'s KEY CHANGED: nothing is sent until you check it (/verify {}) !!",
                open.title, open.title
            ),
        );
        return row.finish(cols, Style::Warning);
    }
    let what = if open.id == STATUS {
        "FastChat: /msg USER to chat, /help for commands".to_string()
    } else if open.group_id.is_some() {
        format!("{}: group, end-to-end encrypted", open.title)
    } else {
        format!("{}: end-to-end encrypted", open.title)
    };
    row.push(Style::Bar, format!(" {}", clean(&what, false)));
    row.finish(cols, Style::Bar)
}

fn conversation_list(model: &Model, list_w: usize, body: usize) -> Vec<Row> {
    let open = &model.selected().id;
    let mut rows: Vec<Row> = Vec::with_capacity(body);
    for (i, conv) in model.ordered().into_iter().enumerate().take(body) {
        let number = match i {
            0..=8 => char::from(b'1' + i as u8),
            9 => '0',
            _ => ' ',
        };
        let flag = if conv.key_warning { "!" } else { " " };
        let unread = if conv.unread > 0 {
            format!(" ({})", conv.unread)
        } else {
            String::new()
        };
        let name_w = list_w.saturating_sub(3 + width(&unread));
        let text = format!(
            "{number}{flag}{}{unread}",
            fit(&clean(&conv.title, false), name_w)
        );
        let style = if conv.id == *open {
            Style::Selected
        } else if conv.key_warning {
            Style::Warning
        } else if conv.unread > 0 {
            Style::Unread
        } else {
            Style::Plain
        };
        rows.push(
            Row {
                pieces: vec![(style, fit(&text, list_w))],
            }
            .finish(list_w, style),
        );
    }
    while rows.len() < body {
        rows.push(Row::default().finish(list_w, Style::Plain));
    }
    rows
}

/// Hours and minutes of `ts_ms`, shifted by `utc_offset_s`.
fn clock(ts_ms: u64, utc_offset_s: i64) -> String {
    let secs = (ts_ms / 1000) as i64 + utc_offset_s;
    let minutes = secs.rem_euclid(86_400) / 60;
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// The open conversation's rows that fit, bottom-aligned and scrolled; and how far up
/// it can be scrolled. Lines are wrapped from the newest up, and only until the rows on
/// screen (and the `scroll` rows below them) are there: a long conversation costs what
/// it shows. When the top is not reached, the maximum scroll returned is a lower bound
/// that is always more than `scroll` (the next page up wraps further).
fn message_pane(
    model: &Model,
    open: &Conversation,
    pane_w: usize,
    body: usize,
    utc_offset_s: i64,
) -> (Vec<Row>, usize) {
    let text_w = pane_w.saturating_sub(PREFIX).max(4);
    // Scrolled up, the last row is the "more below" banner: one row less of text.
    let shown_when_scrolled = body.saturating_sub(1).max(1);
    let wanted = model.scroll.saturating_add(body) + 1;
    // Rows in reverse order (newest first).
    let mut rev: Vec<Row> = Vec::new();
    let mut reached_top = true;
    for line in open.lines.iter().rev() {
        if rev.len() >= wanted {
            reached_top = false;
            break;
        }
        let mut rows = line_rows(model, line, pane_w, text_w, utc_offset_s);
        rows.reverse();
        rev.extend(rows);
    }
    let total = rev.len();
    let max_scroll = if total <= body {
        0
    } else if reached_top {
        total - shown_when_scrolled
    } else {
        total
            .saturating_sub(shown_when_scrolled)
            .max(model.scroll + 1)
    };
    let scroll = model.scroll.min(max_scroll);
    let take = if scroll > 0 {
        shown_when_scrolled
    } else {
        body
    };
    let mut rows: Vec<Row> = rev.into_iter().skip(scroll).take(take).collect();
    rows.reverse();
    if scroll > 0 {
        rows.push(Row {
            pieces: vec![(
                Style::Bar,
                fit(&format!(" -- {scroll} more rows below: PgDn --"), pane_w),
            )],
        });
    }
    // Bottom-aligned: a short conversation sits just above the status bar.
    let mut padded: Vec<Row> = (rows.len()..body)
        .map(|_| Row::default().finish(pane_w, Style::Plain))
        .collect();
    padded.extend(rows);
    (padded, max_scroll)
}

/// The rows one line of a conversation takes, wrapped to the pane.
fn line_rows(
    model: &Model,
    line: &super::model::Line,
    pane_w: usize,
    text_w: usize,
    utc_offset_s: i64,
) -> Vec<Row> {
    let mut out = Vec::new();
    let time = clock(line.ts, utc_offset_s);
    let text = clean(&line.text, true);
    match &line.kind {
        LineKind::Message { from, mark } => {
            let (mark_text, mark_style) = match mark {
                None => ("  ", Style::Plain),
                Some(Mark::Pending) => ("··", Style::Dim),
                Some(Mark::Stored) => ("✓ ", Style::Dim),
                Some(Mark::Delivered) => ("✓✓", Style::Plain),
                Some(Mark::Failed) => ("✗ ", Style::Warning),
            };
            let from = clean(from, false);
            let name_style = if from == model.me {
                Style::Me
            } else {
                Style::Peer
            };
            let wrapped = wrap(&format!("{from}: {text}"), text_w);
            for (i, part) in wrapped.into_iter().enumerate() {
                let mut row = Row::default();
                if i == 0 {
                    row.push(Style::Dim, format!("{time} "));
                    row.push(mark_style, mark_text);
                    row.push(Style::Plain, " ");
                    match part.strip_prefix(&format!("{from}:")) {
                        Some(rest) => {
                            row.push(name_style, format!("{from}:"));
                            row.push(Style::Plain, rest);
                        }
                        None => row.push(Style::Plain, part),
                    }
                } else {
                    row.push(Style::Plain, " ".repeat(PREFIX));
                    row.push(Style::Plain, part);
                }
                out.push(row.finish(pane_w, Style::Plain));
            }
        }
        LineKind::Info | LineKind::Warning => {
            let (marker, style) = if line.kind == LineKind::Info {
                ("--", Style::Dim)
            } else {
                ("!!", Style::Warning)
            };
            for (i, part) in wrap(&text, text_w).into_iter().enumerate() {
                let mut row = Row::default();
                if i == 0 {
                    row.push(Style::Dim, format!("{time} "));
                    row.push(style, format!("{marker} {part}"));
                } else {
                    row.push(style, format!("{}{part}", " ".repeat(PREFIX)));
                }
                out.push(row.finish(pane_w, style));
            }
        }
    }
    out
}

fn status_bar(model: &Model, cols: usize) -> Row {
    let connection = match &model.connection {
        Connection::Connected => "connected".to_string(),
        Connection::Reconnecting => "reconnecting…".to_string(),
        Connection::Offline(why) => format!("OFFLINE: {why}"),
    };
    let mut text = format!(
        " {} @ {} │ {connection}",
        clean(&model.me, false),
        model.relay
    );
    let unread = model.unread_total();
    if unread > 0 {
        text.push_str(&format!(" │ {unread} unread"));
    }
    if let Some(note) = &model.note {
        text.push_str(&format!(" │ {}", clean(note, false)));
    }
    let style = match model.connection {
        Connection::Connected => Style::Bar,
        _ => Style::Warning,
    };
    Row {
        pieces: vec![(style, text)],
    }
    .finish(cols, style)
}

/// The input line, scrolled sideways so the cursor is visible; and the cursor column.
fn input_line(model: &Model, open: &Conversation, cols: usize) -> (Row, usize) {
    let prompt = format!("[{}] ", truncate(&clean(&open.title, false), cols / 3));
    let room = cols.saturating_sub(width(&prompt) + 1).max(1);
    let chars: Vec<char> = clean(&model.input.text(), false).chars().collect();
    let cursor = model.input.cursor().min(chars.len());
    // Start as far left as possible while the cursor still fits.
    let mut start = 0;
    let col_of =
        |from: usize, to: usize| -> usize { chars[from..to].iter().map(|c| char_width(*c)).sum() };
    while col_of(start, cursor) >= room {
        start += 1;
    }
    let visible: String = chars[start..].iter().collect();
    let mut row = Row::default();
    row.push(Style::Dim, prompt.clone());
    row.push(Style::Plain, truncate(&visible, room).to_string());
    (
        row.finish(cols, Style::Plain),
        width(&prompt) + col_of(start, cursor),
    )
}

#[cfg(test)]
mod tests {
    use super::super::model::{info_line, message_line, warning_line};
    use super::*;

    fn screen(m: &Model, cols: usize, rows: usize) -> Vec<String> {
        let s = render(m, cols, rows, 0);
        assert_eq!(s.rows.len(), rows);
        for (i, row) in s.rows.iter().enumerate() {
            assert_eq!(width(&row.text()), cols, "row {i} {:?}", row.text());
        }
        s.text()
    }

    fn sample() -> Model {
        let mut m = Model::new("alice", "127.0.0.1:7401");
        m.push("bob", "bob", None, message_line("bob", "hi alice", 60_000));
        m.push(
            "#2",
            "#crew",
            Some(2),
            message_line("carol", "group hello", 120_000),
        );
        m.select("bob");
        m
    }

    #[test]
    fn layout_has_title_list_pane_status_and_input() {
        let mut m = sample();
        let local = m.outgoing("bob", "hello bob", 3_600_000);
        m.stored(local, Some("x".into()));
        "typing".chars().for_each(|c| m.input.insert(c));
        let rows = screen(&m, 60, 10);
        assert!(
            rows[0].starts_with(" bob: end-to-end encrypted"),
            "{}",
            rows[0]
        );
        // Most recent first: my message to bob is newer than crew's.
        assert!(rows[1].starts_with("1 bob "), "{}", rows[1]);
        assert!(rows[2].starts_with("2 #crew   (1)"), "{}", rows[2]);
        assert!(rows[3].starts_with("3 status"), "{}", rows[3]);
        let list_w = 14;
        for row in &rows[1..8] {
            assert_eq!(row.chars().nth(list_w), Some('│'), "{row}");
        }
        assert!(
            rows[6].ends_with(&fit("00:01    bob: hi alice", 45)),
            "{}",
            rows[6]
        );
        assert!(rows[7].contains("01:00 ✓  alice: hello bob"), "{}", rows[7]);
        assert!(rows[8].starts_with(" alice @ 127.0.0.1:7401 │ connected │ 1 unread"));
        assert!(rows[9].starts_with("[bob] typing"));
        assert_eq!(render(&m, 60, 10, 0).cursor, (12, 9));
    }

    #[test]
    fn delivered_messages_show_two_ticks() {
        let mut m = sample();
        let local = m.outgoing("bob", "hello", 0);
        m.stored(local, Some("mid1".into()));
        m.delivered(&["mid1".to_string()]);
        let rows = screen(&m, 60, 10);
        assert!(
            rows.iter().any(|r| r.contains("00:00 ✓✓ alice: hello")),
            "{rows:#?}"
        );
    }

    #[test]
    fn long_messages_wrap_under_themselves_and_fit() {
        let mut m = sample();
        let text = "the quick brown fox jumps over the lazy dog 日本語のテキスト 😀😀😀 again";
        m.push("bob", "bob", None, message_line("bob", text, 0));
        let rows = screen(&m, 50, 12);
        let pane: Vec<&str> = rows[1..9]
            .iter()
            .map(|r| &r[r.find('│').unwrap() + 3..])
            .collect();
        let joined: Vec<&str> = pane
            .iter()
            .filter(|r| !r.trim().is_empty())
            .copied()
            .collect();
        assert!(
            joined.iter().any(|r| r.contains("bob: the quick")),
            "{joined:#?}"
        );
        // Continuation rows are indented to the text column.
        assert!(
            joined
                .iter()
                .any(|r| r.starts_with("         ") && r.contains("lazy")),
            "{joined:#?}"
        );
    }

    #[test]
    fn scrolling_shows_older_rows_and_says_so() {
        let mut m = sample();
        for i in 0..30 {
            m.push(
                "bob",
                "bob",
                None,
                message_line("bob", &format!("line {i}"), 0),
            );
        }
        let rows = screen(&m, 60, 10);
        assert!(rows[7].contains("line 29"));
        m.scroll = 10;
        let rows = screen(&m, 60, 10);
        // The banner counts exactly the rows hidden below it: lines 20..=29.
        assert!(rows[6].contains("line 19"), "{rows:#?}");
        assert!(rows[7].contains("10 more rows below"), "{rows:#?}");
        m.scroll = 1;
        let rows = screen(&m, 60, 10);
        assert!(rows[6].contains("line 28"), "{rows:#?}");
        assert!(rows[7].contains(" 1 more rows below"), "{rows:#?}");
        m.scroll = 1000;
        let s = render(&m, 60, 10, 0);
        // 31 rows, 6 of them shown above the banner.
        assert_eq!(s.max_scroll, 31 - 6);
        assert!(s.text()[1].contains("hi alice"));
        assert!(s.text()[7].contains("25 more rows below"));
    }

    /// Only the rows on screen are wrapped; the maximum scroll grows page by page until
    /// the top, which is then reachable.
    #[test]
    fn paging_up_a_long_conversation_reaches_the_top() {
        let mut m = Model::new("alice", "relay");
        for i in 0..500 {
            m.push(
                "bob",
                "bob",
                None,
                message_line("bob", &format!("line {i}"), 0),
            );
        }
        m.select("bob");
        // As the app does it: page up, render, clamp to what the render allows.
        let mut pages = 0;
        loop {
            let s = render(&m, 60, 10, 0);
            m.page = s.page;
            m.scroll = m.scroll.min(s.max_scroll);
            if s.text()[1].contains("line 0 ") || pages > 1000 {
                break;
            }
            let before = m.scroll;
            m.page_up();
            assert!(render(&m, 60, 10, 0).max_scroll >= m.scroll.min(before + 1));
            pages += 1;
        }
        // 500 rows, 6 more per page (a 7-row pane less the banner row).
        assert!(pages <= 500 / 6 + 1, "{pages} pages");
        assert!(render(&m, 60, 10, 0).text()[1].contains("bob: line 0 "));
    }

    #[test]
    fn key_warnings_are_impossible_to_miss() {
        let mut m = sample();
        m.push("bob", "bob", None, warning_line("bob's key CHANGED", 0));
        m.set_key_warning("bob", true);
        let s = render(&m, 70, 10, 0);
        let rows = s.text();
        assert!(rows[0].contains("KEY CHANGED"));
        assert_eq!(s.rows[0].pieces[0].0, Style::Warning);
        assert!(rows.iter().any(|r| r.contains("!! bob's key CHANGED")));
        assert!(rows[2].starts_with("2!bob"), "{}", rows[2]);
    }

    #[test]
    fn hostile_text_cannot_inject_escapes_and_tiny_terminals_are_handled() {
        let mut m = sample();
        m.push(
            "bob",
            "bob",
            None,
            message_line("bob", "\x1b[2J\x07evil", 0),
        );
        m.push("bob", "bob", None, info_line("news", 0));
        let rows = screen(&m, 40, 8);
        assert!(rows
            .iter()
            .all(|r| !r.contains('\x1b') && !r.contains('\x07')));
        assert!(rows.iter().any(|r| r.contains("-- news")));
        let rows = screen(&m, 10, 3);
        assert_eq!(rows[0], "terminal t");
    }

    /// Emoji with U+FE0F (measured differently per string and per character by
    /// `unicode-width`) once made `finish` underflow: now no size of terminal panics
    /// and no row is wider than the terminal.
    #[test]
    fn emoji_selectors_never_overflow_a_row_at_any_size() {
        let hearts = "❤️".repeat(40);
        let mixed = "日本語 ❤️e\u{301} 👩\u{200d}💻 x\u{fe0f}\u{fe0f} 😀️";
        let mut m = Model::new("❤️me", "127.0.0.1:7401");
        m.push("#9", "#❤️❤️❤️", Some(9), message_line("carol", &hearts, 0));
        m.push("#9", "#❤️❤️❤️", Some(9), info_line(&hearts, 0));
        m.push("#9", "#❤️❤️❤️", Some(9), warning_line(mixed, 0));
        m.push("bob", "bob", None, message_line("bob", mixed, 0));
        m.set_key_warning("#9", true);
        m.note = Some(hearts.clone());
        hearts.chars().for_each(|c| m.input.insert(c));
        for open in ["#9", "bob"] {
            m.select(open);
            for scroll in [0, 3] {
                m.scroll = scroll;
                for cols in (1..=10).chain([19, 20, 21, 33, 49, 50, 51, 80]) {
                    for rows in [1, 2, 4, 5, 6, 12] {
                        let s = render(&m, cols, rows, 0);
                        assert_eq!(s.rows.len(), rows);
                        for row in &s.rows {
                            assert_eq!(width(&row.text()), cols, "{cols}x{rows}: {row:?}");
                        }
                        assert!(s.cursor.0 < cols.max(1), "{cols}x{rows}: {:?}", s.cursor);
                    }
                }
            }
        }
    }

    #[test]
    fn long_input_scrolls_to_keep_the_cursor_visible() {
        let mut m = sample();
        "0123456789"
            .repeat(10)
            .chars()
            .for_each(|c| m.input.insert(c));
        let s = render(&m, 30, 6, 0);
        assert!(s.cursor.0 < 30);
        assert!(s.text()[5].contains("789"), "{:?}", s.text()[5]);
        m.input.home();
        let s = render(&m, 30, 6, 0);
        assert_eq!(s.cursor.0, "[bob] ".len());
        assert!(s.text()[5].starts_with("[bob] 0123"));
    }
}
