//! `gpu-display-bench`: the frame rate a guest gets writing `/dev/fb0` in a loop on the
//! backend's vhost-user GPU, side by side with the same guest on QEMU's own `virtio-gpu-pci`
//! (the reference), and how many of those frames reached QEMU from the backend.
//!
//! ```text
//! cargo run --release -p guest-tests --bin gpu-display-bench [-- --secs 20 --runs 2]
//! ```
//!
//! Each run boots two display guests at once (TCG, `--smp` vCPUs each, default 1, on the same
//! host CPUs):
//! one with `gpu-backend serve --socket S --display D` (release build; QEMU's
//! `vhost-user-gpu-pci` on D, the GPU on S), one with `virtio-gpu-pci`. Both draw their
//! picture, then write whole frames for `--secs` seconds (`gpu-guest-fb --loop-secs`) and
//! report the frames written; the backend logs the UPDATE messages it sent QEMU when the
//! first guest's QEMU leaves. A last guest that only draws once gives the boot's share of that
//! count. Prints a markdown table (see `docs/performance.md`, "Guest frame rate").

use std::process::ExitCode;
use std::time::Duration;

use guest_tests::artifacts::{backend_binary_for, BuildProfile};
use guest_tests::backend::Backend;
use guest_tests::display::{start_display_guest, DisplayGuest, DisplayOptions, Drawn, FrameLoop};
use guest_tests::frame_rate::{connection_stats, FrameRateReport, FrameRateRun};
use guest_tests::qemu::DisplayDevice;

const USAGE: &str = "\
usage: gpu-display-bench [--secs N] [--runs R] [--smp N] [--profile NAME] [--debug-backend]

Boots a display guest on the backend's vhost-user GPU and one on QEMU's virtio-gpu-pci at the
same time; both write whole frames to /dev/fb0 for N seconds (default 20). Prints frames per
second written by each, their ratio, and the updates per second the backend sent QEMU.
R runs (default 2); --smp vCPUs per guest (default 1: the guest's damage worker shares the
writer's vCPU); profile default tu102-24g; release backend unless --debug-backend.";

/// How long a guest holds its last frame after the loop before powering off.
const HOLD: Duration = Duration::from_secs(1);
/// How long QEMU may take to exit after the guest's hold.
const EXIT_WAIT: Duration = Duration::from_secs(60);
/// How long the backend may take to log a connection's end.
const LOG_WAIT: Duration = Duration::from_secs(10);

struct Args {
    secs: u64,
    runs: usize,
    smp: u32,
    profile: String,
    build: BuildProfile,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        secs: 20,
        runs: 2,
        smp: 1,
        profile: "tu102-24g".into(),
        build: BuildProfile::Release,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let num = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: `{v}` is not a number"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--secs" => a.secs = num("--secs", value("--secs")?)?.clamp(1, 600),
            "--runs" => a.runs = num("--runs", value("--runs")?)?.clamp(1, 20) as usize,
            "--smp" => a.smp = num("--smp", value("--smp")?)?.clamp(1, 8) as u32,
            "--profile" => a.profile = value("--profile")?,
            "--debug-backend" => a.build = BuildProfile::Debug,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("gpu-display-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(report) => {
            println!("{}", report.markdown());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gpu-display-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Wait for `guest`'s picture and loop, then for it to power off.
fn finish_loop(
    mut guest: DisplayGuest,
    secs: u64,
    what: &str,
) -> Result<(Drawn, FrameLoop), String> {
    let drawn = guest.wait_drawn().map_err(|e| format!("{what}: {e}"))?;
    let frames = guest.wait_loop(secs).map_err(|e| format!("{what}: {e}"))?;
    guest
        .wait_poweroff(EXIT_WAIT + HOLD)
        .map_err(|e| format!("{what}: {e}"))?;
    eprintln!(
        "{what}: {} frames in {} ms ({:.1} fps)",
        frames.frames,
        frames.ms,
        frames.fps()
    );
    Ok((drawn, frames))
}

/// The backend's statistics of display connection number `n` (0-based), once logged.
fn stats_of(
    backend: &Backend,
    display: &str,
    n: usize,
) -> Result<guest_tests::frame_rate::ConnectionStats, String> {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = connection_stats(&backend.log_text(), display).get(n) {
            return Ok(*s);
        }
        if start.elapsed() > LOG_WAIT {
            return Err(format!(
                "the backend did not log the end of display connection {} within {LOG_WAIT:?}",
                n + 1
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(args: &Args) -> Result<FrameRateReport, String> {
    let bin = backend_binary_for(args.build).map_err(|e| e.to_string())?;
    let log_dir = std::env::temp_dir().join(format!("gpu-display-bench-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
    let backend = Backend::spawn_with_display(&bin, &args.profile, &log_dir.join("backend.log"))
        .map_err(|e| e.to_string())?;
    let display = backend
        .display_socket()
        .ok_or("the backend has no display socket")?
        .to_path_buf();
    let display_name = display.display().to_string();
    let vhost = |tag: u8, secs: u64, label: &str| {
        DisplayOptions::new(DisplayDevice::VhostUser(display.clone()), tag)
            .with_vfio_user(backend.socket())
            .looping(secs, HOLD)
            .smp(args.smp)
            .label(label)
    };
    let mut runs = Vec::new();
    let mut frame_bytes = 0;
    for r in 0..args.runs {
        eprintln!("run {}: two guests, {} s loops", r + 1, args.secs);
        let v = start_display_guest(&vhost(1, args.secs, "fps-vhost-user"))
            .map_err(|e| e.to_string())?;
        let q = start_display_guest(
            &DisplayOptions::new(DisplayDevice::QemuVirtioGpu, 2)
                .looping(args.secs, HOLD)
                .smp(args.smp)
                .label("fps-virtio-gpu"),
        )
        .map_err(|e| e.to_string())?;
        // Both run at once; the second is waited for while the first finishes.
        let reference = std::thread::scope(|s| {
            let q = s.spawn(|| finish_loop(q, args.secs, "virtio-gpu-pci"));
            let v = finish_loop(v, args.secs, "vhost-user");
            (v, q.join())
        });
        let (vhost_user, reference) = match reference {
            (Ok(v), Ok(Ok(q))) => (v, q),
            (Err(e), _) | (_, Ok(Err(e))) => return Err(e),
            (_, Err(_)) => return Err("the reference guest's thread panicked".into()),
        };
        frame_bytes = u64::from(vhost_user.0.stride) * u64::from(vhost_user.0.height);
        runs.push(FrameRateRun {
            vhost_user: vhost_user.1,
            reference: reference.1,
            stats: stats_of(&backend, &display_name, r)?,
        });
    }
    eprintln!("baseline: a guest that draws once");
    let mut g = start_display_guest(&vhost(1, 0, "fps-baseline")).map_err(|e| e.to_string())?;
    g.wait_drawn().map_err(|e| e.to_string())?;
    g.wait_poweroff(EXIT_WAIT + HOLD)
        .map_err(|e| e.to_string())?;
    let baseline = stats_of(&backend, &display_name, args.runs)?;
    drop(backend);
    let _ = std::fs::remove_dir_all(&log_dir);
    Ok(FrameRateReport {
        runs,
        baseline_updates: baseline.updates,
        frame_bytes,
        loop_secs: args.secs,
        command: format!(
            "cargo run --release -p guest-tests --bin gpu-display-bench -- --secs {} --runs {} --smp {} --profile {}",
            args.secs, args.runs, args.smp, args.profile
        ),
    })
}
