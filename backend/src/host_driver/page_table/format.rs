//! The level structure of the two page-table formats (gpu-facts 4.1) and a
//! format-neutral view of their entries for the builder and the walker.
//!
//! | Format | VA bits | Directories (bits) | PD0 | PT |
//! |---|---|---|---|---|
//! | v2 (Turing–Ada) | 49 | PD3 48:47 (4) → PD2 46:38 → PD1 37:29 | 28:21, 256 dual entries | small 20:12 (512) / big 20:16 (32) |
//! | v3 (Hopper+) | 57 | PD4 56 (2) → PD3 55:47 → PD2 46:38 → PD1 37:29 | same | same |

use super::v2::{Pd0EntryV2, PdeV2, PteV2};
use super::v3::{Pd0EntryV3, PdeV3, PteV3};
use super::{EntryError, PteTarget, TableTarget};
use crate::host_driver::addr::{GpuVa, PageSize, VramAddr};
use crate::host_gpu::Generation;

/// One level of the page-table tree: the VA bits `hi:lo` it indexes and its entry size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// Name (PD4..PD0, PT).
    pub name: &'static str,
    /// Highest VA bit indexing this level.
    pub hi: u32,
    /// Lowest VA bit indexing this level (each entry covers `1 << lo` bytes).
    pub lo: u32,
    /// Entry size in bytes.
    pub entry_bytes: u64,
}

impl Level {
    /// Number of entries in a table of this level.
    pub const fn entries(self) -> u64 {
        1 << (self.hi - self.lo + 1)
    }

    /// The index of `va` at this level.
    pub const fn index(self, va: GpuVa) -> u64 {
        (va.raw() >> self.lo) & (self.entries() - 1)
    }

    /// Bytes of VA one entry covers.
    pub const fn coverage(self) -> u64 {
        1 << self.lo
    }

    /// Bytes of a table of this level.
    pub const fn table_bytes(self) -> u64 {
        self.entries() * self.entry_bytes
    }

    /// Address of entry `index` of the table of this level at `table`.
    pub const fn entry_addr(self, table: VramAddr, index: u64) -> VramAddr {
        VramAddr::new(table.raw() + index * self.entry_bytes)
    }
}

const fn level(name: &'static str, hi: u32, lo: u32, entry_bytes: u64) -> Level {
    Level {
        name,
        hi,
        lo,
        entry_bytes,
    }
}

const V2_DIRECTORIES: [Level; 3] = [
    level("PD3", 48, 47, 8),
    level("PD2", 46, 38, 8),
    level("PD1", 37, 29, 8),
];

const V3_DIRECTORIES: [Level; 4] = [
    level("PD4", 56, 56, 8),
    level("PD3", 55, 47, 8),
    level("PD2", 46, 38, 8),
    level("PD1", 37, 29, 8),
];

/// PD0: 256 dual entries of 16 bytes, each covering 2 MiB.
pub const PD0: Level = level("PD0", 28, 21, 16);
/// Small-page table: 512 PTEs of 4 KiB pages.
pub const SMALL_PT: Level = level("PT(4K)", 20, 12, 8);
/// Big-page table: 32 PTEs of 64 KiB pages (256 bytes).
pub const BIG_PT: Level = level("PT(64K)", 20, 16, 8);

/// Alignment of a big-page table (gpu-facts 4.1: 256 bytes).
pub const BIG_PT_ALIGN: u64 = 256;

/// A page-table format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageTableFormat {
    /// MMU v2: 49-bit VA, 5 levels (Pascal–Ada).
    V2,
    /// MMU v3: 57-bit VA, 6 levels (Hopper, Blackwell).
    V3,
}

/// A format-neutral directory entry (PD4..PD1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdeView {
    /// Not present.
    Invalid,
    /// Points at the next-level table.
    Table(TableTarget),
}

/// A format-neutral PTE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PteView {
    /// VALID.
    pub valid: bool,
    /// Aperture and address.
    pub target: PteTarget,
    /// Read-only (v2 READ_ONLY; v3 PCF read-only bit of a valid PTE).
    pub read_only: bool,
}

/// A format-neutral PD0 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pd0View {
    /// A 2 MiB page.
    Page(PteView),
    /// Pointers to page tables (either may be absent).
    Tables {
        /// Big-page table.
        big: Option<TableTarget>,
        /// Small-page table.
        small: Option<TableTarget>,
    },
}

impl From<PteV2> for PteView {
    fn from(p: PteV2) -> PteView {
        PteView {
            valid: p.valid,
            target: p.target,
            read_only: p.read_only,
        }
    }
}

impl From<PteV3> for PteView {
    fn from(p: PteV3) -> PteView {
        PteView {
            valid: p.valid,
            target: p.target,
            read_only: p.valid && p.pcf & super::v3::pte_pcf::READ_ONLY != 0,
        }
    }
}

impl PageTableFormat {
    /// The format a generation's MMU walks.
    pub const fn for_generation(generation: Generation) -> PageTableFormat {
        match generation {
            Generation::Turing | Generation::Ampere | Generation::Ada => PageTableFormat::V2,
            Generation::Hopper | Generation::Blackwell => PageTableFormat::V3,
        }
    }

    /// Width of a virtual address.
    pub const fn va_bits(self) -> u32 {
        match self {
            PageTableFormat::V2 => 49,
            PageTableFormat::V3 => 57,
        }
    }

    /// First VA past the address space.
    pub const fn va_limit(self) -> u64 {
        1 << self.va_bits()
    }

    /// The directory levels above PD0, root first.
    pub const fn directories(self) -> &'static [Level] {
        match self {
            PageTableFormat::V2 => &V2_DIRECTORIES,
            PageTableFormat::V3 => &V3_DIRECTORIES,
        }
    }

    /// First VRAM address a PTE / table pointer of this format cannot hold.
    pub const fn vram_addr_limit(self) -> u64 {
        match self {
            PageTableFormat::V2 => 1 << (super::v2::ADDRESS_VID_BITS + 12),
            PageTableFormat::V3 => 1 << (super::v3::ADDRESS_BITS + 12),
        }
    }

    /// A directory entry (PD4..PD1) pointing at a table in VRAM.
    pub fn encode_pde(self, table: VramAddr) -> Result<u64, EntryError> {
        match self {
            PageTableFormat::V2 => PdeV2::vram(table).encode(),
            PageTableFormat::V3 => PdeV3::vram(table).encode(),
        }
    }

    /// A PD0 dual entry pointing at VRAM page tables (either may be absent).
    pub fn encode_dual_pde(
        self,
        big: Option<VramAddr>,
        small: Option<VramAddr>,
    ) -> Result<u128, EntryError> {
        let (big, small) = (big.map(TableTarget::Vram), small.map(TableTarget::Vram));
        match self {
            PageTableFormat::V2 => Pd0EntryV2::Tables(super::v2::DualPdeV2 {
                big,
                small,
                ..Default::default()
            })
            .encode(),
            PageTableFormat::V3 => Pd0EntryV3::Tables(super::v3::DualPdeV3 {
                big,
                small,
                ..Default::default()
            })
            .encode(),
        }
    }

    /// A valid PTE mapping VRAM at `pa` (read-write, cached, pitch kind). The same
    /// encoding serves 4 KiB and 64 KiB PTEs and the 2 MiB PTE in PD0's low qword.
    pub fn encode_pte(self, pa: VramAddr) -> Result<u64, EntryError> {
        match self {
            PageTableFormat::V2 => PteV2::vram(pa).encode(),
            PageTableFormat::V3 => PteV3::vram(pa).encode(),
        }
    }

    /// A PD0 entry holding a 2 MiB page at `pa`.
    pub fn encode_huge(self, pa: VramAddr) -> Result<u128, EntryError> {
        if !pa.is_page_aligned(PageSize::Size2M) {
            return Err(EntryError::Misaligned {
                what: "2 MiB PTE",
                addr: pa.raw(),
                align: PageSize::Size2M.bytes(),
            });
        }
        self.encode_pte(pa).map(u128::from)
    }

    /// Decodes a directory entry (PD4..PD1).
    pub fn decode_pde(self, raw: u64) -> Result<PdeView, EntryError> {
        let table = match self {
            PageTableFormat::V2 => PdeV2::decode(raw)?.table,
            PageTableFormat::V3 => PdeV3::decode(raw)?.table,
        };
        Ok(table.map_or(PdeView::Invalid, PdeView::Table))
    }

    /// Decodes a PD0 entry.
    pub fn decode_pd0(self, raw: u128) -> Result<Pd0View, EntryError> {
        Ok(match self {
            PageTableFormat::V2 => match Pd0EntryV2::decode(raw)? {
                Pd0EntryV2::Page(p) => Pd0View::Page(p.into()),
                Pd0EntryV2::Tables(d) => Pd0View::Tables {
                    big: d.big,
                    small: d.small,
                },
            },
            PageTableFormat::V3 => match Pd0EntryV3::decode(raw)? {
                Pd0EntryV3::Page(p) => Pd0View::Page(p.into()),
                Pd0EntryV3::Tables(d) => Pd0View::Tables {
                    big: d.big,
                    small: d.small,
                },
            },
        })
    }

    /// Decodes a PTE (4 KiB or 64 KiB table).
    pub fn decode_pte(self, raw: u64) -> Result<PteView, EntryError> {
        Ok(match self {
            PageTableFormat::V2 => PteV2::decode(raw)?.into(),
            PageTableFormat::V3 => PteV3::decode(raw)?.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_cover_the_va_exactly() {
        for f in [PageTableFormat::V2, PageTableFormat::V3] {
            let dirs = f.directories();
            assert_eq!(dirs[0].hi + 1, f.va_bits(), "{f:?}");
            let mut next_hi = f.va_bits() - 1;
            for l in dirs.iter().chain([&PD0, &SMALL_PT]) {
                assert_eq!(l.hi, next_hi, "{f:?} {}", l.name);
                next_hi = l.lo - 1;
            }
            assert_eq!(SMALL_PT.lo, 12);
            assert_eq!(PD0.table_bytes(), 4096);
            assert_eq!(SMALL_PT.table_bytes(), 4096);
            assert_eq!(BIG_PT.table_bytes(), 256);
        }
        assert_eq!(PageTableFormat::V2.directories()[0].entries(), 4);
        assert_eq!(PageTableFormat::V3.directories()[0].entries(), 2);
        assert_eq!(PD0.entries(), 256);
        assert_eq!(BIG_PT.entries(), 32);
        let va = GpuVa::new(0x1_2345_6789_A000);
        assert_eq!(
            PageTableFormat::V2.directories()[0].index(va),
            (va.raw() >> 47) & 3
        );
        assert_eq!(PD0.index(va), (va.raw() >> 21) & 0xFF);
        assert_eq!(BIG_PT.index(va), (va.raw() >> 16) & 0x1F);
        assert_eq!(
            PageTableFormat::for_generation(Generation::Ada),
            PageTableFormat::V2
        );
        assert_eq!(
            PageTableFormat::for_generation(Generation::Blackwell),
            PageTableFormat::V3
        );
    }

    #[test]
    fn neutral_views_decode_what_was_encoded() {
        for f in [PageTableFormat::V2, PageTableFormat::V3] {
            let t = VramAddr::new(0x3000);
            assert_eq!(
                f.decode_pde(f.encode_pde(t).unwrap()).unwrap(),
                PdeView::Table(TableTarget::Vram(t))
            );
            assert_eq!(f.decode_pde(0).unwrap(), PdeView::Invalid);
            let raw = f
                .encode_dual_pde(Some(VramAddr::new(0x4100)), None)
                .unwrap();
            assert_eq!(
                f.decode_pd0(raw).unwrap(),
                Pd0View::Tables {
                    big: Some(TableTarget::Vram(VramAddr::new(0x4100))),
                    small: None
                }
            );
            let pa = VramAddr::new(0x60_0000);
            let Pd0View::Page(p) = f.decode_pd0(f.encode_huge(pa).unwrap()).unwrap() else {
                panic!("not a page");
            };
            assert_eq!((p.valid, p.target), (true, PteTarget::Vram(pa)));
            assert!(f.encode_huge(VramAddr::new(0x1000)).is_err());
        }
    }
}
