//! Benchmarks of the per-message work both ends do: frame encoding and decoding, JSON
//! parsing of protocol frames, and Noise sealing and opening; and of the per-login
//! work: the two Noise handshakes of a login (NX with the auth server, NK with the
//! relay), each side's share measured separately.
//!
//! `cargo bench -p fastchat-common`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fastchat_common::frame::{encode_into, FrameBuffer, DEFAULT_MAX_FRAME};
use fastchat_common::noise::{NoiseCodec, Role, StaticKeypair};
use fastchat_common::proto::{parse, ClientToRelay, Message, RelayToClient};
use std::hint::black_box;

fn msg_frame() -> RelayToClient {
    RelayToClient::Msg(Message {
        msg_id: 123_456_789,
        from: "alice".into(),
        group_id: None,
        group: None,
        body: "x".repeat(360),
        ts: 1_795_568_656_123,
        event: None,
    })
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    let frame = msg_frame();
    g.bench_function("encode msg (360 B body)", |b| {
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            out.clear();
            encode_into(black_box(&frame), &mut out);
        })
    });
    let mut wire = Vec::new();
    encode_into(&frame, &mut wire);
    g.bench_function("decode + parse msg", |b| {
        let mut fb = FrameBuffer::new(DEFAULT_MAX_FRAME);
        b.iter(|| {
            fb.extend(black_box(&wire));
            let json = fb.next_frame().unwrap().unwrap();
            black_box(parse::<RelayToClient>(json).unwrap());
        })
    });
    let send = serde_json::to_vec(&ClientToRelay::Send {
        id: 42,
        to: Some("bob".into()),
        group_id: None,
        body: "x".repeat(360),
    })
    .unwrap();
    g.bench_function("parse send", |b| {
        b.iter(|| black_box(parse::<ClientToRelay>(black_box(&send)).unwrap()))
    });
    g.finish();
}

fn noise(c: &mut Criterion) {
    let kp = StaticKeypair::generate();
    let (mut io, mut ro) = (Vec::new(), Vec::new());
    let mut client = NoiseCodec::new(Role::NkInitiator(&kp.public), 1 << 20, &mut io).unwrap();
    let mut server = NoiseCodec::new(Role::NkResponder(&kp), 1 << 20, &mut ro).unwrap();
    server.receive(&io, &mut ro).unwrap();
    client.receive(&ro, &mut io).unwrap();
    assert!(client.is_ready() && server.is_ready());
    let frame = msg_frame();

    let mut g = c.benchmark_group("noise");
    g.throughput(Throughput::Elements(1));
    g.bench_function("seal one msg frame", |b| {
        let mut wire = Vec::with_capacity(2048);
        b.iter(|| {
            wire.clear();
            client.queue(black_box(&frame));
            client.seal(&mut wire).unwrap();
        })
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("seal 100 msg frames coalesced", |b| {
        let mut wire = Vec::with_capacity(64 * 1024);
        b.iter(|| {
            wire.clear();
            for _ in 0..100 {
                client.queue(black_box(&frame));
            }
            client.seal(&mut wire).unwrap();
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("seal + open + parse one msg", |b| {
        let mut wire = Vec::with_capacity(2048);
        let mut sink = Vec::new();
        b.iter(|| {
            wire.clear();
            client.queue(&frame);
            client.seal(&mut wire).unwrap();
            server.receive(&wire, &mut sink).unwrap();
            let json = server.next_frame().unwrap().unwrap();
            black_box(parse::<RelayToClient>(json).unwrap());
        })
    });
    g.finish();
}

/// One side of a full handshake: both sides run it, the side not measured is run
/// outside the timing by handing its messages over.
fn handshakes(c: &mut Criterion) {
    let kp = StaticKeypair::generate();
    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    // A whole handshake, both sides (what one login costs the two ends together).
    for (name, pattern) in [
        ("NX (client to auth), both sides", 0),
        ("NK (client to relay), both sides", 1),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let (mut io, mut ro) = (Vec::new(), Vec::new());
                let (mut client, mut server) = if pattern == 0 {
                    (
                        NoiseCodec::new(Role::NxInitiator, 1 << 16, &mut io).unwrap(),
                        NoiseCodec::new(Role::NxResponder(&kp), 1 << 16, &mut ro).unwrap(),
                    )
                } else {
                    (
                        NoiseCodec::new(Role::NkInitiator(&kp.public), 1 << 16, &mut io).unwrap(),
                        NoiseCodec::new(Role::NkResponder(&kp), 1 << 16, &mut ro).unwrap(),
                    )
                };
                server.receive(&io, &mut ro).unwrap();
                client.receive(&ro, &mut io).unwrap();
                black_box(client.is_ready() && server.is_ready())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, frames, noise, handshakes);
criterion_main!(benches);
