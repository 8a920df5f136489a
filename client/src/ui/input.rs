//! The input line: a one-line editor (insert, delete, move, delete a word or to the
//! start) with a recall history of sent lines, like a shell's.

/// Most lines kept for recall.
const MAX_RECALL: usize = 500;

/// The line being typed, the cursor in it, and the lines sent before.
#[derive(Debug, Default, Clone)]
pub struct Input {
    chars: Vec<char>,
    /// Cursor position, in characters (0..=len).
    cursor: usize,
    recall: Vec<String>,
    /// Which recalled line is shown (an index into `recall`), if any.
    recalled: Option<usize>,
    /// What was typed before recalling started, to come back to.
    draft: String,
}

impl Input {
    /// The current text.
    pub fn text(&self) -> String {
        self.chars.iter().collect()
    }

    /// The cursor position in characters.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// Inserts a character at the cursor.
    pub fn insert(&mut self, c: char) {
        self.chars.insert(self.cursor, c);
        self.cursor += 1;
    }

    /// Deletes the character before the cursor.
    pub fn backspace(&mut self) {
        if self.cursor > 0 {
            self.cursor -= 1;
            self.chars.remove(self.cursor);
        }
    }

    /// Deletes the character under the cursor.
    pub fn delete(&mut self) {
        if self.cursor < self.chars.len() {
            self.chars.remove(self.cursor);
        }
    }

    pub fn left(&mut self) {
        self.cursor = self.cursor.saturating_sub(1);
    }

    pub fn right(&mut self) {
        self.cursor = (self.cursor + 1).min(self.chars.len());
    }

    pub fn home(&mut self) {
        self.cursor = 0;
    }

    pub fn end(&mut self) {
        self.cursor = self.chars.len();
    }

    /// Deletes the word before the cursor (and the spaces after it), like Ctrl-W.
    pub fn delete_word(&mut self) {
        let mut start = self.cursor;
        while start > 0 && self.chars[start - 1] == ' ' {
            start -= 1;
        }
        while start > 0 && self.chars[start - 1] != ' ' {
            start -= 1;
        }
        self.chars.drain(start..self.cursor);
        self.cursor = start;
    }

    /// Deletes everything before the cursor, like Ctrl-U.
    pub fn delete_to_start(&mut self) {
        self.chars.drain(..self.cursor);
        self.cursor = 0;
    }

    /// Takes the line for sending: it is cleared and remembered for recall (unless
    /// empty or the same as the last one).
    pub fn take(&mut self) -> String {
        let line = self.text();
        self.chars.clear();
        self.cursor = 0;
        self.recalled = None;
        self.draft.clear();
        if !line.trim().is_empty() && self.recall.last() != Some(&line) {
            self.recall.push(line.clone());
            if self.recall.len() > MAX_RECALL {
                self.recall.remove(0);
            }
        }
        line
    }

    /// Shows the previous sent line (Up).
    pub fn recall_older(&mut self) {
        let index = match self.recalled {
            None if self.recall.is_empty() => return,
            None => {
                self.draft = self.text();
                self.recall.len() - 1
            }
            Some(0) => return,
            Some(i) => i - 1,
        };
        self.recalled = Some(index);
        self.set(&self.recall[index].clone());
    }

    /// Shows the next sent line, or what was being typed (Down).
    pub fn recall_newer(&mut self) {
        let Some(i) = self.recalled else { return };
        if i + 1 < self.recall.len() {
            self.recalled = Some(i + 1);
            self.set(&self.recall[i + 1].clone());
        } else {
            self.recalled = None;
            let draft = std::mem::take(&mut self.draft);
            self.set(&draft);
        }
    }

    fn set(&mut self, text: &str) {
        self.chars = text.chars().collect();
        self.cursor = self.chars.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(s: &str) -> Input {
        let mut input = Input::default();
        s.chars().for_each(|c| input.insert(c));
        input
    }

    #[test]
    fn editing_moves_and_deletes() {
        let mut i = typed("helo");
        i.left();
        i.insert('l');
        assert_eq!((i.text().as_str(), i.cursor()), ("hello", 4));
        i.home();
        i.delete();
        assert_eq!(i.text(), "ello");
        i.end();
        i.backspace();
        assert_eq!(i.text(), "ell");
        i.home();
        i.backspace();
        i.left();
        assert_eq!((i.text().as_str(), i.cursor()), ("ell", 0));
        i.end();
        i.right();
        assert_eq!(i.cursor(), 3);
    }

    #[test]
    fn ctrl_w_and_ctrl_u() {
        let mut i = typed("one two  three");
        i.delete_word();
        assert_eq!(i.text(), "one two  ");
        i.delete_word();
        assert_eq!(i.text(), "one ");
        i.insert('x');
        i.left();
        i.delete_to_start();
        assert_eq!((i.text().as_str(), i.cursor()), ("x", 0));
    }

    #[test]
    fn recall_walks_sent_lines_and_restores_the_draft() {
        let mut i = typed("first");
        assert_eq!(i.take(), "first");
        "second".chars().for_each(|c| i.insert(c));
        i.take();
        "draft".chars().for_each(|c| i.insert(c));
        i.recall_older();
        assert_eq!(i.text(), "second");
        i.recall_older();
        assert_eq!(i.text(), "first");
        i.recall_older();
        assert_eq!(i.text(), "first");
        i.recall_newer();
        assert_eq!(i.text(), "second");
        i.recall_newer();
        assert_eq!(i.text(), "draft");
        // Empty and repeated lines are not remembered twice.
        i.take();
        i.take();
        "draft".chars().for_each(|c| i.insert(c));
        i.take();
        i.recall_older();
        i.recall_older();
        assert_eq!(i.text(), "second");
    }
}
