//! Figures of guests at run time (`docs/performance.md`, "Guests at run time"):
//! 1. trapped BOOT_0 read latency of guest 0 with 1, 2 and 4 guests reading at once (each
//!    guest a client thread here reading back to back), interleaved round by round;
//! 2. time to add and to remove a guest through the control socket as a function of its
//!    VRAM size (the add scrubs the range), against a memset of the same size in this
//!    process;
//! 3. resident memory of the backend with 1, 16 and 64 idle guests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use gpu_backend::control::ControlClient;
use serde_json::json;

use crate::guests::{Served, BAR0, MIB};
use crate::support::proc_stats::{human, proc_stats};
use crate::support::serve_process::{ServeProcess, TempDir};

fn percentile(samples: &[u64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// Guest 0's `samples` BOOT_0 reads while guests 1..n read back to back.
fn concurrent_round(sockets: &[PathBuf], n: usize, samples: usize) -> Vec<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(n));
    let others: Vec<_> = sockets[1..n]
        .iter()
        .map(|socket| {
            let (socket, stop, start) = (socket.clone(), Arc::clone(&stop), Arc::clone(&start));
            std::thread::spawn(move || {
                let mut c = Served::client(&socket);
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    c.region_read(BAR0, 0, 4).expect("a neighbour's read");
                }
            })
        })
        .collect();
    let mut c = Served::client(&sockets[0]);
    start.wait();
    std::thread::sleep(Duration::from_millis(5));
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        c.region_read(BAR0, 0, 4).expect("guest 0's read");
        times.push(t.elapsed().as_nanos() as u64);
    }
    stop.store(true, Ordering::Relaxed);
    for o in others {
        o.join().expect("neighbour thread");
    }
    times
}

/// Figure 1.
pub fn concurrency(binary: &Path, rounds: usize, samples: usize) {
    let guests = Served::sliced(binary, 4, "64M");
    const COUNTS: [usize; 3] = [1, 2, 4];
    let mut all: Vec<Vec<u64>> = vec![Vec::new(); COUNTS.len()];
    concurrent_round(&guests.sockets, 1, samples); // warm-up
    for _ in 0..rounds {
        for (i, &n) in COUNTS.iter().enumerate() {
            all[i].extend(concurrent_round(&guests.sockets, n, samples));
        }
    }
    println!(
        "Guest 0's trapped BOOT_0 reads with N guests reading back to back, {rounds} rounds x {samples} (interleaved), emulated tu102-24g, four 64 MiB guests, {} CPUs, µs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| guests reading | p50 | p99 | p50 / 1 guest | p99 / 1 guest |");
    println!("|---:|---:|---:|---:|---:|");
    let (b50, b99) = (percentile(&all[0], 0.5), percentile(&all[0], 0.99));
    for (n, s) in COUNTS.iter().zip(&all) {
        let (p50, p99) = (percentile(s, 0.5), percentile(s, 0.99));
        println!(
            "| {n} | {p50:.1} | {p99:.1} | {:.2}x | {:.2}x |",
            p50 / b50.max(1e-9),
            p99 / b99.max(1e-9)
        );
    }
    println!();
}

/// A memset of `size` bytes of resident memory (allocated and touched before the clock
/// starts): what zeroing that much dirty VRAM by CPU writes costs at best.
fn memset(size: u64) -> Duration {
    let mut v = vec![0x11u8; size as usize];
    std::hint::black_box(&mut v);
    let t = Instant::now();
    v.fill(0);
    std::hint::black_box(&v);
    t.elapsed()
}

/// Figure 2.
pub fn lifecycle(binary: &Path, rounds: usize) {
    let dir = TempDir::new("figures-lifecycle");
    let control = dir.join("ctl.sock");
    let args: Vec<String> = vec![
        "--profile".into(),
        "tu102-24g".into(),
        "--control".into(),
        control.display().to_string(),
    ];
    let server = ServeProcess::start(binary, &args, vec![control.clone()], dir.join("serve.log"));
    let mut client = ControlClient::connect(&control).expect("control socket");
    let socket = dir.join("g.sock");
    println!(
        "Adding and removing a guest through the control socket (emulated tu102-24g, {rounds} rounds, median ms); baseline: memset of the same bytes in one process"
    );
    println!();
    println!("| VRAM | add | remove | memset | add / memset | remove / memset |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for size in [64 * MIB, 256 * MIB, 1024 * MIB, 4096 * MIB] {
        let (mut adds, mut removes, mut sets) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            client
                .execute("add", Some(json!({"socket": socket, "vram": size})))
                .expect("add");
            adds.push(t.elapsed().as_nanos() as u64);
            // Dirty a page every 16 MiB, as a used slice would be, before it is scrubbed.
            {
                let mut c = Served::client(&socket);
                let mut at = 0;
                while at < size {
                    c.region_write(1, at, &[0xA5; 4096], false).expect("dirty");
                    at += 16 * MIB;
                }
            }
            let t = Instant::now();
            client
                .execute("remove", Some(json!({"socket": socket, "force": true})))
                .expect("remove");
            removes.push(t.elapsed().as_nanos() as u64);
            sets.push(memset(size).as_nanos() as u64);
        }
        let ms = |v: &[u64]| percentile(v, 0.5) / 1000.0;
        let (a, r, m) = (ms(&adds), ms(&removes), ms(&sets));
        println!(
            "| {} | {a:.2} | {r:.2} | {m:.2} | {:.3}x | {:.3}x |",
            human(size),
            a / m.max(1e-9),
            r / m.max(1e-9)
        );
    }
    println!();
    drop(server);
}

/// Figure 3.
pub fn idle(binary: &Path) {
    println!("Resident memory of `serve` with N idle guests (64 MiB slices of an emulated gh100-80g, nobody connected)");
    println!();
    println!("| guests | VmRSS | per guest over 1 guest |");
    println!("|---:|---:|---:|");
    let mut one = 0u64;
    for n in [1usize, 16, 64] {
        let guests = Served::sliced_profile(binary, "gh100-80g", n, "64M");
        std::thread::sleep(Duration::from_millis(300));
        let rss = proc_stats(guests.server.pid()).expect("proc stats").vm_rss;
        if n == 1 {
            one = rss;
        }
        let per = if n > 1 {
            human(rss.saturating_sub(one) / (n as u64 - 1))
        } else {
            "-".into()
        };
        println!("| {n} | {} | {per} |", human(rss));
        drop(guests);
    }
    println!();
}
