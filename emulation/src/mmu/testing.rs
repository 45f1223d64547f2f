//! Minimal page-table encoders for tests, written straight from the gpu-facts 4.3/4.4 bit
//! formulas with plain shifts — deliberately not using the typed decoders under test.

use crate::chip::MmuVersion;
use crate::vram::{Vram, VramAddr};

use super::PageSize;

/// PDE aperture value VIDEO_MEMORY (PDE encoding).
pub(crate) const PDE_VIDEO: u64 = 1;
/// PDE aperture value SYSTEM_COHERENT.
pub(crate) const PDE_SYS_COH: u64 = 2;
/// PTE aperture value VIDEO_MEMORY (PTE encoding).
pub(crate) const PTE_VIDEO: u64 = 0;
/// PTE aperture value PEER_MEMORY.
pub(crate) const PTE_PEER: u64 = 1;
/// PTE aperture value SYSTEM_COHERENT.
pub(crate) const PTE_SYS_COH: u64 = 2;

/// v2 PTE READ_ONLY bit.
pub(crate) const V2_READ_ONLY: u64 = 1 << 6;
/// v2 PTE PRIVILEGE bit.
pub(crate) const V2_PRIV: u64 = 1 << 5;
/// v2 VOL bit (PTE, PDE, VOL_BIG).
pub(crate) const V2_VOL: u64 = 1 << 3;

/// v3 PTE PCF field value `pcf` in place (bits 7:3).
pub(crate) const fn v3_pcf(pcf: u64) -> u64 {
    pcf << 3
}

/// v2 PDE: address = table >> 4 (VID 32:8 holds table >> 12), aperture at 2:1.
pub(crate) const fn v2_pde(table: u64, aperture: u64) -> u64 {
    (table >> 12) << 8 | aperture << 1
}

/// v2 dual PDE halves (low, high): big = addr >> 8 from bit 4, small = addr >> 12 from
/// bit 72 (bit 8 of the high qword).
pub(crate) fn v2_dual(big: Option<u64>, small: Option<u64>) -> (u64, u64) {
    (
        big.map_or(0, |b| (b >> 8) << 4 | PDE_VIDEO << 1),
        small.map_or(0, |s| (s >> 12) << 8 | PDE_VIDEO << 1),
    )
}

/// v2 PTE: (pa >> 12) << 8 | aperture << 1 | VALID.
pub(crate) const fn v2_pte(pa: u64, aperture: u64) -> u64 {
    (pa >> 12) << 8 | aperture << 1 | 1
}

/// v3 PDE: address bits 51:12 in place, aperture at 2:1.
pub(crate) const fn v3_pde(table: u64, aperture: u64) -> u64 {
    table | aperture << 1
}

/// v3 dual PDE halves: big address 51:8 in place, small address 51:12 in place in the high
/// qword.
pub(crate) fn v3_dual(big: Option<u64>, small: Option<u64>) -> (u64, u64) {
    (
        big.map_or(0, |b| b | PDE_VIDEO << 1),
        small.map_or(0, |s| s | PDE_VIDEO << 1),
    )
}

/// v3 PTE: address bits 51:12 in place | aperture << 1 | VALID.
pub(crate) const fn v3_pte(pa: u64, aperture: u64) -> u64 {
    pa | aperture << 1 | 1
}

/// A valid PTE of `format` in video memory for `pa`, plus `extra` bits.
pub(crate) const fn pte(format: MmuVersion, pa: u64, extra: u64) -> u64 {
    match format {
        MmuVersion::V2 => v2_pte(pa, PTE_VIDEO) | extra,
        MmuVersion::V3 => v3_pte(pa, PTE_VIDEO) | extra,
    }
}

/// A small page-table builder: tables are bump-allocated from `next` in `vram`.
pub(crate) struct Tables<'v> {
    vram: &'v Vram,
    format: MmuVersion,
    /// The root directory (PD3 for v2, PD4 for v3).
    pub root: u64,
    next: u64,
}

impl<'v> Tables<'v> {
    /// Tables allocated from `arena` (4 KiB aligned) upwards; the root comes first.
    pub(crate) fn new(vram: &'v Vram, format: MmuVersion, arena: u64) -> Tables<'v> {
        let mut t = Tables {
            vram,
            format,
            root: 0,
            next: arena,
        };
        t.root = t.alloc(4096, 4096);
        t
    }

    fn alloc(&mut self, size: u64, align: u64) -> u64 {
        let at = self.next.next_multiple_of(align);
        self.next = at + size;
        self.vram.fill(VramAddr::new(at), size, 0).unwrap();
        at
    }

    fn rd(&self, addr: u64) -> u64 {
        self.vram.read_u64(VramAddr::new(addr)).unwrap()
    }

    fn wr(&self, addr: u64, v: u64) {
        self.vram.write_u64(VramAddr::new(addr), v).unwrap()
    }

    fn pde(&self, table: u64) -> u64 {
        match self.format {
            MmuVersion::V2 => v2_pde(table, PDE_VIDEO),
            MmuVersion::V3 => v3_pde(table, PDE_VIDEO),
        }
    }

    fn pde_table(&self, raw: u64) -> u64 {
        match self.format {
            MmuVersion::V2 => ((raw >> 8) & ((1 << 25) - 1)) << 12,
            MmuVersion::V3 => raw & 0x000F_FFFF_FFFF_F000,
        }
    }

    fn dual(&self, big: Option<u64>, small: Option<u64>) -> (u64, u64) {
        match self.format {
            MmuVersion::V2 => v2_dual(big, small),
            MmuVersion::V3 => v3_dual(big, small),
        }
    }

    fn dual_big_table(&self, lo: u64) -> u64 {
        match self.format {
            MmuVersion::V2 => ((lo >> 4) & ((1 << 29) - 1)) << 8,
            MmuVersion::V3 => lo & 0x000F_FFFF_FFFF_FF00,
        }
    }

    /// Address of PD0's entry for `va` (creating directories), or of the PD1 entry if
    /// `stop_at_pd1`.
    fn directory_entry(&mut self, va: u64, stop_at_pd1: bool) -> u64 {
        let levels: &[(u32, u32)] = match self.format {
            MmuVersion::V2 => &[(47, 2), (38, 9), (29, 9)],
            MmuVersion::V3 => &[(56, 1), (47, 9), (38, 9), (29, 9)],
        };
        let mut table = self.root;
        for &(shift, bits) in levels {
            let entry = table + ((va >> shift) & ((1 << bits) - 1)) * 8;
            if shift == 29 && stop_at_pd1 {
                return entry;
            }
            let mut raw = self.rd(entry);
            if raw == 0 {
                let t = self.alloc(4096, 4096);
                raw = self.pde(t);
                self.wr(entry, raw);
            }
            table = self.pde_table(raw);
        }
        table + ((va >> 21) & 0xFF) * 16
    }

    /// Address of the PTE slot mapping `va` with pages of `size`, creating tables.
    pub(crate) fn slot(&mut self, va: u64, size: PageSize) -> u64 {
        match size {
            PageSize::Huge512M => self.directory_entry(va, true),
            PageSize::Huge2M => self.directory_entry(va, false),
            PageSize::Big64K => {
                let e = self.directory_entry(va, false);
                let mut lo = self.rd(e);
                if lo == 0 {
                    let t = self.alloc(256, 256);
                    lo = self.dual(Some(t), None).0;
                    self.wr(e, lo);
                }
                self.dual_big_table(lo) + ((va >> 16) & 31) * 8
            }
            PageSize::Small4K => {
                let e = self.directory_entry(va, false);
                let mut hi = self.rd(e + 8);
                if hi == 0 {
                    let t = self.alloc(4096, 4096);
                    hi = self.dual(None, Some(t)).1;
                    self.wr(e + 8, hi);
                }
                self.pde_table(hi) + ((va >> 12) & 511) * 8
            }
        }
    }

    /// Maps `va` to video memory `pa` with a page of `size`; `extra` bits are ORed into
    /// the PTE.
    pub(crate) fn map(&mut self, va: u64, pa: u64, size: PageSize, extra: u64) {
        let raw = pte(self.format, pa, extra);
        self.set(va, size, raw);
    }

    /// Writes `raw` into the PTE slot of `va` for pages of `size`.
    pub(crate) fn set(&mut self, va: u64, size: PageSize, raw: u64) {
        let slot = self.slot(va, size);
        self.wr(slot, raw);
    }
}
