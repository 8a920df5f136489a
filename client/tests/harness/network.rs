//! A test network: a database, an auth server and relays on loopback, and the client
//! options, logins and figures of its users.

use super::*;

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

/// Per-address and per-user limits of the servers that a test's many users and
/// sessions, all from 127.0.0.1, would run into: `flags` raised to 100,000, except those
/// the test sets itself in `extra` (the servers refuse a flag given twice).
fn generous(flags: &[&str], extra: &[String]) -> Vec<String> {
    flags
        .iter()
        .filter(|flag| !extra.iter().any(|e| e == *flag))
        .flat_map(|flag| [flag.to_string(), "100000".to_string()])
        .collect()
}

/// An auth server and relays on a fresh database, plus a home for clients.
pub struct TestNet {
    pub db_url: String,
    pub home: PathBuf,
    pub auth: ServerProcess,
    pub auth_addr: String,
    pub auth_relay_addr: String,
    /// The auth server's stats port (the stats secret: `home/stats.secret`).
    pub auth_stats_addr: String,
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
        // cluster and stats secrets 0600.
        for file in ["cluster.secret", "stats.secret"] {
            let secret = fastchat_common::hex::encode(&rand::random::<[u8; 32]>());
            fastchat_common::keys::write_private_file(&home.join(file), secret.as_bytes()).unwrap();
        }
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
                "--stats-secret-file".into(),
                home.join("stats.secret").display().to_string(),
                "--ticket-ttl-secs".into(),
                settings.ticket_ttl_secs.to_string(),
                "--login-failures-per-user".into(),
                settings.login_failures_per_user.to_string(),
                "--auth-deadline-secs".into(),
                settings.auth_deadline_secs.to_string(),
            ]
            .into_iter()
            .chain(generous(
                &[
                    "--registrations-per-addr-per-minute",
                    "--registrations-per-second",
                    "--password-attempts-per-addr-per-minute",
                    "--max-connections-per-addr",
                ],
                &settings.extra_auth_args,
            ))
            .chain(settings.extra_auth_args.iter().cloned())
            .collect::<Vec<String>>(),
            home.join("auth.log"),
        );
        let auth_relay_addr = auth.wait_for("listening for relays on", Duration::from_secs(30));
        let auth_addr = auth.wait_for("listening for clients on", Duration::from_secs(30));
        let auth_stats_addr =
            auth.wait_for("listening for stats requests on", Duration::from_secs(30));
        let count = settings.relays.max(1);
        let mut net = TestNet {
            db_url,
            home,
            auth,
            auth_addr,
            auth_relay_addr,
            auth_stats_addr,
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
            "--stats-secret-file".into(),
            self.home.join("stats.secret").display().to_string(),
            "--auth-deadline-secs".into(),
            self.settings.auth_deadline_secs.to_string(),
        ];
        args.extend(generous(
            &[
                "--max-in-flight",
                "--max-sessions-per-user",
                "--max-connections-per-addr",
            ],
            &self.settings.extra_relay_args,
        ));
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

    pub(super) fn secret(&self) -> [u8; 32] {
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

/// Sends a stats request over a cluster-secret link and returns the `stats` object.
pub(super) fn stats_over<T: serde::Serialize>(
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
