//! Page-table build benchmark: a 24 GiB identity mapping on the emulated ga100-80g, written
//! entry by entry through the PRAMIN window, against a plain memory write of the same number
//! of bytes measured in the same run.
//!
//! Run: `cargo bench -p gpu-backend --bench page_tables`

use std::hint::black_box;
use std::time::Instant;

use gpu_backend::host_driver::addr::PageSize;
use gpu_backend::host_driver::bench::measure_24g_on_emulated;

const ROUNDS: usize = 5;

/// Best-of-`ROUNDS` time to write `bytes` bytes of 8-byte entries into ordinary memory.
fn plain_write_seconds(bytes: u64) -> f64 {
    let entries = (bytes / 8) as usize;
    let mut buf = vec![0u64; entries];
    let mut best = f64::MAX;
    for round in 0..ROUNDS {
        let start = Instant::now();
        for (i, slot) in buf.iter_mut().enumerate() {
            *slot = black_box(((i as u64) << 8) | 1 | round as u64);
        }
        black_box(&buf);
        best = best.min(start.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!("24 GiB identity mapping on the emulated ga100-80g, best of {ROUNDS}");
    println!();
    println!("| largest page | entries written | window moves | per 1000 entries | entries/s | plain memory write entries/s | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for size in [PageSize::Size2M, PageSize::Size64K, PageSize::Size4K] {
        let m = (0..ROUNDS)
            .map(|_| measure_24g_on_emulated(size).expect("page-table build"))
            .min_by_key(|m| m.elapsed)
            .expect("at least one round");
        let entries = m.entries_written();
        let plain = entries as f64 / plain_write_seconds(entries * 8);
        println!(
            "| {size:?} | {entries} | {} | {:.3} | {:.2e} | {:.2e} | {:.3} |",
            m.window_moves(),
            m.window_moves_per_1000_entries(),
            m.entries_per_second(),
            plain,
            m.entries_per_second() / plain
        );
    }
}
