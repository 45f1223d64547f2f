//! The backend process: `gpu-backend serve --profile <name> --socket <path>` (the GPU whole to
//! one guest) or `... --guest <path>:<size> ...` (VRAM slices, one socket each), optionally
//! with a vhost-user display per guest (`--display <path>`, or
//! `--guest socket=<path>,vram=<size>,display=<path>`), optionally with a control socket
//! (`--control <path>`, through which guests are added and removed while it runs: see
//! [`crate::control`]), started before a guest boots and stopped with SIGTERM afterwards.

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

/// A running backend serving one device per unix socket.
pub struct Backend {
    child: Option<Child>,
    sockets: Vec<PathBuf>,
    /// The vhost-user display sockets, one per entry of `sockets` that has a display.
    displays: Vec<PathBuf>,
    /// The control socket, if started with one.
    control: Option<PathBuf>,
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
        Self::spawn_inner(bin, profile, log, &[], false, extra_args, false)
    }

    /// Start `bin serve --profile <profile> --control <dir>/control.sock` with the guests of
    /// `guests` given by `--guest <dir>/<name>.sock:<size>` (none: the backend starts without
    /// guests); return once the control socket and every guest socket exist.
    /// [`Backend::control_socket`] is the control socket, [`Backend::path_of`] names the
    /// sockets of guests added later.
    pub fn spawn_with_control(
        bin: &Path,
        profile: &str,
        log: &Path,
        guests: &[(&str, u64)],
    ) -> Result<Backend> {
        Self::spawn_inner(bin, profile, log, guests, false, &[], true)
    }

    /// Start `bin serve --profile <profile> --socket <sock> --display <display>` (the whole
    /// GPU and a vhost-user display for its guest) and wait (bounded) for both sockets.
    /// [`Backend::display_socket`] is the display's socket.
    pub fn spawn_with_display(bin: &Path, profile: &str, log: &Path) -> Result<Backend> {
        Self::spawn_inner(bin, profile, log, &[], true, &[], false)
    }

    /// [`Backend::spawn_sliced`] with a display per guest: `--guest
    /// socket=<dir>/<name>.sock,vram=<size>,display=<dir>/<name>.display.sock`.
    /// [`Backend::display_of`] finds a guest's display socket.
    pub fn spawn_sliced_with_displays(
        bin: &Path,
        profile: &str,
        log: &Path,
        guests: &[(&str, u64)],
    ) -> Result<Backend> {
        needs_guests("spawn_sliced_with_displays", guests)?;
        Self::spawn_inner(bin, profile, log, guests, true, &[], false)
    }

    /// Start `bin serve --profile <profile> --guest <dir>/<name>.sock:<size> ...`: one VRAM
    /// slice per entry of `guests` (name, size in bytes), consecutive from the bottom of VRAM in
    /// this order; return once every socket exists. [`Backend::socket_of`] finds a guest's
    /// socket.
    pub fn spawn_sliced(
        bin: &Path,
        profile: &str,
        log: &Path,
        guests: &[(&str, u64)],
    ) -> Result<Backend> {
        needs_guests("spawn_sliced", guests)?;
        Self::spawn_inner(bin, profile, log, guests, false, &[], false)
    }

    fn spawn_inner(
        bin: &Path,
        profile: &str,
        log: &Path,
        guests: &[(&str, u64)],
        with_displays: bool,
        extra_args: &[String],
        with_control: bool,
    ) -> Result<Backend> {
        let socket_dir = new_socket_dir()?;
        let out = File::create(log).ctx(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().ctx(|| "duplicating the log file".into())?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--profile").arg(profile);
        let (mut sockets, mut displays) = (Vec::new(), Vec::new());
        let control = with_control.then(|| socket_dir.join("control.sock"));
        if let Some(path) = &control {
            cmd.arg("--control").arg(path);
        }
        if guests.is_empty() && !with_control {
            let socket = socket_dir.join("gpu.sock");
            cmd.arg("--socket").arg(&socket);
            sockets.push(socket);
            if with_displays {
                let display = socket_dir.join("display.sock");
                cmd.arg("--display").arg(&display);
                displays.push(display);
            }
        }
        for (name, size) in guests {
            let socket = socket_dir.join(format!("{name}.sock"));
            let spec = if with_displays {
                let display = socket_dir.join(format!("{name}.display.sock"));
                let mut spec = std::ffi::OsString::from("socket=");
                spec.push(&socket);
                spec.push(format!(",vram={size},display="));
                spec.push(&display);
                displays.push(display);
                spec
            } else {
                let mut spec = socket.clone().into_os_string();
                spec.push(format!(":{size}"));
                spec
            };
            cmd.arg("--guest").arg(spec);
            sockets.push(socket);
        }
        cmd.args(extra_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd.spawn().ctx(|| format!("starting {}", bin.display()))?;
        let mut backend = Backend {
            child: Some(child),
            sockets,
            displays,
            control,
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
            let missing = self
                .sockets
                .iter()
                .chain(&self.displays)
                .chain(&self.control)
                .find(|s| !std::fs::metadata(s).is_ok_and(|m| m.file_type().is_socket()))
                .cloned();
            let Some(missing) = missing else {
                return Ok(());
            };
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(self.error(format!(
                        "`serve --profile {}` exited with {status} before creating {}",
                        self.profile,
                        missing.display()
                    )));
                }
            }
            if start.elapsed() > SOCKET_WAIT {
                let _ = self.stop();
                return Err(self.error(format!(
                    "socket {} did not appear within {} s",
                    missing.display(),
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

    /// The unix socket QEMU connects to (the first guest's, when sliced).
    pub fn socket(&self) -> &Path {
        &self.sockets[0]
    }

    /// Every guest's socket, in the order given.
    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    /// The socket of the guest called `name` in [`Backend::spawn_sliced`].
    pub fn socket_of(&self, name: &str) -> Option<&Path> {
        let file = format!("{name}.sock");
        self.sockets
            .iter()
            .find(|s| s.file_name().is_some_and(|f| f == file.as_str()))
            .map(PathBuf::as_path)
    }

    /// The control socket (`None` unless started by [`Backend::spawn_with_control`]).
    pub fn control_socket(&self) -> Option<&Path> {
        self.control.as_deref()
    }

    /// `<socket dir>/<name>.sock`: where a guest called `name` is served (the name
    /// [`Backend::socket_of`] finds), for guests added through the control socket.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.socket_dir.join(format!("{name}.sock"))
    }

    /// The vhost-user display socket QEMU connects to (the first guest's, when sliced); `None`
    /// if the backend was started without displays.
    pub fn display_socket(&self) -> Option<&Path> {
        self.displays.first().map(PathBuf::as_path)
    }

    /// The display socket of the guest called `name` in
    /// [`Backend::spawn_sliced_with_displays`].
    pub fn display_of(&self, name: &str) -> Option<&Path> {
        let file = format!("{name}.display.sock");
        self.displays
            .iter()
            .find(|s| s.file_name().is_some_and(|f| f == file.as_str()))
            .map(PathBuf::as_path)
    }

    /// The process id of `gpu-backend serve` while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The file the backend logs to.
    pub fn log_path(&self) -> &Path {
        &self.log
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

/// Refuses a sliced start with no guest (`what` names the caller): it would serve nothing.
fn needs_guests(what: &str, guests: &[(&str, u64)]) -> Result<()> {
    if guests.is_empty() {
        return Err(HarnessError::Backend {
            reason: format!("{what} needs at least one guest"),
            log_tail: String::new(),
        });
    }
    Ok(())
}
