//! Chatting through a fault: sessions that keep sending and receiving while a test
//! breaks something, and what they saw.

use super::*;

/// What [`chat_through_a_fault`] saw.
pub struct FaultRun<T> {
    /// Each session's user and how often it failed over.
    pub failovers: Vec<(String, u32)>,
    /// What the fault returned.
    pub fault: T,
    /// Every (sender, text) that was reported `sent`.
    pub sent: Vec<(String, String)>,
    pub shown: Shown,
}

impl<T> FaultRun<T> {
    /// Every message reported `sent` was shown exactly once, and nothing else.
    pub fn assert_each_shown_once(&self) {
        for m in &self.sent {
            assert_eq!(self.shown.get(m), Some(&1), "{m:?} shown exactly once");
        }
        assert_eq!(
            self.shown.len(),
            self.sent.len(),
            "nothing shown that was not sent"
        );
    }
}

/// Each of `chats` (the sessions of `users`, in order) sends `per_user` texts round the
/// others, receiving between sends; once 40 are sent, `fault` runs (a relay killed or
/// stopped). Then every session receives until each text sent anywhere has been shown
/// somewhere (90 s at most) and lingers a little, so late duplicates would be seen.
/// Sends must succeed: they fail over, never fail.
pub fn chat_through_a_fault<T>(
    chats: Vec<Chat>,
    users: &[String],
    per_user: usize,
    fault: impl FnOnce() -> T,
) -> FaultRun<T> {
    let sent: Mutex<Vec<(String, String)>> = Mutex::default();
    let shown: Mutex<Shown> = Mutex::default();
    let done_sending = AtomicUsize::new(0);
    let (failovers, fault) = std::thread::scope(|s| {
        let handles: Vec<_> = chats
            .into_iter()
            .enumerate()
            .map(|(i, mut chat)| {
                let (sent, shown, done_sending) = (&sent, &shown, &done_sending);
                s.spawn(move || {
                    let receive = |chat: &mut Chat, wait_ms: u64| {
                        let events = chat
                            .receive(Instant::now() + Duration::from_millis(wait_ms))
                            .unwrap();
                        record(&mut shown.lock().unwrap(), events);
                    };
                    for k in 0..per_user {
                        let peer = &users[(i + 1 + k % (users.len() - 1)) % users.len()];
                        let text = format!("{} #{k} to {peer}", users[i]);
                        chat.send_text(peer, &text)
                            .expect("send fails over, never fails");
                        sent.lock().unwrap().push((users[i].clone(), text));
                        receive(&mut chat, 20);
                    }
                    done_sending.fetch_add(1, Ordering::SeqCst);
                    let deadline = Instant::now() + Duration::from_secs(90);
                    while Instant::now() < deadline {
                        let all_sent = done_sending.load(Ordering::SeqCst) == users.len();
                        if all_sent && shown.lock().unwrap().len() >= sent.lock().unwrap().len() {
                            break;
                        }
                        receive(&mut chat, 200);
                    }
                    receive(&mut chat, 500);
                    (chat.user().to_string(), chat.failovers())
                })
            })
            .collect();
        let start = Instant::now();
        while sent.lock().unwrap().len() < 40 && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let fault = fault();
        let failovers = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (failovers, fault)
    });
    let sent = sent.into_inner().unwrap();
    assert_eq!(sent.len(), users.len() * per_user);
    FaultRun {
        failovers,
        fault,
        sent,
        shown: shown.into_inner().unwrap(),
    }
}
