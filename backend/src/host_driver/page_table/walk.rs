//! A software MMU walk over tables in VRAM, read through the PRAMIN cursor and decoded
//! with this crate's own decoders. Used to check what the builder wrote; it trusts
//! nothing but VRAM contents.
//!
//! PD0 semantics: a dual entry holds either a 2 MiB PTE or pointers to a big-page and/or
//! a small-page table. When both tables exist, a valid big PTE wins and an invalid one
//! falls through to the small table. (The "invalid + PRIV = ignore small PTEs" encoding
//! of gpu-facts 4.3 is never written by the builder and is treated like plain invalid.)

use thiserror::Error;

use super::format::{PageTableFormat, Pd0View, PdeView, PteView, BIG_PT, PD0, SMALL_PT};
use super::{EntryError, PteTarget, TableTarget};
use crate::host_driver::addr::{GpuVa, PageSize, SysAddr, VramAddr};
use crate::host_driver::cursor::{CursorError, PraminCursor};

/// Errors of a software walk.
#[derive(Debug, Error)]
pub enum WalkError {
    /// Reading VRAM failed.
    #[error(transparent)]
    Cursor(#[from] CursorError),
    /// An entry did not decode.
    #[error("{level} entry at {at}: {source}")]
    Entry {
        /// Level name.
        level: &'static str,
        /// Where the entry is.
        at: VramAddr,
        /// The decoding error.
        #[source]
        source: EntryError,
    },
    /// A directory points into system memory, which this walker cannot read.
    #[error("{level} entry at {at} points at a table in system memory ({target:?})")]
    TableNotInVram {
        /// Level name.
        level: &'static str,
        /// Where the entry is.
        at: VramAddr,
        /// Where it points.
        target: TableTarget,
    },
    /// The VA is beyond the format's address space.
    #[error("{0} is beyond the {1}-bit address space")]
    VaOutOfRange(GpuVa, u32),
}

/// The result of translating one VA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// What the VA maps to, with the offset inside the page applied.
    pub target: PteTarget,
    /// Size of the page mapping it.
    pub page_size: PageSize,
    /// Whether the page is read-only.
    pub read_only: bool,
    /// Where the PTE is.
    pub pte_at: VramAddr,
}

impl Translation {
    /// The VRAM address the VA maps to, if it maps local VRAM.
    pub fn vram(&self) -> Option<VramAddr> {
        match self.target {
            PteTarget::Vram(a) => Some(a),
            _ => None,
        }
    }
}

fn table_in_vram(
    level: &'static str,
    at: VramAddr,
    target: TableTarget,
) -> Result<VramAddr, WalkError> {
    match target {
        TableTarget::Vram(a) => Ok(a),
        target => Err(WalkError::TableNotInVram { level, at, target }),
    }
}

fn with_offset(target: PteTarget, offset: u64) -> PteTarget {
    match target {
        PteTarget::Vram(a) => PteTarget::Vram(VramAddr::new(a.raw() + offset)),
        PteTarget::Peer { peer, addr } => PteTarget::Peer {
            peer,
            addr: VramAddr::new(addr.raw() + offset),
        },
        PteTarget::SysCoherent(a) => PteTarget::SysCoherent(SysAddr::new(a.raw() + offset)),
        PteTarget::SysNonCoherent(a) => PteTarget::SysNonCoherent(SysAddr::new(a.raw() + offset)),
    }
}

fn read_pd0(cursor: &mut PraminCursor<'_>, at: VramAddr) -> Result<u128, CursorError> {
    let mut q = [0u64; 2];
    cursor.read_u64s(at, &mut q)?;
    Ok(u128::from(q[0]) | (u128::from(q[1]) << 64))
}

fn translation(pte: PteView, va: GpuVa, size: PageSize, at: VramAddr) -> Option<Translation> {
    pte.valid.then(|| Translation {
        target: with_offset(pte.target, va.raw() & (size.bytes() - 1)),
        page_size: size,
        read_only: pte.read_only,
        pte_at: at,
    })
}

/// Translates `va` through the tables rooted at `root`; `Ok(None)` if unmapped.
pub fn translate(
    cursor: &mut PraminCursor<'_>,
    format: PageTableFormat,
    root: VramAddr,
    va: GpuVa,
) -> Result<Option<Translation>, WalkError> {
    if va.raw() >= format.va_limit() {
        return Err(WalkError::VaOutOfRange(va, format.va_bits()));
    }
    let mut table = root;
    for level in format.directories() {
        let at = level.entry_addr(table, level.index(va));
        let raw = cursor.read_u64(at)?;
        let decoded = format.decode_pde(raw).map_err(|source| WalkError::Entry {
            level: level.name,
            at,
            source,
        })?;
        match decoded {
            PdeView::Invalid => return Ok(None),
            PdeView::Table(t) => table = table_in_vram(level.name, at, t)?,
        }
    }
    let at = PD0.entry_addr(table, PD0.index(va));
    let raw = read_pd0(cursor, at)?;
    let pd0 = format.decode_pd0(raw).map_err(|source| WalkError::Entry {
        level: PD0.name,
        at,
        source,
    })?;
    let (big, small) = match pd0 {
        Pd0View::Page(pte) => return Ok(translation(pte, va, PageSize::Size2M, at)),
        Pd0View::Tables { big, small } => (big, small),
    };
    for (pt, level, size) in [
        (big, BIG_PT, PageSize::Size64K),
        (small, SMALL_PT, PageSize::Size4K),
    ] {
        let Some(pt) = pt else { continue };
        let pt = table_in_vram(PD0.name, at, pt)?;
        let pte_at = level.entry_addr(pt, level.index(va));
        let raw = cursor.read_u64(pte_at)?;
        let pte = format.decode_pte(raw).map_err(|source| WalkError::Entry {
            level: level.name,
            at: pte_at,
            source,
        })?;
        if let Some(t) = translation(pte, va, size, pte_at) {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// Counts of valid PTEs found by [`count_pages`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageCounts {
    /// Valid 4 KiB PTEs.
    pub small: u64,
    /// Valid 64 KiB PTEs.
    pub big: u64,
    /// Valid 2 MiB PTEs.
    pub huge: u64,
    /// Tables visited (directories, PD0s and page tables, root included).
    pub tables: u64,
}

impl PageCounts {
    /// Bytes mapped by the counted pages.
    pub fn bytes(&self) -> u64 {
        self.small * PageSize::Size4K.bytes()
            + self.big * PageSize::Size64K.bytes()
            + self.huge * PageSize::Size2M.bytes()
    }
}

/// Walks the whole tree rooted at `root` and counts valid PTEs per page size.
pub fn count_pages(
    cursor: &mut PraminCursor<'_>,
    format: PageTableFormat,
    root: VramAddr,
) -> Result<PageCounts, WalkError> {
    let mut counts = PageCounts::default();
    count_dir(cursor, format, root, 0, &mut counts)?;
    Ok(counts)
}

fn count_dir(
    cursor: &mut PraminCursor<'_>,
    format: PageTableFormat,
    table: VramAddr,
    depth: usize,
    counts: &mut PageCounts,
) -> Result<(), WalkError> {
    counts.tables += 1;
    let Some(level) = format.directories().get(depth) else {
        return count_pd0(cursor, format, table, counts);
    };
    let mut raw = vec![0u64; level.entries() as usize];
    cursor.read_u64s(table, &mut raw)?;
    for (i, &e) in raw.iter().enumerate() {
        let at = level.entry_addr(table, i as u64);
        let decoded = format.decode_pde(e).map_err(|source| WalkError::Entry {
            level: level.name,
            at,
            source,
        })?;
        if let PdeView::Table(t) = decoded {
            let child = table_in_vram(level.name, at, t)?;
            count_dir(cursor, format, child, depth + 1, counts)?;
        }
    }
    Ok(())
}

fn count_pd0(
    cursor: &mut PraminCursor<'_>,
    format: PageTableFormat,
    table: VramAddr,
    counts: &mut PageCounts,
) -> Result<(), WalkError> {
    let mut raw = vec![0u64; 2 * PD0.entries() as usize];
    cursor.read_u64s(table, &mut raw)?;
    for i in 0..PD0.entries() {
        let at = PD0.entry_addr(table, i);
        let e = u128::from(raw[2 * i as usize]) | (u128::from(raw[2 * i as usize + 1]) << 64);
        let decoded = format.decode_pd0(e).map_err(|source| WalkError::Entry {
            level: PD0.name,
            at,
            source,
        })?;
        match decoded {
            Pd0View::Page(p) => counts.huge += u64::from(p.valid),
            Pd0View::Tables { big, small } => {
                for (pt, level, count) in [
                    (big, BIG_PT, &mut counts.big),
                    (small, SMALL_PT, &mut counts.small),
                ] {
                    let Some(pt) = pt else { continue };
                    let pt = table_in_vram(PD0.name, at, pt)?;
                    counts.tables += 1;
                    let mut ptes = vec![0u64; level.entries() as usize];
                    cursor.read_u64s(pt, &mut ptes)?;
                    for (j, &p) in ptes.iter().enumerate() {
                        let decoded = format.decode_pte(p).map_err(|source| WalkError::Entry {
                            level: level.name,
                            at: level.entry_addr(pt, j as u64),
                            source,
                        })?;
                        *count += u64::from(decoded.valid);
                    }
                }
            }
        }
    }
    Ok(())
}
