//! One sliced emulated GPU with its guests: up to [`SEATS`] live ones (added with free VRAM
//! left between them), the removed ones still held by their QEMU (up to [`STALE`]), and
//! the host's view. Adding, removing and presenting again happen here; every other
//! operation is a guest's own (`ops.rs`).

use std::collections::VecDeque;
use std::sync::Arc;

use gpu_backend::host_gpu::emulated::EmulatedHostGpu;
use gpu_backend::host_gpu::HostGpu;
use gpu_backend::presentation::PresentedFunction;
use gpu_backend::slice::SlicedGpu;

use super::guest::Guest;
use super::host::{HostView, Owned};
use super::model::{FREE_CANARY, MARKERS};
use super::ops::{self, Access, KINDS};
use super::run;
use crate::support::rng::Rng;

/// Guests live at once, at most.
pub const SEATS: usize = 4;
/// Removed guests whose function, connection and mapping are kept (and used).
pub const STALE: usize = 3;
/// Slice sizes drawn for a guest (6 MiB has a padded VRAM BAR). With at most five slices
/// handed out at once (four guests and a blocker) and first fit, none ends past 64 MiB.
const SIZES_MIB: [u64; 4] = [2, 4, 6, 8];
const MIB: u64 = 1 << 20;

/// Who an operation is for.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// The live guest in this seat.
    Seat(usize),
    /// The removed guest at this position of the stale list.
    Stale(usize),
}

/// One operation of the soak.
#[derive(Debug, Clone)]
pub enum Op {
    /// A guest's own operation.
    Guest {
        /// Which guest.
        target: Target,
        /// What kind (see [`KINDS`]).
        kind: &'static str,
        /// The operation.
        access: Access,
    },
    /// Remove the guest in `seat`: its QEMU keeps everything it had.
    Remove {
        /// The seat.
        seat: usize,
    },
    /// Add a guest of `size` bytes to the empty `seat`; with a blocker, another slice of
    /// that size is handed out first and taken back after, so the guest lands elsewhere.
    Add {
        /// The seat.
        seat: usize,
        /// Slice size.
        size: u64,
        /// Blocker size.
        blocker: Option<u64>,
    },
    /// Present a removed guest's slice again, and remove it again: both must be refused.
    Represent {
        /// Position in the stale list.
        stale: usize,
    },
}

/// Counts for the report.
#[derive(Debug, Default)]
pub struct Tally {
    /// Operations by kind.
    pub kinds: Vec<(&'static str, u64)>,
    /// Operations on removed guests.
    pub stale_ops: u64,
    /// Guests added (initial ones included), removed, with a blocker.
    pub added: u64,
    /// Guests removed.
    pub removed: u64,
    /// Adds that went around a blocker.
    pub blocked: u64,
    /// Removed slices presented again (refused).
    pub represented: u64,
    /// Distinct slice starts guests got.
    pub starts: std::collections::BTreeSet<u64>,
    /// Full host checks.
    pub checks: u64,
    /// Bytes of host VRAM the host compared.
    pub bytes_checked: u64,
}

impl Tally {
    fn count(&mut self, kind: &'static str) {
        match self.kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => self.kinds.push((kind, 1)),
        }
    }
}

/// The GPU, its guests and the host's view.
pub struct World {
    sliced: SlicedGpu,
    /// The host's view.
    pub host: HostView,
    seats: Vec<Option<Guest>>,
    stale: VecDeque<Guest>,
    next_number: u64,
    seed: u64,
    /// Counts.
    pub tally: Tally,
}

impl World {
    /// Slices a fresh emulated `profile`, plants the canaries and adds [`SEATS`] guests,
    /// with free VRAM between some of them.
    pub fn new(profile: &str, seed: u64, rng: &mut Rng) -> Result<World, String> {
        let gpu = Arc::new(EmulatedHostGpu::by_name(profile).map_err(|e| e.to_string())?);
        let host_gpu: Arc<dyn HostGpu> = gpu.clone();
        let sliced = SlicedGpu::new(host_gpu).map_err(|e| format!("slicing {profile}: {e}"))?;
        let host = HostView::new(gpu, &sliced)?;
        let mut world = World {
            sliced,
            host,
            seats: (0..SEATS).map(|_| None).collect(),
            stale: VecDeque::new(),
            next_number: 0,
            seed,
            tally: Tally::default(),
        };
        // Gaps: a blocker before some guests leaves free VRAM below them once removed.
        for seat in 0..SEATS {
            let blocker = rng.chance(2, 3).then(|| *rng.pick(&SIZES_MIB) * MIB);
            world.add(seat, *rng.pick(&SIZES_MIB) * MIB, blocker)?;
        }
        world.check_all()?;
        Ok(world)
    }

    fn live(&self) -> impl Iterator<Item = &Guest> {
        self.seats.iter().flatten()
    }

    /// Draws the next operation.
    pub fn draw(&self, rng: &mut Rng) -> Op {
        let live: Vec<usize> = (0..SEATS).filter(|&s| self.seats[s].is_some()).collect();
        let empty: Vec<usize> = (0..SEATS).filter(|&s| self.seats[s].is_none()).collect();
        let weights = [
            1000,
            if live.len() >= 2 { 4 } else { 0 },
            if empty.is_empty() { 0 } else { 6 },
            if self.stale.is_empty() { 0 } else { 2 },
        ];
        match rng.weighted(&weights) {
            1 => Op::Remove {
                seat: *rng.pick(&live),
            },
            2 => Op::Add {
                seat: *rng.pick(&empty),
                size: *rng.pick(&SIZES_MIB) * MIB,
                blocker: rng.chance(1, 3).then(|| *rng.pick(&SIZES_MIB) * MIB),
            },
            3 => Op::Represent {
                stale: rng.below(self.stale.len() as u64) as usize,
            },
            _ => {
                let target = if !self.stale.is_empty() && rng.chance(1, 8) {
                    Target::Stale(rng.below(self.stale.len() as u64) as usize)
                } else {
                    Target::Seat(*rng.pick(&live))
                };
                let weights: Vec<u32> = KINDS.iter().map(|&(_, w)| w).collect();
                let kind = KINDS[rng.weighted(&weights)].0;
                let guest = self.guest(target).expect("drawn for a guest that exists");
                Op::Guest {
                    target,
                    kind,
                    access: ops::draw(rng, kind, guest),
                }
            }
        }
    }

    fn guest(&self, target: Target) -> Option<&Guest> {
        match target {
            Target::Seat(s) => self.seats[s].as_ref(),
            Target::Stale(i) => self.stale.get(i),
        }
    }

    fn guest_mut(&mut self, target: Target) -> Option<&mut Guest> {
        match target {
            Target::Seat(s) => self.seats[s].as_mut(),
            Target::Stale(i) => self.stale.get_mut(i),
        }
    }

    /// Waits for every guest's posted messages to be handled.
    fn sync_all(&mut self) -> Result<(), String> {
        for g in self.seats.iter_mut().flatten().chain(self.stale.iter_mut()) {
            g.sync()?;
        }
        Ok(())
    }

    /// Runs `op`.
    pub fn apply(&mut self, op: &Op) -> Result<(), String> {
        if !matches!(op, Op::Guest { .. }) {
            self.sync_all()?;
        }
        match op {
            Op::Guest {
                target,
                kind,
                access,
            } => {
                self.tally.count(kind);
                if matches!(target, Target::Stale(_)) {
                    self.tally.stale_ops += 1;
                }
                let guest = self.guest_mut(*target).ok_or("no such guest")?;
                let label = format!("guest #{} ({:?})", guest.number, target);
                run::run(guest, access).map_err(|e| format!("{label}: {e}"))
            }
            Op::Remove { seat } => self.remove(*seat),
            Op::Add {
                seat,
                size,
                blocker,
            } => self.add(*seat, *size, *blocker),
            Op::Represent { stale } => self.represent(*stale),
        }
    }

    /// A marker no live or stale guest uses.
    fn free_marker(&self) -> Result<u8, String> {
        MARKERS
            .clone()
            .find(|m| self.live().chain(self.stale.iter()).all(|g| g.marker != *m))
            .ok_or_else(|| "no marker left".to_string())
    }

    fn add(&mut self, seat: usize, size: u64, blocker: Option<u64>) -> Result<(), String> {
        if self.seats[seat].is_some() {
            return Err(format!("seat {seat} is taken"));
        }
        let blocker = match blocker {
            Some(b) => {
                self.tally.blocked += 1;
                Some(
                    self.sliced
                        .add_guest(b)
                        .map_err(|e| format!("adding a blocker: {e}"))?,
                )
            }
            None => None,
        };
        let slice = self
            .sliced
            .add_guest(size)
            .map_err(|e| format!("adding a {size:#x}-byte guest: {e}"))?;
        let (start, len) = (slice.slice().start().raw(), slice.slice().size());
        self.host.expect_fill(
            start,
            len,
            0,
            &format!("a new guest's slice {}", slice.slice()),
        )?;
        if let Some(b) = blocker {
            let s = b.slice();
            self.host
                .expect_fill(s.start().raw(), s.size(), 0, "a blocker's slice")?;
            self.sliced
                .remove_guest(&b)
                .map_err(|e| format!("removing a blocker: {e}"))?;
            self.host.plant(s.start().raw(), s.size(), FREE_CANARY)?;
        }
        let number = self.next_number;
        self.next_number += 1;
        let marker = self.free_marker()?;
        let guest = Guest::new(
            number,
            marker,
            slice,
            self.seed ^ number.wrapping_mul(0x9E37),
        )?;
        self.tally.added += 1;
        self.tally.starts.insert(start);
        self.seats[seat] = Some(guest);
        self.host.rebaseline();
        Ok(())
    }

    fn remove(&mut self, seat: usize) -> Result<(), String> {
        let mut guest = self.seats[seat].take().ok_or("removing an empty seat")?;
        let slice = guest.slice.slice();
        let label = format!("guest #{} (slice {slice})", guest.number);
        self.host.expect_bytes(
            slice.start().raw(),
            &guest.model.vram,
            &format!("{label} before removal"),
        )?;
        self.sliced
            .remove_guest(&guest.slice)
            .map_err(|e| format!("removing {label}: {e}"))?;
        if !guest.slice.access().is_revoked() {
            return Err(format!("{label} removed but not revoked"));
        }
        guest.model.live = false;
        // The host takes the range back as free VRAM: canaries again.
        self.host
            .plant(slice.start().raw(), slice.size(), FREE_CANARY)?;
        self.tally.removed += 1;
        self.stale.push_back(guest);
        if self.stale.len() > STALE {
            if let Some(old) = self.stale.pop_front() {
                old.close()?;
            }
        }
        self.host.rebaseline();
        Ok(())
    }

    fn represent(&mut self, stale: usize) -> Result<(), String> {
        let guest = self.stale.get(stale).ok_or("no such removed guest")?;
        let label = format!(
            "removed guest #{} (slice {})",
            guest.number,
            guest.slice.slice()
        );
        if let Ok(f) = PresentedFunction::for_guest(guest.slice.clone()) {
            let mappable = f
                .bars()
                .iter()
                .filter_map(|b| b.mappable().map(|(area, _)| (b.index(), area)))
                .collect::<Vec<_>>();
            return Err(format!(
                "{label} was presented again (mappable BARs: {mappable:?})"
            ));
        }
        if self.sliced.remove_guest(&guest.slice).is_ok() {
            return Err(format!("{label} was removed twice"));
        }
        self.tally.represented += 1;
        Ok(())
    }

    /// Every host-side check, and every guest's DMA memory untouched.
    pub fn check_all(&mut self) -> Result<(), String> {
        self.sync_all()?;
        let owned: Vec<Owned<'_>> = self
            .seats
            .iter()
            .flatten()
            .map(|g| Owned {
                slice: g.slice.slice(),
                vram: &g.model.vram,
                window: g.slice.bar1_window().map_or(0, |w| w.raw()),
                label: format!("guest #{}", g.number),
            })
            .collect();
        let stale: Vec<u64> = self
            .stale
            .iter()
            .filter_map(|g| g.slice.bar1_window().map(|w| w.raw()))
            .collect();
        self.host.check_all(&owned, &stale)?;
        for g in self.seats.iter().flatten().chain(self.stale.iter()) {
            g.dma
                .check_memory()
                .map_err(|e| format!("guest #{}: {e}", g.number))?;
        }
        Ok(())
    }

    /// Removes every guest, hangs every connection up and checks that all VRAM no guest
    /// owns is canaries again.
    pub fn finish(mut self) -> Result<Tally, String> {
        for seat in 0..SEATS {
            if self.seats[seat].is_some() {
                self.remove(seat)?;
            }
        }
        self.check_all()?;
        if self.sliced.partition().assigned().count() != 0 {
            return Err("slices left assigned after removing every guest".into());
        }
        for g in self.stale.drain(..) {
            g.close()?;
        }
        self.tally.checks = self.host.checks;
        self.tally.bytes_checked = self.host.bytes_checked;
        Ok(self.tally)
    }

    /// Live guests now.
    pub fn live_count(&self) -> usize {
        self.live().count()
    }
}
