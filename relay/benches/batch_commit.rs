//! The relay's batch commit against a real PostgreSQL: a worker storing a batch of
//! direct messages (ids, multi-row insert, commit, presence lookup), then the
//! recipient's acknowledgement of them (delete, commit) — the message lifecycle.
//!
//! Needs a database: `FASTCHAT_DB_URL="$(scripts/pg.sh url)" cargo bench -p fastchat-relay`
//! (with `scripts/run.sh` or `scripts/pg.sh start` running). Without it, it says so and
//! measures nothing.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fastchat_common::pool::Completions;
use fastchat_relay::message::Target;
use fastchat_relay::worker::{Done, Job, StoreMetrics, Worker};
use mio::{Poll, Token, Waker};
use std::sync::Arc;

fn lifecycle(c: &mut Criterion) {
    let Ok(url) = std::env::var("FASTCHAT_DB_URL") else {
        eprintln!("batch_commit: set FASTCHAT_DB_URL to a FastChat database to run this benchmark");
        return;
    };
    let db = fastchat_common::db::connect(
        &url,
        2,
        std::time::Duration::from_millis(fastchat_common::db::DEFAULT_TIMEOUT_MS),
    )
    .expect("connecting to FASTCHAT_DB_URL");
    fastchat_common::db::migrate(&mut db.get().expect("a connection")).expect("migrating");
    let mut conn = db.get().expect("a connection");
    let mut ids = Vec::new();
    for name in ["bench_sender", "bench_recipient"] {
        let row = conn
            .query_one(
                "INSERT INTO users (name, password_hash, pubkey) VALUES ($1, 'x', 'x')
                 ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
                &[&name],
            )
            .expect("bench users");
        ids.push(row.get::<_, i64>(0));
    }
    drop(conn);
    let (sender, recipient) = (ids[0], ids[1]);
    let poll = Poll::new().expect("poll");
    let waker = Arc::new(Waker::new(poll.registry(), Token(0)).expect("waker"));
    let (done, done_rx) = Completions::new(waker);
    let mut worker = Worker::new(
        db,
        "bench-relay".into(),
        done,
        Arc::new(StoreMetrics::default()),
        fastchat_relay::worker::groups::Limits {
            invitations: 100,
            group_size: 256,
            groups_per_user: i64::MAX,
        },
        fastchat_relay::worker::StoreLimits {
            max_pending: i64::MAX,
            max_pending_bytes: i64::MAX,
            max_stored_bytes: i64::MAX,
        },
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let body = "x".repeat(360);
    let mut g = c.benchmark_group("batch_commit");
    for batch in [1usize, 16, 100, 256] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::new("store+ack", batch), &batch, |b, &batch| {
            b.iter(|| {
                let jobs = (0..batch)
                    .map(|i| Job::Send {
                        conn: Token(1),
                        req: i as u64,
                        sender_id: sender,
                        sender: "bench_sender".into(),
                        target: Target::User("bench_recipient".into()),
                        body: body.clone(),
                        hold: false,
                        behind: false,
                    })
                    .collect();
                worker.run_batch(jobs);
                let mut stored = Vec::new();
                while let Ok(d) = done_rx.try_recv() {
                    if let Done::Sent { msg_id, .. } = d {
                        stored.push(msg_id);
                    }
                }
                assert_eq!(stored.len(), batch, "every message stored");
                worker.run_batch(vec![Job::Ack {
                    conn: Token(1),
                    user_id: recipient,
                    msg_ids: stored,
                }]);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, lifecycle);
criterion_main!(benches);
