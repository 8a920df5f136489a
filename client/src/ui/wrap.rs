//! Text measured in terminal columns: display width (wide characters and emoji take two
//! columns, combining marks none), cleaning text from peers so it cannot move the
//! cursor or change colours, truncating and padding to a width, and word wrapping.
//!
//! One measure everywhere: a string is as wide as the sum of its characters' widths
//! ([`char_width`]). `UnicodeWidthStr` measures some sequences differently from their
//! characters (an emoji with the presentation selector U+FE0F, "❤️", is 2 as a string
//! and 1 + 0 as characters), and mixing the two let a cut piece come out wider than the
//! room it was cut for — an underflow. Every subtraction of widths below saturates
//! anyway, so a measuring mistake can only misalign a row, never crash.

use unicode_width::UnicodeWidthChar;

/// Columns `s` takes on a terminal: the sum of its characters' widths.
pub fn width(s: &str) -> usize {
    s.chars().map(char_width).sum()
}

/// Columns one character takes (control characters: none; they are cleaned first).
pub fn char_width(c: char) -> usize {
    UnicodeWidthChar::width(c).unwrap_or(0)
}

pub use crate::text::clean;

/// The longest prefix of `s` that fits in `cols` columns.
pub fn truncate(s: &str, cols: usize) -> &str {
    let mut used = 0;
    for (i, c) in s.char_indices() {
        let w = char_width(c);
        if used + w > cols {
            return &s[..i];
        }
        used += w;
    }
    s
}

/// `s` cut or padded with spaces to exactly `cols` columns.
pub fn fit(s: &str, cols: usize) -> String {
    let cut = truncate(s, cols);
    let mut out = cut.to_string();
    out.extend(std::iter::repeat_n(' ', cols.saturating_sub(width(cut))));
    out
}

/// Wraps `text` into lines of at most `cols` columns: at spaces where it can, inside a
/// word only when the word alone is too long. Explicit newlines start new lines.
/// Always returns at least one line.
pub fn wrap(text: &str, cols: usize) -> Vec<String> {
    let cols = cols.max(2);
    let mut lines = Vec::new();
    for paragraph in text.split('\n') {
        let mut line = String::new();
        let mut line_w = 0;
        for word in paragraph.split(' ') {
            let word_w = width(word);
            let gap = usize::from(!line.is_empty());
            if line_w + gap + word_w <= cols {
                if gap == 1 {
                    line.push(' ');
                }
                line.push_str(word);
                line_w += gap + word_w;
                continue;
            }
            if !line.is_empty() {
                lines.push(std::mem::take(&mut line));
                line_w = 0;
            }
            // The word starts a line; cut it if it is wider than a line.
            for c in word.chars() {
                let w = char_width(c);
                if line_w + w > cols {
                    lines.push(std::mem::take(&mut line));
                    line_w = 0;
                }
                line.push(c);
                line_w += w;
            }
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_count_columns_not_bytes() {
        assert_eq!(width("abc"), 3);
        assert_eq!(width("héllo"), 5);
        assert_eq!(width("日本"), 4);
        assert_eq!(width("😀"), 2);
    }

    #[test]
    fn truncate_and_fit_respect_wide_characters() {
        assert_eq!(truncate("日本語", 5), "日本");
        assert_eq!(fit("日本語", 5), "日本 ");
        assert_eq!(width(&fit("😀😀😀", 5)), 5);
        assert_eq!(fit("ab", 4), "ab  ");
        assert_eq!(fit("abcdef", 3), "abc");
    }

    #[test]
    fn wrap_breaks_at_spaces_then_inside_long_words() {
        assert_eq!(wrap("hello world foo", 11), vec!["hello world", "foo"]);
        assert_eq!(wrap("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
        assert_eq!(wrap("", 10), vec![""]);
        assert_eq!(wrap("a\nb", 10), vec!["a", "b"]);
        assert_eq!(wrap("hi abcdefgh", 4), vec!["hi", "abcd", "efgh"]);
    }

    #[test]
    fn wrapped_lines_never_exceed_the_width() {
        let text = "日本語のテキスト 😀😀😀 mixed with ascii words and ünïcödé";
        for cols in 2..30 {
            for line in wrap(text, cols) {
                assert!(width(&line) <= cols, "{line:?} wider than {cols}");
            }
        }
        // A wide character never splits across the edge.
        assert_eq!(wrap("a😀", 2), vec!["a", "😀"]);
    }

    /// Emoji with the presentation selector, CJK, combining marks, zero-width joiners:
    /// every cut, fit and wrapped line stays within its width, at every width.
    #[test]
    fn emoji_selectors_and_mixed_scripts_never_overflow() {
        let hearts = "❤️".repeat(40);
        let samples = [
            hearts.as_str(),
            "❤️❤️❤️",
            "日本❤️e\u{301}\u{301}👩\u{200d}💻 ok 😀️ x",
            "a\u{301}\u{302}\u{303}",
            "\u{fe0f}\u{fe0f}\u{200d}",
        ];
        for s in samples {
            assert_eq!(width(s), s.chars().map(char_width).sum::<usize>());
            for cols in 0..=10 {
                let cut = truncate(s, cols);
                assert!(width(cut) <= cols, "truncate({s:?}, {cols}) = {cut:?}");
                assert_eq!(width(&fit(s, cols)), cols, "fit({s:?}, {cols})");
                if cols >= 2 {
                    for line in wrap(s, cols) {
                        assert!(width(&line) <= cols, "{line:?} wider than {cols}");
                    }
                }
            }
        }
    }
}
