//! The page-table walker: translates one virtual address by reading the page tables in
//! VRAM the way the GPU MMU does.
//!
//! # Walk
//! - v2 (49-bit VA): PD3 (VA 48:47) → PD2 (46:38) → PD1 (37:29) → PD0 (28:21, dual) →
//!   big-page PT (20:16, 64 KiB pages) or small-page PT (20:12, 4 KiB pages).
//! - v3 (57-bit VA): PD4 (VA 56) → PD3 (55:47) → PD2 → PD1 → PD0 → PT, as v2 below PD3.
//! - A PTE may sit in PD1 (512 MiB page) or in the low qword of a PD0 entry (2 MiB page).
//!   A PTE in any higher level is a fault ([`WalkFault::PteNotAllowed`]).
//! - Every table must be in video memory; tables are read with bounds-checked accesses
//!   and a fixed number of levels is visited, so garbage tables yield a fault or a
//!   translation, never a panic or a loop.
//!
//! # Big and small page tables (PD0 dual entry)
//! The big-page table is consulted first when present, as the hardware does (gpu-facts
//! 4.3: an invalid big PTE with PRIVILEGE means "ignore the small PTEs"):
//! 1. big PTE valid → 64 KiB page;
//! 2. big PTE invalid and sparse → [`WalkFault::Sparse`];
//! 3. big PTE invalid and marked "no small pages" (v2 PRIVILEGE, v3 PCF
//!    NO_VALID_4KB_PAGE / MAPPING_NOWHERE) → [`WalkFault::InvalidPte`] at the big table;
//! 4. otherwise the small-page table, if present, decides; without one the access faults
//!    at the big table.
//!
//! A big or small table pointer outside video memory faults as soon as it is needed.

use thiserror::Error;

use super::entry::{DualPde, Level, PageSize, Pde, PdeAperture, Pte, Translation};
use super::{v2, v3};
use crate::chip::MmuVersion;
use crate::vram::{Vram, VramAddr};

/// Why a walk failed, and at which level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum WalkFault {
    /// The VA has bits set above the format's VA width (49 bits v2, 57 bits v3).
    #[error("VA {va:#x} is outside the {bits}-bit virtual address space")]
    VaOutOfRange {
        /// The VA.
        va: u64,
        /// VA width of the format.
        bits: u32,
    },
    /// The entry to read lies (partly) outside VRAM.
    #[error("{level} entry at {entry:#x} (table {table:#x}) is outside VRAM")]
    TableOutsideVram {
        /// The level whose table was being read.
        level: Level,
        /// Table base address.
        table: u64,
        /// Address of the entry (saturated on overflow).
        entry: u64,
    },
    /// A directory entry is not present (aperture 0, not sparse). For PD0 both halves of
    /// the dual entry are absent; `raw` is the whole 128-bit entry.
    #[error("{level} entry {raw:#x} is not present")]
    InvalidPde {
        /// The level of the entry.
        level: Level,
        /// The raw entry (zero-extended for 8-byte entries).
        raw: u128,
    },
    /// A directory entry points at a table outside video memory (the emulator has no
    /// system memory behind the MMU).
    #[error("{level} entry points at a table in {aperture:?}, not video memory")]
    TableNotInVideoMemory {
        /// The level of the entry.
        level: Level,
        /// The table's aperture.
        aperture: PdeAperture,
    },
    /// A directory entry holds a PTE at a level that cannot map pages (PD4..PD2).
    #[error("{level} entry {raw:#x} holds a PTE, which this level cannot")]
    PteNotAllowed {
        /// The level of the entry.
        level: Level,
        /// The raw entry.
        raw: u64,
    },
    /// The PTE mapping the VA is invalid.
    #[error("{level} PTE {raw:#018x} is not valid")]
    InvalidPte {
        /// The level of the PTE (a page table, or PD0/PD1 for large pages).
        level: Level,
        /// The raw PTE.
        raw: u64,
    },
    /// The VA lies in a range marked sparse: on hardware reads return 0 and writes are
    /// dropped without a fault.
    #[error("VA lies in a sparse range (marked at {level})")]
    Sparse {
        /// The level of the sparse entry.
        level: Level,
    },
}

/// Number of VA bits of `format`: 49 (v2) or 57 (v3).
pub const fn va_bits(format: MmuVersion) -> u32 {
    match format {
        MmuVersion::V2 => 49,
        MmuVersion::V3 => 57,
    }
}

/// The directory levels above PD0, root first.
const fn directory_levels(format: MmuVersion) -> &'static [Level] {
    match format {
        MmuVersion::V2 => &[Level::Pd3, Level::Pd2, Level::Pd1],
        MmuVersion::V3 => &[Level::Pd4, Level::Pd3, Level::Pd2, Level::Pd1],
    }
}

fn decode_pde(format: MmuVersion, raw: u64) -> Pde {
    match format {
        MmuVersion::V2 => v2::decode_pde(raw),
        MmuVersion::V3 => v3::decode_pde(raw),
    }
}

fn decode_pte(format: MmuVersion, raw: u64) -> Pte {
    match format {
        MmuVersion::V2 => v2::decode_pte(raw),
        MmuVersion::V3 => v3::decode_pte(raw),
    }
}

fn decode_dual(format: MmuVersion, lo: u64, hi: u64) -> DualPde {
    match format {
        MmuVersion::V2 => v2::decode_dual(lo, hi),
        MmuVersion::V3 => v3::decode_dual(lo, hi),
    }
}

/// Reads the qword at `table + index(va) * entry_size + offset` of `level`'s table.
fn read_entry(
    vram: &Vram,
    level: Level,
    table: u64,
    offset: u64,
    format: MmuVersion,
    va: u64,
) -> Result<u64, WalkFault> {
    let entry = level
        .index(va, format)
        .checked_mul(level.entry_size())
        .and_then(|o| o.checked_add(offset))
        .and_then(|o| table.checked_add(o));
    let fault = WalkFault::TableOutsideVram {
        level,
        table,
        entry: entry.unwrap_or(u64::MAX),
    };
    let entry = entry.ok_or(fault)?;
    vram.read_u64(VramAddr::new(entry)).map_err(|_| fault)
}

/// The translation by a PTE found at `level`, which maps pages of `size`.
fn leaf(
    format: MmuVersion,
    raw: u64,
    level: Level,
    size: PageSize,
    va: u64,
) -> Result<Translation, WalkFault> {
    match decode_pte(format, raw) {
        Pte::Valid(p) => Ok(p.translate(va, size, level, raw)),
        Pte::Invalid { sparse: true, .. } => Err(WalkFault::Sparse { level }),
        Pte::Invalid { .. } => Err(WalkFault::InvalidPte { level, raw }),
    }
}

/// Translates `va` through the page tables rooted at `pdb` (the root directory: PD3 for
/// v2, PD4 for v3) in `vram`. See the module documentation for the rules.
pub fn translate(
    vram: &Vram,
    pdb: VramAddr,
    format: MmuVersion,
    va: u64,
) -> Result<Translation, WalkFault> {
    let bits = va_bits(format);
    if va >> bits != 0 {
        return Err(WalkFault::VaOutOfRange { va, bits });
    }
    let mut table = pdb.raw();
    for &level in directory_levels(format) {
        let raw = read_entry(vram, level, table, 0, format, va)?;
        match decode_pde(format, raw) {
            Pde::Table {
                aperture: PdeAperture::VideoMemory,
                addr,
            } => table = addr,
            Pde::Table { aperture, .. } => {
                return Err(WalkFault::TableNotInVideoMemory { level, aperture })
            }
            Pde::Invalid { sparse: true } => return Err(WalkFault::Sparse { level }),
            Pde::Invalid { sparse: false } => {
                return Err(WalkFault::InvalidPde {
                    level,
                    raw: u128::from(raw),
                })
            }
            Pde::Pte if level == Level::Pd1 => {
                return leaf(format, raw, level, PageSize::Huge512M, va)
            }
            Pde::Pte => return Err(WalkFault::PteNotAllowed { level, raw }),
        }
    }
    walk_pd0(vram, table, format, va)
}

/// The PD0 step and the page tables below it.
fn walk_pd0(vram: &Vram, pd0: u64, format: MmuVersion, va: u64) -> Result<Translation, WalkFault> {
    let level = Level::Pd0;
    let lo = read_entry(vram, level, pd0, 0, format, va)?;
    let hi = read_entry(vram, level, pd0, 8, format, va)?;
    let (big, small, sparse) = match decode_dual(format, lo, hi) {
        DualPde::Pte => return leaf(format, lo, level, PageSize::Huge2M, va),
        DualPde::Tables { big, small, sparse } => (big, small, sparse),
    };

    let mut big_fault = None;
    if big.aperture != PdeAperture::Invalid {
        if big.aperture != PdeAperture::VideoMemory {
            return Err(WalkFault::TableNotInVideoMemory {
                level,
                aperture: big.aperture,
            });
        }
        let pt = Level::BigPageTable;
        let raw = read_entry(vram, pt, big.addr, 0, format, va)?;
        match decode_pte(format, raw) {
            Pte::Valid(p) => return Ok(p.translate(va, PageSize::Big64K, pt, raw)),
            Pte::Invalid { sparse: true, .. } => return Err(WalkFault::Sparse { level: pt }),
            Pte::Invalid { no_small: true, .. } => {
                return Err(WalkFault::InvalidPte { level: pt, raw })
            }
            Pte::Invalid { .. } => big_fault = Some(WalkFault::InvalidPte { level: pt, raw }),
        }
    }

    match small.aperture {
        PdeAperture::VideoMemory => {
            let pt = Level::SmallPageTable;
            let raw = read_entry(vram, pt, small.addr, 0, format, va)?;
            leaf(format, raw, pt, PageSize::Small4K, va)
        }
        PdeAperture::Invalid => Err(big_fault.unwrap_or(if sparse {
            WalkFault::Sparse { level }
        } else {
            WalkFault::InvalidPde {
                level,
                raw: u128::from(hi) << 64 | u128::from(lo),
            }
        })),
        aperture => Err(WalkFault::TableNotInVideoMemory { level, aperture }),
    }
}
