//! Two seeded soaks: a bounded hostile-client soak against the real `gpu-backend serve`
//! binary (this file), and the churn soak in process (`churn/`: random hostile operations
//! over every slice of a sliced GPU with guests removed and added again, a million with
//! `GPU_BACKEND_SOAK_OPS=1000000`; see its module docs).
//!
//! The hostile-client soak:
//!
//! One emulated TU102 is sliced for two guests: B's slice first, then A's, then free VRAM.
//! A hostile client on A runs seeded episodes of misbehaviour over every message type
//! (`hostile.rs`, `episodes.rs`, `resources.rs`: fuzzed, mutated and lying messages, odd fds,
//! DMA and interrupt floods, aperture floods, stalls, reconnects) while a well-behaved client
//! on B keeps checking its data and timing its trapped reads (`guest.rs`), and the test
//! watches the host's VRAM outside both slices (`host.rs`) and the server process.
//!
//! It asserts that the server stays up and stops on SIGTERM in bounded time; that B's data
//! (planted through the mapped VRAM BAR, the trapped VRAM BAR and the aperture) reads back
//! intact through every path, its DMA maps, interrupt eventfds and reconnects keep working,
//! and its trapped reads' p99 stays under [`P99_BOUND`] and none takes over [`MAX_BOUND`]; that host VRAM canaries next to A's
//! slice, the host-reserved region and every VRAM file's size are untouched; that A only ever
//! got errnos or disconnects (see `hostile.rs` for what counts as a violation); that the server
//! never logged a panic; and that the fds A made the server hold are released once A is gone.
//!
//! Longer runs and other seeds (the seed fixes A's and B's choices, not the thread timing):
//!
//! ```sh
//! GPU_BACKEND_SOAK_SECONDS=600 GPU_BACKEND_SOAK_SEED=7 \
//!     cargo test --release -p gpu-backend --test soak -- --nocapture
//! ```
//!
//! `GPU_BACKEND_SOAK_EPISODES=fuzz,irqs` runs only those episodes (names in `hostile.rs`),
//! to narrow down a failure.

#[path = "../support/mod.rs"]
mod support;

mod churn;
mod episodes;
mod guest;
mod host;
mod hostile;
mod payloads;
mod resources;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use episodes::SLICE;
use guest::{GuestReport, WellBehaved};
use host::HostCanaries;
use hostile::{Episode, Hostile, Tally};
use support::proc_stats::{fd_count, human, proc_stats, HostVramFiles, ProcStats};
use support::serve_process::{ServeProcess, TempDir};

/// Soak length without `GPU_BACKEND_SOAK_SECONDS`.
const DEFAULT_SECONDS: u64 = 20;
/// Seed without `GPU_BACKEND_SOAK_SEED`.
const DEFAULT_SEED: u64 = 0x50A4_2026;
/// Bound on the p99 of B's trapped reads: about 100x what they take here (0.06-0.2 ms in a
/// debug build on two shared cores with four busy threads), so only a real starvation fails.
const P99_BOUND: Duration = Duration::from_millis(50);
/// Bound on any single trapped read of B: no stall (the worst seen is tens of ms).
const MAX_BOUND: Duration = Duration::from_secs(2);
/// How long SIGTERM may take to end the server.
const STOP_BOUND: Duration = Duration::from_secs(10);
/// Fds the server may hold beyond its count before A came (a finished connection's socket
/// is only closed when the next client arrives).
const FD_SLACK: usize = 4;

struct Config {
    seconds: u64,
    seed: u64,
    episodes: Vec<Episode>,
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text} is not a number")))
}

impl Config {
    fn from_env() -> Config {
        let episodes = match std::env::var("GPU_BACKEND_SOAK_EPISODES") {
            Ok(list) if !list.trim().is_empty() => list
                .split(',')
                .map(|n| Episode::by_name(n.trim()).unwrap_or_else(|| panic!("no episode {n}")))
                .collect(),
            _ => Episode::ALL.to_vec(),
        };
        Config {
            seconds: env_u64("GPU_BACKEND_SOAK_SECONDS").unwrap_or(DEFAULT_SECONDS),
            seed: env_u64("GPU_BACKEND_SOAK_SEED").unwrap_or(DEFAULT_SEED),
            episodes,
        }
    }
}

/// The partition `serve` will make for these flags, from `inspect --json`: (guest area end,
/// host-reserved size, slice starts by guest).
fn partition(binary: &Path, guests: &[String]) -> (u64, u64, Vec<u64>) {
    let out = std::process::Command::new(binary)
        .args(["inspect", "--json", "--profile", "tu102-24g"])
        .args(guests.iter().flat_map(|g| ["--guest", g.as_str()]))
        .env("RUST_LOG", "error")
        .output()
        .expect("run inspect");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    let p = &json["partition"];
    let starts = json["guests"]
        .as_array()
        .expect("guests")
        .iter()
        .map(|g| g["slice"]["start"].as_u64().expect("slice start"))
        .collect();
    (
        p["guest_area_end"].as_u64().expect("guest_area_end"),
        p["host_reserved"]["size"].as_u64().expect("host_reserved"),
        starts,
    )
}

fn percentile(samples: &[u64], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    Duration::from_nanos(sorted[i])
}

fn describe(tally: &Tally, guest: &GuestReport, peak: &ProcStats, before: &ProcStats) {
    eprintln!(
        "A (hostile): {} connections, {} refused, {} dropped by the server",
        tally.connections, tally.refused, tally.disconnects
    );
    eprintln!(
        "  sent {}, replies {}, errnos {:?}",
        tally.sent, tally.replies, tally.errnos
    );
    eprintln!("  episodes {:?}", tally.episodes);
    eprintln!("  longest {:?}", tally.longest);
    for f in &tally.flood_results {
        eprintln!("  {f}");
    }
    for (name, after) in &tally.stall_drops {
        eprintln!("  stalled client ({name}) dropped after {after:.2?}");
    }
    eprintln!(
        "B (well-behaved): {} register reads p50 {:.2?} p99 {:.2?} max {:.2?}; {} aperture reads p50 {:.2?} p99 {:.2?} max {:.2?}",
        guest.register_ns.len(),
        percentile(&guest.register_ns, 0.5),
        percentile(&guest.register_ns, 0.99),
        percentile(&guest.register_ns, 1.0),
        guest.aperture_ns.len(),
        percentile(&guest.aperture_ns, 0.5),
        percentile(&guest.aperture_ns, 0.99),
        percentile(&guest.aperture_ns, 1.0),
    );
    eprintln!(
        "  {} checked, {} whole-slice checks, {} DMA/IRQ checks, {} reconnects (longest {:.2?})",
        human(guest.bytes_checked),
        guest.full_checks,
        guest.fd_checks,
        guest.reconnects,
        guest.longest_reconnect
    );
    eprintln!(
        "server: before A fds {} VmSize {} maps {}; peak fds {} VmSize {} VmRSS {} maps {} threads {}",
        before.fds,
        human(before.vm_size),
        before.maps,
        peak.fds,
        human(peak.vm_size),
        human(peak.vm_rss),
        peak.maps,
        peak.threads
    );
}

#[test]
fn a_hostile_guest_cannot_crash_starve_or_stall_another() {
    let config = Config::from_env();
    eprintln!(
        "soak: {} s, seed {:#x}, episodes {:?}",
        config.seconds,
        config.seed,
        config.episodes.iter().map(|e| e.name()).collect::<Vec<_>>()
    );
    let binary = Path::new(env!("CARGO_BIN_EXE_gpu-backend"));
    let dir = TempDir::new("soak");
    let (a_socket, b_socket) = (dir.join("a.sock"), dir.join("b.sock"));
    let guests = [
        format!("{}:64M", b_socket.display()),
        format!("{}:64M", a_socket.display()),
    ];
    let (guest_area_end, reserved_size, starts) = partition(binary, &guests);
    assert_eq!(starts, [0, SLICE], "B first, then A");
    let args: Vec<String> = ["--profile", "tu102-24g"]
        .iter()
        .map(|s| s.to_string())
        .chain(
            guests
                .iter()
                .flat_map(|g| ["--guest".to_string(), g.clone()]),
        )
        .collect();
    let mut server = ServeProcess::start(
        binary,
        &args,
        vec![a_socket.clone(), b_socket.clone()],
        dir.join("serve.log"),
    );
    let pid = server.pid();
    let vram = HostVramFiles::open(pid).expect("the server's VRAM memfds");
    let host = HostCanaries::plant(
        vram,
        config.seed ^ 0x4057,
        (2 * SLICE, guest_area_end),
        (guest_area_end, guest_area_end + reserved_size),
    )
    .expect("plant host canaries");
    let guest = WellBehaved::start(b_socket, config.seed).expect("B starts");
    let before = proc_stats(pid).expect("server stats");

    let until = Instant::now() + Duration::from_secs(config.seconds);
    let (seed, episodes) = (config.seed, config.episodes.clone());
    let a_done = Arc::new(AtomicBool::new(false));
    let hostile = std::thread::spawn({
        let a_done = Arc::clone(&a_done);
        move || {
            let result = Hostile::new(a_socket, seed, episodes).run(until);
            a_done.store(true, Ordering::SeqCst);
            result
        }
    });
    // B keeps going until A is done, so it also runs through A's last episode.
    let well_behaved = std::thread::spawn(move || guest.run(until, &a_done));

    let mut failures = Vec::new();
    let mut peak = before;
    let mut died = None;
    while !(hostile.is_finished() && well_behaved.is_finished()) {
        if let Some(status) = server.exited() {
            died = Some(status);
            break;
        }
        if let Ok(now) = proc_stats(pid) {
            peak.fds = peak.fds.max(now.fds);
            peak.vm_size = peak.vm_size.max(now.vm_size);
            peak.vm_rss = peak.vm_rss.max(now.vm_rss);
            peak.maps = peak.maps.max(now.maps);
            peak.threads = peak.threads.max(now.threads);
        }
        if let Err(e) = host.check_canaries() {
            failures.push(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if let Some(status) = died {
        // The clients see the server gone and end; their reports add nothing.
        panic!(
            "the server died during the soak ({status}); log tail:\n{}",
            server.log_tail(40)
        );
    }
    // A's fds stay open until the server has stopped (see `Hostile::run`).
    let (tally, _a_fds) = hostile.join().expect("hostile client thread");
    let report = well_behaved.join().expect("well-behaved client thread");
    describe(&tally, &report, &peak, &before);

    // A is gone: what it made the server hold must be released.
    let settle = Instant::now() + Duration::from_secs(5);
    let mut fds_after = fd_count(pid).unwrap_or(usize::MAX);
    while fds_after > before.fds + FD_SLACK && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(50));
        fds_after = fd_count(pid).unwrap_or(usize::MAX);
    }
    eprintln!(
        "server fds: {} before A, {fds_after} after A left",
        before.fds
    );
    if fds_after > before.fds + FD_SLACK {
        failures.push(format!(
            "the server holds {fds_after} fds after A left, {} before",
            before.fds
        ));
    }
    if let Err(e) = host.check_all() {
        failures.push(e);
    }
    eprintln!(
        "host: {} canaries, host-reserved region and VRAM file sizes checked",
        host.count()
    );
    failures.extend(tally.violations.iter().map(|v| format!("A got: {v}")));
    if let Some(f) = &report.failure {
        failures.push(format!("B: {f}"));
    }
    for (name, samples) in [
        ("register", &report.register_ns),
        ("aperture", &report.aperture_ns),
    ] {
        let p99 = percentile(samples, 0.99);
        if p99 > P99_BOUND {
            failures.push(format!(
                "B's trapped {name} reads: p99 {p99:.2?} > {P99_BOUND:?}"
            ));
        }
        let max = percentile(samples, 1.0);
        if max > MAX_BOUND {
            failures.push(format!(
                "B's trapped {name} reads: one took {max:.2?} > {MAX_BOUND:?}"
            ));
        }
        if samples.len() < 100 {
            failures.push(format!(
                "B made only {} trapped {name} reads",
                samples.len()
            ));
        }
    }
    let log = server.log_text();
    eprintln!(
        "server log: {} lines, {} bytes",
        log.lines().count(),
        log.len()
    );
    if log.contains("panicked") {
        failures.push("the server logged a panic".into());
    }
    match server.stop(libc::SIGTERM, STOP_BOUND) {
        Ok((status, took)) => {
            eprintln!("SIGTERM: exited {status} after {took:.2?}");
            if !status.success() {
                failures.push(format!("the server exited {status} on SIGTERM"));
            }
        }
        Err(e) => failures.push(format!("SIGTERM: {e}")),
    }
    for socket in server.sockets() {
        if socket.exists() {
            failures.push(format!("{} left behind", socket.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s) (seed {:#x}):\n- {}\nserver log tail:\n{}",
        failures.len(),
        config.seed,
        failures.join("\n- "),
        server.log_tail(30)
    );
}
