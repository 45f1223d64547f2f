//! The harness's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while preparing or booting a guest.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// `qemu-configs/install.sh` failed or its output was unusable.
    #[error("installing the QEMU lab with {script}: {reason}")]
    QemuInstall {
        /// The install script.
        script: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Building a binary (the guest probe or the backend) failed.
    #[error("building {what}: {reason}")]
    Build {
        /// What was being built.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// QEMU exited unsuccessfully (e.g. it could not connect to the vfio-user socket).
    #[error("QEMU exited with {status}\n--- QEMU stderr ---\n{stderr}\n--- serial log (tail) ---\n{serial_tail}")]
    QemuFailed {
        /// Exit status description.
        status: String,
        /// QEMU's stderr.
        stderr: String,
        /// The end of the guest's serial log.
        serial_tail: String,
    },
    /// The guest did not power off in time; QEMU was killed.
    #[error("guest did not finish within {secs} s (QEMU killed)\n--- QEMU stderr ---\n{stderr}\n--- serial log (tail) ---\n{serial_tail}")]
    Timeout {
        /// The timeout.
        secs: u64,
        /// QEMU's stderr.
        stderr: String,
        /// The end of the guest's serial log.
        serial_tail: String,
    },
    /// The guest powered off but the probe never printed its `GPUPROBE done` line.
    #[error("the guest probe did not finish (no `GPUPROBE done` line)\n--- serial log (tail) ---\n{serial_tail}")]
    ProbeIncomplete {
        /// The end of the guest's serial log.
        serial_tail: String,
    },
    /// A nested guest powered off before reporting the end of its commands.
    #[error("{what} did not finish (no end marker)\n--- serial log (tail) ---\n{serial_tail}")]
    GuestIncomplete {
        /// What did not finish.
        what: String,
        /// The end of the guest's serial log.
        serial_tail: String,
    },
    /// `gpu-backend inspect` failed (e.g. an unknown profile) or printed unusable JSON.
    #[error("`gpu-backend inspect --profile {profile}`: {reason}")]
    Inspect {
        /// The profile asked for.
        profile: String,
        /// What went wrong (the backend's own message for an unknown profile).
        reason: String,
    },
    /// The backend's host VRAM could not be found or accessed.
    #[error("host VRAM: {0}")]
    HostVram(#[from] crate::host_vram::HostVramError),
    /// Talking to QEMU over QMP failed.
    #[error("QMP: {0}")]
    Qmp(#[from] crate::qmp::QmpError),
    /// A screenshot could not be read or saved.
    #[error("screenshot: {0}")]
    Screenshot(#[from] crate::screenshot::ScreenshotError),
    /// `gpu-backend ctl` failed or was refused.
    #[error("control socket: {0}")]
    Control(#[from] crate::control::CtlError),
    /// The backend process could not be started or did not create its socket.
    #[error("backend: {reason}\n--- backend log (tail) ---\n{log_tail}")]
    Backend {
        /// What went wrong.
        reason: String,
        /// The end of the backend's output.
        log_tail: String,
    },
}

/// Result alias of the harness.
pub type Result<T> = std::result::Result<T, HarnessError>;

/// Attach a context string to I/O errors.
pub trait IoContext<T> {
    /// Turn an `io::Error` into [`HarnessError::Io`] with `context`.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| HarnessError::Io {
            context: context(),
            source,
        })
    }
}

/// The last `lines` lines of `text` (for error messages).
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
