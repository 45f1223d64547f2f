//! A probe guest that keeps running while the host acts on it (the soak of several live
//! guests, hot-plug): start it ([`start_probe_guest`]), follow its console
//! ([`LiveGuest::wait_for_line`], [`LiveGuest::report`]), talk to QEMU over QMP
//! ([`LiveGuest::qmp`], e.g. `device_add`), then let it power off ([`LiveGuest::wait_exit`])
//! or stop it ([`LiveGuest::quit`]). Every wait is bounded; QEMU is killed when the handle is
//! dropped.
//!
//! ```no_run
//! use std::time::Duration;
//! use guest_tests::live::start_probe_guest;
//! use guest_tests::{GuestOptions, ProbeArgs};
//! let mut guest = start_probe_guest(&GuestOptions::new(ProbeArgs::new()).label("live"))?;
//! guest.wait_for_line("GPUPROBE done", 0, Duration::from_secs(120))?;
//! let report = guest.report();
//! guest.wait_exit(Duration::from_secs(30))?;
//! # Ok::<(), guest_tests::HarnessError>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Result;
use crate::guest::{probe_vm_config, GuestOptions};
use crate::paths::{keep_runs, new_run_dir, new_socket_dir};
use crate::qemu::{QemuLab, VmOutcome};
use crate::qmp::Qmp;
use crate::report::ProbeReport;
use crate::vm::{spawn_vm, RunningVm};

/// A running probe guest with a QMP socket.
pub struct LiveGuest {
    vm: RunningVm,
    run_dir: PathBuf,
    _socket_dir: SocketDir,
}

/// The directory of the QMP socket, removed with the guest.
struct SocketDir(PathBuf);

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Boot a probe guest for `opts` (its `timeout` is not applied: every wait names its own) with
/// a QMP socket; return at once.
pub fn start_probe_guest(opts: &GuestOptions) -> Result<LiveGuest> {
    let lab = QemuLab::get()?;
    let run_dir = new_run_dir(&opts.label)?;
    let socket_dir = new_socket_dir()?;
    let mut cfg = probe_vm_config(lab, opts, &run_dir)?;
    cfg.qmp_socket = Some(socket_dir.join("qmp.sock"));
    let vm = spawn_vm(lab, &cfg)?;
    Ok(LiveGuest {
        vm,
        run_dir,
        _socket_dir: SocketDir(socket_dir),
    })
}

impl LiveGuest {
    /// The run directory (serial log, QEMU's output and command line).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The console so far.
    pub fn serial(&self) -> String {
        self.vm.serial()
    }

    /// QEMU's stderr so far.
    pub fn stderr(&self) -> String {
        self.vm.stderr()
    }

    /// The probe's report from the console so far (complete lines only).
    pub fn report(&self) -> ProbeReport {
        let serial = self.serial();
        let complete = serial.rfind('\n').map_or("", |end| &serial[..=end]);
        ProbeReport::parse(complete)
    }

    /// How many complete console lines contain `marker`.
    pub fn count_lines(&self, marker: &str) -> usize {
        self.serial()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n') && l.contains(marker))
            .count()
    }

    /// Wait (at most `timeout`) until the console holds `n + 1` lines with `marker`; the one
    /// numbered `n` (0-based), from the marker on. Fails if QEMU exits first.
    pub fn wait_for_line(&mut self, marker: &str, n: usize, timeout: Duration) -> Result<String> {
        self.vm.wait_for_line(marker, n, timeout)
    }

    /// True while QEMU runs.
    pub fn is_running(&mut self) -> bool {
        self.vm.is_running()
    }

    /// The QMP session (connected on first use).
    pub fn qmp(&mut self) -> Result<&mut Qmp> {
        self.vm.qmp()
    }

    /// Wait (at most `timeout`, then kill QEMU) for QEMU to exit.
    pub fn wait_exit(self, timeout: Duration) -> Result<VmOutcome> {
        self.vm.wait_exit(timeout)
    }

    /// Stop QEMU with QMP `quit` and wait (at most `timeout`) for it to exit.
    pub fn quit(self, timeout: Duration) -> Result<VmOutcome> {
        self.vm.quit(timeout)
    }

    /// Remove the run directory unless `GUEST_TESTS_KEEP=1` (call once the checks passed).
    pub fn discard_logs(&self) {
        if !keep_runs() {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}
