//! The backend process: `gpu-backend serve --profile <name> --socket <path>`, started before a
//! guest boots and stopped with SIGTERM afterwards.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::artifacts::backend_binary;
use crate::error::{tail, HarnessError, IoContext, Result};
use crate::paths::new_socket_dir;

/// How long to wait for the backend's socket to appear.
pub const SOCKET_WAIT: Duration = Duration::from_secs(30);
/// How long to wait for the backend to exit after SIGTERM before SIGKILL.
pub const STOP_WAIT: Duration = Duration::from_secs(10);

/// A running backend serving one device on a unix socket.
pub struct Backend {
    child: Option<Child>,
    socket: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    profile: String,
}

impl Backend {
    /// Build (if needed) and start the backend for `profile`, logging to `log`, with its socket
    /// in a fresh short temporary directory; return once the socket exists.
    pub fn spawn(profile: &str, log: &Path) -> Result<Backend> {
        let bin = backend_binary()?;
        Self::spawn_with(&bin, profile, log, &[])
    }

    /// Start `bin serve --profile <profile> --socket <sock> <extra_args>` and wait (bounded) for
    /// the socket to appear.
    pub fn spawn_with(
        bin: &Path,
        profile: &str,
        log: &Path,
        extra_args: &[String],
    ) -> Result<Backend> {
        let socket_dir = new_socket_dir()?;
        let socket = socket_dir.join("gpu.sock");
        let out = File::create(log).ctx(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().ctx(|| "duplicating the log file".into())?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--profile")
            .arg(profile)
            .arg("--socket")
            .arg(&socket)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd.spawn().ctx(|| format!("starting {}", bin.display()))?;
        let mut backend = Backend {
            child: Some(child),
            socket,
            socket_dir,
            log: log.to_path_buf(),
            profile: profile.to_string(),
        };
        backend.wait_for_socket()?;
        Ok(backend)
    }

    fn wait_for_socket(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if std::fs::metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket()) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(self.error(format!(
                        "`serve --profile {}` exited with {status} before creating {}",
                        self.profile,
                        self.socket.display()
                    )));
                }
            }
            if start.elapsed() > SOCKET_WAIT {
                let _ = self.stop();
                return Err(self.error(format!(
                    "socket {} did not appear within {} s",
                    self.socket.display(),
                    SOCKET_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn error(&self, reason: String) -> HarnessError {
        HarnessError::Backend {
            reason,
            log_tail: tail(&self.log_text(), 40),
        }
    }

    /// The unix socket QEMU connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The backend's output so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Send SIGTERM, wait up to [`STOP_WAIT`], then SIGKILL. Returns the exit status (None if it
    /// was already reaped).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on the pid of our own, not yet reaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let start = Instant::now();
        while start.elapsed() < STOP_WAIT {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.socket_dir);
    }
}
