//! Benchmarks of the end-to-end work a client does per message: sealing and opening a
//! Fernet text, and (per conversation) making and opening a key offer.
//!
//! `cargo bench -p fastchat-client`

use criterion::{criterion_group, criterion_main, Criterion};
use fastchat_client::e2e::{self, ConversationKey, Envelope, Identity, TextPayload};
use std::hint::black_box;

fn e2e(c: &mut Criterion) {
    let key = ConversationKey::generate();
    let payload = TextPayload {
        group_key: None,
        file: None,
        mid: e2e::new_message_id(),
        ts: 1_795_568_656_123,
        text: "x".repeat(200),
    };
    let mut g = c.benchmark_group("e2e");
    g.bench_function("seal 200 B text", |b| {
        b.iter(|| black_box(e2e::seal_text(&key, black_box(&payload)).unwrap().to_body()))
    });
    let body = e2e::seal_text(&key, &payload).unwrap().to_body();
    g.bench_function("open 200 B text", |b| {
        b.iter(|| {
            let Envelope::Text { token, .. } = Envelope::from_body(black_box(&body)).unwrap()
            else {
                unreachable!()
            };
            black_box(e2e::open_text(&key, &token).unwrap())
        })
    });
    let alice = Identity::generate().unwrap();
    let bob = Identity::generate().unwrap();
    g.sample_size(20);
    g.bench_function("make offer (RSA-OAEP + PSS sign)", |b| {
        b.iter(|| black_box(e2e::make_offer(&alice, "alice", "bob", bob.peer_key(), &key).unwrap()))
    });
    let Envelope::Offer {
        key_id,
        wrapped,
        sig,
        ..
    } = e2e::make_offer(&alice, "alice", "bob", bob.peer_key(), &key).unwrap()
    else {
        unreachable!()
    };
    g.bench_function("open offer (PSS verify + RSA-OAEP)", |b| {
        b.iter(|| {
            black_box(
                e2e::open_offer(
                    &bob,
                    "alice",
                    "bob",
                    alice.peer_key(),
                    &key_id,
                    &wrapped,
                    &sig,
                )
                .unwrap(),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, e2e);
criterion_main!(benches);
