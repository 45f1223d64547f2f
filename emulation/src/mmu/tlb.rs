//! The TLB: a bounded, set-associative cache of translations keyed by (page-directory
//! base, format, 4 KiB virtual page).
//!
//! Like hardware, the TLB keeps serving a cached translation after the page tables change,
//! until software invalidates it through the MMU_INVALIDATE registers (gpu-facts 4.7):
//! - TRIGGER with ALL_PDB flushes every entry;
//! - otherwise the entries of the PDB named by `MMU_INVALIDATE_PDB`/`_UPPER_PDB` are
//!   flushed (a system-memory PDB names nothing the emulator caches).
//! - ALL_VA = 0 (a targeted VA invalidate) flushes all VAs of the PDB too: the VA
//!   registers are not modelled, and over-invalidating is always correct.
//! - CACHE_LEVEL, REPLAY, ACK and the other control fields do not narrow the flush.
//!
//! Entries cover 4 KiB of VA whatever the page size (a large page fills one entry per
//! 4 KiB page touched). Faults are not cached. A walk racing with an invalidate does not
//! insert its (possibly stale) result: an epoch counter detects the race.
//!
//! The cache is guarded by one mutex, taken only by translations and invalidates, never by
//! other register accesses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::entry::Translation;
use super::walker::{translate, WalkFault};
use crate::bar0::TlbInvalidateRequest;
use crate::chip::MmuVersion;
use crate::regs::invalidate_pdb_address;
use crate::vram::{Vram, VramAddr};

/// Default number of sets.
pub const DEFAULT_TLB_SETS: usize = 256;
/// Entries per set.
pub const TLB_WAYS: usize = 4;

/// Granule of a TLB entry: 4 KiB.
const PAGE_SHIFT: u32 = 12;
const PAGE_MASK: u64 = (1 << PAGE_SHIFT) - 1;

/// What an invalidate removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidateScope {
    /// Every entry (ALL_PDB).
    All,
    /// Every entry of the page directory at this VRAM address.
    Pdb(VramAddr),
    /// A page directory in system memory: nothing the emulator caches.
    SystemMemoryPdb(u64),
}

impl InvalidateScope {
    /// The scope of a triggered invalidate, from the register values at the trigger.
    pub const fn from_request(req: TlbInvalidateRequest) -> InvalidateScope {
        if req.control.all_pdb() == 1 {
            return InvalidateScope::All;
        }
        let addr = invalidate_pdb_address(req.pdb, req.upper_pdb);
        if req.pdb.aperture() == 0 {
            InvalidateScope::Pdb(VramAddr::new(addr))
        } else {
            InvalidateScope::SystemMemoryPdb(addr)
        }
    }
}

/// TLB counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TlbStats {
    /// Translations served from the cache.
    pub hits: u64,
    /// Translations that needed a walk (including faulting ones).
    pub misses: u64,
    /// Invalidates applied.
    pub invalidations: u64,
    /// Entries currently cached.
    pub entries: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    pdb: VramAddr,
    format: MmuVersion,
    vpn: u64,
    /// The translation of the 4 KiB page's first byte.
    page: Translation,
}

#[derive(Debug, Clone, Copy, Default)]
struct Set {
    ways: [Option<Entry>; TLB_WAYS],
    /// Round-robin victim when the set is full.
    next: usize,
}

impl Set {
    fn find(&self, pdb: VramAddr, format: MmuVersion, vpn: u64) -> Option<&Entry> {
        self.ways
            .iter()
            .flatten()
            .find(|e| e.pdb == pdb && e.format == format && e.vpn == vpn)
    }

    fn insert(&mut self, entry: Entry) {
        let slot = self
            .ways
            .iter()
            .position(|w| {
                w.is_some_and(|e| {
                    e.pdb == entry.pdb && e.format == entry.format && e.vpn == entry.vpn
                })
            })
            .or_else(|| self.ways.iter().position(Option::is_none))
            .unwrap_or_else(|| {
                let victim = self.next % TLB_WAYS;
                self.next = (victim + 1) % TLB_WAYS;
                victim
            });
        self.ways[slot] = Some(entry);
    }
}

#[derive(Debug)]
struct State {
    sets: Box<[Set]>,
    /// Bumped by every invalidate; a walk started in an older epoch is not cached.
    epoch: u64,
}

/// A translation cache in front of the page-table walker. Thread safe.
#[derive(Debug)]
pub struct Tlb {
    state: Mutex<State>,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
}

impl Default for Tlb {
    fn default() -> Tlb {
        Tlb::new()
    }
}

impl Tlb {
    /// An empty TLB of [`DEFAULT_TLB_SETS`] × [`TLB_WAYS`] entries.
    pub fn new() -> Tlb {
        Tlb::with_sets(DEFAULT_TLB_SETS)
    }

    /// An empty TLB of `sets` (rounded up to a power of two, at least 1) × [`TLB_WAYS`]
    /// entries.
    pub fn with_sets(sets: usize) -> Tlb {
        let sets = sets.max(1).checked_next_power_of_two().unwrap_or(1);
        Tlb {
            state: Mutex::new(State {
                sets: vec![Set::default(); sets].into_boxed_slice(),
                epoch: 0,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }

    /// Maximum number of cached translations.
    pub fn capacity(&self) -> usize {
        self.lock().sets.len() * TLB_WAYS
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked (no multi-step updates).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_index(sets: usize, pdb: VramAddr, vpn: u64) -> usize {
        let mix = (vpn ^ pdb.raw().rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // `sets` is a power of two.
        ((mix >> 32) as usize) & (sets - 1)
    }

    /// Translates `va` through the tables at `pdb`: from the cache if present (even if the
    /// tables changed since), else by a walk whose successful result is cached.
    pub fn translate(
        &self,
        vram: &Vram,
        pdb: VramAddr,
        format: MmuVersion,
        va: u64,
    ) -> Result<Translation, WalkFault> {
        let vpn = va >> PAGE_SHIFT;
        let (set, epoch) = {
            let state = self.lock();
            let set = Tlb::set_index(state.sets.len(), pdb, vpn);
            if let Some(e) = state.sets[set].find(pdb, format, vpn) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(e.page.rebased(e.page.pa, va & PAGE_MASK));
            }
            (set, state.epoch)
        };
        self.misses.fetch_add(1, Ordering::Relaxed);
        let t = translate(vram, pdb, format, va)?;
        let page = t.rebased(t.pa & !PAGE_MASK, 0);
        let mut state = self.lock();
        if state.epoch == epoch {
            state.sets[set].insert(Entry {
                pdb,
                format,
                vpn,
                page,
            });
        }
        Ok(t)
    }

    /// Removes the entries in `scope`; returns how many were removed. Counted in
    /// [`TlbStats::invalidations`].
    pub fn invalidate(&self, scope: InvalidateScope) -> usize {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        self.remove(scope)
    }

    /// Removes every entry without counting an invalidate (device reset).
    pub fn clear(&self) {
        self.remove(InvalidateScope::All);
    }

    fn remove(&self, scope: InvalidateScope) -> usize {
        let mut state = self.lock();
        state.epoch = state.epoch.wrapping_add(1);
        let mut removed = 0;
        for way in state.sets.iter_mut().flat_map(|s| s.ways.iter_mut()) {
            let hit = match (scope, &way) {
                (_, None) => false,
                (InvalidateScope::All, Some(_)) => true,
                (InvalidateScope::Pdb(pdb), Some(e)) => e.pdb == pdb,
                (InvalidateScope::SystemMemoryPdb(_), Some(_)) => false,
            };
            if hit {
                *way = None;
                removed += 1;
            }
        }
        removed
    }

    /// Counters and the current number of entries.
    pub fn stats(&self) -> TlbStats {
        let entries = self
            .lock()
            .sets
            .iter()
            .map(|s| s.ways.iter().flatten().count())
            .sum();
        TlbStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            entries,
        }
    }
}
