//! Property tests of what the client reads from other people: the end-to-end envelope
//! in a message body, the tokens and offers inside it, peers' public keys, and file
//! names in file offers.
//!
//! Like `common/tests/fuzz_wire.rs` (see there): arbitrary and mutated input must give
//! an error, never a panic; a token or an offer that opens must be exactly what was
//! sealed; valid envelopes survive encode → decode unchanged. `scripts/fuzz.sh` runs
//! these with many more cases. Failures are saved in
//! `client/proptest-regressions/fuzz_e2e.txt` and replayed first by later runs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use fastchat_client::e2e::{self, ConversationKey, Envelope, Identity, PeerKey, TextPayload};
use fastchat_client::files::safe_name;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::Value;
use std::path::{Component, Path};
use std::sync::OnceLock;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/fuzz_e2e.txt",
        ))),
        ..ProptestConfig::default()
    }
}

/// Any string, control characters, quotes and non-ASCII included.
fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("(?s).{{0,{max}}}")).expect("a valid regex")
}

fn identity() -> &'static Identity {
    static ID: OnceLock<Identity> = OnceLock::new();
    ID.get_or_init(|| Identity::generate().expect("an RSA key pair"))
}

fn conversation_key() -> &'static ConversationKey {
    static KEY: OnceLock<ConversationKey> = OnceLock::new();
    KEY.get_or_init(ConversationKey::generate)
}

/// A valid offer from `alice` to `bob` (both this identity), made once.
fn offer() -> &'static (String, String, String) {
    static OFFER: OnceLock<(String, String, String)> = OnceLock::new();
    OFFER.get_or_init(|| {
        let me = identity();
        match e2e::make_offer(me, "alice", "bob", me.peer_key(), conversation_key()) {
            Ok(Envelope::Offer {
                key_id,
                wrapped,
                sig,
                ..
            }) => (key_id, wrapped, sig),
            other => panic!("make_offer gave {other:?}"),
        }
    })
}

fn hex_id(len: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[0-9a-f]{{{len}}}")).expect("a valid regex")
}

/// Envelopes of every type with valid key ids and arbitrary contents.
fn envelope() -> impl Strategy<Value = Envelope> {
    (
        0usize..4,
        hex_id(16),
        text(40),
        text(40),
        any::<i64>(),
        any::<i32>(),
    )
        .prop_map(|(kind, key_id, a, b, group_id, epoch)| match kind {
            0 => Envelope::Offer {
                v: e2e::ENVELOPE_VERSION,
                key_id,
                wrapped: a,
                sig: b,
            },
            1 => Envelope::Text {
                v: e2e::ENVELOPE_VERSION,
                key_id,
                token: a,
            },
            2 => Envelope::GroupText {
                v: e2e::ENVELOPE_VERSION,
                group_id,
                key_id,
                epoch,
                token: a,
            },
            _ => Envelope::Receipt {
                v: e2e::ENVELOPE_VERSION,
                key_id,
                token: a,
            },
        })
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        hex_id(16).prop_map(Value::String),
        text(20).prop_map(Value::String),
        Just(Value::Array(vec![])),
        Just(Value::Object(Default::default())),
    ]
}

/// A change to an envelope's JSON: which field (by index into the names below, or
/// removed) and its new value.
const ENVELOPE_FIELDS: [&str; 8] = [
    "type", "v", "key_id", "wrapped", "sig", "token", "group_id", "epoch",
];

/// Replaces one character of `s` (by position) with `c`; `s` unchanged when empty.
fn replace_char(s: &str, at: usize, c: char) -> String {
    let n = s.chars().count();
    if n == 0 {
        return s.to_string();
    }
    s.chars()
        .enumerate()
        .map(|(i, x)| if i == at % n { c } else { x })
        .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_envelope_arbitrary_bodies(body in text(300)) {
        if let Ok(env) = Envelope::from_body(&body) {
            prop_assert_eq!(env.version(), e2e::ENVELOPE_VERSION);
            prop_assert_eq!(Envelope::from_body(&env.to_body()).ok(), Some(env));
        }
    }

    #[test]
    fn fuzz_envelope_round_trip_and_mutations(
        env in envelope(),
        changes in proptest::collection::vec((0usize..8, proptest::option::of(json_leaf())), 0..4),
    ) {
        prop_assert_eq!(Envelope::from_body(&env.to_body()).ok(), Some(env.clone()));
        let mut value = serde_json::to_value(&env).expect("envelopes serialise");
        let obj = value.as_object_mut().expect("an envelope is a JSON object");
        for (field, new) in changes {
            match new {
                Some(v) => obj.insert(ENVELOPE_FIELDS[field].into(), v),
                None => obj.remove(ENVELOPE_FIELDS[field]),
            };
        }
        let body = value.to_string();
        match Envelope::from_body(&body) {
            Ok(parsed) => {
                prop_assert_eq!(parsed.version(), e2e::ENVELOPE_VERSION);
                prop_assert!(parsed.key_id().len() == 16);
                prop_assert_eq!(Envelope::from_body(&parsed.to_body()).ok(), Some(parsed));
            }
            Err(e) => prop_assert!(matches!(e, e2e::E2eError::BadPayload(_)), "{e:?}"),
        }
    }

    #[test]
    fn fuzz_open_tokens(
        token in prop_oneof![text(200), "[A-Za-z0-9_=-]{0,200}"],
        text_in in text(60),
        at in any::<usize>(),
        c in any::<char>(),
        nonce in any::<[u8; 16]>(),
        index in any::<u32>(),
    ) {
        let key = conversation_key();
        // Random tokens never open.
        prop_assert!(e2e::open_text(key, &token).is_err());
        prop_assert!(e2e::open_receipt(key, &token).is_err());
        prop_assert!(e2e::open_chunk(&key.key, &nonce, index, index, &token).is_err());
        // A genuine token with one character changed opens as itself or not at all.
        let payload = TextPayload {
            group_key: None,
            file: None,
            mid: e2e::new_message_id(),
            ts: 1,
            text: text_in,
        };
        let Envelope::Text { token: good, .. } = e2e::seal_text(key, &payload).expect("sealing") else {
            panic!("seal_text makes a text envelope");
        };
        let bad = replace_char(&good, at, c);
        if let Ok(opened) = e2e::open_text(key, &bad) {
            prop_assert_eq!(opened, payload);
        }
        let chunk = e2e::seal_chunk(&key.key, &nonce, index, index, b"data").expect("sealing");
        let bad = replace_char(&chunk, at, c);
        if let Ok(opened) = e2e::open_chunk(&key.key, &nonce, index, index, &bad) {
            prop_assert_eq!(opened, b"data".to_vec());
        }
        // With a key that is not a Fernet key: an error, not a panic.
        let odd = ConversationKey { id: key.id.clone(), key: token.clone() };
        prop_assert!(e2e::open_text(&odd, &good).is_err() || odd.key == key.key);
    }

    #[test]
    fn fuzz_open_any_plaintext(
        plain in proptest::collection::vec(any::<u8>(), 0..300),
        json_text in text(100),
        nonce in any::<[u8; 16]>(),
        index in any::<u32>(),
    ) {
        // Authentic tokens (the key is right) around arbitrary plaintext: the payload
        // parsers must refuse what is not theirs.
        let key = conversation_key();
        let fernet = fernet::Fernet::new(&key.key).expect("a generated key is a Fernet key");
        for p in [plain.clone(), json_text.into_bytes()] {
            let token = fernet.encrypt(&p);
            if let Ok(t) = e2e::open_text(key, &token) {
                prop_assert_eq!(t.mid.len(), 32);
            }
            if let Ok(r) = e2e::open_receipt(key, &token) {
                prop_assert_eq!(r.mid.len(), 32);
            }
            if let Ok(data) = e2e::open_chunk(&key.key, &nonce, index, index.wrapping_add(1), &token) {
                prop_assert_eq!(&p[..16], &nonce[..]);
                prop_assert_eq!(&p[24..], &data[..]);
            }
        }
    }

    #[test]
    fn fuzz_open_offer(
        field in 0usize..5,
        at in any::<usize>(),
        c in any::<char>(),
        random in text(600),
    ) {
        let me = identity();
        let (key_id, wrapped, sig) = offer();
        let mut args = [
            "alice".to_string(),
            "bob".to_string(),
            key_id.clone(),
            wrapped.clone(),
            sig.clone(),
        ];
        let genuine = args.clone();
        args[field] = replace_char(&args[field], at, c);
        let open = |a: &[String; 5]| e2e::open_offer(me, &a[0], &a[1], me.peer_key(), &a[2], &a[3], &a[4]);
        match open(&args) {
            Ok(key) => {
                prop_assert_eq!(&args, &genuine, "an altered offer opened");
                prop_assert_eq!(&key, conversation_key());
            }
            Err(_) => prop_assert_ne!(&args, &genuine),
        }
        // Entirely random wrapped keys and signatures.
        args = genuine.clone();
        args[3 + field % 2] = random.clone();
        prop_assert!(open(&args).is_err() || args == genuine);
        args[3 + field % 2] = STANDARD.encode(random.as_bytes());
        prop_assert!(open(&args).is_err() || args == genuine);
    }

    #[test]
    fn fuzz_peer_keys(pem in text(600), at in any::<usize>(), c in any::<char>()) {
        let _ = PeerKey::from_pem(&pem);
        let genuine = identity().public_pem();
        let altered = replace_char(&genuine, at, c);
        if let Ok(k) = PeerKey::from_pem(&altered) {
            prop_assert_eq!(PeerKey::from_pem(k.pem()).ok(), Some(k));
        }
        let _ = Identity::from_pkcs8_der(pem.as_bytes());
        let _ = e2e::safety_number(&pem, &genuine);
    }

    #[test]
    fn fuzz_file_names_stay_inside(name in text(300)) {
        let safe = safe_name(&name);
        prop_assert!(!safe.is_empty() && safe.len() <= 120);
        prop_assert!(!safe.starts_with('.'));
        prop_assert!(!safe.chars().any(|c| c.is_control() || c == '/' || c == '\\'));
        let joined = Path::new("downloads").join(&safe);
        prop_assert_eq!(joined.parent(), Some(Path::new("downloads")));
        prop_assert!(matches!(joined.components().next_back(), Some(Component::Normal(_))));
    }
}
