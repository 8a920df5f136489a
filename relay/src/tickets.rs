//! Tickets the auth server pushed to this relay: single use, bound to one user,
//! expiring.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Who a ticket admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub user: String,
    pub user_id: i64,
}

/// Why a ticket was refused. Deliberately vague towards the client.
#[derive(Debug, PartialEq, Eq)]
pub enum TicketRefusal {
    Unknown,
    Expired,
    OtherUser,
}

struct Entry {
    admission: Admission,
    expires: Instant,
}

/// Tickets waiting to be presented.
#[derive(Default)]
pub struct TicketBook {
    tickets: HashMap<String, Entry>,
}

impl TicketBook {
    /// Holds `ticket` for `admission` until `ttl` has passed.
    pub fn insert(&mut self, ticket: String, admission: Admission, ttl: Duration, now: Instant) {
        self.tickets.insert(
            ticket,
            Entry {
                admission,
                expires: now + ttl,
            },
        );
    }

    /// Consumes the ticket whatever the outcome, so a ticket can never be tried twice.
    pub fn redeem(
        &mut self,
        ticket: &str,
        user: &str,
        now: Instant,
    ) -> Result<Admission, TicketRefusal> {
        let entry = self.tickets.remove(ticket).ok_or(TicketRefusal::Unknown)?;
        if entry.expires <= now {
            return Err(TicketRefusal::Expired);
        }
        if entry.admission.user != user {
            return Err(TicketRefusal::OtherUser);
        }
        Ok(entry.admission)
    }

    /// Forgets expired tickets.
    pub fn expire(&mut self, now: Instant) {
        self.tickets.retain(|_, e| e.expires > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Admission {
        Admission {
            user: "alice".into(),
            user_id: 1,
        }
    }

    #[test]
    fn single_use_bound_and_expiring() {
        let mut book = TicketBook::default();
        let t = Instant::now();
        let ttl = Duration::from_secs(30);
        book.insert("a".into(), alice(), ttl, t);
        assert_eq!(book.redeem("a", "alice", t), Ok(alice()));
        assert_eq!(book.redeem("a", "alice", t), Err(TicketRefusal::Unknown));
        book.insert("b".into(), alice(), ttl, t);
        assert_eq!(book.redeem("b", "bob", t), Err(TicketRefusal::OtherUser));
        assert_eq!(book.redeem("b", "alice", t), Err(TicketRefusal::Unknown));
        book.insert("c".into(), alice(), ttl, t);
        assert_eq!(
            book.redeem("c", "alice", t + ttl),
            Err(TicketRefusal::Expired)
        );
        book.insert("d".into(), alice(), ttl, t);
        book.expire(t + ttl);
        assert_eq!(book.redeem("d", "alice", t), Err(TicketRefusal::Unknown));
    }
}
