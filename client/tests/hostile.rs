//! Hostile and broken input against running servers: each case gets an `error` frame
//! where the link allows one and a closed connection, and the servers go on serving
//! everyone else.

mod harness;

use fastchat_client::chat::Chat;
use fastchat_common::frame::encode_raw_into;
use fastchat_common::link::{Link, LinkError};
use fastchat_common::noise::Role;
use fastchat_common::proto::{AuthToClient, ErrorCode, RelayToClient};
use harness::{receive_n, TestNet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn relay_link(net: &TestNet) -> Link {
    let key = net.relay_key(0);
    Link::connect(
        &net.relay_addrs[0],
        Role::NkInitiator(&key),
        1 << 20,
        Duration::from_secs(5),
    )
    .unwrap()
}

fn auth_link(net: &TestNet) -> Link {
    Link::connect(
        &net.auth_addr,
        Role::NxInitiator,
        1 << 20,
        Duration::from_secs(5),
    )
    .unwrap()
}

fn deadline() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(10))
}

/// Reads frames until an error frame; returns its code, then checks the server closed.
fn error_then_close<T: serde::de::DeserializeOwned>(
    link: &mut Link,
    code_of: impl Fn(&T) -> Option<ErrorCode>,
) -> ErrorCode {
    loop {
        let frame = link
            .recv::<T>(deadline())
            .expect("the server answers before closing")
            .expect("an error frame before the deadline");
        if let Some(code) = code_of(&frame) {
            match link.recv_json(deadline()) {
                Err(LinkError::Closed) | Err(LinkError::Io(_)) => return code,
                other => panic!("expected the connection to close, got {other:?}"),
            }
        }
    }
}

fn relay_error(f: &RelayToClient) -> Option<ErrorCode> {
    match f {
        RelayToClient::Error(e) => Some(e.code),
        _ => None,
    }
}

fn auth_error(f: &AuthToClient) -> Option<ErrorCode> {
    match f {
        AuthToClient::Error(e) => Some(e.code),
        _ => None,
    }
}

fn raw_frame(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_raw_into(json, &mut out);
    out
}

fn send_raw(link: &mut Link, bytes: &[u8]) {
    link.queue_raw_bytes(bytes);
    link.flush().unwrap();
}

/// The server closes a plain TCP connection that sent garbage.
fn garbage_is_dropped(addr: &str, garbage: &[u8]) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(garbage).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("server did not close after garbage: {e}"),
        }
    }
}

fn normal_exchange_works(net: &TestNet, text: &str) {
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    alice.send_text("bob", text).unwrap();
    let mut bob = net.login("bob");
    let got = receive_n(&mut bob, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, text);
}

#[test]
fn relay_survives_bad_input() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    // A healthy session stays up through everything below.
    let mut bystander = Chat::login(&net.opts("bob"), true).unwrap();

    garbage_is_dropped(
        &net.relay_addrs[0],
        b"\x00\x05hello this is not noise at all",
    );
    // A peer that never completes anything is closed at the deadline (3 s in tests).
    garbage_is_dropped(&net.relay_addrs[0], b"GET / HTTP/1.1\r\n\r\n");
    garbage_is_dropped(&net.relay_addrs[0], &[0xff; 70_000]);

    // A handshake for another key fails.
    let wrong = fastchat_common::noise::StaticKeypair::generate();
    assert!(Link::connect(
        &net.relay_addrs[0],
        Role::NkInitiator(&wrong.public),
        1 << 20,
        Duration::from_secs(5)
    )
    .is_err());

    // Over-long frame.
    let mut link = relay_link(&net);
    send_raw(&mut link, &(10_000_000u32).to_be_bytes());
    assert_eq!(
        error_then_close(&mut link, relay_error),
        ErrorCode::FrameTooLong
    );

    // Invalid JSON, unknown tag, wrong fields.
    for (bytes, code) in [
        (&b"{this is not json"[..], ErrorCode::BadJson),
        (&b"\xff\xfe\xfd"[..], ErrorCode::BadJson),
        (&br#"{"t":"launch_missiles"}"#[..], ErrorCode::UnknownTag),
        (
            &br#"{"t":"hello","version":"one"}"#[..],
            ErrorCode::BadFrame,
        ),
        (&br#"{"no_tag":1}"#[..], ErrorCode::BadFrame),
    ] {
        let mut link = relay_link(&net);
        send_raw(&mut link, &raw_frame(bytes));
        assert_eq!(error_then_close(&mut link, relay_error), code, "{bytes:?}");
    }

    // Frames that do not fit the state: a send before hello, a send before auth,
    // a second hello, an unsupported version.
    for frames in [
        vec![&br#"{"t":"send","id":1,"to":"bob","body":"x"}"#[..]],
        vec![
            &br#"{"t":"hello","version":2}"#[..],
            &br#"{"t":"send","id":1,"to":"bob","body":"x"}"#[..],
        ],
        vec![
            &br#"{"t":"hello","version":2}"#[..],
            &br#"{"t":"hello","version":2}"#[..],
        ],
        vec![&br#"{"t":"auth","user":"bob","ticket":"00"}"#[..]],
    ] {
        let mut link = relay_link(&net);
        let bytes: Vec<u8> = frames.iter().flat_map(|f| raw_frame(f)).collect();
        send_raw(&mut link, &bytes);
        assert_eq!(
            error_then_close(&mut link, relay_error),
            ErrorCode::BadState
        );
    }
    let mut link = relay_link(&net);
    send_raw(&mut link, &raw_frame(br#"{"t":"hello","version":99}"#));
    assert_eq!(
        error_then_close(&mut link, relay_error),
        ErrorCode::BadVersion
    );

    // Garbage after a good handshake: a Noise message that does not decrypt.
    let mut link = relay_link(&net);
    link.write_raw_wire(b"\x00\x200123456789abcdef0123456789abcdef")
        .unwrap();
    assert!(matches!(
        link.recv_json(deadline()),
        Err(LinkError::Closed) | Err(LinkError::Io(_))
    ));

    // A frame split across many writes still works (not an error).
    let mut link = relay_link(&net);
    let hello = raw_frame(br#"{"t":"hello","version":2}"#);
    for b in &hello {
        send_raw(&mut link, &[*b]);
    }
    assert!(matches!(
        link.recv::<RelayToClient>(deadline()).unwrap(),
        Some(RelayToClient::Hello { .. })
    ));

    normal_exchange_works(&net, "still working");
    // The bystander session saw nothing of it and still receives. (It shares bob's
    // store with the session above, which showed "still working" first: one of a
    // user's processes shows a message.)
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    alice.send_text("bob", "for the bystander").unwrap();
    let got = receive_n(&mut bystander, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, "for the bystander");
}

#[test]
fn auth_server_survives_bad_input() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");

    garbage_is_dropped(&net.auth_addr, b"\x00\x03abc\x00\x00\xff\xff");
    garbage_is_dropped(
        &net.auth_relay_addr,
        &[0x00, 0x30]
            .iter()
            .copied()
            .chain([9u8; 48])
            .collect::<Vec<_>>(),
    );
    garbage_is_dropped(&net.auth_relay_addr, b"GET / HTTP/1.1\r\n\r\n");

    let mut link = auth_link(&net);
    send_raw(&mut link, &(1u32 << 31).to_be_bytes());
    assert_eq!(
        error_then_close(&mut link, auth_error),
        ErrorCode::FrameTooLong
    );

    for (frames, code) in [
        (vec![&b"[[[["[..]], ErrorCode::BadJson),
        (vec![&br#"{"t":"format_disk"}"#[..]], ErrorCode::UnknownTag),
        (
            vec![&br#"{"t":"login","id":1,"user":"alice","password":"x"}"#[..]],
            ErrorCode::BadState,
        ),
        (
            vec![
                &br#"{"t":"hello","version":2}"#[..],
                &br#"{"t":"login","id":"one"}"#[..],
            ],
            ErrorCode::BadFrame,
        ),
    ] {
        let mut link = auth_link(&net);
        let bytes: Vec<u8> = frames.iter().flat_map(|f| raw_frame(f)).collect();
        send_raw(&mut link, &bytes);
        assert_eq!(error_then_close(&mut link, auth_error), code);
    }

    // Registration input is checked, without closing the connection.
    let mut link = auth_link(&net);
    send_raw(&mut link, &raw_frame(br#"{"t":"hello","version":2}"#));
    for (frame, code) in [
        (
            &br#"{"t":"register","id":1,"user":"Bad Name","password":"longenough","pubkey":"x"}"#[..],
            ErrorCode::InvalidName,
        ),
        (
            &br#"{"t":"register","id":2,"user":"carol","password":"short","pubkey":"x"}"#[..],
            ErrorCode::WeakPassword,
        ),
        (
            &br#"{"t":"register","id":3,"user":"carol","password":"longenough","pubkey":"x"}"#[..],
            ErrorCode::BadKey,
        ),
    ] {
        send_raw(&mut link, &raw_frame(frame));
        loop {
            match link.recv::<AuthToClient>(deadline()).unwrap().unwrap() {
                AuthToClient::Error(e) => {
                    assert_eq!(e.code, code);
                    break;
                }
                AuthToClient::Hello { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    // A relay control link without the cluster secret fails its handshake.
    let wrong = [7u8; 32];
    let attempt = Link::connect(
        &net.auth_relay_addr,
        Role::PskInitiator(&wrong),
        1 << 20,
        Duration::from_secs(5),
    );
    assert!(attempt.is_err(), "a control link needs the cluster secret");

    normal_exchange_works(&net, "auth still working");
}

#[test]
fn random_frames_never_hurt_the_relay() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let tags = [
        "hello", "auth", "send", "ack", "key", "ping", "msg", "", "x",
    ];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..40 {
        let mut link = relay_link(&net);
        let mut bytes = Vec::new();
        for _ in 0..(next() % 6) {
            let tag = tags[(next() % tags.len() as u64) as usize];
            let json = match next() % 4 {
                0 => format!(r#"{{"t":"{tag}","version":2}}"#),
                1 => format!(
                    r#"{{"t":"{tag}","id":{},"to":"bob","body":"{}"}}"#,
                    next(),
                    "b".repeat((next() % 100) as usize)
                ),
                2 => format!(r#"{{"t":"{tag}","msg_ids":[{}, -1]}}"#, next() as i64),
                _ => (0..(next() % 40))
                    .map(|_| (next() % 95 + 32) as u8 as char)
                    .collect(),
            };
            bytes.extend(raw_frame(json.as_bytes()));
        }
        send_raw(&mut link, &bytes);
        // Whatever the server answers, it must not crash.
        let _ = link.recv_json(Some(Instant::now() + Duration::from_millis(200)));
    }
    normal_exchange_works(&net, "after the noise");
}
