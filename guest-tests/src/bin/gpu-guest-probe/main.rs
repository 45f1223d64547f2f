//! `gpu-guest-probe`: a static program run inside a QEMU guest (as `/init` or from it) that
//! finds the emulated NVIDIA GPU on the PCI bus and checks what the guest sees of it: ids, BAR
//! sizes, the BOOT_0 register, VRAM read-back, the all-ones padding at the end of the VRAM BAR,
//! and persistence of VRAM contents across guests.
//!
//! Output is one fact per line on the console, prefixed `GPUPROBE `, ending with
//! `GPUPROBE done pass=N fail=M skip=K`; then the machine powers off. Parameters come from the
//! kernel command line (`gpuprobe.*`, see `params`). Build it static:
//!
//! ```text
//! cargo rustc --release -p guest-tests --bin gpu-guest-probe --target x86_64-unknown-linux-gnu \
//!     --target-dir target/guest-static -- -C target-feature=+crt-static
//! ```
//!
//! `--no-poweroff` makes it exit instead of powering off (for interactive use in a guest shell).

mod aperture;
mod bench;
mod checks;
mod mem;
mod out;
mod params;
#[allow(dead_code)] // the host-side helpers of the shared file are not used here
#[path = "../../pattern.rs"]
mod pattern;
mod pci;
mod soak;
mod sys;
mod window;

use out::{fact, fail, set_current};

fn mount_pseudo_filesystems() {
    for (fstype, target, probe, name) in [
        (c"proc", c"/proc", "/proc/self", "mount_proc"),
        (c"sysfs", c"/sys", "/sys/bus", "mount_sys"),
        (c"devtmpfs", c"/dev", "/dev/mem", "mount_dev"),
    ] {
        set_current(name);
        match sys::mount_if_missing(fstype, target, probe) {
            Ok(true) => fact(
                "mount",
                &format!(
                    "fs={} target={}",
                    fstype.to_string_lossy(),
                    target.to_string_lossy()
                ),
            ),
            Ok(false) => {}
            Err(e) => fail(
                name,
                &format!(
                    "mount {} on {}: {e}",
                    fstype.to_string_lossy(),
                    target.to_string_lossy()
                ),
            ),
        }
    }
}

fn main() {
    let power_off = !std::env::args().any(|a| a == "--no-poweroff");
    sys::set_power_off(power_off);
    set_current("startup");
    sys::install_guards(120);
    fact(
        "start",
        &format!(
            "probe={} pid={}",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        ),
    );
    mount_pseudo_filesystems();

    set_current("params");
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_else(|e| {
        fail("params", &format!("reading /proc/cmdline: {e}"));
        String::new()
    });
    let params = params::Params::from_cmdline(&cmdline);
    // SAFETY: alarm has no preconditions; re-arms the watchdog with the requested timeout.
    unsafe { libc::alarm(params.timeout) };
    for e in &params.errors {
        fail("params", e);
    }
    fact(
        "params",
        &format!(
            "vendor={:#06x} device={} vram_bar={} vram_real={} persist={:?} timeout={}",
            params.vendor,
            params.device.map_or("any".into(), |d| format!("{d:#06x}")),
            params.vram_bar.map_or("none".into(), |b| b.to_string()),
            params.vram_real.map_or("bar".into(), |r| r.to_string()),
            params.persist,
            params.timeout
        ),
    );

    checks::run(&params);

    set_current("finish");
    out::done();
    sys::finish(0);
}
