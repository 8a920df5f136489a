//! CPU time and peak memory of the server processes, from `/proc`, by the PIDs that
//! `scripts/run.sh` records (and PostgreSQL's postmaster and its children).

use std::path::Path;

/// One server process (or PostgreSQL with all its backends).
#[derive(Debug, Clone)]
pub struct Proc {
    pub name: String,
    pub pids: Vec<u32>,
}

/// Figures of a process group at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// User + system CPU seconds.
    pub cpu_secs: f64,
    /// Resident memory now, bytes (summed over the group).
    pub rss: u64,
    /// Peak resident memory, bytes (summed over the group).
    pub peak_rss: u64,
}

fn clock_ticks() -> f64 {
    // Linux reports /proc times in USER_HZ, 100 on every platform we run on.
    100.0
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; everything after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds, RSS and peak RSS of `pid` (zero if it is gone).
fn sample_pid(pid: u32) -> Sample {
    let Some(f) = stat_fields(pid) else {
        return Sample::default();
    };
    // After the name: state(0) ppid(1) … utime(11) stime(12).
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Sample {
        cpu_secs: ticks / clock_ticks(),
        rss: status_kb(pid, "VmRSS:") * 1024,
        peak_rss: status_kb(pid, "VmHWM:") * 1024,
    }
}

impl Proc {
    /// Sums the group's figures now.
    pub fn sample(&self) -> Sample {
        let mut total = Sample::default();
        for pid in self.current_pids() {
            let s = sample_pid(pid);
            total.cpu_secs += s.cpu_secs;
            total.rss += s.rss;
            total.peak_rss += s.peak_rss;
        }
        total
    }

    /// The group's PIDs: for PostgreSQL, the postmaster's children come and go.
    fn current_pids(&self) -> Vec<u32> {
        if self.name != "postgres" {
            return self.pids.clone();
        }
        let Some(&master) = self.pids.first() else {
            return Vec::new();
        };
        let mut pids = vec![master];
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                if stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()))
                    == Some(master)
                {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The server processes of the cluster under `home` (as `scripts/run.sh` lays it out).
pub fn discover(home: &Path) -> Vec<Proc> {
    let mut procs = Vec::new();
    if let Ok(dir) = std::fs::read_dir(home.join("run")) {
        let mut entries: Vec<_> = dir.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".pid")
                .to_string();
            if let Some(pid) = read_pid(&entry.path()) {
                if Path::new(&format!("/proc/{pid}")).exists() {
                    procs.push(Proc {
                        name,
                        pids: vec![pid],
                    });
                }
            }
        }
    }
    let pgdata = std::fs::read_to_string(home.join("pg.location"))
        .map(|s| std::path::PathBuf::from(s.trim()))
        .unwrap_or_else(|_| home.join("pg"));
    if let Some(pid) = read_pid(&pgdata.join("postmaster.pid")) {
        procs.push(Proc {
            name: "postgres".into(),
            pids: vec![pid],
        });
    }
    procs
}
