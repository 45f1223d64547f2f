//! `gpu-demo`: boot a QEMU guest against the emulated GPU and show what it sees.
//!
//! ```text
//! cargo run --release -p guest-tests --bin gpu-demo [-- --profile gh200-96g]
//! ```
//!
//! Builds the backend, the static guest programs and their initramfs images, installs QEMU
//! into the project cache if needed (the installer's output is shown), starts `gpu-backend
//! serve --display`, boots a guest that checks the device (and the trapped BAR0 window), then a
//! second guest against the same backend that looks for the first guest's VRAM pattern, then a
//! third that loads the stock virtio_gpu driver on the backend's vhost-user display and draws a
//! picture into /dev/fb0; takes QEMU's screenshot of it and saves it as PNG next to the
//! report (`<target>/guest-tests/demo/<profile>-screen.png` and `<profile>-report.txt`); prints
//! the device, its BARs, every check and where the screenshot is, and exits with 0 only if all
//! checks passed. Progress goes to stderr, the tables to stdout.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use guest_tests::artifacts::{backend_binary, probe_binary};
use guest_tests::demo::{DemoDisplay, DemoReport};
use guest_tests::display::{start_display_guest, DisplayOptions, SETTLE_TIMEOUT};
use guest_tests::display_image::display_initramfs;
use guest_tests::error::{HarnessError, IoContext};
use guest_tests::guest::guest_initramfs;
use guest_tests::paths::harness_dir;
use guest_tests::qemu::DisplayDevice;
use guest_tests::{
    boot_guest, with_backend_bin, with_display_backend, Backend, GuestOptions, ProfileLayout,
    QemuLab, Result,
};

/// The profile `gpu-backend serve` uses when given none.
const DEFAULT_PROFILE: &str = "gh200-96g";
/// Where in VRAM the first guest leaves its pattern for the second.
const PATTERN_OFFSET: u64 = 0x10000;
const PATTERN_SEED: u64 = 0xdec0;

const USAGE: &str = "\
usage: gpu-demo [--profile NAME] [--once] [--no-display]

Boots a QEMU guest (TCG) against `gpu-backend serve` and shows what the guest sees of the
emulated GPU: the PCI device, every BAR (guest address, presented and real size, padding, type)
and the checks (BOOT_0, VRAM read-back, padding reads 0xFF and drops writes, the BAR0 window
and PRAMIN aperture, persistence across two guests). Then a guest with the backend's vhost-user
display draws into /dev/fb0; QEMU's screenshot of it is compared pixel by pixel and saved as
PNG next to the report (target/guest-tests/demo/). Exit status 0 only if every check passed.

  --profile NAME   emulated GPU profile (default gh200-96g; `gpu-backend --help` lists them:
                   tu102-24g, ga100-80g, gh100-80g, gh200-96g, gb202-32g)
  --once           boot one guest only (no persistence check across guests)
  --no-display     no display guest (serve without --display)
  -h, --help       this text

First run: installs QEMU into .cache/qemu-lab (about 50 MB download, shown as it happens).
";

struct Args {
    profile: String,
    once: bool,
    display: bool,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        profile: DEFAULT_PROFILE.into(),
        once: false,
        display: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--profile" => a.profile = it.next().ok_or("--profile needs a value")?,
            "--once" => a.once = true,
            "--no-display" => a.display = false,
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

/// Where the demo keeps its report and screenshot: `<target>/guest-tests/demo`.
fn demo_dir() -> PathBuf {
    harness_dir().join("demo")
}

/// Boot the display guest on `backend`'s display, take QEMU's screenshot once it shows the
/// guest's picture (or the settle time passed), save it as `png`.
fn display_guest(backend: &Backend, profile: &str, png: &Path) -> Result<DemoDisplay> {
    let display = backend
        .display_socket()
        .ok_or_else(|| HarnessError::Backend {
            reason: "the backend was started without a display".into(),
            log_tail: String::new(),
        })?;
    let opts = DisplayOptions::new(DisplayDevice::VhostUser(display.to_path_buf()), 1)
        .with_vfio_user(backend.socket())
        .label(&format!("demo-{profile}-display"));
    let mut guest = start_display_guest(&opts)?;
    let drawn = guest.wait_drawn()?;
    let shot = guest.screenshot_matching(&drawn, "screen", SETTLE_TIMEOUT)?;
    shot.image.write_png(png)?;
    guest.finish()?;
    Ok(DemoDisplay {
        png: png.to_path_buf(),
        width: shot.image.width(),
        height: shot.image.height(),
        matches: shot.matches(),
        verdict: shot.verdict(),
    })
}

fn run(args: &Args) -> Result<bool> {
    let bin = step(
        "building gpu-backend (cargo build -p gpu-backend)",
        backend_binary,
    )?;
    let layout = ProfileLayout::inspect(&args.profile)?;
    let lab = step(
        "checking the QEMU lab (qemu-configs/install.sh; the first run downloads about 160 MB)",
        QemuLab::get,
    )?;
    step(
        "building the static guest programs and their initramfs images",
        || {
            probe_binary()?;
            guest_initramfs()?;
            if args.display {
                display_initramfs()?;
            }
            Ok(())
        },
    )?;
    let guests = if args.once { 1 } else { 2 } + u32::from(args.display);
    let out_dir = demo_dir();
    std::fs::create_dir_all(&out_dir).ctx(|| format!("creating {}", out_dir.display()))?;
    let png = out_dir.join(format!("{}-screen.png", args.profile));
    eprintln!(
        "gpu-demo: starting `gpu-backend serve --profile {}{}`",
        args.profile,
        if args.display { " --display ..." } else { "" }
    );
    let demo = |backend: &Backend| {
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
        let display = if args.display {
            Some(step(
                &format!(
                    "booting guest {guests} of {guests} (TCG, ~10 s): virtio_gpu on the \
                     backend's display, draws into /dev/fb0, QEMU takes a screenshot"
                ),
                || display_guest(backend, &args.profile, &png),
            )?)
        } else {
            None
        };
        Ok((first, second, display))
    };
    let (first, second, display) = if args.display {
        with_display_backend(&bin, &args.profile, demo)?
    } else {
        with_backend_bin(&bin, &args.profile, demo)?
    };
    let report = DemoReport {
        layout: &layout,
        first: &first,
        second: second.as_ref(),
        display: display.as_ref(),
        qemu_version: &lab.version,
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let report_path = out_dir.join(format!("{}-report.txt", args.profile));
    let plain = DemoReport {
        color: false,
        ..report
    };
    std::fs::write(&report_path, plain.render())
        .ctx(|| format!("writing {}", report_path.display()))?;
    println!("\n{}", report.render());
    println!("Report saved as {}", report_path.display());
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
