//! The backend's control socket from the harness, through the command-line client the way a
//! user drives it: `gpu-backend ctl --control PATH --json list | add | remove | stats`. Answers
//! are decoded into the backend's own types ([`GpuReport`], [`GuestInfo`]); a refusal (exit
//! status 2 with the backend's message) is [`CtlError::Refused`].
//!
//! ```no_run
//! use guest_tests::control::Ctl;
//! # fn f(bin: &std::path::Path, control: &std::path::Path) -> Result<(), guest_tests::control::CtlError> {
//! let ctl = Ctl::new(bin, control);
//! let added = ctl.add(std::path::Path::new("/tmp/g1.sock"), 16 << 20)?;
//! assert!(ctl.list()?.guests.iter().any(|g| g.vram_start == added.vram_start));
//! ctl.remove(std::path::Path::new("/tmp/g1.sock"), false)?;
//! # Ok(()) }
//! ```

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gpu_backend::guests::{GpuReport, GuestInfo};
use serde::de::DeserializeOwned;

/// Errors of a `gpu-backend ctl` run.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The client could not be started.
    #[error("running `gpu-backend ctl {args}`: {source}")]
    Spawn {
        /// Its arguments.
        args: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The client exited unsuccessfully (the backend refused, or could not be reached).
    #[error("`gpu-backend ctl {args}` exited with {code:?}: {stderr}")]
    Refused {
        /// Its arguments.
        args: String,
        /// Its exit code (2 for a refusal).
        code: Option<i32>,
        /// What it printed on stderr (the backend's message).
        stderr: String,
    },
    /// The answer was not the JSON expected.
    #[error("`gpu-backend ctl {args}` printed unexpected JSON ({reason}): {stdout}")]
    Decode {
        /// Its arguments.
        args: String,
        /// Why it could not be decoded.
        reason: String,
        /// What it printed.
        stdout: String,
    },
}

/// How one `gpu-backend ctl` run ended.
#[derive(Clone, Debug)]
pub struct CtlRun {
    /// The arguments after `--json`.
    pub args: String,
    /// Its exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Its stdout (the backend's JSON answer on success).
    pub stdout: String,
    /// Its stderr (the error message on failure).
    pub stderr: String,
    /// How long it took.
    pub elapsed: Duration,
}

impl CtlRun {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    fn ok(self) -> Result<CtlRun, CtlError> {
        if self.success() {
            Ok(self)
        } else {
            Err(CtlError::Refused {
                args: self.args,
                code: self.code,
                stderr: self.stderr.trim().to_string(),
            })
        }
    }

    fn decode<T: DeserializeOwned>(self) -> Result<T, CtlError> {
        let run = self.ok()?;
        serde_json::from_str(&run.stdout).map_err(|e| CtlError::Decode {
            args: run.args,
            reason: e.to_string(),
            stdout: run.stdout,
        })
    }
}

/// `gpu-backend ctl` against one control socket.
#[derive(Clone, Debug)]
pub struct Ctl {
    bin: PathBuf,
    control: PathBuf,
}

impl Ctl {
    /// The client `bin` (the `gpu-backend` binary) talking to the control socket `control`.
    pub fn new(bin: &Path, control: &Path) -> Ctl {
        Ctl {
            bin: bin.to_path_buf(),
            control: control.to_path_buf(),
        }
    }

    /// `gpu-backend ctl --control <socket> --json <args>`, whatever its exit status.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<CtlRun, CtlError> {
        let shown = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let start = Instant::now();
        let out = Command::new(&self.bin)
            .arg("ctl")
            .arg("--control")
            .arg(&self.control)
            .arg("--json")
            .args(args)
            .output()
            .map_err(|source| CtlError::Spawn {
                args: shown.clone(),
                source,
            })?;
        Ok(CtlRun {
            args: shown,
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: start.elapsed(),
        })
    }

    /// `list`: the GPU, its free VRAM and every guest.
    pub fn list(&self) -> Result<GpuReport, CtlError> {
        self.run(&["list"])?.decode()
    }

    /// The guest served on `socket`, as `list` shows it (`None`: no such guest).
    pub fn guest(&self, socket: &Path) -> Result<Option<GuestInfo>, CtlError> {
        let socket = socket.to_string_lossy();
        Ok(self.list()?.guests.into_iter().find(|g| g.socket == socket))
    }

    /// `add --socket <socket> --vram <vram>` (bytes, a multiple of 2 MiB): the new guest.
    pub fn add(&self, socket: &Path, vram: u64) -> Result<GuestInfo, CtlError> {
        self.run(&add_args(socket, vram))?.decode()
    }

    /// `add --socket <socket> --vram <vram> --no-msix`: a guest QEMU can hot-unplug.
    pub fn add_without_msix(&self, socket: &Path, vram: u64) -> Result<GuestInfo, CtlError> {
        let mut args = add_args(socket, vram);
        args.push("--no-msix".into());
        self.run(&args)?.decode()
    }

    /// `remove --socket <socket> [--force]`; an error if the backend refused.
    pub fn remove(&self, socket: &Path, force: bool) -> Result<CtlRun, CtlError> {
        self.run(&remove_args(socket, force))?.ok()
    }
}

/// The arguments of `add`.
pub fn add_args(socket: &Path, vram: u64) -> Vec<OsString> {
    vec![
        "add".into(),
        "--socket".into(),
        socket.into(),
        "--vram".into(),
        vram.to_string().into(),
    ]
}

/// The arguments of `remove`.
pub fn remove_args(socket: &Path, force: bool) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["remove".into(), "--socket".into(), socket.into()];
    if force {
        a.push("--force".into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_and_answers() {
        assert_eq!(
            add_args(Path::new("/t/a.sock"), 16 << 20),
            ["add", "--socket", "/t/a.sock", "--vram", "16777216"]
        );
        assert_eq!(
            remove_args(Path::new("/t/a.sock"), true),
            ["remove", "--socket", "/t/a.sock", "--force"]
        );
        assert_eq!(remove_args(Path::new("/t/a.sock"), false).len(), 3);
        let run = |code, stdout: &str| CtlRun {
            args: "list".into(),
            code,
            stdout: stdout.into(),
            stderr: "gpu-backend: error: no\n".into(),
            elapsed: Duration::ZERO,
        };
        let info = r#"{"socket":"/t/a.sock","vram_start":0,"vram_size":2097152,
            "connected":false,"traps":{"passed_reads":0,"passed_writes":0,"hidden_reads":0,
            "dropped_writes":0,"window_writes":0,"aperture_bytes_read":0,
            "aperture_bytes_written":0,"aperture_bytes_refused":0,"hidden_offsets":[]}}"#;
        let g: GuestInfo = run(Some(0), info).decode().unwrap();
        assert_eq!((g.vram_size, g.connected, g.msix), (2 << 20, false, true));
        match run(Some(2), info).decode::<GuestInfo>() {
            Err(CtlError::Refused { code, stderr, .. }) => {
                assert_eq!((code, stderr.as_str()), (Some(2), "gpu-backend: error: no"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run(Some(0), "{").decode::<GuestInfo>(),
            Err(CtlError::Decode { .. })
        ));
    }
}
