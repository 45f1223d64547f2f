//! Markdown tables of the guest benchmarks ([`crate::bench`]) next to the host ping-pong floor
//! ([`crate::pingpong`]), with the ratios the project tracks.

use std::fmt::Write as _;

use crate::bench::{Bandwidth, BenchRun, GuestBench};
use crate::pingpong::Placement;
use crate::stats::{us, Latency};

/// Target of the mapped-VRAM / guest-RAM read bandwidth ratio.
pub const VRAM_RATIO_TARGET: f64 = 0.9;

/// Everything one `gpu-guest-bench` run measured.
pub struct BenchSummary<'a> {
    /// Backend profile.
    pub profile: &'a str,
    /// QEMU version.
    pub qemu_version: &'a str,
    /// `debug` or `release`.
    pub backend_build: &'a str,
    /// The main boot (all benchmarks).
    pub main: &'a BenchRun,
    /// The VRAM BAR index used for the bandwidth benchmarks.
    pub vram_bar: Option<u8>,
    /// Host ping-pong floor per placement.
    pub pingpong: &'a [(Placement, Latency)],
    /// Extra boots with other `-smp` / pinning (register latencies only).
    pub variants: &'a [BenchRun],
    /// Host 1-minute load average at the start and the end of the run, and the host's CPUs.
    pub host_load: Option<(f64, f64, usize)>,
    /// The command that reproduces these figures.
    pub command: String,
}

fn latency_row(s: &mut String, what: &str, l: Option<&Latency>) {
    match l {
        Some(l) => {
            let _ = writeln!(
                s,
                "| {what} | {} | {} | {} | {} | {} |",
                us(l.p50_ns),
                us(l.p99_ns),
                us(l.mean_ns),
                l.loop_mean_ns.map_or("-".into(), us),
                l.n
            );
        }
        None => {
            let _ = writeln!(s, "| {what} | not measured | | | | |");
        }
    }
}

fn ratio(a: u64, b: u64) -> String {
    if b == 0 {
        return "-".into();
    }
    let r = a as f64 / b as f64;
    if r >= 10.0 {
        format!("{r:.0}x")
    } else {
        format!("{r:.2}x")
    }
}

fn ratio_f(a: f64, b: f64) -> String {
    if b <= 0.0 {
        return "-".into();
    }
    let r = a / b;
    if r >= 10.0 {
        format!("{r:.0}x")
    } else {
        format!("{r:.2}x")
    }
}

/// (f) The PRAMIN aperture against the mapped VRAM BAR, if measured.
fn aperture_section(s: &mut String, b: &GuestBench) {
    let (Some(a), Some(m)) = (b.aperture_read(), b.aperture_mapped_read()) else {
        return;
    };
    let windows = b.aperture_windows.unwrap_or(0);
    let _ = writeln!(
        s,
        "\n### PRAMIN aperture reads (f), MB/s: {} KiB at each of {windows} window positions 1 MiB \
         apart ({} KiB per pass), 8-byte volatile loads\n",
        (a.bytes / windows.max(1)) >> 10,
        a.bytes >> 10
    );
    s.push_str(
        "| path | best | median | per 8-byte load, best pass (µs) | passes |\n|---|---:|---:|---:|---:|\n",
    );
    for (what, bw) in [
        (
            "PRAMIN aperture (BAR0 + 0x700000, trapped: one vfio-user round trip per load; \
             the pass includes its window moves)",
            a,
        ),
        ("mapped VRAM BAR, the same bytes (resource mmap)", m),
    ] {
        let per_load = bw.ns / (bw.bytes / 8).max(1);
        let _ = writeln!(
            s,
            "| {what} | {} | {} | {} | {} |",
            fmt_mbps(Some(bw.mb_per_s())),
            fmt_mbps(bw.median_ns.map(|ns| Bandwidth::rate(bw.bytes, ns))),
            us(per_load),
            bw.reps
        );
    }
    let _ = writeln!(
        s,
        "\nThe mapped VRAM BAR reads the same bytes {} faster (best passes). The aperture is \
         for a driver's page-table and instance-block updates, not for bulk data.",
        ratio_f(m.mb_per_s(), a.mb_per_s())
    );
}

fn mbps(bench: &GuestBench, name: &str) -> Option<f64> {
    bench.bandwidth.get(name).map(|b| b.mb_per_s())
}

fn fmt_mbps(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else if v >= 1.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.3}")
        }
    })
}

impl BenchSummary<'_> {
    /// The whole report as markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let b = &self.main.bench;
        let cfg = &self.main.config;
        let _ = writeln!(
            s,
            "## Guest-side benchmarks: {}, QEMU {} (TCG), {}, backend {} build\n",
            self.profile,
            self.qemu_version,
            cfg.describe(),
            self.backend_build
        );
        if let Some((start, end, cpus)) = self.host_load {
            let _ = writeln!(
                s,
                "Host: {cpus} CPUs, 1-minute load average {start:.2} at the start, {end:.2} at the \
                 end (other work on the host inflates every figure below, the trapped round trips most).\n"
            );
        }
        let timer = b.latency.get("timer");
        let _ = writeln!(
            s,
            "One guest with the vfio-user GPU and `-device edu`; guest clock source `{}`, {} vCPUs. \
             Each latency sample times one access with `Instant::now()` (the timer itself costs \
             p50 {} µs, included in p50/p99/mean); \"loop mean\" is the fastest of 5 untimed \
             loops of the same accesses, divided by their number. N = {} after {} warm-up accesses.\n",
            b.clocksource,
            b.cpus,
            timer.map_or("?".into(), |t| us(t.p50_ns)),
            cfg.n,
            cfg.warmup
        );

        s.push_str("### Register access latency (µs)\n\n");
        s.push_str(
            "| access | p50 | p99 | mean | loop mean | n |\n|---|---:|---:|---:|---:|---:|\n",
        );
        latency_row(
            &mut s,
            "(a) GPU BAR0 BOOT_0 read, trapped (vfio-user round trip)",
            b.gpu_read(),
        );
        if b.latency.contains_key("gpu_aperture_read32") {
            latency_row(
                &mut s,
                "(f) GPU PRAMIN aperture 4-byte read, trapped (window parked)",
                b.latency.get("gpu_aperture_read32"),
            );
            latency_row(
                &mut s,
                "(f) GPU PRAMIN aperture 8-byte read, trapped (window parked)",
                b.latency.get("gpu_aperture_read64"),
            );
        }
        latency_row(
            &mut s,
            "(b) edu BAR0 register 0 read (QEMU in-process device)",
            b.edu_read(),
        );
        for (p, l) in self.pingpong {
            latency_row(
                &mut s,
                &format!("(c) host unix-socket ping-pong 32/36 B, {}", p.describe()),
                Some(l),
            );
        }
        latency_row(
            &mut s,
            "edu BAR0 register write",
            b.latency.get("edu_bar0_write32"),
        );
        if b.latency.contains_key("vram_read32") {
            latency_row(
                &mut s,
                "mapped VRAM 4-byte read (resource mmap, never reaches the socket)",
                b.latency.get("vram_read32"),
            );
            latency_row(&mut s, "guest RAM 4-byte read", b.latency.get("ram_read32"));
        }
        latency_row(&mut s, "guest timer alone (empty sample)", timer);

        if let Some(p) = &b.posted {
            let _ = writeln!(
                s,
                "\n### BAR0 writes (e): burst of {} writes to BAR0 {:#x} (window register, \
                 rewritten with its own value), then one BOOT_0 read; median of 5 bursts\n",
                p.n, p.reg
            );
            s.push_str("| per write, burst + read | per write, issue only | the read after the burst | trapped read alone (p50) |\n|---:|---:|---:|---:|\n");
            let _ = writeln!(
                s,
                "| {} µs | {} µs | {} µs | {} µs |",
                us(p.per_write_ns()),
                us(p.issue_per_write_ns()),
                us(p.drain_ns),
                b.gpu_read().map_or("-".into(), |l| us(l.p50_ns))
            );
        }

        let seq_bytes = b.bandwidth.get("ram_seq_read64").map(|x| x.bytes);
        let copy_bytes = b.bandwidth.get("ram_memcpy").map(|x| x.bytes);
        if seq_bytes.is_some() || copy_bytes.is_some() {
            let _ = writeln!(
                s,
                "\n### Sequential bandwidth (d), MB/s, best of {} passes: {} with 8-byte volatile accesses{}\n",
                b.bandwidth.values().map(|x| x.reps).max().unwrap_or(1),
                seq_bytes.map_or("-".into(), |x| format!("{} MiB", x >> 20)),
                copy_bytes.map_or(String::new(), |x| format!(", {} MiB memcpy into guest RAM", x >> 20)),
            );
            let with_copy = copy_bytes.is_some();
            s.push_str(if with_copy {
                "| source | read | write | memcpy |\n|---|---:|---:|---:|\n"
            } else {
                "| source | read | write |\n|---|---:|---:|\n"
            });
            let bar = self.vram_bar.map_or("?".into(), |i| i.to_string());
            for (what, key) in [
                (
                    format!("mapped VRAM (BAR{bar} resource mmap, real part)"),
                    "vram",
                ),
                ("guest RAM (anonymous mapping)".to_string(), "ram"),
            ] {
                let _ = write!(
                    s,
                    "| {what} | {} | {} |",
                    fmt_mbps(mbps(b, &format!("{key}_seq_read64"))),
                    fmt_mbps(mbps(b, &format!("{key}_seq_write64"))),
                );
                if with_copy {
                    let _ = write!(s, " {} |", fmt_mbps(mbps(b, &format!("{key}_memcpy"))));
                }
                s.push('\n');
            }
            if let Some(w) = b.bandwidth.get("vram_seq_write64") {
                let _ = writeln!(
                    s,
                    "\nThe first VRAM write pass ran at {} MB/s: it also populates the backend's \
                     sparse VRAM memfd (one host page fault per 4 KiB page); later passes reuse the pages.",
                    fmt_mbps(Some(w.first_mb_per_s()))
                );
            }
        }

        aperture_section(&mut s, b);

        s.push_str("\n### Ratios\n\n| ratio | value | note |\n|---|---:|---|\n");
        if let (Some(g), Some(e)) = (b.gpu_read(), b.edu_read()) {
            let _ = writeln!(
                s,
                "| trapped read / edu read (p50) | {} | mean {}; the cost of leaving QEMU's process |",
                ratio(g.p50_ns, e.p50_ns),
                ratio(g.mean_ns, e.mean_ns)
            );
        }
        if let Some(g) = b.gpu_read() {
            // The floor is the fastest placement; the others show what scheduling adds.
            let floor = self.pingpong.iter().map(|(_, l)| l.p50_ns).min();
            for (p, l) in self.pingpong {
                let note = if Some(l.p50_ns) == floor {
                    "the floor: fastest placement"
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    "| trapped read / ping-pong, {} (p50) | {} | mean {}{}{note} |",
                    p.describe(),
                    ratio(g.p50_ns, l.p50_ns),
                    ratio(g.mean_ns, l.mean_ns),
                    if note.is_empty() { "" } else { "; " }
                );
            }
        }
        if let (Some(a), Some(m)) = (b.aperture_read(), b.aperture_mapped_read()) {
            let _ = writeln!(
                s,
                "| mapped VRAM BAR / PRAMIN aperture, 8-byte reads (f) | {} | the same bytes; every aperture load is a trapped round trip |",
                ratio_f(m.mb_per_s(), a.mb_per_s())
            );
        }
        let mut missed = false;
        for (what, key) in [
            ("sequential 8-byte reads", "seq_read64"),
            ("sequential 8-byte writes", "seq_write64"),
            ("memcpy into guest RAM", "memcpy"),
        ] {
            if let (Some(v), Some(r)) = (
                mbps(b, &format!("vram_{key}")),
                mbps(b, &format!("ram_{key}")),
            ) {
                let value = v / r;
                let met = value >= VRAM_RATIO_TARGET;
                missed |= !met;
                let _ = writeln!(
                    s,
                    "| VRAM-map / RAM, {what} | {value:.2} | target >= {VRAM_RATIO_TARGET}: {} |",
                    if met { "met" } else { "**not met**" }
                );
            }
        }
        let single = b
            .latency
            .get("vram_read32")
            .zip(b.latency.get("ram_read32"))
            .and_then(|(v, r)| Some((v.loop_mean_ns?, r.loop_mean_ns?)));
        if b.bandwidth.contains_key("vram_seq_read64") {
            s.push_str(
                "\nThe mapped VRAM is QEMU's mmap of the backend's VRAM memfd (a `ram_device` \
                 region); guest accesses to it never reach the backend's socket.",
            );
        }
        match single {
            // Within a factor of two per access (including the loop's own cost): same path.
            Some((v, r)) if v <= 2 * r.max(1) => {
                let _ = write!(
                    s,
                    " Under this QEMU's TCG a single mapped read costs what a guest-RAM read costs \
                     ({} vs {} µs, loop mean), so both run on the same fast path and the \
                     bandwidth ratio is 1 up to noise{}.",
                    us(v),
                    us(r),
                    if missed {
                        ": a miss here comes from other load on the host during the passes \
                         (best of several passes; rerun on a quiet host)"
                    } else {
                        ""
                    }
                );
            }
            Some((v, r)) => {
                let _ = write!(
                    s,
                    " Under TCG a single mapped read costs {} µs against {} µs for guest RAM \
                     (loop mean): QEMU serves the region on a slower path than RAM. This \
                     measures TCG, not the backend; with KVM the guest's page tables point \
                     straight at the mapping.",
                    us(v),
                    us(r)
                );
            }
            None => {}
        }
        if b.bandwidth.contains_key("vram_seq_read64") || single.is_some() {
            s.push('\n');
        }
        if let (Some(p), Some(g)) = (&b.posted, b.gpu_read()) {
            let issue = p.issue_per_write_ns();
            let note = if issue * 4 >= g.p50_ns {
                format!(
                    "\n**BAR0 writes are not posted here**: a write takes {} µs to retire, like a \
                     trapped read ({} µs), and the read after a burst takes {} µs, nowhere near \
                     the {} ms a backlog of {} queued writes would need. \
                     QEMU's vfio-user client (hw/vfio-user/device.c, `vfio_user_get_region_info`) \
                     turns posted writes off for the whole device as soon as any region has the \
                     MMAP flag (a direct mapping could overtake a queued write), and this \
                     backend maps its VRAM BARs. Every trapped write therefore costs a full round \
                     trip.\n",
                    us(issue),
                    us(g.p50_ns),
                    us(p.drain_ns),
                    (p.n * g.p50_ns) / 1_000_000,
                    p.n
                )
            } else {
                format!(
                    "\nBAR0 writes are posted: a write retires in {} µs; the read after a burst \
                     waits {} µs for the backlog.\n",
                    us(issue),
                    us(p.drain_ns)
                )
            };
            s.push_str(&note);
        }

        if !self.command.is_empty() {
            let _ = writeln!(s, "\nReproduce: `{}`", self.command);
        }

        if !self.variants.is_empty() {
            s.push_str(
                "\n### Placement: register reads (a) and (b) per QEMU configuration (µs)\n\n\
                 | configuration | GPU read p50 | GPU read p99 | GPU read mean | edu read p50 | BAR0 write, per write (burst + read) |\n\
                 |---|---:|---:|---:|---:|---:|\n",
            );
            for v in std::iter::once(self.main).chain(self.variants) {
                let g = v.bench.gpu_read();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    v.config.describe(),
                    g.map_or("-".into(), |l| us(l.p50_ns)),
                    g.map_or("-".into(), |l| us(l.p99_ns)),
                    g.map_or("-".into(), |l| us(l.mean_ns)),
                    v.bench.edu_read().map_or("-".into(), |l| us(l.p50_ns)),
                    v.bench.posted.map_or("-".into(), |p| us(p.per_write_ns())),
                );
            }
        }
        s
    }
}
