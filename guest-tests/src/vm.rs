//! A QEMU guest that stays alive while the host acts on it: start it ([`spawn_vm`]), wait for
//! marker lines on its serial console ([`RunningVm::wait_for_line`]), talk to QEMU over QMP
//! ([`RunningVm::qmp`], e.g. a `screendump`), then let it finish ([`RunningVm::wait_exit`]) or
//! stop it ([`RunningVm::quit`]). Every wait has a time limit; QEMU is killed when the handle
//! is dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{tail, HarnessError, IoContext, Result};
use crate::qemu::{qemu_args, shell_quote, QemuLab, VmConfig, VmOutcome};
use crate::qmp::Qmp;

/// How long QEMU may take to open its QMP socket after it started.
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the serial log and the process are polled.
const POLL: Duration = Duration::from_millis(25);

/// A running QEMU.
pub struct RunningVm {
    child: Option<Child>,
    serial_log: PathBuf,
    stderr_path: PathBuf,
    qmp_socket: Option<PathBuf>,
    qmp: Option<Qmp>,
    start: Instant,
}

fn read_lossy(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

/// Start QEMU for `cfg` (its command line goes to `qemu.cmdline`, its stdout and stderr to
/// `qemu.stdout` and `qemu.stderr`, next to the serial log).
pub fn spawn_vm(lab: &QemuLab, cfg: &VmConfig) -> Result<RunningVm> {
    let dir = cfg.serial_log.parent().unwrap_or(Path::new("."));
    let stdout_path = dir.join("qemu.stdout");
    let stderr_path = dir.join("qemu.stderr");
    let args = qemu_args(cfg);
    let cmdline = std::iter::once(lab.qemu_bin.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(dir.join("qemu.cmdline"), format!("{cmdline}\n"))
        .ctx(|| "writing qemu.cmdline".into())?;
    let stdout =
        File::create(&stdout_path).ctx(|| format!("creating {}", stdout_path.display()))?;
    let stderr =
        File::create(&stderr_path).ctx(|| format!("creating {}", stderr_path.display()))?;
    let child = Command::new(&lab.qemu_bin)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .ctx(|| format!("starting {}", lab.qemu_bin.display()))?;
    Ok(RunningVm {
        child: Some(child),
        serial_log: cfg.serial_log.clone(),
        stderr_path,
        qmp_socket: cfg.qmp_socket.clone(),
        qmp: None,
        start: Instant::now(),
    })
}

impl RunningVm {
    /// The serial console output so far.
    pub fn serial(&self) -> String {
        read_lossy(&self.serial_log)
    }

    /// QEMU's stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// Time since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    fn timeout_error(&self, timeout: Duration) -> HarnessError {
        HarnessError::Timeout {
            secs: timeout.as_secs(),
            stderr: self.stderr(),
            serial_tail: tail(&self.serial(), 40),
        }
    }

    /// True while QEMU runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Wait until the console holds at least `n + 1` lines containing `marker` and return the
    /// one numbered `n` (0-based; the text from the marker on). Fails if QEMU exits first or
    /// after `timeout` (QEMU keeps running then: the caller decides).
    pub fn wait_for_line(&mut self, marker: &str, n: usize, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            let serial = self.serial();
            // Only complete lines (a newline follows) count.
            let found = serial
                .split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .filter_map(|l| l.find(marker).map(|at| &l[at..]))
                .nth(n);
            if let Some(line) = found {
                return Ok(line.trim_end().to_string());
            }
            if !self.is_running() {
                return Err(HarnessError::GuestIncomplete {
                    what: format!("QEMU exited before console line {} with `{marker}`", n + 1),
                    serial_tail: format!(
                        "{}\n--- QEMU stderr ---\n{}",
                        tail(&self.serial(), 40),
                        self.stderr()
                    ),
                });
            }
            if start.elapsed() >= timeout {
                return Err(self.timeout_error(timeout));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The QMP session (connected on first use). Errors if the configuration had no QMP
    /// socket.
    pub fn qmp(&mut self) -> Result<&mut Qmp> {
        let qmp = match self.qmp.take() {
            Some(qmp) => qmp,
            None => {
                let path = self
                    .qmp_socket
                    .as_ref()
                    .ok_or_else(|| HarnessError::Build {
                        what: "QMP session".into(),
                        reason: "the VM was started without a QMP socket".into(),
                    })?;
                Qmp::connect(path, QMP_CONNECT_TIMEOUT)?
            }
        };
        Ok(self.qmp.insert(qmp))
    }

    /// Wait for QEMU to exit (the guest powered off), at most `timeout` (then kill it and
    /// return [`HarnessError::Timeout`]).
    pub fn wait_exit(mut self, timeout: Duration) -> Result<VmOutcome> {
        let start = Instant::now();
        let Some(mut child) = self.child.take() else {
            return Err(HarnessError::Build {
                what: "QEMU".into(),
                reason: "already reaped".into(),
            });
        };
        let status = loop {
            if let Some(status) = child.try_wait().ctx(|| "waiting for QEMU".into())? {
                break status;
            }
            if start.elapsed() >= timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.timeout_error(timeout));
            }
            std::thread::sleep(POLL);
        };
        Ok(VmOutcome {
            serial: self.serial(),
            stderr: self.stderr(),
            duration: self.start.elapsed(),
            status,
        })
    }

    /// Stop QEMU through QMP `quit` and wait (at most `timeout`) for it to exit.
    pub fn quit(mut self, timeout: Duration) -> Result<VmOutcome> {
        self.qmp()?.quit()?;
        self.wait_exit(timeout)
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
