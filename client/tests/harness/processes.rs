//! Real `fastchat-auth` and `fastchat-relay` processes: started, their logs watched,
//! stopped or killed.

use super::*;

/// A server process whose stderr is copied to a log file and watched.
pub struct ServerProcess {
    child: Child,
    pub log_path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    pub(super) fn spawn(binary: &Path, args: &[String], log_path: PathBuf) -> ServerProcess {
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

pub fn binary(name: &str) -> PathBuf {
    // The client's own binary is built for its integration tests; the servers sit
    // beside it in the same target directory.
    let client = PathBuf::from(env!("CARGO_BIN_EXE_fastchat"));
    client.with_file_name(name)
}
