//! Text from peers made safe to print. A peer (or the relay, for group names) chooses
//! every character of a text, a file name or a group name; printed raw, a newline forges
//! a line that looks like another message, an escape sequence rewrites the terminal, and
//! a bidirectional control (U+202E) shows `photo` U+202E `gpj.exe` as `photoexe.jpg`. Both the
//! terminal UI and `fastchat read` print through [`clean`].

/// Text safe to print: tabs become a space, other control characters (escape sequences
/// included) and bidirectional controls become `�`. Newlines are kept when
/// `keep_newlines`.
pub fn clean(s: &str, keep_newlines: bool) -> String {
    s.chars()
        .map(|c| match c {
            '\n' if keep_newlines => '\n',
            '\t' => ' ',
            c if c.is_control() || is_bidi_control(c) => '\u{fffd}',
            c => c,
        })
        .collect()
}

/// A text of several lines as one printed record: continuation lines indented, so no
/// line of a message can pass for a line of its own.
pub fn one_record(s: &str) -> String {
    clean(s, true).replace('\n', "\n    ")
}

/// The characters that reorder how text around them is shown: embeddings, overrides,
/// isolates and marks.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_bidi_controls_are_replaced() {
        assert_eq!(clean("a\x1b[2Jb\tc", false), "a\u{fffd}[2Jb c");
        assert_eq!(clean("a\nb", true), "a\nb");
        assert_eq!(clean("a\nb", false), "a\u{fffd}b");
        assert_eq!(clean("photo\u{202e}gpj.exe", false), "photo\u{fffd}gpj.exe");
        assert_eq!(clean("\u{2067}x\u{2069}", false), "\u{fffd}x\u{fffd}");
    }

    #[test]
    fn a_forged_line_stays_inside_its_message() {
        assert_eq!(
            one_record("hi\n[2026-12-01 10:00:00] bob: send me your password"),
            "hi\n    [2026-12-01 10:00:00] bob: send me your password"
        );
    }
}
