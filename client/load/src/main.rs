//! `fastchat-load`: drives simulated users through the real protocol, the real Noise
//! transport and the real end-to-end encryption against a running cluster, and reports
//! throughput, latency, losses and what the servers spent (CPU, memory).
//!
//! Layout: [`setup`] (accounts and sessions), [`driver`] (the mio traffic loop),
//! [`hold`] (idle sessions held by child processes), [`chaos`] (people on the client
//! library through server faults, and the audit), [`procstat`] (server CPU and
//! memory from /proc), [`pgceiling`] (PostgreSQL's own ceiling for the message
//! lifecycle).

mod abuse;
mod acklog;
mod chaos;
mod driver;
mod hold;
mod pgceiling;
mod procstat;
mod setup;

use clap::{Parser, Subcommand};
use driver::{quantile_ms, Driver, Outcome, Pace, To};
use fastchat_client::connect::{AuthLink, RelayLink};
use fastchat_client::e2e::{ConversationKey, Identity};
use fastchat_client::error::ClientError;
use fastchat_common::proto::{ClientToRelay, RelayToClient};
use setup::{Target, User};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Load tester for FastChat.
#[derive(Parser, Debug)]
#[command(name = "fastchat-load", version)]
struct Cli {
    /// The auth server.
    #[arg(
        long,
        global = true,
        env = "FASTCHAT_SERVER",
        default_value = "127.0.0.1:7400"
    )]
    server: String,
    /// The cluster's home (run/*.pid, PostgreSQL's location) for server CPU and memory.
    #[arg(
        long,
        global = true,
        env = "FASTCHAT_HOME",
        default_value = ".fastchat"
    )]
    home: PathBuf,
    /// Threads that log simulated users in.
    #[arg(long, global = true, default_value_t = 8)]
    setup_threads: usize,
    /// Only the JSON line, no table.
    #[arg(long, global = true)]
    json: bool,
    /// Acknowledge messages without writing their ids to disk first. By default the
    /// simulated recipients append what they acknowledge to a file and sync it once
    /// per poll turn before sending the acks (an ack can be what makes a message
    /// durable); with this flag the figures say `"acks": "volatile"`.
    #[arg(long, global = true)]
    volatile_acks: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(clap::Args, Debug, Clone)]
struct Traffic {
    /// Simulated users (one session each).
    #[arg(long, default_value_t = 50)]
    users: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Open loop: messages per second in all. Without it: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Closed loop: messages each sender keeps waiting for `sent`.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Plaintext bytes per message.
    #[arg(long, default_value_t = 200)]
    size: usize,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Direct messages to random peers.
    Direct(Traffic),
    /// Direct messages, each user to the next one (a ring).
    Ring(Traffic),
    /// Group fan-out: each group's admin sends to the group.
    Group {
        /// Number of groups.
        #[arg(long, default_value_t = 2)]
        groups: usize,
        /// Members per group.
        #[arg(long, default_value_t = 100)]
        members: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 4)]
        window: usize,
        #[arg(long, default_value_t = 200)]
        size: usize,
    },
    /// Offline drain: messages queued for a user who then logs in and receives them.
    Drain {
        /// Messages queued.
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// Users filling the queue (each stays within the relays' send rate).
        #[arg(long, default_value_t = 50)]
        senders: usize,
    },
    /// Login storm: sessions opened through resumption credentials, in parallel.
    Logins {
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// Sessions per user.
        #[arg(long, default_value_t = 10)]
        sessions: usize,
        /// Threads logging in at once.
        #[arg(long, default_value_t = 32)]
        threads: usize,
        /// Present the credentials straight to the relays (round robin), as clients
        /// failing over do: one handshake per session and no auth server. Without it,
        /// each session resumes at the auth server and redeems its ticket.
        #[arg(long)]
        direct: bool,
    },
    /// Idle connections: hold sessions and report the relays' memory per connection.
    /// The sessions are spread over child processes (see `--per-process`), since one
    /// process may hold only as many sockets as its descriptor limit allows.
    Idle {
        #[arg(long, default_value_t = 50)]
        users: usize,
        /// Sessions per user.
        #[arg(long, default_value_t = 100)]
        sessions: usize,
        /// Seconds to hold them.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Threads (in each process) logging sessions in.
        #[arg(long, default_value_t = 32)]
        threads: usize,
        /// Most sessions one process holds; more are spread over more processes.
        #[arg(long, default_value_t = 8_000)]
        per_process: usize,
    },
    /// (Used by `idle`.) Reads the users (JSON, one line) from standard input, opens
    /// `count` sessions starting at session `from`, prints `ready`, and holds them until
    /// standard input closes.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        from: usize,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 32)]
        threads: usize,
    },
    /// Chaos: people on the real client library (failover, resends, local store)
    /// sending direct and group messages at a steady pace while `scripts/chaos.sh`
    /// breaks servers; then an audit: every message reported `sent` shown exactly once
    /// to each recipient. Exits non-zero on a loss or a duplicate.
    Chaos {
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// Seconds of sending.
        #[arg(long, default_value_t = 120.0)]
        seconds: f64,
        /// Messages per second, each person.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Seconds to wait for the last deliveries after sending stops.
        #[arg(long, default_value_t = 90.0)]
        drain: f64,
    },
    /// Abuse: normal direct traffic (open loop) while every flood of the abuse work runs
    /// at once, each from its own loopback address (see `scripts/abuse.sh`, which gives
    /// the cluster its default limits first). Reports the normal users' latency and
    /// password logins, what the attackers got, and the servers' CPU, memory and
    /// database growth.
    Abuse {
        #[arg(long, default_value_t = 20)]
        users: usize,
        /// Normal messages per second, in all.
        #[arg(long, default_value_t = 400.0)]
        rate: f64,
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// The normal traffic alone (the baseline).
        #[arg(long)]
        no_attack: bool,
        /// PostgreSQL connection string, for the database's growth.
        #[arg(long, env = "FASTCHAT_DB_URL")]
        db_url: Option<String>,
    },
    /// PostgreSQL's ceiling for the message lifecycle: batched insert, then batched
    /// delete, of ~200-byte rows, from several connections.
    PgCeiling {
        /// PostgreSQL connection string.
        #[arg(long, env = "FASTCHAT_DB_URL")]
        db_url: String,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 4)]
        threads: usize,
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
}

/// One line of results, printed as a table and as JSON.
struct Report {
    scenario: String,
    users: usize,
    outcome: Outcome,
    extra: serde_json::Value,
    servers: Vec<(String, procstat::Sample, procstat::Sample)>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(lost) => {
            eprintln!("fastchat-load: {lost} messages lost (or, for chaos, lost or shown twice)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("fastchat-load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn shared_key() -> ConversationKey {
    ConversationKey::generate()
}

fn run(cli: &Cli) -> Result<u64, Box<dyn std::error::Error>> {
    if let Scenario::PgCeiling {
        db_url,
        seconds,
        threads,
        batch,
    } = &cli.scenario
    {
        let rows = pgceiling::run(db_url, *seconds, *threads, *batch)?;
        let line = serde_json::json!({
            "scenario": "pg-ceiling", "threads": threads, "batch": batch,
            "rows_per_s": rows.round(),
        });
        if !cli.json {
            println!("PostgreSQL message lifecycle (insert then delete, batches of {batch}, {threads} connections): {rows:.0} rows/s");
        }
        println!("{line}");
        return Ok(0);
    }
    if let Scenario::Chaos {
        users,
        seconds,
        rate,
        drain,
    } = &cli.scenario
    {
        let audit = chaos::run(&chaos::Plan {
            server: cli.server.clone(),
            data_dir: cli.home.join("chaos"),
            users: *users,
            seconds: *seconds,
            rate: *rate,
            drain: *drain,
            setup_threads: cli.setup_threads,
            progress: !cli.json,
        })?;
        if !cli.json {
            println!(
                "chaos: {} people; sent {} (failed {}); deliveries expected {}, shown {}; lost {}; shown twice {}; shown without a confirmed send {}; failovers {}",
                users, audit.sent, audit.failed_sends, audit.expected, audit.shown, audit.lost, audit.duplicates, audit.unconfirmed, audit.failovers
            );
        }
        println!(
            "{}",
            serde_json::json!({
                "scenario": "chaos", "users": users, "sent": audit.sent,
                "failed_sends": audit.failed_sends, "expected": audit.expected,
                "shown": audit.shown, "lost": audit.lost, "duplicates": audit.duplicates,
                "unconfirmed": audit.unconfirmed, "failovers": audit.failovers,
            })
        );
        if audit.sent == 0 {
            return Err("nothing was sent: the audit would prove nothing".into());
        }
        return Ok((audit.lost + audit.duplicates) as u64);
    }
    let target = Target {
        server: cli.server.clone(),
        data_dir: setup::data_dir(&cli.home),
    };
    let procs = procstat::discover(&cli.home);
    let identity = Identity::generate()?;
    let pubkey = identity.public_pem();
    let report = match &cli.scenario {
        Scenario::Direct(t) | Scenario::Ring(t) => {
            let ring = matches!(cli.scenario, Scenario::Ring(_));
            let users = setup::users(&target, t.users, &pubkey, cli.setup_threads)?;
            let sessions = setup::parallel(users.len(), cli.setup_threads, |i| {
                setup::session(&target, &users, i)
            })?;
            let mut driver = new_driver(cli, sessions, shared_key(), t.size)?;
            let n = users.len();
            let names: Vec<String> = users.iter().map(|u| u.name.clone()).collect();
            let mut peers = Peers::new(n);
            let senders: Vec<usize> = (0..n).collect();
            let before = sample(&procs);
            let outcome = driver.run(
                &senders,
                |s| {
                    let peer = if ring {
                        (s + 1) % n
                    } else {
                        peers.other_than(s)
                    };
                    To::User(names[peer].clone())
                },
                pace(t.rate, t.window),
                t.seconds,
                Duration::from_secs(20),
                !cli.json,
            )?;
            Report {
                scenario: if ring { "ring" } else { "direct" }.into(),
                users: n,
                extra: serde_json::json!({"pace": pace_name(t.rate, t.window)}),
                servers: diff(&procs, before),
                outcome,
            }
        }
        Scenario::Group {
            groups,
            members,
            seconds,
            rate,
            window,
            size,
        } => {
            let n = groups * members;
            let users = setup::users(&target, n, &pubkey, cli.setup_threads)?;
            let mut group_ids = Vec::new();
            for g in 0..*groups {
                group_ids.push(make_group(&target, &users, g * members, *members)?);
            }
            let sessions =
                setup::parallel(n, cli.setup_threads, |i| setup::session(&target, &users, i))?;
            let mut driver = new_driver(cli, sessions, shared_key(), *size)?;
            let senders: Vec<usize> = (0..*groups).map(|g| g * members).collect();
            let before = sample(&procs);
            let outcome = driver.run(
                &senders,
                |s| To::Group(group_ids[s / members], (*members - 1) as u32),
                pace(*rate, *window),
                *seconds,
                Duration::from_secs(20),
                !cli.json,
            )?;
            Report {
                scenario: "group".into(),
                users: n,
                extra: serde_json::json!({"groups": groups, "members": members, "pace": pace_name(*rate, *window)}),
                servers: diff(&procs, before),
                outcome,
            }
        }
        Scenario::Drain {
            messages,
            size,
            senders,
        } => {
            // Many senders fill the queue, each within the relays' per-user send rate.
            let senders = (*senders).max(1);
            let users = setup::users(&target, senders + 1, &pubkey, cli.setup_threads)?;
            let sessions = setup::parallel(senders, cli.setup_threads, |i| {
                setup::session(&target, &users, i)
            })?;
            let key = shared_key();
            let mut driver = new_driver(cli, sessions, key, *size)?;
            let recipient = users[senders].name.clone();
            if !cli.json {
                eprintln!("  queueing {messages} messages for {recipient} (offline) from {senders} senders");
            }
            let from: Vec<usize> = (0..senders).collect();
            let fill = driver.run_limited(
                &from,
                |_| To::User(recipient.clone()),
                Pace::Closed { window: 64 },
                *messages,
                !cli.json,
            )?;
            if fill.acked < *messages {
                return Err(
                    format!("only {} of {messages} messages were stored", fill.acked).into(),
                );
            }
            let before = sample(&procs);
            let login = Instant::now();
            driver.add(setup::session(&target, &users, senders)?)?;
            let outcome = driver.run(
                &[],
                |_| To::User(String::new()),
                Pace::Quiet,
                0.0,
                Duration::from_secs(300),
                !cli.json,
            )?;
            let drain_secs = outcome.seconds;
            Report {
                scenario: "drain".into(),
                users: senders + 1,
                extra: serde_json::json!({"queued": messages, "senders": senders, "login_to_last_ms": (login.elapsed().as_secs_f64() * 1000.0).round(), "drain_seconds": drain_secs}),
                servers: diff(&procs, before),
                outcome,
            }
        }
        Scenario::Logins {
            users: n,
            sessions,
            threads,
            direct,
        } => {
            let users = setup::users(&target, *n, &pubkey, cli.setup_threads)?;
            let relays = setup::relays(&target, &users[0])?;
            if *direct && relays.is_empty() {
                return Err("the auth server listed no relays".into());
            }
            let total = n * sessions;
            let before = sample(&procs);
            let started = Instant::now();
            let opened = setup::parallel(total, *threads, |i| {
                if *direct {
                    setup::direct_session(&relays[i % relays.len()], &users, i % n)
                } else {
                    setup::session(&target, &users, i % n)
                }
            })?;
            let secs = started.elapsed().as_secs_f64();
            drop(opened);
            let outcome = Outcome {
                seconds: secs,
                rate: total as f64 / secs,
                ..Outcome::default()
            };
            Report {
                scenario: if *direct { "logins-direct" } else { "logins" }.into(),
                users: *n,
                extra: serde_json::json!({"sessions": total, "logins_per_s": (total as f64 / secs).round(), "seconds": secs, "direct": direct}),
                servers: diff(&procs, before),
                outcome,
            }
        }
        Scenario::Idle {
            users: n,
            sessions,
            seconds,
            threads,
            per_process,
        } => {
            // Accounts and credentials first, so the holding processes only resume.
            let users = setup::users(&target, *n, &pubkey, cli.setup_threads)?;
            let relays: Vec<&procstat::Proc> = procs
                .iter()
                .filter(|p| p.name.starts_with("relay"))
                .collect();
            let rss_before: u64 = relays.iter().map(|p| p.sample().rss).sum();
            let before = sample(&procs);
            let total = n * sessions;
            let held = hold::spread(cli, &users, total, *threads, (*per_process).max(1))?;
            std::thread::sleep(Duration::from_secs_f64(*seconds));
            let rss_after: u64 = relays.iter().map(|p| p.sample().rss).sum();
            let per_conn = rss_after.saturating_sub(rss_before) as f64 / total as f64;
            let processes = held.len();
            hold::release(held)?;
            Report {
                scenario: "idle".into(),
                users: *n,
                extra: serde_json::json!({"connections": total, "processes": processes, "relay_rss_before_mb": rss_before as f64 / 1e6, "relay_rss_after_mb": rss_after as f64 / 1e6, "relay_bytes_per_connection": per_conn.round()}),
                servers: diff(&procs, before),
                outcome: Outcome::default(),
            }
        }
        Scenario::Hold {
            from,
            count,
            threads,
        } => {
            let users = hold::read_users()?;
            let n = users.len().max(1);
            let held = setup::parallel(*count, *threads, |i| {
                setup::session(&target, &users, (from + i) % n)
            })?;
            hold::serve(held)?;
            return Ok(0);
        }
        Scenario::Abuse {
            users,
            rate,
            seconds,
            size,
            no_attack,
            db_url,
        } => {
            let users = setup::users_from(&target, *users, &pubkey, cli.setup_threads, |i| {
                Some(abuse::normal_address(i))
            })?;
            let sessions = setup::parallel(users.len(), cli.setup_threads, |i| {
                setup::session(&target, &users, i)
            })?;
            let mut driver = new_driver(cli, sessions, shared_key(), *size)?;
            let n = users.len();
            let names: Vec<String> = users.iter().map(|u| u.name.clone()).collect();
            let mut peers = Peers::new(n);
            let senders: Vec<usize> = (0..n).collect();
            let db_before = database_bytes(db_url.as_deref());
            let attack = if *no_attack {
                None
            } else {
                if !cli.json {
                    eprintln!("  starting the floods");
                }
                Some(abuse::Attack::start(
                    &target,
                    &pubkey,
                    &names[0],
                    db_url.as_deref(),
                )?)
            };
            let before = sample(&procs);
            let outcome = driver.run(
                &senders,
                |s| To::User(names[peers.other_than(s)].clone()),
                Pace::Open { rate: *rate },
                *seconds,
                Duration::from_secs(20),
                !cli.json,
            )?;
            let servers = diff(&procs, before);
            let (attackers, logins) = match attack {
                Some(a) => {
                    let (counters, logins) = a.stop();
                    (counters.json(), logins)
                }
                None => (serde_json::Value::Null, Vec::new()),
            };
            let mut login_ms: Vec<u32> = logins.iter().map(|d| d.as_micros() as u32).collect();
            login_ms.sort_unstable();
            let db_growth = database_bytes(db_url.as_deref())
                .zip(db_before)
                .map(|(after, before)| after - before);
            Report {
                scenario: if *no_attack {
                    "abuse-baseline"
                } else {
                    "abuse"
                }
                .into(),
                users: n,
                extra: serde_json::json!({
                    "pace": pace_name(Some(*rate), 0),
                    "attackers": attackers,
                    "probe_logins": {
                        "count": login_ms.len(),
                        "p50_ms": quantile_ms(&login_ms, 0.5),
                        "max_ms": login_ms.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
                    },
                    "database_growth_bytes": db_growth,
                }),
                servers,
                outcome,
            }
        }
        Scenario::PgCeiling { .. } | Scenario::Chaos { .. } => unreachable!("handled above"),
    };
    print_report(&report, &procs, cli.json);
    Ok(report.outcome.lost)
}

/// Picks peers at random (xorshift: cheap, and the same sequence every run).
struct Peers {
    n: usize,
    rng: u64,
}

impl Peers {
    fn new(n: usize) -> Peers {
        Peers {
            n,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// A user other than `s` (the next one when there are fewer than two).
    fn other_than(&mut self, s: usize) -> usize {
        if self.n < 2 {
            return (s + 1) % self.n.max(1);
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let p = (self.rng % (self.n as u64 - 1)) as usize;
        if p >= s {
            p + 1
        } else {
            p
        }
    }
}

/// The database's size in bytes, if it can be asked.
fn database_bytes(db_url: Option<&str>) -> Option<i64> {
    let mut db = postgres::Client::connect(db_url?, postgres::NoTls).ok()?;
    db.query_one("SELECT pg_database_size(current_database())", &[])
        .ok()
        .map(|r| r.get(0))
}

fn pace(rate: Option<f64>, window: usize) -> Pace {
    match rate {
        Some(rate) => Pace::Open { rate },
        None => Pace::Closed { window },
    }
}

fn pace_name(rate: Option<f64>, window: usize) -> String {
    match rate {
        Some(r) => format!("open {r:.0}/s"),
        None => format!("closed window {window}"),
    }
}

/// This process (the driver's sessions and threads; not the child processes a
/// scenario may spread sessions over), sampled beside the servers.
fn driver_proc() -> procstat::Proc {
    procstat::Proc {
        name: DRIVER.into(),
        pids: vec![std::process::id()],
    }
}

/// The name the driver's own figures go under in a report's samples.
const DRIVER: &str = "driver";

fn sample(procs: &[procstat::Proc]) -> Vec<procstat::Sample> {
    procs
        .iter()
        .chain(std::iter::once(&driver_proc()))
        .map(procstat::Proc::sample)
        .collect()
}

fn diff(
    procs: &[procstat::Proc],
    before: Vec<procstat::Sample>,
) -> Vec<(String, procstat::Sample, procstat::Sample)> {
    procs
        .iter()
        .chain(std::iter::once(&driver_proc()))
        .zip(before)
        .map(|(p, b)| (p.name.clone(), b, p.sample()))
        .collect()
}

/// Creates a group of `members` users starting at `first`, with `first` as admin.
fn make_group(
    target: &Target,
    users: &[User],
    first: usize,
    members: usize,
) -> Result<i64, ClientError> {
    let admin = &users[first];
    let mut auth = AuthLink::connect(&target.server, &target.data_dir)?;
    let redirect = auth.resume(&admin.name, &admin.credential)?;
    let mut relay = RelayLink::connect(&redirect, false)?;
    let id = relay.next_id();
    relay.queue(&ClientToRelay::GroupCreate {
        id,
        name: format!("load group {first}"),
    });
    relay.flush()?;
    let group_id = match relay.wait_reply(
        id,
        |f| matches!(f, RelayToClient::Group { id: got, .. } if *got == id),
    )? {
        RelayToClient::Group { group, .. } => group.group_id,
        other => return Err(ClientError::Protocol(format!("{other:?}"))),
    };
    let mut ids = Vec::new();
    for u in &users[first + 1..first + members] {
        let id = relay.next_id();
        relay.queue(&ClientToRelay::GroupAdd {
            id,
            group_id,
            user: u.name.clone(),
        });
        ids.push((id, u));
    }
    relay.flush()?;
    let mut invited = Vec::new();
    for (id, u) in ids {
        let reply = relay.wait_reply(
            id,
            |f| matches!(f, RelayToClient::Group { id: got, .. } if *got == id),
        )?;
        // Members who share no group with the admin yet (an earlier run's groups may
        // still hold them) were invited, not added.
        if matches!(reply, RelayToClient::Group { invited: true, .. }) {
            invited.push(u);
        }
    }
    relay.close();
    // Each invited member accepts.
    for u in invited {
        setup::retrying(|| {
            let mut auth = AuthLink::connect(&target.server, &target.data_dir)?;
            let redirect = auth.resume(&u.name, &u.credential)?;
            let mut theirs = RelayLink::connect(&redirect, false)?;
            let id = theirs.next_id();
            theirs.queue(&ClientToRelay::GroupAccept { id, group_id });
            theirs.flush()?;
            theirs.wait_reply(
                id,
                |f| matches!(f, RelayToClient::Group { id: got, .. } if *got == id),
            )?;
            theirs.close();
            Ok(())
        })?;
    }
    Ok(group_id)
}

fn print_report(r: &Report, procs: &[procstat::Proc], json_only: bool) {
    let o = &r.outcome;
    let lat = |q: f64| quantile_ms(&o.latencies, q);
    let late = |q: f64| quantile_ms(&o.lateness, q);
    let relays = procs.iter().filter(|p| p.name.starts_with("relay")).count();
    let (driver, servers): (Vec<_>, Vec<_>) = r.servers.iter().partition(|(n, _, _)| n == DRIVER);
    let driver_cpu: f64 = driver.iter().map(|(_, b, a)| a.cpu_secs - b.cpu_secs).sum();
    let cpu_total: f64 = servers
        .iter()
        .map(|(_, b, a)| a.cpu_secs - b.cpu_secs)
        .sum();
    let cpu_us_per_msg = if o.delivered > 0 {
        cpu_total * 1e6 / o.delivered as f64
    } else {
        0.0
    };
    if !json_only {
        println!(
            "scenario {}  users {}  relays {}  {}",
            r.scenario, r.users, relays, r.extra
        );
        println!(
            "{:>10} {:>10} {:>10} {:>6} {:>6} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "sent",
            "stored",
            "delivered",
            "lost",
            "dups",
            "msgs/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        );
        println!(
            "{:>10} {:>10} {:>10} {:>6} {:>6} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            o.sent,
            o.acked,
            o.delivered,
            o.lost,
            o.duplicates,
            o.rate,
            lat(0.5),
            lat(0.9),
            lat(0.99),
            lat(0.999),
            lat(1.0)
        );
        println!(
            "  driver     cpu {driver_cpu:>7.2} s   ({:.0} % of a core over {:.1} s){}",
            100.0 * driver_cpu / o.seconds.max(0.001),
            o.seconds,
            if o.lateness.is_empty() {
                String::new()
            } else {
                format!(
                    "   late p50 {:.2} / p99 {:.2} / max {:.2} ms",
                    late(0.5),
                    late(0.99),
                    late(1.0)
                )
            }
        );
        for (name, b, a) in &servers {
            println!(
                "  {:<10} cpu {:>7.2} s   peak rss {:>7.1} MB",
                name,
                a.cpu_secs - b.cpu_secs,
                a.peak_rss as f64 / 1e6
            );
        }
        if o.delivered > 0 {
            println!("  server cpu per delivered message: {cpu_us_per_msg:.1} µs");
        }
    }
    let lateness = if o.lateness.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::json!({"p50": late(0.5), "p99": late(0.99), "max": late(1.0)})
    };
    let driver = serde_json::json!({
        "cpu_s": (driver_cpu * 100.0).round() / 100.0,
        "cpu_share": if o.seconds > 0.0 { (driver_cpu / o.seconds * 100.0).round() / 100.0 } else { 0.0 },
        "lateness_ms": lateness,
        "acks": if o.ack_syncs.is_some() { "durable" } else { "volatile" },
        "ack_syncs": o.ack_syncs,
    });
    let servers: Vec<serde_json::Value> = servers
        .iter()
        .map(|(name, b, a)| {
            serde_json::json!({"name": name, "cpu_s": ((a.cpu_secs - b.cpu_secs) * 100.0).round() / 100.0, "peak_rss_mb": (a.peak_rss as f64 / 1e5).round() / 10.0})
        })
        .collect();
    let line = serde_json::json!({
        "scenario": r.scenario,
        "users": r.users,
        "relays": relays,
        "sent": o.acked,
        "delivered": o.delivered,
        "lost": o.lost,
        "duplicates": o.duplicates,
        "errors": o.errors,
        "msgs_per_s": o.rate.round(),
        "latency_ms": {"p50": lat(0.5), "p90": lat(0.9), "p99": lat(0.99), "p99.9": lat(0.999), "max": lat(1.0)},
        "server_cpu_us_per_msg": (cpu_us_per_msg * 10.0).round() / 10.0,
        "servers": servers,
        "driver": driver,
        "details": r.extra,
    });
    println!("{line}");
}

/// A driver for `sessions`, with durable acknowledgements unless `--volatile-acks`.
fn new_driver(
    cli: &Cli,
    sessions: Vec<setup::Session>,
    key: ConversationKey,
    size: usize,
) -> std::io::Result<Driver> {
    let mut driver = Driver::new(sessions, key, size)?;
    if cli.volatile_acks {
        driver.volatile_acks();
    }
    Ok(driver)
}
