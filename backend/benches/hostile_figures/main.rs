//! Figures for `docs/performance.md` ("A hostile neighbour"), against the real
//! `gpu-backend serve` binary (release build) over real sockets, with the project's test
//! client in this process:
//!
//! 1. `latency`: a well-behaved guest B's trapped 4-byte reads (a BAR0 register and the PRAMIN
//!    aperture) while guest A floods its own aperture with 1 MiB accesses, against B alone and
//!    against A flooding its VRAM BAR with the same accesses (same bytes and CPU, no PRAMIN),
//!    all in one run, conditions interleaved round by round.
//! 2. `budgets`: a guest maps DMA until the server refuses (4 KiB maps with one fd each, without
//!    fds, and 1 TiB maps of a sparse memfd then halving sizes; with the GPU whole to the
//!    guest, and sliced for two guests; then 17 guests together against the process-wide
//!    budget), reporting where it was refused and the server's fds, mapped and resident bytes
//!    and mappings at that point (`/proc/<pid>`), and whether the other guest could still map
//!    DMA, wire an interrupt eventfd and reconnect.
//!
//! 3. `concurrency`, `lifecycle`, `idle` (guests at run time): a guest's trapped register
//!    read latency with 1, 2 and 4 guests reading at once; adding and removing a guest
//!    through the control socket against a memset of its VRAM size; resident memory with 1,
//!    16 and 64 idle guests.
//!
//! Run: `cargo bench -p gpu-backend --bench hostile_figures [-- latency|budgets|concurrency|lifecycle|idle]
//! [--rounds N] [--samples N]`

#[allow(dead_code)]
#[path = "../../tests/support/mod.rs"]
mod support;

mod budgets;
mod guests;
mod latency;
mod runtime;

use std::path::Path;

fn arg_value(args: &[String], name: &str) -> Option<usize> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1)?.parse().ok()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` support
    }
    let binary = Path::new(env!("CARGO_BIN_EXE_gpu-backend"));
    let only = |name: &str| {
        let picked: Vec<&String> = args
            .iter()
            .filter(|a| {
                ["latency", "budgets", "concurrency", "lifecycle", "idle"].contains(&a.as_str())
            })
            .collect();
        picked.is_empty() || picked.iter().any(|a| *a == name)
    };
    if only("latency") {
        let rounds = arg_value(&args, "--rounds").unwrap_or(5);
        let samples = arg_value(&args, "--samples").unwrap_or(2000);
        latency::run(binary, rounds, samples);
    }
    if only("budgets") {
        budgets::run(binary);
    }
    if only("concurrency") {
        let rounds = arg_value(&args, "--rounds").unwrap_or(5);
        let samples = arg_value(&args, "--samples").unwrap_or(2000);
        runtime::concurrency(binary, rounds, samples);
    }
    if only("lifecycle") {
        runtime::lifecycle(binary, arg_value(&args, "--rounds").unwrap_or(3));
    }
    if only("idle") {
        runtime::idle(binary);
    }
}
