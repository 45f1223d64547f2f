//! `gpu-guest-bench`: what a trapped register access, a posted write, the PRAMIN aperture and
//! the mapped VRAM cost as a QEMU guest sees them, next to QEMU's in-process `edu` device and a
//! host unix-socket ping-pong (the floor of any vfio-user round trip). Prints a markdown report
//! on stdout.
//!
//! ```text
//! cargo run --release -p guest-tests --bin gpu-guest-bench [-- --profile gh200-96g --matrix]
//! ```

use std::process::ExitCode;
use std::time::Instant;

use guest_tests::artifacts::{backend_binary_for, probe_binary, BuildProfile};
use guest_tests::bench::{run_bench, BenchConfig, BenchRun};
use guest_tests::bench_table::BenchSummary;
use guest_tests::guest::guest_initramfs;
use guest_tests::pingpong::{ping_pong, Placement};
use guest_tests::{affinity, ProfileLayout, QemuLab, Result};

const USAGE: &str = "\
usage: gpu-guest-bench [--profile NAME] [--n N] [--warmup N] [--mib M] [--memcpy-mib M]
                       [--aperture-kib K] [--aperture-windows W] [--aperture-reps R]
                       [--smp N] [--pin CPU[,CPU]] [--matrix] [--debug-backend]

Boots one TCG guest with the emulated GPU (vfio-user) and QEMU's edu device and measures, from
inside the guest: (a) trapped BAR0 BOOT_0 reads, (b) edu register reads, (d) sequential reads of
the mapped VRAM against guest RAM, (e) posted BAR0 writes, (f) sequential reads through the
PRAMIN aperture (window moved over VRAM) against the same bytes through the mapped VRAM BAR;
and on the host (c) a unix-socket ping-pong with vfio-user-sized messages. Prints a markdown
report on stdout, progress on stderr.

  --profile NAME     emulated GPU profile (default gh200-96g)
  --n N              timed accesses per latency benchmark (default 2000)
  --warmup N         untimed accesses before each (default 200)
  --mib M            MiB for the sequential bandwidth passes (default 64, 0 skips)
  --memcpy-mib M     MiB for memcpy passes into guest RAM (default 0: off; noisy under TCG)
  --aperture-kib K   KiB read through the aperture per window position (default 64, max 1024,
                     0 skips (f); every 8-byte load is a trapped round trip)
  --aperture-windows W  window positions, 1 MiB apart (default 16)
  --aperture-reps R  aperture passes, the best is reported (default 2)
  --smp N            guest vCPUs of the main boot (default 2)
  --pin CPUS         pin QEMU and the backend of the main boot to these host CPUs (e.g. 0)
  --matrix           also boot with -smp 1 / pinned to one CPU (register latencies only)
  --debug-backend    use the debug build of gpu-backend (default: release, as deployed)
";

struct Args {
    profile: String,
    main: BenchConfig,
    matrix: bool,
    build: BuildProfile,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        profile: "gh200-96g".into(),
        main: BenchConfig::default(),
        matrix: false,
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
            "--profile" => a.profile = value("--profile")?,
            "--n" => a.main.n = num("--n", value("--n")?)?.clamp(1, 1_000_000) as u32,
            "--warmup" => {
                a.main.warmup = num("--warmup", value("--warmup")?)?.min(1_000_000) as u32
            }
            "--mib" => a.main.mib = num("--mib", value("--mib")?)?.min(1024),
            "--memcpy-mib" => {
                a.main.memcpy_mib = num("--memcpy-mib", value("--memcpy-mib")?)?.min(1024)
            }
            "--aperture-kib" => {
                a.main.aperture_kib = num("--aperture-kib", value("--aperture-kib")?)?.min(1024)
            }
            "--aperture-windows" => {
                a.main.aperture_windows =
                    num("--aperture-windows", value("--aperture-windows")?)?.min(1024)
            }
            "--aperture-reps" => {
                a.main.aperture_reps =
                    num("--aperture-reps", value("--aperture-reps")?)?.clamp(1, 100)
            }
            "--smp" => a.main.smp = num("--smp", value("--smp")?)?.clamp(1, 64) as u32,
            "--pin" => {
                let cpus = value("--pin")?
                    .split(',')
                    .map(|c| {
                        c.trim()
                            .parse::<usize>()
                            .map_err(|_| format!("--pin: bad CPU `{c}`"))
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                a.main.cpus = Some(cpus);
            }
            "--matrix" => a.matrix = true,
            "--debug-backend" => a.build = BuildProfile::Debug,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(a)
}

fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("gpu-guest-bench: {what}...");
    let t = Instant::now();
    let r = f()?;
    eprintln!(
        "gpu-guest-bench:   done in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(r)
}

/// The host's 1-minute load average.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The command line that reproduces this run.
fn reproduction_command() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cmd = String::from("cargo run --release -p guest-tests --bin gpu-guest-bench");
    if !args.is_empty() {
        cmd.push_str(" -- ");
        cmd.push_str(&args.join(" "));
    }
    cmd
}

fn run(args: &Args) -> Result<bool> {
    let backend = step(
        &format!("building gpu-backend ({})", args.build.dir_name()),
        || backend_binary_for(args.build),
    )?;
    let layout = ProfileLayout::inspect_with(&backend, &args.profile)?;
    let lab = step(
        "checking the QEMU lab (qemu-configs/install.sh)",
        QemuLab::get,
    )?;
    step("building the guest probe and initramfs", || {
        probe_binary()?;
        guest_initramfs()
    })?;

    let load_start = load_average();
    let cpus = affinity::current().unwrap_or_default();
    let mut placements = vec![Placement::Unpinned];
    if let Some(&c0) = cpus.first() {
        placements.push(Placement::SameCpu(c0));
        if let Some(&c1) = cpus.get(1) {
            placements.push(Placement::CrossCpu(c0, c1));
        }
    }
    let pingpong = step("host unix-socket ping-pong (32/36-byte messages)", || {
        placements
            .iter()
            .map(|&p| {
                ping_pong(args.main.n as usize, args.main.warmup as usize, p)
                    .map(|l| (p, l))
                    .map_err(|e| guest_tests::HarnessError::Io {
                        context: format!("ping-pong {}", p.describe()),
                        source: e,
                    })
            })
            .collect::<Result<Vec<_>>>()
    })?;

    let main = step(
        &format!(
            "booting the benchmark guest ({}, TCG; about 40-90 s, the aperture passes take most)",
            args.main.describe()
        ),
        || run_bench(&backend, &layout, &args.main),
    )?;
    let mut variants: Vec<BenchRun> = Vec::new();
    if args.matrix {
        let first = cpus.first().copied().unwrap_or(0);
        let base = BenchConfig {
            mib: 0,
            memcpy_mib: 0,
            aperture_kib: 0,
            cpus: None,
            ..args.main.clone()
        };
        for (smp, pin) in [(1, None), (2, Some(vec![first])), (1, Some(vec![first]))] {
            let cfg = BenchConfig {
                smp,
                cpus: pin,
                label: format!("bench-smp{smp}"),
                ..base.clone()
            };
            if cfg.smp == args.main.smp && cfg.cpus == args.main.cpus {
                continue;
            }
            variants.push(step(
                &format!("booting a variant ({}, about 10 s)", cfg.describe()),
                || run_bench(&backend, &layout, &cfg),
            )?);
        }
    }

    let summary = BenchSummary {
        profile: &args.profile,
        qemu_version: &lab.version,
        backend_build: args.build.dir_name(),
        main: &main,
        vram_bar: layout.vram_bar().map(|b| b.index),
        pingpong: &pingpong,
        variants: &variants,
        host_load: load_start.zip(load_average()).map(|(a, b)| {
            (
                a,
                b,
                std::thread::available_parallelism().map_or(0, |n| n.get()),
            )
        }),
        command: reproduction_command(),
    };
    println!("{}", summary.markdown());
    let mut ok = true;
    for r in std::iter::once(&main).chain(&variants) {
        let failures = r.run.report.failures();
        if !failures.is_empty() {
            ok = false;
            eprintln!(
                "gpu-guest-bench: {} failed checks in `{}` (logs: {}):",
                failures.len(),
                r.config.describe(),
                r.run.run_dir.display()
            );
            for f in failures {
                eprintln!("  {}: {}", f.name, f.detail);
            }
        }
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("gpu-guest-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("gpu-guest-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
