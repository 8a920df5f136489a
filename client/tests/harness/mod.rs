//! The shared integration-test harness: one private PostgreSQL cluster per test
//! process, a fresh database per test, real `fastchat-auth` and `fastchat-relay`
//! processes on OS-chosen loopback ports, and client helpers.
//!
//! PostgreSQL refuses to run as root; when the tests run as root the cluster is made
//! and run by the `postgres` user. A watchdog process stops the cluster and removes it
//! when the test process exits, however it exits.
//!
//! A test that stops PostgreSQL makes a cluster of its own ([`Cluster::private`],
//! then [`TestNet::on`]) so other tests of its process keep theirs; it may then
//! [`Cluster::stop`] and [`Cluster::start`] it.

#![allow(dead_code)]

use fastchat_client::chat::{self, Chat, Options};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "correct horse battery";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The directory of PostgreSQL's server binaries.
fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("FASTCHAT_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    found.retain(|d| d.join("initdb").exists());
    found.sort_by_key(|d| {
        d.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().expect(
        "PostgreSQL server binaries not found: run scripts/test.sh (it installs them) \
         or set FASTCHAT_PG_BIN",
    )
}

/// Runs a PostgreSQL tool, as the postgres user when we are root.
fn pg_command(tool: &str) -> Command {
    let path = pg_bin().join(tool);
    if is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(path);
        c.current_dir("/");
        c
    } else {
        Command::new(path)
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// A private PostgreSQL cluster: the one shared by this test process
/// ([`Cluster::get`]) or one of a test's own ([`Cluster::private`]).
pub struct Cluster {
    pub port: u16,
    dir: PathBuf,
    /// Outlives this process on purpose: it cleans up after us.
    _watchdog: Child,
}

impl Cluster {
    /// The cluster shared by the tests of this process, started on first use.
    pub fn get() -> &'static Cluster {
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        CLUSTER.get_or_init(Cluster::create)
    }

    /// A cluster of the caller's own, for a test that stops and starts PostgreSQL.
    /// Removed when dropped (or, at the latest, when the process exits).
    pub fn private() -> Cluster {
        Cluster::create()
    }

    /// Stops PostgreSQL (`pg_ctl stop -m fast`: sessions are ended, nothing is lost).
    pub fn stop(&self) {
        let out = pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .expect("running pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts PostgreSQL again (after [`Cluster::stop`]), on the same port.
    pub fn start(&self) {
        self.pg_ctl_start();
    }

    fn pg_ctl_start(&self) {
        // fsync=off: commits still go through the WAL to the kernel, so stopping or
        // killing PostgreSQL loses nothing; only a crash of the machine could, which no
        // test does. The tests then do not wait on a shared, busy disk.
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 \
             -c shared_buffers=64MB -c fsync=off",
            self.port,
            self.dir.display()
        );
        let out = pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .args(["-o", &opts, "-l"])
            .arg(self.dir.join("server.log"))
            .args(["-w", "start"])
            .output()
            .expect("running pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn create() -> Cluster {
        let dir = std::env::temp_dir().join(unique("fastchat-pg"));
        std::fs::create_dir_all(&dir).expect("creating the cluster directory");
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of {} to postgres failed", dir.display());
        }
        let out = pg_command("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "fastchat",
                "-E",
                "UTF8",
                "--locale=C",
                "-D",
            ])
            .arg(&dir)
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        // Stop and remove the cluster when this process is gone, however it ends.
        let pg_ctl = pg_bin().join("pg_ctl");
        let stop = if is_root() {
            format!(
                "runuser -u postgres -- {} -D {} -m immediate stop",
                pg_ctl.display(),
                dir.display()
            )
        } else {
            format!(
                "{} -D {} -m immediate stop",
                pg_ctl.display(),
                dir.display()
            )
        };
        let script = format!(
            "cd /; while kill -0 {pid} 2>/dev/null && [ \"$(cut -d' ' -f3 /proc/{pid}/stat 2>/dev/null)\" != Z ]; \
             do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = dir.display()
        );
        let watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the cluster watchdog");
        let cluster = Cluster {
            port,
            dir,
            _watchdog: watchdog,
        };
        cluster.pg_ctl_start();
        cluster
    }

    /// A connection string for `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=fastchat dbname={db}",
            self.port
        )
    }

    /// Creates a fresh, empty database and returns its connection string.
    pub fn fresh_database(&self) -> String {
        let name = unique("t").replace('-', "_");
        let mut admin = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .expect("connecting to the test cluster");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("creating a test database");
        self.url(&name)
    }
}

impl Drop for Cluster {
    /// Only private clusters are dropped; the shared one is left to the watchdog.
    fn drop(&mut self) {
        let _ = pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server process whose stderr is copied to a log file and watched.
pub struct ServerProcess {
    child: Child,
    pub log_path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    fn spawn(binary: &Path, args: &[String], log_path: PathBuf) -> ServerProcess {
        assert!(
            binary.exists(),
            "{} is missing: build the servers first (`cargo build --bins`, as scripts/test.sh does)",
            binary.display()
        );
        let mut child = Command::new(binary)
            .args(args)
            .env("FASTCHAT_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let stderr = child.stderr.take().expect("stderr was piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let path = log_path.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        ServerProcess {
            child,
            log_path,
            lines,
        }
    }

    /// Waits for a log line containing `needle`; returns the text after it.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                for line in &lines[seen..] {
                    if let Some(pos) = line.find(needle) {
                        return line[pos + needle.len()..].trim().to_string();
                    }
                }
                seen = lines.len();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {timeout:?}; log:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `count` log lines contain `needle` (0 returns at once).
    pub fn wait_for_count(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .count();
            if seen >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {seen} of {count} log lines with {needle:?} within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit (up to `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn binary(name: &str) -> PathBuf {
    // The client's own binary is built for its integration tests; the servers sit
    // beside it in the same target directory.
    let client = PathBuf::from(env!("CARGO_BIN_EXE_fastchat"));
    client.with_file_name(name)
}

/// Settings for a test cluster.
#[derive(Clone)]
pub struct Settings {
    pub ticket_ttl_secs: u64,
    pub login_failures_per_user: u32,
    /// Seconds before a connection that has not said hello (or logged in) is closed.
    pub auth_deadline_secs: u64,
    /// How many relays to start.
    pub relays: usize,
    pub extra_auth_args: Vec<String>,
    pub extra_relay_args: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ticket_ttl_secs: 30,
            login_failures_per_user: 5,
            auth_deadline_secs: 3,
            relays: 1,
            extra_auth_args: Vec::new(),
            extra_relay_args: Vec::new(),
        }
    }
}

/// An auth server and relays on a fresh database, plus a home for clients.
pub struct TestNet {
    pub db_url: String,
    pub home: PathBuf,
    pub auth: ServerProcess,
    pub auth_addr: String,
    pub auth_relay_addr: String,
    /// Relay i is `relay-{i+1}`; `None` while it is down.
    pub relays: Vec<Option<ServerProcess>>,
    /// Client address of each relay (kept across restarts).
    pub relay_addrs: Vec<String>,
    settings: Settings,
}

impl TestNet {
    pub fn start() -> TestNet {
        TestNet::with(Settings::default())
    }

    pub fn with(settings: Settings) -> TestNet {
        TestNet::on(Cluster::get(), settings)
    }

    /// A network on a fresh database of `cluster` (e.g. a [`Cluster::private`] one).
    pub fn on(cluster: &Cluster, settings: Settings) -> TestNet {
        let db_url = cluster.fresh_database();
        let home = std::env::temp_dir().join(unique("fastchat-net"));
        std::fs::create_dir_all(&home).unwrap();
        // Secrets as the scripts make them: key directory 0700 (made by the servers),
        // cluster secret 0600.
        let secret = fastchat_common::hex::encode(&rand::random::<[u8; 32]>());
        fastchat_common::keys::write_private_file(&home.join("cluster.secret"), secret.as_bytes())
            .unwrap();
        let auth = ServerProcess::spawn(
            &binary("fastchat-auth"),
            &[
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--relay-listen".into(),
                "127.0.0.1:0".into(),
                "--db-url".into(),
                db_url.clone(),
                "--key-file".into(),
                home.join("keys/auth.key").display().to_string(),
                "--secret-file".into(),
                home.join("cluster.secret").display().to_string(),
                "--ticket-ttl-secs".into(),
                settings.ticket_ttl_secs.to_string(),
                "--login-failures-per-user".into(),
                settings.login_failures_per_user.to_string(),
                "--auth-deadline-secs".into(),
                settings.auth_deadline_secs.to_string(),
            ]
            .into_iter()
            .chain(settings.extra_auth_args.iter().cloned())
            .collect::<Vec<String>>(),
            home.join("auth.log"),
        );
        let auth_relay_addr = auth.wait_for("listening for relays on", Duration::from_secs(30));
        let auth_addr = auth.wait_for("listening for clients on", Duration::from_secs(30));
        let count = settings.relays.max(1);
        let mut net = TestNet {
            db_url,
            home,
            auth,
            auth_addr,
            auth_relay_addr,
            relays: (0..count).map(|_| None).collect(),
            relay_addrs: vec![String::new(); count],
            settings,
        };
        for i in 0..count {
            net.start_relay(i, "127.0.0.1:0");
        }
        // Every relay has its mesh links before the test starts.
        for i in 0..count {
            net.relay(i)
                .wait_for_count(MESH_LINK_UP, count - 1, Duration::from_secs(30));
        }
        net
    }

    /// Relay `i`'s process (panics if it is down).
    pub fn relay(&self, i: usize) -> &ServerProcess {
        self.relays[i].as_ref().expect("the relay is running")
    }

    /// Relay `i`'s process, mutably (panics if it is down).
    pub fn relay_mut(&mut self, i: usize) -> &mut ServerProcess {
        self.relays[i].as_mut().expect("the relay is running")
    }

    /// The public key of relay `i`.
    pub fn relay_key(&self, i: usize) -> Vec<u8> {
        let path = self.home.join(format!("keys/relay-{}.key", i + 1));
        let text = std::fs::read_to_string(path).unwrap();
        let line = text.lines().find(|l| l.starts_with("public ")).unwrap();
        fastchat_common::hex::decode(&line[7..]).unwrap()
    }

    /// Starts relay `i` (again), listening for clients on `listen`.
    pub fn start_relay(&mut self, i: usize, listen: &str) {
        let id = format!("relay-{}", i + 1);
        let mut args = vec![
            "--id".into(),
            id.clone(),
            "--listen".into(),
            listen.into(),
            "--mesh-listen".into(),
            "127.0.0.1:0".into(),
            "--auth".into(),
            self.auth_relay_addr.clone(),
            "--db-url".into(),
            self.db_url.clone(),
            "--key-file".into(),
            self.home
                .join(format!("keys/{id}.key"))
                .display()
                .to_string(),
            "--secret-file".into(),
            self.home.join("cluster.secret").display().to_string(),
            "--auth-deadline-secs".into(),
            self.settings.auth_deadline_secs.to_string(),
        ];
        args.extend(self.settings.extra_relay_args.iter().cloned());
        let relay = ServerProcess::spawn(
            &binary("fastchat-relay"),
            &args,
            self.home.join(format!("{id}.log")),
        );
        self.relay_addrs[i] = relay.wait_for("listening for clients on", Duration::from_secs(30));
        relay.wait_for("registered with auth server", Duration::from_secs(30));
        self.relays[i] = Some(relay);
    }

    /// SIGKILLs relay `i`: no goodbye, presence rows left behind.
    pub fn kill_relay(&mut self, i: usize) {
        if let Some(mut r) = self.relays[i].take() {
            r.kill();
        }
    }

    /// Starts relay `i` again on its old client address.
    pub fn restart_relay(&mut self, i: usize) {
        let addr = self.relay_addrs[i].clone();
        // The port may linger briefly; retry the bind a few times.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpListener::bind(&addr).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.start_relay(i, &addr);
    }

    /// SIGKILLs relay 0 and starts it again on the same address.
    pub fn kill_and_restart_relay(&mut self) {
        self.kill_relay(0);
        self.restart_relay(0);
    }

    /// Which relay (index) a session is on, by its client address.
    pub fn relay_index(&self, addr: &str) -> usize {
        self.relay_addrs
            .iter()
            .position(|a| a == addr)
            .expect("a relay of this network")
    }

    /// Asks relay `i` for its stats over its mesh port (with the cluster secret).
    pub fn relay_stats(&self, i: usize) -> serde_json::Value {
        let addr = self
            .relay(i)
            .wait_for("listening for relays on", Duration::from_secs(1));
        stats_over(&addr, &self.secret(), |id| {
            fastchat_common::proto::MeshFrame::StatsRequest { id }
        })
    }

    /// Asks the auth server for its stats over its relay port.
    pub fn auth_stats(&self) -> serde_json::Value {
        stats_over(&self.auth_relay_addr, &self.secret(), |id| {
            fastchat_common::proto::RelayToAuth::StatsRequest { id }
        })
    }

    fn secret(&self) -> [u8; 32] {
        fastchat_common::keys::load_secret(&self.home.join("cluster.secret")).unwrap()
    }

    /// Client options for `user`, with a data directory of their own.
    pub fn opts(&self, user: &str) -> Options {
        Options {
            server: self.auth_addr.clone(),
            data_dir: self.home.join("clients").join(user),
            user: user.to_string(),
            password: PASSWORD.to_string(),
        }
    }

    /// Registers `user` through the client library.
    pub fn register(&self, user: &str) -> Options {
        let opts = self.opts(user);
        chat::register(&opts).unwrap_or_else(|e| panic!("registering {user}: {e}"));
        opts
    }

    /// Logs `user` in (receiving).
    pub fn login(&self, user: &str) -> Chat {
        Chat::login(&self.opts(user), true).unwrap_or_else(|e| panic!("login of {user}: {e}"))
    }

    /// The `fastchat` CLI as `user` (server, data directory, password set; no input).
    pub fn fastchat(&self, user: &str) -> Command {
        let opts = self.opts(user);
        let mut command = Command::new(env!("CARGO_BIN_EXE_fastchat"));
        command
            .arg("--server")
            .arg(&opts.server)
            .arg("--user")
            .arg(user)
            .arg("--data-dir")
            .arg(&opts.data_dir)
            .env("FASTCHAT_PASSWORD", PASSWORD)
            .stdin(Stdio::null());
        command
    }

    /// Runs the `fastchat` CLI as `user`; returns (success, stdout, stderr).
    pub fn cli(&self, user: &str, args: &[&str]) -> (bool, String, String) {
        let out = self
            .fastchat(user)
            .args(args)
            .output()
            .expect("running fastchat");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Every row of every table of the database, as text.
    pub fn dump_database(&self) -> String {
        let mut client = postgres::Client::connect(&self.db_url, postgres::NoTls).unwrap();
        let tables: Vec<String> = client
            .query(
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut dump = String::new();
        for t in tables {
            for row in client
                .query(&format!("SELECT t::text FROM {t} t"), &[])
                .unwrap()
            {
                dump.push_str(&row.get::<_, String>(0));
                dump.push('\n');
            }
        }
        dump
    }

    /// Rows in `messages`, not counting delivery receipts (those wait for senders who
    /// may never read again; see [`TestNet::stored_receipts`]).
    pub fn stored_messages(&self) -> i64 {
        let mut client = postgres::Client::connect(&self.db_url, postgres::NoTls).unwrap();
        client
            .query_one(
                "SELECT count(*) FROM messages WHERE position('\"type\":\"receipt\"' in body) = 0",
                &[],
            )
            .unwrap()
            .get(0)
    }

    /// Delivery receipts in `messages` (their envelope type is visible to the server).
    pub fn stored_receipts(&self) -> i64 {
        let mut client = postgres::Client::connect(&self.db_url, postgres::NoTls).unwrap();
        client
            .query_one(
                "SELECT count(*) FROM messages WHERE position('\"type\":\"receipt\"' in body) > 0",
                &[],
            )
            .unwrap()
            .get(0)
    }
}

/// What a relay logs for each mesh link that comes up ("mesh link to|from X is up"; a
/// bare "mesh link" would also match its summaries and closed links).
pub const MESH_LINK_UP: &str = " is up";

/// Polls `f` every 50 ms until it returns `want`, and fails with the last value after
/// 20 s: for effects the servers apply after they answer (an acknowledgement's delete,
/// a download's release), which a loaded machine may take a while to show.
pub fn eventually<T: PartialEq + std::fmt::Debug>(what: &str, want: T, mut f: impl FnMut() -> T) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = f();
        if got == want {
            return;
        }
        if Instant::now() >= deadline {
            assert_eq!(got, want, "{what} (waited 20 s)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends a stats request over a cluster-secret link and returns the `stats` object.
fn stats_over<T: serde::Serialize>(
    addr: &str,
    secret: &[u8; 32],
    request: impl Fn(u64) -> T,
) -> serde_json::Value {
    use fastchat_common::link::Link;
    use fastchat_common::noise::Role;
    let mut link = Link::connect(
        addr,
        Role::PskInitiator(secret),
        1 << 20,
        Duration::from_secs(5),
    )
    .expect("connecting for stats");
    link.queue(&serde_json::json!({"t": "hello", "version": fastchat_common::PROTOCOL_VERSION}));
    link.queue(&request(1));
    link.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let frame: serde_json::Value = link
            .recv(Some(deadline))
            .expect("reading stats")
            .expect("stats before the deadline");
        if frame["t"] == "stats" {
            return frame["stats"].clone();
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for r in self.relays.iter_mut() {
            if let Some(mut r) = r.take() {
                r.kill();
            }
        }
        self.auth.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.home);
        } else {
            eprintln!("test files kept in {}", self.home.display());
        }
    }
}

/// Receives until `n` messages arrived or `timeout` passed.
pub fn receive_n(
    chat: &mut Chat,
    n: usize,
    timeout: Duration,
) -> Vec<fastchat_client::chat::Received> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        for e in chat.receive(deadline).expect("receiving") {
            if let fastchat_client::chat::Event::Message(m) = e {
                got.push(m);
            }
        }
    }
    got
}

/// Texts a session showed, by (sender, text), with how often each was shown.
pub type Shown = std::collections::HashMap<(String, String), usize>;

/// Counts the texts among `events` into `shown`.
pub fn record(shown: &mut Shown, events: Vec<fastchat_client::chat::Event>) {
    for e in events {
        if let fastchat_client::chat::Event::Message(m) = e {
            *shown.entry((m.from, m.text)).or_insert(0) += 1;
        }
    }
}

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
