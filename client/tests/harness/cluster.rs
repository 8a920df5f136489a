//! The private PostgreSQL cluster of a test process (run as `postgres` when the tests
//! run as root), its watchdog, and fresh databases.

use super::*;

pub(super) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The directory of PostgreSQL's server binaries.
pub(super) fn pg_bin() -> PathBuf {
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
pub(super) fn pg_command(tool: &str) -> Command {
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

    pub(super) fn pg_ctl_start(&self) {
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

    pub(super) fn create() -> Cluster {
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
