//! The churn soak: random hostile guest operations spread over every slice of a sliced
//! emulated GPU, with guests removed and added again in between, in process.
//!
//! Each profile's GPU is sliced for up to four guests of 2-8 MiB, with free VRAM between
//! and after them (`world.rs`). Each guest is what QEMU would hold: its presented function
//! served over an in-process vfio-user connection, a mapping of its VRAM BAR's memfd and a
//! sealed memfd of DMA memory (`guest.rs`). The operations are the guest's (drawn in
//! `ops.rs`, run and checked in `run.rs`): window register values inside, at the edge of and
//! past its slice or garbage; PRAMIN aperture reads and writes of widths 1/2/4/8, odd
//! lengths and up to 64 KiB at every offset, straddling the end of the slice and of the
//! aperture; trapped VRAM BAR accesses into and past the padding; accesses through the
//! mapping; BAR0 anywhere; WRITE_MULTI; DMA map/unmap of its memfd (a sliced guest's device
//! does no DMA of its own: the maps are only recorded, and the memfd must come out
//! unchanged); D3hot and back; config space writes; resets; reconnects. In between, guests
//! are removed (their QEMU keeps function, connection and mapping, and keeps using them) and
//! added again, often around a blocker so they land on another range, and removed slices are
//! presented again (refused).
//!
//! Every byte a guest reads is checked against its model (`model.rs`): its own data where
//! it owns VRAM, ~0 elsewhere, and never another guest's marker or a canary. The host side
//! (`host.rs`) checks, every [`DEFAULT_CHECK_EVERY`] operations and at the end, every byte
//! of the 80 MiB where the slices live (each slice against its model, the rest canaries),
//! samples of the rest of the guest area, the host-reserved region outside the BAR1 tables,
//! the BAR1 translations of live and removed windows, and the host registers.
//!
//! The run is deterministic for a seed. The full count, in release:
//!
//! ```sh
//! GPU_BACKEND_SOAK_OPS=1000000 cargo test --release -p gpu-backend --test soak churn -- --nocapture
//! ```
//!
//! `GPU_BACKEND_SOAK_SEED` picks the seed, `GPU_BACKEND_SOAK_PROFILES` the profiles
//! (comma-separated; the operations are split between them), and a failure prints the
//! profile, seed and operation index, and the last operations: replay it with the same
//! seed and count, and `GPU_BACKEND_SOAK_CHECK_EVERY=1` to find the operation that broke
//! something the host sees.

mod dma;
mod guest;
mod host;
mod model;
mod ops;
mod run;
mod world;

use std::collections::VecDeque;
use std::time::Instant;

use crate::env_u64;
use crate::support::rng::{splitmix64, Rng};
use world::{Op, World};

/// Operations without `GPU_BACKEND_SOAK_OPS` (about 5 s in a debug build here).
const DEFAULT_OPS: u64 = 20_000;
/// Seed without `GPU_BACKEND_SOAK_SEED`.
const DEFAULT_SEED: u64 = 0xC4_0211;
/// Profiles without `GPU_BACKEND_SOAK_PROFILES`: every generation (Turing and Ampere: window
/// with TARGET, MMU v2; Hopper, Grace Hopper with its carve-out, Blackwell: 22- and 23-bit
/// window, MMU v3).
const DEFAULT_PROFILES: &str = "tu102-24g,ga100-80g,gh100-80g,gh200-96g,gb202-32g";
/// Operations between two full host checks.
const DEFAULT_CHECK_EVERY: u64 = 2048;
/// Operations shown when one fails.
const HISTORY: usize = 24;

struct Config {
    ops: u64,
    seed: u64,
    profiles: Vec<String>,
    check_every: u64,
}

impl Config {
    fn from_env() -> Config {
        let profiles = std::env::var("GPU_BACKEND_SOAK_PROFILES")
            .ok()
            .filter(|p| !p.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_PROFILES.into());
        Config {
            ops: env_u64("GPU_BACKEND_SOAK_OPS").unwrap_or(DEFAULT_OPS),
            seed: env_u64("GPU_BACKEND_SOAK_SEED").unwrap_or(DEFAULT_SEED),
            profiles: profiles.split(',').map(|p| p.trim().to_string()).collect(),
            check_every: env_u64("GPU_BACKEND_SOAK_CHECK_EVERY")
                .unwrap_or(DEFAULT_CHECK_EVERY)
                .max(1),
        }
    }
}

/// The seed of `profile`'s run: the same whichever other profiles run.
fn profile_seed(seed: u64, profile: &str) -> u64 {
    profile
        .bytes()
        .fold(splitmix64(seed), |h, b| splitmix64(h ^ u64::from(b)))
}

/// Runs `ops` operations on `profile`; on failure, the report.
fn soak(profile: &str, seed: u64, ops: u64, check_every: u64) -> Result<(), String> {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut world = World::new(profile, seed, &mut rng).map_err(|e| format!("setting up: {e}"))?;
    let mut history: VecDeque<(u64, Op)> = VecDeque::with_capacity(HISTORY);
    let fail = |i: u64, e: String, history: &VecDeque<(u64, Op)>| {
        let last: Vec<String> = history
            .iter()
            .map(|(n, op)| format!("  #{n}: {op:?}"))
            .collect();
        format!(
            "{profile}, seed {seed:#x}: operation #{i} of {ops}: {e}\nlast operations:\n{}",
            last.join("\n")
        )
    };
    for i in 0..ops {
        let op = world.draw(&mut rng);
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back((i, op.clone()));
        let result = world.apply(&history.back().expect("just pushed").1);
        let result = result.and_then(|()| {
            if (i + 1) % check_every == 0 {
                world.check_all()
            } else {
                Ok(())
            }
        });
        if let Err(e) = result {
            return Err(fail(i, e, &history));
        }
    }
    let live = world.live_count();
    let tally = world
        .finish()
        .map_err(|e| fail(ops, format!("at the end: {e}"), &history))?;
    let elapsed = started.elapsed();
    let mut kinds = tally.kinds.clone();
    kinds.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    eprintln!(
        "churn {profile}: {ops} ops in {elapsed:.2?} ({:.1} µs/op), seed {seed:#x}\n  \
         guests added {} (around a blocker {}), removed {}, {} distinct slice starts, {} live at the end; \
         {} ops on removed guests, {} removed slices presented again (refused)\n  \
         {} full host checks, {} MiB of host VRAM compared\n  {}",
        elapsed.as_secs_f64() * 1e6 / ops.max(1) as f64,
        tally.added,
        tally.blocked,
        tally.removed,
        tally.starts.len(),
        live,
        tally.stale_ops,
        tally.represented,
        tally.checks,
        tally.bytes_checked >> 20,
        kinds.join(", ")
    );
    Ok(())
}

#[test]
fn hostile_guest_operations_with_guests_removed_and_added_never_cross_a_slice() {
    let config = Config::from_env();
    let per_profile = config.ops.div_ceil(config.profiles.len() as u64);
    eprintln!(
        "churn soak: {} ops over {:?} ({per_profile} each), seed {:#x}, full host check every {} ops",
        config.ops, config.profiles, config.seed, config.check_every
    );
    let failures: Vec<String> = config
        .profiles
        .iter()
        .filter_map(|profile| {
            let seed = profile_seed(config.seed, profile);
            soak(profile, seed, per_profile, config.check_every).err()
        })
        .collect();
    assert!(
        failures.is_empty(),
        "churn soak failed (GPU_BACKEND_SOAK_SEED={:#x} GPU_BACKEND_SOAK_OPS={} replays it):\n{}",
        config.seed,
        config.ops,
        failures.join("\n\n")
    );
}
