//! Who may do what: a session acts only as the user its ticket named; it cannot read,
//! acknowledge or delete another user's messages, send to a group it is not in, or do
//! an admin's work without the role; tickets cannot be reused, forged or handed to
//! another user; the servers' control ports refuse anyone without the cluster secret.
//! Each test goes through the raw protocol, as a hostile client would.

mod harness;

use fastchat_client::connect::{AuthLink, Redirect, RelayLink};
use fastchat_client::error::ClientError;
use fastchat_common::link::Link;
use fastchat_common::noise::Role;
use fastchat_common::proto::{ClientToRelay, ErrorCode, RelayToClient};
use harness::{Settings, TestNet, PASSWORD};

fn refusal<T>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Refused { code, .. }) => code,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got through"),
    }
}
use std::time::{Duration, Instant};

fn redirect(net: &TestNet, user: &str) -> Redirect {
    let mut auth = AuthLink::connect(&net.auth_addr, &net.home.join("raw")).unwrap();
    auth.login(user, PASSWORD).unwrap()
}

fn session(net: &TestNet, user: &str) -> RelayLink {
    RelayLink::connect(&redirect(net, user), true).unwrap()
}

/// Sends `frame` (made with a fresh request id) and returns the reply to that id (a
/// refusal as `Err`).
fn request(
    link: &mut RelayLink,
    make: impl Fn(u64) -> ClientToRelay,
) -> Result<RelayToClient, ClientError> {
    let id = link.next_id();
    link.queue(&make(id));
    link.flush().unwrap();
    link.wait_reply(id, |f| match f {
        RelayToClient::Sent { id: got, .. }
        | RelayToClient::Group { id: got, .. }
        | RelayToClient::Members { id: got, .. } => *got == id,
        _ => false,
    })
}

fn refused(reply: Result<RelayToClient, ClientError>) -> ErrorCode {
    match reply {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn send_to(link: &mut RelayLink, to: &str, body: &str) -> RelayToClient {
    request(link, |id| ClientToRelay::Send {
        id,
        to: Some(to.into()),
        group_id: None,
        body: body.into(),
    })
    .unwrap()
}

/// Every `msg` that arrives within `wait`.
fn drain(link: &mut RelayLink, wait: Duration) -> Vec<(i64, String, String)> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while let Ok(Some(frame)) = link.recv(Some(deadline)) {
        if let RelayToClient::Msg(m) = frame {
            got.push((m.msg_id, m.from, m.body));
        }
    }
    got
}

#[test]
fn a_session_speaks_only_as_its_ticket_s_user() {
    let net = TestNet::start();
    for u in ["alice", "bob", "carol"] {
        net.register(u);
    }
    let (mut alice, _) = session(&net, "alice").into_link();
    let mut bob = session(&net, "bob");
    // A `from` smuggled into the frame changes nothing: the relay names the sender.
    alice.queue(
        &serde_json::json!({"t": "send", "id": 1, "to": "bob", "from": "carol", "body": "hi"}),
    );
    alice.flush().unwrap();
    let deadline = Some(Instant::now() + Duration::from_secs(10));
    loop {
        match alice.recv::<RelayToClient>(deadline).unwrap() {
            Some(RelayToClient::Sent { id: 1, .. }) => break,
            Some(_) => {}
            None => panic!("no `sent`"),
        }
    }
    let got = drain(&mut bob, Duration::from_secs(5));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, "alice", "delivered as the session's user");
    // A second `auth` on a logged-in session is not a way to become someone else.
    let carol = redirect(&net, "carol");
    alice.queue(&ClientToRelay::Auth {
        user: "carol".into(),
        ticket: carol.ticket.clone(),
        receive: true,
    });
    alice.flush().unwrap();
    let reply = alice.recv::<RelayToClient>(Some(Instant::now() + Duration::from_secs(10)));
    assert!(
        matches!(&reply, Ok(Some(RelayToClient::Error(e))) if e.code == ErrorCode::BadState),
        "{reply:?}"
    );
}

#[test]
fn nobody_reads_or_acknowledges_another_user_s_messages() {
    let net = TestNet::start();
    for u in ["alice", "bob", "carol"] {
        net.register(u);
    }
    // Two messages wait for bob, offline.
    let mut alice = session(&net, "alice");
    let mut ids = Vec::new();
    for text in ["one", "two"] {
        match send_to(&mut alice, "bob", text) {
            RelayToClient::Sent { msg_id, .. } => ids.push(msg_id),
            other => panic!("{other:?}"),
        }
    }
    // carol logs in: none of bob's messages reach her; her acks of bob's ids (and of
    // ids that do not exist) delete nothing.
    let mut carol = session(&net, "carol");
    assert!(drain(&mut carol, Duration::from_secs(1)).is_empty());
    carol.queue(&ClientToRelay::Ack {
        msg_ids: vec![ids[0], ids[1], ids[1] + 1000],
    });
    carol.flush().unwrap();
    // An ack has no reply. carol's next send goes to the same database worker (jobs
    // of one user always do), so once it is `sent`, her ack has been handled.
    assert!(matches!(
        send_to(&mut carol, "alice", "after my ack"),
        RelayToClient::Sent { .. }
    ));
    assert_eq!(
        net.stored_messages(),
        3,
        "carol's acks deleted nothing (bob's two, and hers to alice)"
    );
    // bob gets both.
    let mut bob = session(&net, "bob");
    let got = drain(&mut bob, Duration::from_secs(5));
    let got_ids: Vec<i64> = got.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(got_ids, ids);
}

#[test]
fn groups_refuse_outsiders_and_members_without_the_admin_role() {
    let net = TestNet::start();
    for u in ["alice", "bob", "carol"] {
        net.register(u);
    }
    let mut alice = session(&net, "alice");
    let group_id = match request(&mut alice, |id| ClientToRelay::GroupCreate {
        id,
        name: "club".into(),
    })
    .unwrap()
    {
        RelayToClient::Group { group, .. } => group.group_id,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        request(&mut alice, |id| ClientToRelay::GroupAdd {
            id,
            group_id,
            user: "bob".into()
        }),
        Ok(RelayToClient::Group { invited: true, .. })
    ));
    let before = net.stored_messages();
    let mut carol = session(&net, "carol");
    // An outsider can neither send to the group nor see who is in it.
    let reply = request(&mut carol, |id| ClientToRelay::Send {
        id,
        to: None,
        group_id: Some(group_id),
        body: "let me in".into(),
    });
    assert_eq!(refused(reply), ErrorCode::NotMember);
    let reply = request(&mut carol, |id| ClientToRelay::GroupMembers {
        id,
        group_id,
    });
    assert_eq!(refused(reply), ErrorCode::NotMember);
    let reply = request(&mut carol, |id| ClientToRelay::GroupAdd {
        id,
        group_id,
        user: "carol".into(),
    });
    assert_eq!(refused(reply), ErrorCode::NotMember);
    assert_eq!(
        net.stored_messages(),
        before,
        "nothing stored for an outsider"
    );
    // A member without the admin role cannot add, remove or promote.
    let mut bob = session(&net, "bob");
    assert!(matches!(
        request(&mut bob, |id| ClientToRelay::GroupAccept { id, group_id }),
        Ok(RelayToClient::Group { group, .. }) if group.role == "member"
    ));
    let reply = request(&mut bob, |id| ClientToRelay::GroupAdd {
        id,
        group_id,
        user: "carol".into(),
    });
    assert_eq!(refused(reply), ErrorCode::NotAdmin);
    let reply = request(&mut bob, |id| ClientToRelay::GroupRemove {
        id,
        group_id,
        user: "alice".into(),
    });
    assert_eq!(refused(reply), ErrorCode::NotAdmin);
    let reply = request(&mut bob, |id| ClientToRelay::GroupPromote {
        id,
        group_id,
        user: "bob".into(),
    });
    assert_eq!(refused(reply), ErrorCode::NotAdmin);
    // The group is as it was: alice (admin) and bob.
    match request(&mut alice, |id| ClientToRelay::GroupMembers {
        id,
        group_id,
    }) {
        Ok(RelayToClient::Members { members, .. }) => {
            let who: Vec<(String, String)> =
                members.into_iter().map(|m| (m.user, m.role)).collect();
            assert_eq!(
                who,
                vec![
                    ("alice".to_string(), "admin".to_string()),
                    ("bob".to_string(), "member".to_string())
                ]
            );
        }
        other => panic!("{other:?}"),
    }
}

fn bad_ticket(result: Result<RelayLink, ClientError>) {
    match result {
        Err(ClientError::Refused {
            code: ErrorCode::BadTicket,
            ..
        }) => {}
        Err(e) => panic!("expected bad_ticket, got {e:?}"),
        Ok(_) => panic!("expected bad_ticket, got a session"),
    }
}

#[test]
fn tickets_cannot_be_reused_forged_or_handed_to_another_user() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    // Reused: a ticket works once.
    let r = redirect(&net, "alice");
    let first = RelayLink::connect(&r, true).unwrap();
    bad_ticket(RelayLink::connect(&r, true));
    drop(first);
    // Handed over: alice's ticket presented for bob.
    let mut r = redirect(&net, "alice");
    r.user = "bob".into();
    bad_ticket(RelayLink::connect(&r, true));
    // Forged: a made-up ticket, for a real user.
    let mut forged = redirect(&net, "alice");
    forged.ticket = "0123456789abcdef0123456789abcdef".into();
    bad_ticket(RelayLink::connect(&forged, true));
    // A refused ticket is used up all the same: the handed-over one above cannot now
    // serve alice either.
    let mut back = r.clone();
    back.user = "alice".into();
    bad_ticket(RelayLink::connect(&back, true));
}

#[test]
fn control_ports_refuse_anyone_without_the_cluster_secret() {
    let net = TestNet::start();
    let mesh_addr = net
        .relay(0)
        .wait_for("listening for relays on", Duration::from_secs(5));
    let wrong = [7u8; 32];
    for addr in [net.auth_relay_addr.as_str(), mesh_addr.as_str()] {
        let link = Link::connect(
            addr,
            Role::PskInitiator(&wrong),
            1 << 16,
            Duration::from_secs(5),
        );
        assert!(link.is_err(), "{addr} refused a link without the secret");
    }
    // The servers go on: the relay is still in rotation and serves a login.
    net.register("alice");
    let _alice = session(&net, "alice");
}

#[test]
fn a_relay_takes_a_resumption_credential_only_for_its_user_and_until_revoked() {
    let net = TestNet::with(Settings {
        extra_relay_args: vec!["--resume-failures-per-addr".into(), "6".into()],
        ..Settings::default()
    });
    for u in ["alice", "bob"] {
        net.register(u);
    }
    let login = redirect(&net, "alice");
    let (credential, _) = login
        .credential
        .clone()
        .expect("a password login mints one");
    assert!(
        login.relays.iter().any(|r| r.addr == login.relay_addr),
        "the relays listed for failover include the one logged in to"
    );
    let relay = &login.relays[0];
    // The credential opens a session as its user, with no ticket and no auth server.
    let mut alice = RelayLink::resume(relay, "alice", &credential, true).unwrap();
    assert_eq!(alice.user, "alice");
    assert!(matches!(
        send_to(&mut alice, "bob", "resumed"),
        RelayToClient::Sent { .. }
    ));
    // Not for another user, not made up, and a ticket is no credential.
    for (user, secret) in [
        ("bob", credential.clone()),
        ("alice", "0".repeat(64)),
        ("alice", login.ticket.clone()),
        ("alice", "x".repeat(10_000)),
        ("no such user!", credential.clone()),
    ] {
        let refused = refusal(RelayLink::resume(relay, user, &secret, true));
        assert_eq!(refused, ErrorCode::BadCredentials, "{user}");
    }
    // Revoked at the auth server: no relay takes it any more.
    let mut auth = AuthLink::connect(&net.auth_addr, &net.home.join("raw")).unwrap();
    auth.logout("alice", &credential).unwrap();
    for relay in &login.relays {
        let refused = refusal(RelayLink::resume(relay, "alice", &credential, true));
        assert_eq!(refused, ErrorCode::BadCredentials);
    }
    // Six refusals from this address: now even a good credential is turned away
    // without a lookup, with the time to wait.
    let fresh = redirect(&net, "alice").credential.unwrap().0;
    match RelayLink::resume(relay, "alice", &fresh, true) {
        Err(ClientError::Refused {
            code: ErrorCode::RateLimited,
            retry_after_ms: Some(ms),
            ..
        }) => assert!(ms > 0),
        Err(other) => panic!("expected rate_limited, got {other}"),
        Ok(_) => panic!("expected rate_limited, got through"),
    }
}
