//! `gpu-demo`: boot a QEMU guest against the emulated GPU and show what it sees.
//!
//! ```text
//! cargo run --release -p guest-tests --bin gpu-demo [-- --profile gh200-96g]
//! ```
//!
//! Builds the backend, the static guest probe and its initramfs, installs QEMU into the
//! project cache if needed (the installer's output is shown), starts `gpu-backend serve`, boots
//! a guest that checks the device (and the trapped BAR0 window), then a second guest against the
//! same backend that looks for the first guest's VRAM pattern; prints the device, its BARs and every check, and exits
//! with 0 only if all checks passed. Progress goes to stderr, the tables to stdout.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use guest_tests::artifacts::{backend_binary, probe_binary};
use guest_tests::demo::DemoReport;
use guest_tests::guest::guest_initramfs;
use guest_tests::{boot_guest, with_backend, GuestOptions, ProfileLayout, QemuLab, Result};

/// The profile `gpu-backend serve` uses when given none.
const DEFAULT_PROFILE: &str = "gh200-96g";
/// Where in VRAM the first guest leaves its pattern for the second.
const PATTERN_OFFSET: u64 = 0x10000;
const PATTERN_SEED: u64 = 0xdec0;

const USAGE: &str = "\
usage: gpu-demo [--profile NAME] [--once]

Boots a QEMU guest (TCG) against `gpu-backend serve` and shows what the guest sees of the
emulated GPU: the PCI device, every BAR (guest address, presented and real size, padding, type)
and the checks (BOOT_0, VRAM read-back, padding reads 0xFF and drops writes, the BAR0 window
and PRAMIN aperture, persistence across two guests). Exit status 0 only if every check passed.

  --profile NAME   emulated GPU profile (default gh200-96g; `gpu-backend --help` lists them:
                   tu102-24g, ga100-80g, gh100-80g, gh200-96g, gb202-32g)
  --once           boot one guest only (no persistence check across guests)
  -h, --help       this text

First run: installs QEMU into .cache/qemu-lab (about 50 MB download, shown as it happens).
";

struct Args {
    profile: String,
    once: bool,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        profile: DEFAULT_PROFILE.into(),
        once: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--profile" => a.profile = it.next().ok_or("--profile needs a value")?,
            "--once" => a.once = true,
            other => match other.strip_prefix("--profile=") {
                Some(p) => a.profile = p.to_string(),
                None => return Err(format!("unknown argument `{other}`")),
            },
        }
    }
    Ok(a)
}

/// Print a progress line, run `f`, print how long it took.
fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("gpu-demo: {what}...");
    let t = Instant::now();
    let r = f()?;
    eprintln!("gpu-demo:   done ({:.1} s)", t.elapsed().as_secs_f64());
    Ok(r)
}

fn run(args: &Args) -> Result<bool> {
    step("building gpu-backend (cargo build -p gpu-backend)", || {
        backend_binary().map(drop)
    })?;
    let layout = ProfileLayout::inspect(&args.profile)?;
    let lab = step(
        "checking the QEMU lab (qemu-configs/install.sh; the first run downloads about 50 MB)",
        QemuLab::get,
    )?;
    step("building the static guest probe and its initramfs", || {
        probe_binary()?;
        guest_initramfs()
    })?;
    let guests = if args.once { 1 } else { 2 };
    eprintln!(
        "gpu-demo: starting `gpu-backend serve --profile {}`",
        args.profile
    );
    let (first, second) = with_backend(&args.profile, |backend| {
        let boot = |n: u32, probe, what: &str| {
            step(
                &format!("booting guest {n} of {guests} (TCG, ~10 s): {what}"),
                || {
                    boot_guest(
                        &GuestOptions::new(probe)
                            .with_socket(backend.socket())
                            .label(&format!("demo-{}-guest{n}", args.profile)),
                    )
                },
            )
        };
        let mut probe = layout.probe_args();
        if let Some(vram) = layout.guest_vram {
            // The BAR0 window checks: a few thousand trapped accesses, a second or two.
            probe = layout.window_probe_args(probe, vram);
        }
        if !args.once {
            probe = probe.persist_write(PATTERN_OFFSET, PATTERN_SEED);
        }
        let first = boot(1, probe, "checks, leaves a pattern in VRAM")?;
        let second = if args.once {
            None
        } else {
            Some(boot(
                2,
                layout
                    .probe_args()
                    .persist_check(PATTERN_OFFSET, PATTERN_SEED),
                "a fresh guest looks for that pattern",
            )?)
        };
        Ok((first, second))
    })?;
    let report = DemoReport {
        layout: &layout,
        first: &first,
        second: second.as_ref(),
        qemu_version: &lab.version,
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    println!("\n{}", report.render());
    Ok(report.all_passed())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("gpu-demo: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("gpu-demo: error: {e}");
            ExitCode::FAILURE
        }
    }
}
