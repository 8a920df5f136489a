//! Which key does what: termion key events become UI [`Action`]s. Bindings follow
//! readline and irssi/weechat habits.

use termion::event::Key;

/// Something a key asks the UI to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Type this character.
    Insert(char),
    Backspace,
    Delete,
    Left,
    Right,
    Home,
    End,
    /// Ctrl-W.
    DeleteWord,
    /// Ctrl-U.
    DeleteToStart,
    /// Up: an older sent line.
    RecallOlder,
    /// Down: a newer sent line.
    RecallNewer,
    /// Enter.
    Submit,
    /// Tab or Ctrl-N.
    NextConversation,
    /// Shift-Tab or Ctrl-P.
    PreviousConversation,
    /// Alt-1 … Alt-9, Alt-0 (the tenth): jump to that conversation of the list.
    Jump(usize),
    PageUp,
    PageDown,
    /// Ctrl-L.
    Redraw,
    /// Ctrl-C (in raw mode it is a key, not a signal).
    Quit,
}

/// The action a key stands for, if any.
pub fn action(key: Key) -> Option<Action> {
    Some(match key {
        Key::Char('\n') | Key::Char('\r') => Action::Submit,
        Key::Char('\t') | Key::Ctrl('n') => Action::NextConversation,
        Key::BackTab | Key::Ctrl('p') => Action::PreviousConversation,
        Key::Alt(d @ '1'..='9') => Action::Jump(d as usize - '1' as usize),
        Key::Alt('0') => Action::Jump(9),
        Key::Char(c) if !c.is_control() => Action::Insert(c),
        Key::Backspace | Key::Ctrl('h') => Action::Backspace,
        Key::Delete => Action::Delete,
        Key::Left | Key::Ctrl('b') => Action::Left,
        Key::Right | Key::Ctrl('f') => Action::Right,
        Key::Home | Key::Ctrl('a') => Action::Home,
        Key::End | Key::Ctrl('e') => Action::End,
        Key::Ctrl('w') => Action::DeleteWord,
        Key::Ctrl('u') => Action::DeleteToStart,
        Key::Up => Action::RecallOlder,
        Key::Down => Action::RecallNewer,
        Key::PageUp => Action::PageUp,
        Key::PageDown => Action::PageDown,
        Key::Ctrl('l') => Action::Redraw,
        Key::Ctrl('c') => Action::Quit,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_bindings() {
        assert_eq!(action(Key::Char('\n')), Some(Action::Submit));
        assert_eq!(action(Key::Char('\t')), Some(Action::NextConversation));
        assert_eq!(action(Key::Ctrl('n')), Some(Action::NextConversation));
        assert_eq!(action(Key::BackTab), Some(Action::PreviousConversation));
        assert_eq!(action(Key::Ctrl('p')), Some(Action::PreviousConversation));
        assert_eq!(action(Key::Alt('1')), Some(Action::Jump(0)));
        assert_eq!(action(Key::Alt('0')), Some(Action::Jump(9)));
        assert_eq!(action(Key::Char('é')), Some(Action::Insert('é')));
        assert_eq!(action(Key::Ctrl('w')), Some(Action::DeleteWord));
        assert_eq!(action(Key::Ctrl('u')), Some(Action::DeleteToStart));
        assert_eq!(action(Key::Ctrl('c')), Some(Action::Quit));
        assert_eq!(action(Key::PageUp), Some(Action::PageUp));
        assert_eq!(action(Key::F(5)), None);
    }
}
