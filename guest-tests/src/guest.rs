//! The top-level API: boot a guest running the probe, optionally attached to a vfio-user
//! backend, and return the parsed [`ProbeReport`].

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::artifacts::{backend_binary, probe_binary};
use crate::backend::Backend;
use crate::error::{tail, HarnessError, Result};
use crate::initramfs::write_guest_initramfs;
use crate::paths::{harness_dir, keep_runs, new_run_dir};
use crate::probe_args::ProbeArgs;
use crate::qemu::{run_vm, QemuLab, VmConfig, DEFAULT_MEMORY_MIB, DEFAULT_SMP};
use crate::report::ProbeReport;

/// Default limit for one boot (TCG boot to power-off is about 6 s on two cores).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);
/// Kernel parameters always given to the guest. `iomem=relaxed` keeps `/dev/mem` usable on BARs.
pub const BASE_KERNEL_ARGS: &str = "console=ttyS0 quiet panic=-1 iomem=relaxed";

/// Options of one guest boot.
#[derive(Clone, Debug)]
pub struct GuestOptions {
    /// What the probe should expect.
    pub probe: ProbeArgs,
    /// vfio-user socket to attach (`None`: boot without the device).
    pub vfio_user_socket: Option<PathBuf>,
    /// Extra JSON members for the vfio-user-pci device (e.g. `"x-no-posted-writes":true`).
    pub vfio_user_props: Vec<String>,
    /// Limit for the whole boot.
    pub timeout: Duration,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Guest vCPUs (`-smp`).
    pub smp: u32,
    /// Extra kernel command-line words.
    pub extra_kernel_args: String,
    /// Extra raw QEMU arguments.
    pub extra_qemu_args: Vec<String>,
    /// Name of the run directory (`<target>/guest-tests/runs/<label>-<pid>-<n>`).
    pub label: String,
}

impl GuestOptions {
    /// Defaults: no device, the given probe arguments, [`DEFAULT_TIMEOUT`].
    pub fn new(probe: ProbeArgs) -> Self {
        GuestOptions {
            probe,
            vfio_user_socket: None,
            vfio_user_props: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            memory_mib: DEFAULT_MEMORY_MIB,
            smp: DEFAULT_SMP,
            extra_kernel_args: String::new(),
            extra_qemu_args: Vec::new(),
            label: "guest".into(),
        }
    }

    /// Attach the vfio-user server listening on `socket`.
    pub fn with_socket(mut self, socket: &Path) -> Self {
        self.vfio_user_socket = Some(socket.to_path_buf());
        self
    }

    /// Name the run directory.
    pub fn label(mut self, label: &str) -> Self {
        self.label = label.into();
        self
    }

    /// Number of guest vCPUs.
    pub fn smp(mut self, vcpus: u32) -> Self {
        self.smp = vcpus.max(1);
        self
    }

    /// Append raw QEMU arguments (e.g. `["-device", "edu"]`).
    pub fn qemu_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_qemu_args
            .extend(args.into_iter().map(Into::into));
        self
    }
}

/// The result of one boot.
#[derive(Debug)]
pub struct GuestRun {
    /// Parsed probe output.
    pub report: ProbeReport,
    /// Full serial console log.
    pub serial_log: String,
    /// QEMU's stderr.
    pub qemu_stderr: String,
    /// Wall time from QEMU start to exit.
    pub boot_time: Duration,
    /// Directory holding the logs (removed after a clean run unless `GUEST_TESTS_KEEP=1`).
    pub run_dir: PathBuf,
}

/// The guest initramfs (busybox + probe), built once per process.
pub fn guest_initramfs() -> Result<PathBuf> {
    static INITRD: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    INITRD
        .get_or_init(|| {
            let build = || -> Result<PathBuf> {
                let lab = QemuLab::get()?;
                let probe = probe_binary()?;
                write_guest_initramfs(&lab.busybox, &probe, &harness_dir())
            };
            build().map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|reason| HarnessError::Build {
            what: "guest initramfs".into(),
            reason,
        })
}

/// Boot one guest and return the probe's report. Errors: QEMU cannot be installed or run,
/// QEMU fails (e.g. cannot connect to the socket), the boot times out, or the probe never
/// printed `GPUPROBE done`. Failed checks are *not* errors: inspect the report.
pub fn boot_guest(opts: &GuestOptions) -> Result<GuestRun> {
    let lab = QemuLab::get()?;
    let run_dir = new_run_dir(&opts.label)?;
    let cfg = probe_vm_config(lab, opts, &run_dir)?;
    let outcome = run_vm(lab, &cfg, opts.timeout)?;
    if !outcome.status.success() {
        return Err(HarnessError::QemuFailed {
            status: outcome.status.to_string(),
            stderr: outcome.stderr,
            serial_tail: tail(&outcome.serial, 40),
        });
    }
    let report = ProbeReport::parse(&outcome.serial);
    if !report.is_complete() {
        return Err(HarnessError::ProbeIncomplete {
            serial_tail: tail(&outcome.serial, 60),
        });
    }
    if report.all_passed() && !keep_runs() {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    Ok(GuestRun {
        report,
        serial_log: outcome.serial,
        qemu_stderr: outcome.stderr,
        boot_time: outcome.duration,
        run_dir,
    })
}

/// The QEMU configuration of a probe guest for `opts`, its serial log in `run_dir` (no QMP
/// socket, no reboots).
pub fn probe_vm_config(lab: &QemuLab, opts: &GuestOptions, run_dir: &Path) -> Result<VmConfig> {
    let initrd = guest_initramfs()?;
    let mut append = format!("{BASE_KERNEL_ARGS} {}", opts.probe.kernel_args());
    if !opts.extra_kernel_args.is_empty() {
        append.push(' ');
        append.push_str(&opts.extra_kernel_args);
    }
    Ok(VmConfig {
        kernel: lab.guest_kernel.clone(),
        initrd,
        append: append.trim_end().to_string(),
        vfio_user_socket: opts.vfio_user_socket.clone(),
        vfio_user_props: opts.vfio_user_props.clone(),
        iommu: false,
        memory_mib: opts.memory_mib,
        smp: opts.smp,
        serial_log: run_dir.join("serial.log"),
        display: None,
        qmp_socket: None,
        allow_reboot: false,
        extra_args: opts.extra_qemu_args.clone(),
    })
}

/// Boot a guest with no vfio-user device (tests the QEMU/kernel/initramfs/probe pipeline).
pub fn boot_guest_without_device(probe: &ProbeArgs) -> Result<GuestRun> {
    boot_guest(&GuestOptions::new(probe.clone()).label("no-device"))
}

/// Start the backend for `profile`, boot one guest attached to it, stop the backend.
pub fn boot_guest_with_backend(profile: &str, probe: &ProbeArgs) -> Result<ProbeReport> {
    let run = with_backend(profile, |backend| {
        boot_guest(
            &GuestOptions::new(probe.clone())
                .with_socket(backend.socket())
                .label(profile),
        )
    })?;
    Ok(run.report)
}

/// Start the backend for `profile`, run `f` with it (e.g. several guests in a row against the
/// same backend, for persistence), then stop it. Backend output goes to
/// `<target>/guest-tests/runs/backend-<profile>-…/backend.log`.
pub fn with_backend<T>(profile: &str, f: impl FnOnce(&Backend) -> Result<T>) -> Result<T> {
    with_backend_bin(&backend_binary()?, profile, f)
}

/// [`with_backend`] with a given backend binary (e.g. a release build from
/// [`crate::artifacts::backend_binary_for`]).
pub fn with_backend_bin<T>(
    bin: &Path,
    profile: &str,
    f: impl FnOnce(&Backend) -> Result<T>,
) -> Result<T> {
    let dir = new_run_dir(&format!("backend-{profile}"))?;
    let backend = Backend::spawn_with(bin, profile, &dir.join("backend.log"), &[])?;
    run_then_stop(backend, &dir, f)
}

/// Start `bin serve --profile <profile>` with one VRAM slice per entry of `guests` (name, size
/// in bytes; see [`Backend::spawn_sliced`]), run `f` with it, then stop it.
pub fn with_sliced_backend<T>(
    bin: &Path,
    profile: &str,
    guests: &[(&str, u64)],
    f: impl FnOnce(&Backend) -> Result<T>,
) -> Result<T> {
    let dir = new_run_dir(&format!("backend-{profile}-sliced"))?;
    let backend = Backend::spawn_sliced(bin, profile, &dir.join("backend.log"), guests)?;
    run_then_stop(backend, &dir, f)
}

/// Start `bin serve --profile <profile> --socket S --display D` (the whole GPU with a
/// vhost-user display, see [`Backend::spawn_with_display`]), run `f` with it, then stop it.
pub fn with_display_backend<T>(
    bin: &Path,
    profile: &str,
    f: impl FnOnce(&Backend) -> Result<T>,
) -> Result<T> {
    let dir = new_run_dir(&format!("backend-{profile}-display"))?;
    let backend = Backend::spawn_with_display(bin, profile, &dir.join("backend.log"))?;
    run_then_stop(backend, &dir, f)
}

/// [`with_sliced_backend`] with a vhost-user display per guest (see
/// [`Backend::spawn_sliced_with_displays`]).
pub fn with_sliced_display_backend<T>(
    bin: &Path,
    profile: &str,
    guests: &[(&str, u64)],
    f: impl FnOnce(&Backend) -> Result<T>,
) -> Result<T> {
    let dir = new_run_dir(&format!("backend-{profile}-displays"))?;
    let backend =
        Backend::spawn_sliced_with_displays(bin, profile, &dir.join("backend.log"), guests)?;
    run_then_stop(backend, &dir, f)
}

fn run_then_stop<T>(
    mut backend: Backend,
    dir: &Path,
    f: impl FnOnce(&Backend) -> Result<T>,
) -> Result<T> {
    let result = f(&backend);
    backend.stop();
    match &result {
        Ok(_) if !keep_runs() => {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(_) => {}
        Err(_) => eprintln!(
            "--- backend log ({}) tail ---\n{}",
            dir.join("backend.log").display(),
            tail(&backend.log_text(), 40)
        ),
    }
    result
}
