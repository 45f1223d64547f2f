//! A `gpu-backend serve` child process: its stderr goes to a log file (a pipe nobody drains
//! would stall the server once full), its sockets are waited for, and it is stopped with a
//! signal within a bound, or killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A private directory for sockets and logs, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory named after `tag`, this process and the time.
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("gpu-backend-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// `name` inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `gpu-backend serve`.
#[derive(Debug)]
pub struct ServeProcess {
    child: Option<Child>,
    log: PathBuf,
    sockets: Vec<PathBuf>,
}

impl ServeProcess {
    /// Start `binary serve <args>` (stderr to `log`, `RUST_LOG=warn` unless set) and wait up
    /// to 60 s for every socket in `sockets` to appear.
    pub fn start(
        binary: &Path,
        args: &[String],
        sockets: Vec<PathBuf>,
        log: PathBuf,
    ) -> ServeProcess {
        let stderr = std::fs::File::create(&log).expect("create the server log");
        let child = Command::new(binary)
            .arg("serve")
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn gpu-backend serve");
        let mut process = ServeProcess {
            child: Some(child),
            log,
            sockets,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !process.sockets.iter().all(|s| s.exists()) {
            if let Some(status) = process.exited() {
                panic!("serve exited early with {status}:\n{}", process.log_text());
            }
            assert!(Instant::now() < deadline, "the sockets never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        process
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The exit status, if the server has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// What the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Send `signal` and wait up to `within` for the process to end: its status and how long
    /// it took, or `Err` (the process is then killed).
    pub fn stop(
        &mut self,
        signal: libc::c_int,
        within: Duration,
    ) -> Result<(ExitStatus, Duration), String> {
        let Some(child) = self.child.as_mut() else {
            return Err("already stopped".into());
        };
        let start = Instant::now();
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Ok((status, start.elapsed()));
            }
            if start.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                return Err(format!("still running {within:?} after signal {signal}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The sockets the server was started with.
    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
