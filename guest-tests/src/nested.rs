//! Nested VFIO runs: the real Linux VFIO stack inside a QEMU guest. The host runs the outer
//! `gpu-backend serve --profile P --socket S ...` (an emulated GPU); QEMU (q35, TCG, an
//! emulated Intel IOMMU, shared memfd RAM) attaches it as a vfio-user-pci device at guest
//! 0000:00:05.0; the guest's `/init` ([`crate::guest_script`]) loads the guest kernel's VFIO
//! modules, binds the device to vfio-pci, checks its `/dev/vfio/<group>` and runs the test's
//! [`GuestCommand`]s with static programs (`gpu-backend`, `gpu-guest-vfio-client`,
//! `gpu-guest-vfio-bench`) that drive the device through the VFIO UAPI. Results come back on
//! the serial console ([`GuestResults`]); the outer backend stays alive afterwards so the host
//! can look at its VRAM ([`crate::HostVram::open`]).
//!
//! ```no_run
//! use guest_tests::guest_script::GuestCommand;
//! use guest_tests::nested::{boot_nested, spawn_outer_backend, NestedOptions};
//! let backend = spawn_outer_backend("tu102-24g", &[], "nested-doc")?;
//! let opts = NestedOptions::new(vec![GuestCommand::run("ls", "ls -l /dev/vfio")]);
//! let run = boot_nested(backend, &opts)?;
//! assert!(run.results.get("vfio-group").is_some_and(|r| r.success()));
//! # Ok::<(), guest_tests::HarnessError>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::artifacts::{backend_binary, guest_binary, GuestBinary};
use crate::backend::Backend;
use crate::error::{tail, HarnessError, IoContext, Result};
use crate::guest_script::{
    commands_script, init_script, GuestCommand, GuestResults, ALIVE_SCRIPT, COMMANDS_PATH, MODULES,
    MODULE_DIR, WAIT_SOCKET_SCRIPT,
};
use crate::initramfs::CpioArchive;
use crate::paths::{keep_runs, new_run_dir};
use crate::qemu::{run_vm, QemuLab, VmConfig};

/// Guest RAM of a nested guest in MiB: the static programs, the inner backend and the DMA
/// buffers it maps; the guest has no VRAM of its own to back.
pub const NESTED_MEMORY_MIB: u32 = 1024;
/// Limit of one nested boot (TCG; the commands' work included).
pub const NESTED_TIMEOUT: Duration = Duration::from_secs(900);
/// Kernel parameters of a nested guest.
pub const NESTED_KERNEL_ARGS: &str = "console=ttyS0 quiet panic=-1 intel_iommu=on";
/// Where the guest binaries go in the image.
const BIN_DIR: &str = "bin";

/// Options of one nested boot.
#[derive(Clone, Debug)]
pub struct NestedOptions {
    /// What the guest runs after its setup.
    pub commands: Vec<GuestCommand>,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub smp: u32,
    /// Limit of the whole boot.
    pub timeout: Duration,
    /// Extra kernel command-line words.
    pub extra_kernel_args: String,
    /// Name of the run directory.
    pub label: String,
}

impl NestedOptions {
    /// Defaults: [`NESTED_MEMORY_MIB`], 2 vCPUs, [`NESTED_TIMEOUT`].
    pub fn new(commands: Vec<GuestCommand>) -> NestedOptions {
        NestedOptions {
            commands,
            memory_mib: NESTED_MEMORY_MIB,
            smp: 2,
            timeout: NESTED_TIMEOUT,
            extra_kernel_args: String::new(),
            label: "nested".into(),
        }
    }

    /// Name the run directory.
    pub fn label(mut self, label: &str) -> Self {
        self.label = label.into();
        self
    }
}

/// A finished nested boot.
pub struct NestedRun {
    /// The outer backend, still serving (stopped when dropped).
    pub backend: Backend,
    /// What the guest reported.
    pub results: GuestResults,
    /// Full serial console log.
    pub serial_log: String,
    /// QEMU's stderr.
    pub qemu_stderr: String,
    /// Wall time from QEMU start to exit.
    pub boot_time: Duration,
    /// Directory of the logs (`serial.log`, `backend.log`, `qemu.*`, the initramfs). Kept.
    pub run_dir: PathBuf,
}

impl NestedRun {
    /// One line per result, for test logs.
    pub fn summary(&self) -> String {
        self.results
            .results
            .iter()
            .map(|r| r.summary())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Remove the run directory and the outer backend's log directory unless
    /// `GUEST_TESTS_KEEP=1` (call after the checks passed).
    pub fn discard_logs(&self) {
        if !keep_runs() {
            let _ = std::fs::remove_dir_all(&self.run_dir);
            if let Some(dir) = self.backend.log_path().parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// Start the outer backend, `gpu-backend serve --profile <profile> --socket <S> <args>` (the
/// host's debug build), logging to `<target>/guest-tests/runs/<label>-…/backend.log`.
pub fn spawn_outer_backend(profile: &str, args: &[String], label: &str) -> Result<Backend> {
    let bin = backend_binary()?;
    let dir = new_run_dir(&format!("{label}-backend"))?;
    Backend::spawn_with(&bin, profile, &dir.join("backend.log"), args)
}

/// The files of the nested image that do not depend on the commands.
fn base_archive(lab: &QemuLab) -> Result<Vec<u8>> {
    let read = |p: &Path| std::fs::read(p).ctx(|| format!("reading {}", p.display()));
    let mut a = CpioArchive::with_busybox(
        &[
            "bin", "dev", "proc", "sys", "tmp", "root", "lib", MODULE_DIR,
        ],
        &read(&lab.busybox)?,
    );
    a.symlink("bin/sh", "busybox");
    for which in [
        GuestBinary::Backend,
        GuestBinary::VfioClient,
        GuestBinary::VfioBench,
    ] {
        let path = guest_binary(which)?;
        a.file(&format!("{BIN_DIR}/{}", which.name()), 0o755, &read(&path)?);
    }
    a.file("bin/nested-alive", 0o755, ALIVE_SCRIPT.as_bytes());
    a.file(
        "bin/nested-wait-socket",
        0o755,
        WAIT_SOCKET_SCRIPT.as_bytes(),
    );
    for m in MODULES {
        let ko = lab.guest_modules.join(format!("{m}.ko"));
        if !ko.is_file() {
            return Err(HarnessError::QemuInstall {
                script: crate::qemu::install_script(),
                reason: format!("guest module {} is missing", ko.display()),
            });
        }
        a.file(&format!("{MODULE_DIR}/{m}.ko"), 0o644, &read(&ko)?);
    }
    a.file("init", 0o755, init_script().as_bytes());
    Ok(a.finish())
}

/// The base image, built once per process. Not compressed: writing and unpacking it is
/// faster than gzip in a debug-built harness and in a TCG guest.
fn base_image() -> Result<&'static [u8]> {
    static IMAGE: OnceLock<std::result::Result<Vec<u8>, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            QemuLab::get()
                .and_then(base_archive)
                .map_err(|e| e.to_string())
        })
        .as_deref()
        .map_err(|reason| HarnessError::Build {
            what: "nested guest initramfs".into(),
            reason: reason.clone(),
        })
}

/// The commands archive appended to the base image (the kernel unpacks concatenated archives
/// in order; each may be compressed or not).
fn commands_archive(commands: &[GuestCommand]) -> Result<Vec<u8>> {
    let script = commands_script(commands).map_err(|e| HarnessError::Build {
        what: "nested guest commands".into(),
        reason: e.to_string(),
    })?;
    let mut a = CpioArchive::new();
    let dir = Path::new(COMMANDS_PATH)
        .parent()
        .map_or_else(String::new, |p| p.to_string_lossy().into_owned());
    let mut at = String::new();
    for part in dir.split('/').filter(|p| !p.is_empty()) {
        if !at.is_empty() {
            at.push('/');
        }
        at.push_str(part);
        a.dir(&at, 0o755);
    }
    a.file(COMMANDS_PATH, 0o644, script.as_bytes());
    Ok(a.finish())
}

/// Boot a nested guest against `backend` (the outer backend, see [`spawn_outer_backend`]) and
/// run `opts.commands` after the setup. Errors: QEMU, the modules or the static programs
/// missing, QEMU failing, the boot timing out, or the guest not reaching the end of its
/// commands. Commands that fail are *not* errors: inspect [`NestedRun::results`].
pub fn boot_nested(backend: Backend, opts: &NestedOptions) -> Result<NestedRun> {
    let lab = QemuLab::get()?;
    let base = base_image()?;
    let run_dir = new_run_dir(&opts.label)?;
    let mut image = base.to_vec();
    image.extend_from_slice(&commands_archive(&opts.commands)?);
    let initrd = run_dir.join("initramfs.cpio");
    std::fs::write(&initrd, &image).ctx(|| format!("writing {}", initrd.display()))?;
    std::fs::write(
        run_dir.join("commands.sh"),
        commands_script(&opts.commands).unwrap_or_default(),
    )
    .ctx(|| "writing commands.sh".into())?;
    let mut append = NESTED_KERNEL_ARGS.to_string();
    if !opts.extra_kernel_args.is_empty() {
        append.push(' ');
        append.push_str(&opts.extra_kernel_args);
    }
    let cfg = VmConfig {
        kernel: lab.guest_kernel.clone(),
        initrd,
        append,
        vfio_user_socket: Some(backend.socket().to_path_buf()),
        vfio_user_props: Vec::new(),
        iommu: true,
        memory_mib: opts.memory_mib,
        smp: opts.smp,
        serial_log: run_dir.join("serial.log"),
        display: None,
        qmp_socket: None,
        allow_reboot: false,
        extra_args: Vec::new(),
    };
    let show_backend_log = |backend: &Backend| {
        eprintln!(
            "--- outer backend log tail ---\n{}",
            tail(&backend.log_text(), 40)
        );
    };
    let outcome = match run_vm(lab, &cfg, opts.timeout) {
        Ok(o) => o,
        Err(e) => {
            show_backend_log(&backend);
            return Err(e);
        }
    };
    if !outcome.status.success() {
        show_backend_log(&backend);
        return Err(HarnessError::QemuFailed {
            status: outcome.status.to_string(),
            stderr: outcome.stderr,
            serial_tail: tail(&outcome.serial, 40),
        });
    }
    let results = GuestResults::parse(&outcome.serial);
    if !results.done {
        show_backend_log(&backend);
        return Err(HarnessError::GuestIncomplete {
            what: "the nested guest's /init".into(),
            serial_tail: tail(&outcome.serial, 60),
        });
    }
    Ok(NestedRun {
        backend,
        results,
        serial_log: outcome.serial,
        qemu_stderr: outcome.stderr,
        boot_time: outcome.duration,
        run_dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_archive_holds_the_script_under_its_directories() {
        let raw = commands_archive(&[GuestCommand::run("x", "true")]).unwrap();
        let text = String::from_utf8_lossy(&raw);
        let etc = text.find("etc\0").unwrap();
        let nested = text.find("etc/nested\0").unwrap();
        let file = text.find("etc/nested/commands.sh\0").unwrap();
        assert!(etc < nested && nested < file, "parents first");
        assert!(text.contains("run_cmd run x true"));
        assert!(commands_archive(&[GuestCommand::stop("none")]).is_err());
    }
}
