//! QEMU: installing it (through `qemu-configs/install.sh`), building its command line, and
//! running one guest with a timeout (to the end: [`run_vm`]; while the host acts on it:
//! [`crate::vm`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::error::{HarnessError, Result};
use crate::paths::workspace_root;
use crate::vm::spawn_vm;

/// Guest RAM in MiB (also the size of the shared memfd backend).
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Guest vCPUs.
pub const DEFAULT_SMP: u32 = 2;
/// PCI slot of the vfio-user device (`addr`), i.e. guest BDF 0000:00:05.0.
pub const VFIO_USER_PCI_ADDR: &str = "0x5";

/// The emulated IOMMU of nested VFIO guests.
pub const INTEL_IOMMU_DEVICE: &str = "intel-iommu,caching-mode=on";

/// The installed QEMU lab (values of `env.sh` written by `qemu-configs/install.sh`).
#[derive(Clone, Debug)]
pub struct QemuLab {
    /// The unpacked Debian prefix.
    pub prefix: PathBuf,
    /// Wrapper script that runs QEMU through the prefix's loader.
    pub qemu_bin: PathBuf,
    /// QEMU version, e.g. `11.1.3`.
    pub version: String,
    /// Guest kernel (`vmlinuz`).
    pub guest_kernel: PathBuf,
    /// Static busybox.
    pub busybox: PathBuf,
    /// Directory of the guest kernel's modules, uncompressed: the VFIO modules (`vfio.ko`,
    /// `vfio_iommu_type1.ko`, `irqbypass.ko`, `vfio-pci-core.ko`, `vfio-pci.ko`) and the
    /// virtio-gpu driver with its dependencies ([`QemuLab::display_modules`]).
    pub guest_modules: PathBuf,
    /// The names of the virtio-gpu driver's modules in load order, dependencies first
    /// (`drm` ... `virtio-gpu`; `GUEST_DISPLAY_MODULES` of `env.sh`); each is
    /// `<guest_modules>/<name>.ko`.
    pub display_modules: Vec<String>,
}

/// Path of the install script.
pub fn install_script() -> PathBuf {
    workspace_root().join("qemu-configs").join("install.sh")
}

fn install() -> Result<QemuLab> {
    let script = install_script();
    let err = |reason: String| HarnessError::QemuInstall {
        script: script.clone(),
        reason,
    };
    // The script is idempotent and locked; it prints progress, which we send to stderr.
    let status = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| err(format!("cannot run bash: {e}")))?;
    if !status.success() {
        return Err(err(format!("exited with {status} (see its output above)")));
    }
    let cache = std::env::var_os("GPU_BACKEND_CACHE")
        .map_or_else(|| workspace_root().join(".cache"), PathBuf::from);
    let env_sh = cache.join("qemu-lab").join("env.sh");
    // Let bash evaluate env.sh (it uses shell quoting) and print the values NUL-separated.
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#". "$1" && printf '%s\0' "$QEMU_PREFIX" "$QEMU_BIN" "$QEMU_VERSION" "$GUEST_KERNEL" "$BUSYBOX" "$GUEST_MODULES" "$GUEST_DISPLAY_MODULES""#)
        .arg("bash")
        .arg(&env_sh)
        .output()
        .map_err(|e| err(format!("cannot read {}: {e}", env_sh.display())))?;
    if !out.status.success() {
        return Err(err(format!(
            "sourcing {} failed: {}",
            env_sh.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<&str> = text.split('\0').collect();
    if v.len() < 7 || v[..7].iter().any(|s| s.is_empty()) {
        return Err(err(format!("{} lacks a value: {v:?}", env_sh.display())));
    }
    let lab = QemuLab {
        prefix: v[0].into(),
        qemu_bin: v[1].into(),
        version: v[2].to_string(),
        guest_kernel: v[3].into(),
        busybox: v[4].into(),
        guest_modules: v[5].into(),
        display_modules: v[6].split_whitespace().map(String::from).collect(),
    };
    for p in [&lab.qemu_bin, &lab.guest_kernel, &lab.busybox] {
        if !p.is_file() {
            return Err(err(format!("{} does not exist", p.display())));
        }
    }
    if !lab.guest_modules.is_dir() {
        return Err(err(format!(
            "the guest module directory {} does not exist",
            lab.guest_modules.display()
        )));
    }
    if let Some(m) = lab
        .display_modules
        .iter()
        .find(|m| !lab.guest_modules.join(format!("{m}.ko")).is_file())
    {
        return Err(err(format!(
            "the guest module {m}.ko is not in {}",
            lab.guest_modules.display()
        )));
    }
    Ok(lab)
}

impl QemuLab {
    /// Install (or find) the QEMU lab; runs the install script once per process.
    pub fn get() -> Result<&'static QemuLab> {
        static LAB: OnceLock<std::result::Result<QemuLab, String>> = OnceLock::new();
        LAB.get_or_init(|| {
            install().map_err(|e| match e {
                HarnessError::QemuInstall { reason, .. } => reason,
                other => other.to_string(),
            })
        })
        .as_ref()
        .map_err(|reason| HarnessError::QemuInstall {
            script: install_script(),
            reason: reason.clone(),
        })
    }
}

/// One guest's QEMU configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub append: String,
    /// Socket of a vfio-user server to attach as `vfio-user-pci`, if any.
    pub vfio_user_socket: Option<PathBuf>,
    /// Extra properties of the vfio-user-pci device, as JSON members (e.g. `"x-no-posted-writes":true`).
    pub vfio_user_props: Vec<String>,
    /// Add an emulated Intel IOMMU (`-device intel-iommu,caching-mode=on`, placed before the
    /// vfio-user-pci device as QEMU requires), so the guest's own vfio-pci can drive the
    /// device. The guest kernel then needs `intel_iommu=on`.
    pub iommu: bool,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub smp: u32,
    /// File receiving the guest's serial console.
    pub serial_log: PathBuf,
    /// A display for the guest, if any.
    pub display: Option<DisplayDevice>,
    /// QMP socket QEMU listens on (`-qmp unix:PATH,server=on,wait=off`), if any.
    pub qmp_socket: Option<PathBuf>,
    /// Let a guest reboot (QEMU resets the machine) instead of exiting (`-no-reboot`).
    pub allow_reboot: bool,
    /// Additional raw QEMU arguments.
    pub extra_args: Vec<String>,
}

/// A guest's display device. QEMU runs with `-nographic` (no display window); QMP
/// `screendump` still writes what the device shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DisplayDevice {
    /// `vhost-user-gpu-pci`, whose device model is the vhost-user server on this socket
    /// (`gpu-backend serve ... --display PATH`): `-chardev socket,id=gpu0,path=PATH -device
    /// vhost-user-gpu-pci,chardev=gpu0`. Needs shared guest RAM (always on here).
    VhostUser(PathBuf),
    /// QEMU's own `virtio-gpu-pci`: the same guest driver against QEMU's device model, a
    /// reference for the guest side of the display tests.
    QemuVirtioGpu,
}

/// The chardev id of the vhost-user display socket.
pub const DISPLAY_CHARDEV: &str = "gpu0";

impl DisplayDevice {
    /// QEMU arguments adding the device.
    pub fn args(&self) -> Vec<String> {
        match self {
            DisplayDevice::VhostUser(socket) => vec![
                "-chardev".into(),
                format!(
                    "socket,id={DISPLAY_CHARDEV},path={}",
                    socket.to_string_lossy().replace(',', ",,")
                ),
                "-device".into(),
                format!("vhost-user-gpu-pci,chardev={DISPLAY_CHARDEV}"),
            ],
            DisplayDevice::QemuVirtioGpu => vec!["-device".into(), "virtio-gpu-pci".into()],
        }
    }
}

impl VmConfig {
    /// A guest booting `kernel` with `initrd` and command line `append`, its console in
    /// `serial_log`; no devices, [`DEFAULT_MEMORY_MIB`], [`DEFAULT_SMP`], no reboots.
    pub fn new(kernel: &Path, initrd: &Path, append: &str, serial_log: &Path) -> VmConfig {
        VmConfig {
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            append: append.to_string(),
            vfio_user_socket: None,
            vfio_user_props: Vec::new(),
            iommu: false,
            memory_mib: DEFAULT_MEMORY_MIB,
            smp: DEFAULT_SMP,
            serial_log: serial_log.to_path_buf(),
            display: None,
            qmp_socket: None,
            allow_reboot: false,
            extra_args: Vec::new(),
        }
    }
}

/// Quote `s` as a JSON string.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The JSON `-device` argument for a vfio-user-pci device on `socket` (the only accepted form
/// for the socket property).
pub fn vfio_user_device_json(socket: &Path, extra_props: &[String]) -> String {
    let mut json = format!(
        r#"{{"driver":"vfio-user-pci","socket":{{"type":"unix","path":{}}},"addr":"{VFIO_USER_PCI_ADDR}""#,
        json_string(&socket.to_string_lossy())
    );
    for p in extra_props {
        json.push(',');
        json.push_str(p);
    }
    json.push('}');
    json
}

/// QEMU's arguments (without the binary) for `cfg`.
pub fn qemu_args(cfg: &VmConfig) -> Vec<OsString> {
    let mem = format!("{}M", cfg.memory_mib);
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    for s in [
        "-machine",
        "q35",
        "-accel",
        // One TCG thread for all vCPUs: with multi-threaded TCG a guest kernel patching its
        // own text at boot (int3-based text_poke) now and then hit a stale int3 on another
        // vCPU and panicked (seen once in about a hundred boots here); single-threaded TCG
        // also ran the e2e suite faster on this 2-core machine (118 s against 170 s).
        "tcg,thread=single",
        "-cpu",
        "max",
        "-m",
        &mem,
        "-smp",
        &cfg.smp.to_string(),
        "-nographic",
        "-nodefaults",
        "-monitor",
        "none",
        // Shared guest RAM: vfio-user DMA_MAP then carries an fd the server can mmap.
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        "-machine",
        "memory-backend=mem",
        "-serial",
        // QEMU option syntax: a comma inside a value is written as two commas.
        &format!(
            "file:{}",
            cfg.serial_log.to_string_lossy().replace(',', ",,")
        ),
    ] {
        push(s);
    }
    if !cfg.allow_reboot {
        push("-no-reboot");
    }
    if let Some(qmp) = &cfg.qmp_socket {
        push("-qmp");
        push(&format!(
            "unix:{},server=on,wait=off",
            qmp.to_string_lossy().replace(',', ",,")
        ));
    }
    if cfg.iommu {
        // Before the vfio-user-pci device; without caching-mode QEMU cannot map DMA for it.
        push("-device");
        push(INTEL_IOMMU_DEVICE);
    }
    if let Some(sock) = &cfg.vfio_user_socket {
        push("-device");
        push(&vfio_user_device_json(sock, &cfg.vfio_user_props));
    }
    if let Some(display) = &cfg.display {
        a.extend(display.args().into_iter().map(OsString::from));
    }
    a.push("-kernel".into());
    a.push(cfg.kernel.clone().into());
    a.push("-initrd".into());
    a.push(cfg.initrd.clone().into());
    a.push("-append".into());
    a.push(cfg.append.clone().into());
    a.extend(cfg.extra_args.iter().map(OsString::from));
    a
}

/// How a QEMU run ended.
#[derive(Debug)]
pub struct VmOutcome {
    /// The serial console output.
    pub serial: String,
    /// QEMU's stderr.
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub duration: Duration,
    /// QEMU's exit status.
    pub status: ExitStatus,
}

/// Run QEMU until it exits or `timeout` passes (then kill it and return [`HarnessError::Timeout`]).
/// QEMU's stdout/stderr go to `qemu.stdout`/`qemu.stderr` next to the serial log.
pub fn run_vm(lab: &QemuLab, cfg: &VmConfig, timeout: Duration) -> Result<VmOutcome> {
    spawn_vm(lab, cfg)?.wait_exit(timeout)
}

/// Quote a word for a POSIX shell (for the `qemu.cmdline` file users can re-run).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_json_form() {
        let j = vfio_user_device_json(
            Path::new("/tmp/a \"b\".sock"),
            &[r#""x-no-posted-writes":true"#.into()],
        );
        assert_eq!(
            j,
            r#"{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/tmp/a \"b\".sock"},"addr":"0x5","x-no-posted-writes":true}"#
        );
    }

    #[test]
    fn iommu_comes_before_the_vfio_user_device() {
        let cfg = VmConfig {
            vfio_user_socket: Some("/s".into()),
            iommu: true,
            ..VmConfig::new(
                Path::new("k"),
                Path::new("i"),
                "",
                Path::new("/x/serial.log"),
            )
        };
        let args: Vec<String> = qemu_args(&cfg)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let iommu = args.iter().position(|a| a == INTEL_IOMMU_DEVICE).unwrap();
        let dev = args
            .iter()
            .position(|a| a.contains("vfio-user-pci"))
            .unwrap();
        assert!(iommu < dev, "{args:?}");
        assert_eq!(args[iommu - 1], "-device");
        let no_iommu = qemu_args(&VmConfig {
            iommu: false,
            ..cfg
        });
        assert!(!no_iommu.iter().any(|a| a == INTEL_IOMMU_DEVICE));
    }

    #[test]
    fn display_qmp_and_reboot_arguments() {
        let base = VmConfig::new(Path::new("k"), Path::new("i"), "", Path::new("/x/s.log"));
        let words = |cfg: &VmConfig| -> Vec<String> {
            qemu_args(cfg)
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let plain = words(&base);
        assert!(plain.iter().any(|a| a == "-no-reboot"));
        assert!(!plain.iter().any(|a| a == "-qmp" || a == "-chardev"));
        let cfg = VmConfig {
            display: Some(DisplayDevice::VhostUser("/t/a,b.sock".into())),
            qmp_socket: Some("/t/qmp.sock".into()),
            allow_reboot: true,
            ..base.clone()
        };
        let a = words(&cfg);
        assert!(!a.iter().any(|a| a == "-no-reboot"));
        let after = |flag: &str| {
            let i = a.iter().position(|w| w == flag).unwrap();
            a[i + 1].clone()
        };
        assert_eq!(after("-qmp"), "unix:/t/qmp.sock,server=on,wait=off");
        assert_eq!(after("-chardev"), "socket,id=gpu0,path=/t/a,,b.sock");
        assert!(a.iter().any(|w| w == "vhost-user-gpu-pci,chardev=gpu0"));
        let own = words(&VmConfig {
            display: Some(DisplayDevice::QemuVirtioGpu),
            ..base
        });
        assert!(own.iter().any(|w| w == "virtio-gpu-pci"));
        assert!(!own.iter().any(|w| w == "-chardev"));
    }
}
