//! Guest-side benchmarks: one guest with the vfio-user GPU and QEMU's `edu` device, the probe in
//! benchmark mode (`gpuprobe.bench=1`, see the probe's `bench` module), results parsed from its
//! `GPUPROBE bench` lines. The host ping-pong floor is in [`crate::pingpong`], the tables in
//! [`crate::bench_table`].

use std::collections::BTreeMap;
use std::path::Path;

use crate::affinity::with_cpus;
use crate::error::Result;
use crate::expect::ProfileLayout;
use crate::guest::{boot_guest, with_backend_bin, GuestOptions, GuestRun};
use crate::report::{Fact, ProbeReport};
use crate::stats::Latency;

/// What one benchmark boot does.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Timed accesses per latency benchmark.
    pub n: u32,
    /// Untimed warm-up accesses.
    pub warmup: u32,
    /// MiB for the sequential bandwidth benchmarks (0: skip).
    pub mib: u64,
    /// MiB for the memcpy bandwidth benchmarks (0: skip, the default: under TCG their rate
    /// depends on glibc's copy strategy and TCG's software TLB and varied threefold between
    /// runs on the development machine).
    pub memcpy_mib: u64,
    /// KiB read through the PRAMIN aperture per window position (0: skip the aperture
    /// benchmark).
    pub aperture_kib: u64,
    /// Window positions (1 MiB apart) per aperture pass.
    pub aperture_windows: u64,
    /// Aperture passes (each `aperture_kib` x `aperture_windows`; every 8-byte load is a
    /// trapped round trip, so keep this small).
    pub aperture_reps: u64,
    /// Guest vCPUs.
    pub smp: u32,
    /// Pin QEMU and the backend to these host CPUs (`None`: unpinned).
    pub cpus: Option<Vec<usize>>,
    /// Run directory label.
    pub label: String,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            n: 2000,
            warmup: 200,
            mib: 64,
            memcpy_mib: 0,
            aperture_kib: 64,
            aperture_windows: 16,
            aperture_reps: 2,
            smp: crate::qemu::DEFAULT_SMP,
            cpus: None,
            label: "bench".into(),
        }
    }
}

impl BenchConfig {
    /// A short description of the placement, e.g. `-smp 2, unpinned`.
    pub fn describe(&self) -> String {
        let pin = match &self.cpus {
            None => "unpinned".to_string(),
            Some(c) => format!(
                "QEMU + backend pinned to CPU {}",
                c.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
            ),
        };
        format!("-smp {}, {pin}", self.smp)
    }
}

/// A sequential transfer, repeated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bandwidth {
    /// Bytes moved per pass.
    pub bytes: u64,
    /// Nanoseconds of the fastest pass.
    pub ns: u64,
    /// Nanoseconds of the median pass, if reported.
    pub median_ns: Option<u64>,
    /// Nanoseconds of the first pass, if reported.
    pub first_ns: Option<u64>,
    /// Passes.
    pub reps: u64,
}

impl Bandwidth {
    /// Decimal megabytes per second of the fastest pass.
    pub fn mb_per_s(&self) -> f64 {
        Self::rate(self.bytes, self.ns)
    }

    /// Decimal megabytes per second of the first pass (falls back to the fastest).
    pub fn first_mb_per_s(&self) -> f64 {
        Self::rate(self.bytes, self.first_ns.unwrap_or(self.ns))
    }

    /// Decimal megabytes per second of `bytes` in `ns` nanoseconds (0 for 0 ns).
    pub fn rate(bytes: u64, ns: u64) -> f64 {
        if ns == 0 {
            return 0.0;
        }
        bytes as f64 / (ns as f64 / 1e9) / 1e6
    }
}

/// A burst of posted writes followed by one read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostedWrites {
    /// BAR0 offset written.
    pub reg: u64,
    /// Writes per burst.
    pub n: u64,
    /// Time until the last write instruction retired.
    pub issue_ns: u64,
    /// Time of the read after the burst (waits until the backlog is handled).
    pub drain_ns: u64,
    /// Burst plus read.
    pub total_ns: u64,
}

impl PostedWrites {
    /// Average cost per write including the final read (burst + read, divided by n).
    pub fn per_write_ns(&self) -> u64 {
        self.total_ns / self.n.max(1)
    }

    /// Average time a write instruction takes to retire.
    pub fn issue_per_write_ns(&self) -> u64 {
        self.issue_ns / self.n.max(1)
    }
}

/// Everything the probe measured in one guest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuestBench {
    /// The guest's clock source (timers are only cheap and exact with `tsc`).
    pub clocksource: String,
    /// Guest CPUs.
    pub cpus: u64,
    /// Latency benchmarks by name (`timer`, `gpu_bar0_read32`, `edu_bar0_read32`, ...).
    pub latency: BTreeMap<String, Latency>,
    /// Bandwidth benchmarks by name (`vram_seq_read64`, `ram_seq_read64`, ...).
    pub bandwidth: BTreeMap<String, Bandwidth>,
    /// The posted-write burst, if measured.
    pub posted: Option<PostedWrites>,
    /// Window positions of the aperture benchmark, if measured.
    pub aperture_windows: Option<u64>,
}

impl GuestBench {
    /// Collect the `GPUPROBE bench` lines of a report.
    pub fn from_report(report: &ProbeReport) -> GuestBench {
        let mut b = GuestBench::default();
        for f in report.facts_of("bench") {
            let name = f.get("name").unwrap_or_default().to_string();
            match (name.as_str(), f.get("kind")) {
                ("env", _) => {
                    b.clocksource = f.get("clocksource").unwrap_or_default().to_string();
                    b.cpus = f.num("cpus").unwrap_or(0);
                }
                (_, Some("latency")) => {
                    if let Some(l) = Latency::from_fact(f) {
                        b.latency.insert(name, l);
                    }
                }
                (_, Some("bandwidth")) => {
                    if name == "aperture_read64" {
                        b.aperture_windows = f.num("windows");
                    }
                    if let Some(bw) = bandwidth(f) {
                        b.bandwidth.insert(name, bw);
                    }
                }
                (_, Some("burst")) => b.posted = posted(f),
                _ => {}
            }
        }
        b
    }

    /// The trapped read of the GPU's BOOT_0 (benchmark a).
    pub fn gpu_read(&self) -> Option<&Latency> {
        self.latency.get("gpu_bar0_read32")
    }

    /// The read of edu's register 0 (benchmark b).
    pub fn edu_read(&self) -> Option<&Latency> {
        self.latency.get("edu_bar0_read32")
    }

    /// Sequential 8-byte reads through the PRAMIN aperture (benchmark f).
    pub fn aperture_read(&self) -> Option<&Bandwidth> {
        self.bandwidth.get("aperture_read64")
    }

    /// The same bytes through the mapped VRAM BAR (benchmark f's baseline).
    pub fn aperture_mapped_read(&self) -> Option<&Bandwidth> {
        self.bandwidth.get("aperture_mapped_read64")
    }
}

fn bandwidth(f: &Fact) -> Option<Bandwidth> {
    Some(Bandwidth {
        bytes: f.num("bytes")?,
        ns: f.num("ns")?,
        median_ns: f.num("median_ns"),
        first_ns: f.num("first_ns"),
        reps: f.num("reps").unwrap_or(1),
    })
}

fn posted(f: &Fact) -> Option<PostedWrites> {
    Some(PostedWrites {
        reg: f.num("reg")?,
        n: f.num("n")?,
        issue_ns: f.num("issue_ns")?,
        drain_ns: f.num("drain_ns")?,
        total_ns: f.num("total_ns")?,
    })
}

/// One benchmark boot and what it measured.
#[derive(Debug)]
pub struct BenchRun {
    /// The configuration.
    pub config: BenchConfig,
    /// The guest run (report, logs, boot time).
    pub run: GuestRun,
    /// The measurements.
    pub bench: GuestBench,
}

/// Start `backend_bin serve` for `layout`'s profile, boot one guest with the GPU and `-device
/// edu`, run the probe's checks and benchmarks, and collect the results. With `config.cpus`,
/// the backend and QEMU are both pinned (the calling thread is pinned while they start).
pub fn run_bench(
    backend_bin: &Path,
    layout: &ProfileLayout,
    config: &BenchConfig,
) -> Result<BenchRun> {
    let args = layout
        .probe_args()
        .set("bench", 1)
        .set("bench_n", config.n)
        .set("bench_warmup", config.warmup)
        .set("bench_mib", config.mib)
        .set("bench_memcpy_mib", config.memcpy_mib)
        .set("bench_reg", format!("{:#x}", layout.window_register()))
        .set("bench_aperture_kib", config.aperture_kib)
        .set("bench_aperture_windows", config.aperture_windows)
        .set("bench_aperture_reps", config.aperture_reps)
        .set("window_reg", format!("{:#x}", layout.window_register()))
        .set("vram_map", layout.vram_map())
        // Generous: the bandwidth passes go through QEMU's slow MMIO path under TCG.
        .watchdog_secs(600);
    let run = with_cpus(config.cpus.as_deref(), || {
        with_backend_bin(backend_bin, &layout.profile, |backend| {
            boot_guest(
                &GuestOptions::new(args.clone())
                    .with_socket(backend.socket())
                    .smp(config.smp)
                    .qemu_args(["-device", "edu"])
                    .label(&config.label),
            )
        })
    })?;
    let bench = GuestBench::from_report(&run.report);
    Ok(BenchRun {
        config: config.clone(),
        run,
        bench,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bench_lines() {
        let r = ProbeReport::parse(
            "GPUPROBE bench name=env clocksource=tsc cpus=2\n\
             GPUPROBE bench name=gpu_bar0_read32 kind=latency n=10 p50_ns=60000 p99_ns=90000 mean_ns=61000 min_ns=50000 max_ns=95000 loop_mean_ns=59000\n\
             GPUPROBE bench name=gpu_bar0_posted_write kind=burst reg=0x10fd40 n=100 bursts=5 issue_ns=100000 drain_ns=500000 total_ns=600000\n\
             GPUPROBE bench name=vram_seq_read64 kind=bandwidth bytes=1000000 ns=1000000\n\
             GPUPROBE bench name=aperture_read64 kind=bandwidth bytes=1048576 ns=4000000000 median_ns=4100000000 first_ns=4200000000 reps=3 windows=16 chunk=65536\n",
        );
        let b = GuestBench::from_report(&r);
        assert_eq!(b.clocksource, "tsc");
        assert_eq!(b.gpu_read().unwrap().p50_ns, 60000);
        let p = b.posted.unwrap();
        assert_eq!(
            (p.reg, p.per_write_ns(), p.issue_per_write_ns()),
            (0x10fd40, 6000, 1000)
        );
        assert!((b.bandwidth["vram_seq_read64"].mb_per_s() - 1000.0).abs() < 1e-9);
        let ap = b.aperture_read().unwrap();
        assert_eq!(
            (ap.bytes, ap.reps, ap.median_ns),
            (1 << 20, 3, Some(4_100_000_000))
        );
        assert!(b.aperture_mapped_read().is_none());
    }
}
