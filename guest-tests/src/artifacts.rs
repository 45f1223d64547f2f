//! Building the binaries a guest run needs: the static guest programs ([`GuestBinary`]: the
//! probe, for nested VFIO guests the backend itself, the vfio-user client and the VFIO bench,
//! for display guests the framebuffer writer) and the host's backend.
//!
//! Each is built at most once per process; the results are cached in statics.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::error::{HarnessError, Result};
use crate::paths::{cargo, target_dir, workspace_root};

/// Target triple the guest programs are built for (static glibc, `+crt-static`).
pub const PROBE_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Environment variable overriding the probe binary.
pub const PROBE_BIN_ENV: &str = "GPU_GUEST_PROBE_BIN";
/// Environment variable overriding the backend binary.
pub const BACKEND_BIN_ENV: &str = "GPU_BACKEND_BIN";

fn run_cargo(what: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(cargo())
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        // Cargo's progress goes to stderr, which the test harness shows on failure.
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| HarnessError::Build {
            what: what.into(),
            reason: format!("running {}: {e}", cargo().display()),
        })?;
    if !status.success() {
        return Err(HarnessError::Build {
            what: what.into(),
            reason: format!("`cargo {}` failed with {status}", args.join(" ")),
        });
    }
    Ok(())
}

/// True if `path` is an ELF file without a `PT_INTERP` program header (statically linked).
pub fn is_static_elf(path: &Path) -> std::io::Result<bool> {
    let data = std::fs::read(path)?;
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a 64-bit little-endian ELF",
        )
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err(bad());
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[32..40].try_into().map_err(|_| bad())?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        let Some(ph) = data.get(off..off + 4) else {
            return Err(bad());
        };
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes(ph.try_into().map_err(|_| bad())?) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A static program for the guest, built with `cargo rustc --release --target
/// x86_64-unknown-linux-gnu --target-dir <target>/guest-static -- -C target-feature=+crt-static
/// -C strip=debuginfo`: static glibc, so it runs on the bare busybox initramfs. The separate
/// target directory keeps these builds from disturbing the host builds' artifacts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestBinary {
    /// `gpu-guest-probe` (guest-tests): the BAR/VRAM/window probe.
    Probe,
    /// `gpu-backend` (the backend itself), for nested VFIO guests.
    Backend,
    /// `gpu-guest-vfio-client` (guest-tests): the sliced-guest checks over vfio-user.
    VfioClient,
    /// `gpu-guest-vfio-bench` (guest-tests): register reads through VFIO mmap vs pread.
    VfioBench,
    /// `gpu-guest-fb` (guest-tests): draws a known picture into `/dev/fb0`.
    FbWriter,
}

impl GuestBinary {
    /// Every guest binary.
    pub const ALL: [GuestBinary; 5] = [
        GuestBinary::Probe,
        GuestBinary::Backend,
        GuestBinary::VfioClient,
        GuestBinary::VfioBench,
        GuestBinary::FbWriter,
    ];

    /// The cargo package and binary name.
    pub fn package_and_name(self) -> (&'static str, &'static str) {
        match self {
            GuestBinary::Probe => ("guest-tests", "gpu-guest-probe"),
            GuestBinary::Backend => ("gpu-backend", "gpu-backend"),
            GuestBinary::VfioClient => ("guest-tests", "gpu-guest-vfio-client"),
            GuestBinary::VfioBench => ("guest-tests", "gpu-guest-vfio-bench"),
            GuestBinary::FbWriter => ("guest-tests", "gpu-guest-fb"),
        }
    }

    /// The binary's name.
    pub fn name(self) -> &'static str {
        self.package_and_name().1
    }

    /// The environment variable that overrides the build with a given file.
    pub fn env_override(self) -> &'static str {
        match self {
            GuestBinary::Probe => PROBE_BIN_ENV,
            GuestBinary::Backend => "GPU_GUEST_BACKEND_BIN",
            GuestBinary::VfioClient => "GPU_GUEST_VFIO_CLIENT_BIN",
            GuestBinary::VfioBench => "GPU_GUEST_VFIO_BENCH_BIN",
            GuestBinary::FbWriter => "GPU_GUEST_FB_BIN",
        }
    }

    fn index(self) -> usize {
        match self {
            GuestBinary::Probe => 0,
            GuestBinary::Backend => 1,
            GuestBinary::VfioClient => 2,
            GuestBinary::VfioBench => 3,
            GuestBinary::FbWriter => 4,
        }
    }
}

/// The target directory of the static guest binaries: `<target>/guest-static`.
pub fn guest_target_dir() -> PathBuf {
    target_dir().join("guest-static")
}

fn build_static(which: GuestBinary) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(which.env_override()) {
        return Ok(PathBuf::from(path));
    }
    let (package, name) = which.package_and_name();
    let target_dir = guest_target_dir();
    let target_dir_arg = target_dir.to_string_lossy();
    run_cargo(
        name,
        &[
            "rustc",
            "--release",
            "-p",
            package,
            "--bin",
            name,
            "--target",
            PROBE_TARGET,
            "--target-dir",
            &target_dir_arg,
            "--",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=debuginfo",
        ],
    )?;
    let path = target_dir.join(PROBE_TARGET).join("release").join(name);
    match is_static_elf(&path) {
        Ok(true) => Ok(path),
        Ok(false) => Err(HarnessError::Build {
            what: name.into(),
            reason: format!("{} is dynamically linked (has PT_INTERP)", path.display()),
        }),
        Err(e) => Err(HarnessError::Build {
            what: name.into(),
            reason: format!("checking {}: {e}", path.display()),
        }),
    }
}

/// The static guest binary `which`: its override variable ([`GuestBinary::env_override`]) or
/// built (once per process, see [`GuestBinary`]) and checked to be static.
pub fn guest_binary(which: GuestBinary) -> Result<PathBuf> {
    static BUILT: [OnceLock<std::result::Result<PathBuf, String>>; GuestBinary::ALL.len()] =
        [const { OnceLock::new() }; GuestBinary::ALL.len()];
    BUILT[which.index()]
        .get_or_init(|| {
            build_static(which).map_err(|e| match e {
                HarnessError::Build { reason, .. } => reason,
                other => other.to_string(),
            })
        })
        .clone()
        .map_err(|reason| HarnessError::Build {
            what: which.name().into(),
            reason,
        })
}

/// The static guest probe binary: `$GPU_GUEST_PROBE_BIN`, or built as a [`GuestBinary`]:
/// `cargo rustc --release -p guest-tests --bin gpu-guest-probe --target x86_64-unknown-linux-gnu
/// --target-dir <target>/guest-static -- -C target-feature=+crt-static -C strip=debuginfo`.
pub fn probe_binary() -> Result<PathBuf> {
    guest_binary(GuestBinary::Probe)
}

/// Which cargo profile to build the backend with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BuildProfile {
    /// `cargo build` (`<target>/debug`): what the tests and the demo use.
    Debug,
    /// `cargo build --release` (`<target>/release`): what the benchmarks use.
    Release,
}

impl BuildProfile {
    /// The directory name under the target directory.
    pub fn dir_name(self) -> &'static str {
        match self {
            BuildProfile::Debug => "debug",
            BuildProfile::Release => "release",
        }
    }
}

fn build_backend(profile: BuildProfile) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(BACKEND_BIN_ENV) {
        return Ok(PathBuf::from(path));
    }
    let mut args = vec!["build"];
    if profile == BuildProfile::Release {
        args.push("--release");
    }
    args.extend(["-p", "gpu-backend", "--bin", "gpu-backend"]);
    run_cargo("gpu-backend", &args)?;
    let path = target_dir().join(profile.dir_name()).join("gpu-backend");
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::Build {
            what: "gpu-backend".into(),
            reason: format!("{} missing after cargo build", path.display()),
        })
    }
}

/// The backend binary: `$GPU_BACKEND_BIN`, or `<target>/debug/gpu-backend` after
/// `cargo build -p gpu-backend` (run once per process so the binary is never stale).
pub fn backend_binary() -> Result<PathBuf> {
    backend_binary_for(BuildProfile::Debug)
}

/// The backend binary built with `profile`: `$GPU_BACKEND_BIN`, or
/// `<target>/<debug|release>/gpu-backend` after `cargo build [--release] -p gpu-backend`
/// (each profile built at most once per process).
pub fn backend_binary_for(profile: BuildProfile) -> Result<PathBuf> {
    static DEBUG: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    static RELEASE: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let cell = match profile {
        BuildProfile::Debug => &DEBUG,
        BuildProfile::Release => &RELEASE,
    };
    cell.get_or_init(|| {
        build_backend(profile).map_err(|e| match e {
            HarnessError::Build { reason, .. } => reason,
            other => other.to_string(),
        })
    })
    .clone()
    .map_err(|reason| HarnessError::Build {
        what: "gpu-backend".into(),
        reason,
    })
}
