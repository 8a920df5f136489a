//! PostgreSQL's own ceiling for the message lifecycle, measured on the same cluster:
//! from several connections, insert a batch of ~200-byte rows (one multi-row statement,
//! one commit), then delete them by key (one statement, one commit) — what the relay
//! does for a message that is stored and later acknowledged.

use postgres::{Client, NoTls};
use std::time::{Duration, Instant};

/// Rows per second through insert + delete, with `threads` connections and batches of
/// `batch`, for `seconds`.
pub fn run(
    db_url: &str,
    seconds: f64,
    threads: usize,
    batch: usize,
) -> Result<f64, postgres::Error> {
    let mut admin = Client::connect(db_url, NoTls)?;
    admin.batch_execute(
        "DROP TABLE IF EXISTS load_ceiling;
         CREATE TABLE load_ceiling (
             recipient_id bigint NOT NULL, id bigserial NOT NULL, sender_id bigint NOT NULL,
             body text NOT NULL, sent_at_ms bigint NOT NULL, PRIMARY KEY (recipient_id, id))",
    )?;
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let totals: Vec<Result<u64, postgres::Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|t| {
                s.spawn(move || -> Result<u64, postgres::Error> {
                    let mut c = Client::connect(db_url, NoTls)?;
                    let body = "x".repeat(200);
                    let recipients: Vec<i64> = (0..batch as i64).map(|i| t as i64 * 1_000_000 + i).collect();
                    let senders = vec![1i64; batch];
                    let bodies = vec![body.as_str(); batch];
                    let stamps = vec![0i64; batch];
                    let mut rows = 0u64;
                    while Instant::now() < until {
                        let mut tx = c.transaction()?;
                        let ids: Vec<i64> = tx
                            .query(
                                "INSERT INTO load_ceiling (recipient_id, sender_id, body, sent_at_ms)
                                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $4::int8[])
                                 RETURNING id",
                                &[&recipients, &senders, &bodies, &stamps],
                            )?
                            .iter()
                            .map(|r| r.get(0))
                            .collect();
                        tx.commit()?;
                        let mut tx = c.transaction()?;
                        tx.execute(
                            "DELETE FROM load_ceiling l USING unnest($1::int8[], $2::int8[]) AS a(r, i)
                             WHERE l.recipient_id = a.r AND l.id = a.i",
                            &[&recipients, &ids],
                        )?;
                        tx.commit()?;
                        rows += batch as u64;
                    }
                    Ok(rows)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread"))
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut rows = 0;
    for t in totals {
        rows += t?;
    }
    admin.batch_execute("DROP TABLE IF EXISTS load_ceiling")?;
    Ok(rows as f64 / elapsed)
}
