//! B's trapped-read latency while A floods its aperture, against B alone and against A
//! flooding its VRAM BAR (the same 1 MiB accesses over the socket, without the PRAMIN lock):
//! the first ratio is what B notices, the last separates the lock from plain CPU sharing.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_backend::vfio_user::test_client::TestClient;

use crate::guests::{percentile, Served, APERTURE, BAR0, MIB, VRAM_BAR, WINDOW};

/// What A does while B measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flood {
    /// Nothing (connected, idle).
    Alone,
    /// 1 MiB aperture reads and writes back to back (each under the shared PRAMIN lock).
    Aperture,
    /// 1 MiB reads and writes of its VRAM BAR back to back (trapped, no PRAMIN).
    VramBar,
}

impl Flood {
    const ALL: [Flood; 3] = [Flood::Alone, Flood::Aperture, Flood::VramBar];

    fn name(self) -> &'static str {
        match self {
            Flood::Alone => "B alone (A idle)",
            Flood::Aperture => "A floods its aperture",
            Flood::VramBar => "A floods its VRAM BAR",
        }
    }
}

/// Samples of one condition over all rounds.
#[derive(Default)]
struct Samples {
    register: Vec<u64>,
    aperture: Vec<u64>,
    /// A's accesses: ns each.
    flood: Vec<u64>,
    flood_bytes: u64,
    flood_time: Duration,
}

/// A's flood until `stop`: the bytes moved, the time, and each access's duration.
fn flood(a: &mut TestClient, kind: Flood, stop: &AtomicBool) -> (u64, Duration, Vec<u64>) {
    let data = vec![0x5Au8; MIB as usize];
    let (mut bytes, mut times) = (0u64, Vec::new());
    let started = Instant::now();
    let mut n = 0u64;
    while kind != Flood::Alone && !stop.load(Ordering::Relaxed) {
        let (region, offset) = match kind {
            Flood::Aperture => (BAR0, APERTURE),
            _ => (VRAM_BAR, (n % 63) * MIB),
        };
        let t = Instant::now();
        if n % 2 == 0 {
            a.region_read(region, offset, MIB as u32).expect("A's read");
        } else {
            a.region_write(region, offset, &data, false)
                .expect("A's write");
        }
        times.push(t.elapsed().as_nanos() as u64);
        bytes += MIB;
        n += 1;
    }
    (bytes, started.elapsed(), times)
}

/// B's `samples` timed reads of BOOT_0 and of the aperture under condition `kind`.
fn measure(
    b: &mut TestClient,
    a: TestClient,
    kind: Flood,
    samples: usize,
    into: &mut Samples,
) -> TestClient {
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || {
            let mut a = a;
            let result = flood(&mut a, kind, &stop);
            (a, result)
        }
    });
    std::thread::sleep(Duration::from_millis(20));
    for i in 0..samples {
        let t = Instant::now();
        b.region_read(BAR0, 0, 4).expect("B's BOOT_0 read");
        into.register.push(t.elapsed().as_nanos() as u64);
        let offset = ((i as u64 * 4100) % MIB) & !3;
        let t = Instant::now();
        b.region_read(BAR0, APERTURE + offset, 4)
            .expect("B's aperture read");
        into.aperture.push(t.elapsed().as_nanos() as u64);
    }
    stop.store(true, Ordering::Relaxed);
    let (a, (bytes, time, times)) = flooding.join().expect("flood thread");
    into.flood_bytes += bytes;
    into.flood_time += time;
    into.flood.extend(times);
    a
}

/// Measure and print the table.
pub fn run(binary: &Path, rounds: usize, samples: usize) {
    let guests = Served::sliced(binary, 2, "64M");
    let mut b = Served::client(&guests.sockets[0]);
    let mut a = Served::client(&guests.sockets[1]);
    for client in [&mut a, &mut b] {
        client
            .region_write(BAR0, WINDOW, &0u32.to_le_bytes(), false)
            .expect("window");
    }
    // Warm up both paths.
    let mut warm = Samples::default();
    a = measure(&mut b, a, Flood::Alone, samples, &mut warm);
    let mut all: Vec<Samples> = Flood::ALL.iter().map(|_| Samples::default()).collect();
    for _ in 0..rounds {
        for (i, kind) in Flood::ALL.into_iter().enumerate() {
            a = measure(&mut b, a, kind, samples, &mut all[i]);
        }
    }
    let alone = &all[0];
    println!(
        "B's trapped 4-byte reads, {rounds} rounds x {samples} per condition (interleaved), emulated tu102-24g, two 64 MiB guests, µs"
    );
    println!();
    println!("| condition | BOOT_0 p50 | BOOT_0 p99 | aperture p50 | aperture p99 | aperture p99 / alone | aperture p99 / VRAM-BAR flood | A's 1 MiB access p50 | A's MB/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (kind, s) in Flood::ALL.iter().zip(&all) {
        let ap99 = percentile(&s.aperture, 0.99);
        let ratio_alone = ap99 / percentile(&alone.aperture, 0.99).max(1e-9);
        let ratio_bar = ap99 / percentile(&all[2].aperture, 0.99).max(1e-9);
        let (access, rate) = if s.flood.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            (
                format!("{:.0}", percentile(&s.flood, 0.5)),
                format!(
                    "{:.0}",
                    s.flood_bytes as f64 / s.flood_time.as_secs_f64() / 1e6
                ),
            )
        };
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.2}x | {access} | {rate} |",
            kind.name(),
            percentile(&s.register, 0.5),
            percentile(&s.register, 0.99),
            percentile(&s.aperture, 0.5),
            ap99,
            ratio_alone,
            ratio_bar,
        );
    }
    let reg_ratio =
        percentile(&all[1].register, 0.99) / percentile(&alone.register, 0.99).max(1e-9);
    println!();
    println!(
        "BOOT_0 p99 with A flooding its aperture / alone: {reg_ratio:.2}x; aperture p50 ratio: {:.2}x",
        percentile(&all[1].aperture, 0.5) / percentile(&alone.aperture, 0.5).max(1e-9)
    );
    drop((a, b));
    drop(guests);
}
