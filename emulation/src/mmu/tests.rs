//! Tests of the walker, the TLB and BAR1, with page tables written by the raw encoders of
//! [`super::testing`].

use proptest::prelude::*;

use super::testing::*;
use super::*;
use crate::bar0::AccessWidth::Dword;
use crate::chip::{BarBlockRegisterKind, MmuVersion};
use crate::profile::ChipProfile;
use crate::regs::{
    MmuInvalidate, MmuInvalidatePdb, MmuInvalidateUpperPdb, BAR1_BLOCK, BAR1_BLOCK_HIGH_ADDR,
    BAR1_BLOCK_LOW_ADDR, MMU_INVALIDATE, MMU_INVALIDATE_PDB, MMU_INVALIDATE_UPPER_PDB,
};
use crate::vram::{Vram, VramAddr};
use crate::{EmulatedGpu, TlbInvalidateRequest};

use MmuVersion::{V2, V3};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn vram(size: u64) -> Vram {
    Vram::new(size).unwrap()
}

fn w64(v: &Vram, addr: u64, val: u64) {
    v.write_u64(VramAddr::new(addr), val).unwrap();
}

fn walk(v: &Vram, pdb: u64, format: MmuVersion, va: u64) -> Result<Translation, WalkFault> {
    translate(v, VramAddr::new(pdb), format, va)
}

fn root_level(format: MmuVersion) -> Level {
    match format {
        V2 => Level::Pd3,
        V3 => Level::Pd4,
    }
}

// --- hand-built tables, literal bit patterns -----------------------------------------

#[test]
fn v2_hand_built_4k_walk() {
    let v = vram(16 * MIB);
    // PD3 idx 1, PD2 idx 3, PD1 idx 5, PD0 idx 7, small PT idx 9, offset 0x123.
    let va = 1 << 47 | 3 << 38 | 5 << 29 | 7 << 21 | 9 << 12 | 0x123;
    // Directory entries: table address >> 4 with aperture VIDEO (1) at bits 2:1.
    w64(&v, 0x1000 + 8, 0x2000 >> 4 | 1 << 1);
    w64(&v, 0x2000 + 3 * 8, 0x3000 >> 4 | 1 << 1);
    w64(&v, 0x3000 + 5 * 8, 0x4000 >> 4 | 1 << 1);
    // PD0 dual entry: big half empty, small half = PT address >> 12 from bit 72.
    w64(&v, 0x4000 + 7 * 16, 0);
    w64(&v, 0x4000 + 7 * 16 + 8, (0x5000 >> 12) << 8 | 1 << 1);
    // PTE = (pa >> 12) << 8 | aperture << 1 | VALID.
    w64(&v, 0x5000 + 9 * 8, (0xABC_D000 >> 12) << 8 | 1);
    let t = walk(&v, 0x1000, V2, va).unwrap();
    assert_eq!(t.pa, 0xABC_D123);
    assert_eq!(t.page_size, PageSize::Small4K);
    assert_eq!(t.level, Level::SmallPageTable);
    assert_eq!(t.aperture, PteAperture::VideoMemory);
    assert!(!t.read_only && !t.privileged);
    assert_eq!(t.pte, 0xABCD01);
}

#[test]
fn v2_hand_built_64k_and_2m_walks() {
    let v = vram(16 * MIB);
    w64(&v, 0x1000, 0x2000 >> 4 | 2);
    w64(&v, 0x2000, 0x3000 >> 4 | 2);
    w64(&v, 0x3000, 0x4000 >> 4 | 2);
    // PD0[0]: big PT at 0x4100 (256-byte aligned): raw low qword = addr >> 4 | aperture.
    w64(&v, 0x4000, 0x4100 >> 4 | 2);
    w64(&v, 0x4100 + 3 * 8, (0x30_0000 >> 12) << 8 | 1);
    let t = walk(&v, 0x1000, V2, 3 << 16 | 0xBEEF).unwrap();
    assert_eq!((t.pa, t.page_size), (0x30_BEEF, PageSize::Big64K));
    // PD0[1]: a 2 MiB PTE in the low qword.
    w64(&v, 0x4000 + 16, (0x60_0000 >> 12) << 8 | 1);
    let t = walk(&v, 0x1000, V2, 1 << 21 | 0x1_2345).unwrap();
    assert_eq!((t.pa, t.page_size), (0x61_2345, PageSize::Huge2M));
    assert_eq!(t.level, Level::Pd0);
}

#[test]
fn v3_hand_built_walks() {
    let v = vram(16 * MIB);
    // PD4 idx 1 (VA bit 56), PD3 idx 2, PD2 idx 3, PD1 idx 4, PD0 idx 5.
    let base = 1 << 56 | 2 << 47 | 3 << 38 | 4 << 29 | 5 << 21;
    // Directory entries: address bits 51:12 in place, aperture VIDEO at 2:1.
    w64(&v, 0x1000 + 8, 0x2000 | 1 << 1);
    w64(&v, 0x2000 + 2 * 8, 0x3000 | 1 << 1);
    w64(&v, 0x3000 + 3 * 8, 0x4000 | 1 << 1);
    w64(&v, 0x4000 + 4 * 8, 0x5000 | 1 << 1);
    // PD0[5]: big PT at 0x6100 (51:8 in place), small PT at 0x7000 (115:76 in place).
    w64(&v, 0x5000 + 5 * 16, 0x6100 | 1 << 1);
    w64(&v, 0x5000 + 5 * 16 + 8, 0x7000 | 1 << 1);
    // Small PTE idx 0x12: address in place | VALID; big PTE idx 2.
    w64(&v, 0x7000 + 0x12 * 8, 0x00AB_C000 | 1);
    w64(&v, 0x6100 + 2 * 8, 0x0090_0000 | 1);
    let t = walk(&v, 0x1000, V3, base | 0x12 << 12 | 0x456).unwrap();
    assert_eq!((t.pa, t.page_size), (0xAB_C456, PageSize::Small4K));
    let t = walk(&v, 0x1000, V3, base | 2 << 16 | 0x456).unwrap();
    assert_eq!((t.pa, t.page_size), (0x90_0456, PageSize::Big64K));
    // PD0[6]: a 2 MiB PTE (IS_PTE = bit 0); PD1[5]: a 512 MiB PTE.
    w64(&v, 0x5000 + 6 * 16, 0x0020_0000 | 1);
    let t = walk(&v, 0x1000, V3, base + (1 << 21) + 0x1_0001).unwrap();
    assert_eq!((t.pa, t.page_size), (0x21_0001, PageSize::Huge2M));
    w64(&v, 0x4000 + 5 * 8, 0x2000_0000 | 1);
    let va = base - (5 << 21) + (1 << 29) + 0x123_4567;
    let t = walk(&v, 0x1000, V3, va).unwrap();
    assert_eq!((t.pa, t.page_size), (0x2123_4567, PageSize::Huge512M));
    assert_eq!(t.level, Level::Pd1);
}

// --- builder-based: every page size, both formats -------------------------------------

#[test]
fn every_page_size_in_both_formats() {
    for format in [V2, V3] {
        let v = vram(GIB);
        let mut t = Tables::new(&v, format, 16 * MIB);
        let cases = [
            (0x3_2345_6000u64, PageSize::Small4K, 0x200_0000u64),
            (0x40_0001_0000, PageSize::Big64K, 0x211_0000),
            (0x8020_0000, PageSize::Huge2M, 0x240_0000),
            (0x1_2000_0000, PageSize::Huge512M, 0x2000_0000),
        ];
        for &(va, size, pa) in &cases {
            t.map(va, pa, size, 0);
        }
        for &(va, size, pa) in &cases {
            for off in [0, 1, size.bytes() / 2 + 7, size.bytes() - 1] {
                let tr = walk(&v, t.root, format, va + off).unwrap();
                assert_eq!(tr.pa, pa + off, "{format:?} {size:?} +{off:#x}");
                assert_eq!(tr.page_size, size);
                assert_eq!(tr.aperture, PteAperture::VideoMemory);
                assert!(!tr.read_only);
            }
            // The byte after the page is not mapped by it.
            let next = walk(&v, t.root, format, va + size.bytes());
            assert!(next.map_or(true, |tr| tr.pa != pa + size.bytes()));
        }
        // The same tables through translate_with-like access: the TLB agrees.
        let tlb = Tlb::new();
        for &(va, _, pa) in &cases {
            let tr = tlb
                .translate(&v, VramAddr::new(t.root), format, va + 5)
                .unwrap();
            assert_eq!(tr.pa, pa + 5);
        }
    }
}

#[test]
fn pte_fields_v2() {
    let v = vram(16 * MIB);
    let mut t = Tables::new(&v, V2, MIB);
    let va = 0x10_0000;
    t.set(
        va,
        PageSize::Small4K,
        v2_pte(0x5000, PTE_VIDEO) | V2_READ_ONLY | 0x42 << 56,
    );
    let tr = walk(&v, t.root, V2, va).unwrap();
    assert!(tr.read_only && !tr.privileged);
    assert_eq!(tr.kind, 0x42);
    t.set(
        va,
        PageSize::Small4K,
        v2_pte(0x5000, PTE_VIDEO) | V2_PRIV | V2_VOL,
    );
    let tr = walk(&v, t.root, V2, va).unwrap();
    assert!(tr.privileged && tr.uncached && !tr.read_only);
    // Peer: index in bits 35:33; system memory: address up to bit 53.
    t.set(va, PageSize::Small4K, v2_pte(0x5000, PTE_PEER) | 5 << 33);
    let tr = walk(&v, t.root, V2, va).unwrap();
    assert_eq!(tr.aperture, PteAperture::Peer { id: 5 });
    assert_eq!(tr.pa, 0x5000);
    let sys = 0x3F_1234_5678_9000u64;
    t.set(va, PageSize::Small4K, v2_pte(sys, PTE_SYS_COH));
    let tr = walk(&v, t.root, V2, va + 8).unwrap();
    assert_eq!(tr.aperture, PteAperture::SystemCoherent);
    assert_eq!(tr.pa, sys + 8);
    t.set(va, PageSize::Small4K, v2_pte(0x5000, 3));
    let tr = walk(&v, t.root, V2, va).unwrap();
    assert_eq!(tr.aperture, PteAperture::SystemNonCoherent);
}

#[test]
fn pte_fields_v3() {
    let v = vram(16 * MIB);
    let mut t = Tables::new(&v, V3, MIB);
    let va = 0x10_0000;
    // PCF 0x0C: regular, read-only, no atomic, cached; KIND 6.
    t.set(
        va,
        PageSize::Small4K,
        v3_pte(0x5000, PTE_VIDEO) | v3_pcf(0x0C) | 6 << 8,
    );
    let tr = walk(&v, t.root, V3, va).unwrap();
    assert!(tr.read_only && tr.atomic_disable && !tr.privileged && !tr.uncached);
    assert_eq!(tr.kind, 6);
    // PCF bit 1 PRIVILEGE, bit 0 UNCACHED (RM's enumeration).
    t.set(
        va,
        PageSize::Small4K,
        v3_pte(0x5000, PTE_VIDEO) | v3_pcf(0b11),
    );
    let tr = walk(&v, t.root, V3, va).unwrap();
    assert!(tr.privileged && tr.uncached && !tr.read_only);
    t.set(va, PageSize::Small4K, v3_pte(0x5000, PTE_PEER) | 3 << 61);
    assert_eq!(
        walk(&v, t.root, V3, va).unwrap().aperture,
        PteAperture::Peer { id: 3 }
    );
    let sys = 0x000F_1234_5678_9000u64;
    t.set(va, PageSize::Small4K, v3_pte(sys, PTE_SYS_COH));
    let tr = walk(&v, t.root, V3, va + 1).unwrap();
    assert_eq!((tr.aperture, tr.pa), (PteAperture::SystemCoherent, sys + 1));
}

// --- faults ---------------------------------------------------------------------------

#[test]
fn faults_name_the_level() {
    for format in [V2, V3] {
        let v = vram(64 * MIB);
        let root = root_level(format);
        let mut t = Tables::new(&v, format, MIB);
        // Empty root.
        assert!(matches!(
            walk(&v, t.root, format, 0x1000),
            Err(WalkFault::InvalidPde { level, raw: 0 }) if level == root
        ));
        let va = 0x1_0000_0000u64 | 7 << 21 | 9 << 12;
        t.map(va, 32 * MIB, PageSize::Small4K, 0);
        let expect = |va: u64, want: Level| {
            let got = walk(&v, t.root, format, va);
            assert!(
                matches!(got, Err(WalkFault::InvalidPde { level, .. }) if level == want),
                "{format:?} {va:#x}: {got:?}"
            );
        };
        expect(va | 1 << 38, Level::Pd2);
        expect(va ^ 1 << 29, Level::Pd1);
        expect(va ^ 1 << 21, Level::Pd0);
        assert!(matches!(
            walk(&v, t.root, format, va ^ 1 << 12),
            Err(WalkFault::InvalidPte {
                level: Level::SmallPageTable,
                raw: 0
            })
        ));
        // VA width.
        let bits = va_bits(format);
        assert_eq!(
            walk(&v, t.root, format, 1 << bits),
            Err(WalkFault::VaOutOfRange {
                va: 1 << bits,
                bits
            })
        );
        if format == V3 {
            expect(1 << 49, Level::Pd3);
        }
        // PDB outside VRAM, including addresses that overflow.
        for pdb in [64 * MIB, u64::MAX - 7, u64::MAX] {
            assert!(matches!(
                walk(&v, pdb, format, 0x1000),
                Err(WalkFault::TableOutsideVram { level, .. }) if level == root
            ));
        }
    }
}

#[test]
fn bad_directory_entries_fault() {
    for format in [V2, V3] {
        let v = vram(16 * MIB);
        let root = root_level(format);
        let next = match format {
            V2 => Level::Pd2,
            V3 => Level::Pd3,
        };
        let pde = |table: u64, ap: u64| match format {
            V2 => v2_pde(table, ap),
            V3 => v3_pde(table, ap),
        };
        let root_at = 0x1000;
        // A table beyond the end of VRAM.
        w64(&v, root_at, pde(16 * MIB, PDE_VIDEO));
        assert!(matches!(
            walk(&v, root_at, format, 0),
            Err(WalkFault::TableOutsideVram { level, table, .. }) if level == next && table == 16 * MIB
        ));
        // A table in system memory.
        w64(&v, root_at, pde(0x2000, PDE_SYS_COH));
        assert_eq!(
            walk(&v, root_at, format, 0),
            Err(WalkFault::TableNotInVideoMemory {
                level: root,
                aperture: PdeAperture::SystemCoherent
            })
        );
        // A PTE in the root (only PD1 and PD0 can hold one).
        w64(&v, root_at, 0x20_0000 | 1);
        assert!(matches!(
            walk(&v, root_at, format, 0),
            Err(WalkFault::PteNotAllowed { level, .. }) if level == root
        ));
        // A sparse directory entry: v2 invalid + VOL, v3 invalid + PCF 1.
        w64(&v, root_at, 1 << 3);
        assert_eq!(
            walk(&v, root_at, format, 0),
            Err(WalkFault::Sparse { level: root })
        );
    }
}

#[test]
fn invalid_and_sparse_ptes() {
    for format in [V2, V3] {
        let v = vram(16 * MIB);
        let mut t = Tables::new(&v, format, MIB);
        let va = 0x40_0000;
        let sparse = match format {
            V2 => V2_VOL,
            V3 => v3_pcf(1),
        };
        t.set(va, PageSize::Small4K, sparse);
        assert_eq!(
            walk(&v, t.root, format, va),
            Err(WalkFault::Sparse {
                level: Level::SmallPageTable
            })
        );
        // 2 MiB slot: an invalid low qword without IS_PTE falls back to the table halves.
        let va2 = 0x80_0000;
        let slot = t.slot(va2, PageSize::Huge2M);
        w64(&v, slot, sparse);
        assert_eq!(
            walk(&v, t.root, format, va2),
            Err(WalkFault::Sparse { level: Level::Pd0 })
        );
        w64(&v, slot, 0);
        assert!(matches!(
            walk(&v, t.root, format, va2),
            Err(WalkFault::InvalidPde {
                level: Level::Pd0,
                ..
            })
        ));
    }
}

#[test]
fn dual_pde_checks_big_page_first() {
    for format in [V2, V3] {
        let v = vram(64 * MIB);
        let mut t = Tables::new(&v, format, MIB);
        let va = 0x4_0000_0000u64 | 3 << 16 | 5 << 12 | 0x10;
        t.map(va, 32 * MIB, PageSize::Small4K, 0);
        t.map(va, 40 * MIB, PageSize::Big64K, 0);
        // Valid big PTE wins.
        let tr = walk(&v, t.root, format, va).unwrap();
        assert_eq!(
            (tr.page_size, tr.pa),
            (PageSize::Big64K, 40 * MIB + (5 << 12 | 0x10))
        );
        // Plain invalid big PTE: the small table decides.
        t.set(va, PageSize::Big64K, 0);
        let tr = walk(&v, t.root, format, va).unwrap();
        assert_eq!((tr.page_size, tr.pa), (PageSize::Small4K, 32 * MIB + 0x10));
        assert!(matches!(
            walk(&v, t.root, format, va ^ 1 << 12),
            Err(WalkFault::InvalidPte {
                level: Level::SmallPageTable,
                ..
            })
        ));
        // "No valid small page" big PTE: fault at the big table, small PTE ignored.
        let no_small = match format {
            V2 => V2_PRIV,
            V3 => v3_pcf(crate::mmu::v3::PTE_PCF_NO_VALID_4KB_PAGE),
        };
        t.set(va, PageSize::Big64K, no_small);
        assert!(matches!(
            walk(&v, t.root, format, va),
            Err(WalkFault::InvalidPte {
                level: Level::BigPageTable,
                ..
            })
        ));
        if format == V3 {
            t.set(
                va,
                PageSize::Big64K,
                v3_pcf(crate::mmu::v3::PTE_PCF_MAPPING_NOWHERE),
            );
            assert!(walk(&v, t.root, format, va).is_err());
        }
        // Sparse big PTE.
        let sparse = match format {
            V2 => V2_VOL,
            V3 => v3_pcf(1),
        };
        t.set(va, PageSize::Big64K, sparse);
        assert_eq!(
            walk(&v, t.root, format, va),
            Err(WalkFault::Sparse {
                level: Level::BigPageTable
            })
        );
        // Only a big table: an invalid big PTE faults there.
        let va_big_only = va + (1 << 21);
        t.map(va_big_only, 48 * MIB, PageSize::Big64K, 0);
        assert!(walk(&v, t.root, format, va_big_only).is_ok());
        assert!(matches!(
            walk(&v, t.root, format, va_big_only ^ 1 << 16),
            Err(WalkFault::InvalidPte {
                level: Level::BigPageTable,
                raw: 0
            })
        ));
    }
}

#[test]
fn large_page_ignores_low_address_bits() {
    let v = vram(16 * MIB);
    let mut t = Tables::new(&v, V2, MIB);
    // A 2 MiB PTE whose address is not 2 MiB aligned: the in-page offset comes from the VA.
    t.set(0x20_0000, PageSize::Huge2M, v2_pte(0x60_3000, PTE_VIDEO));
    assert_eq!(walk(&v, t.root, V2, 0x20_0010).unwrap().pa, 0x60_0010);
}

// --- TLB ------------------------------------------------------------------------------

#[test]
fn tlb_serves_stale_translations_until_invalidated() {
    for format in [V2, V3] {
        let v = vram(64 * MIB);
        let mut t = Tables::new(&v, format, MIB);
        let mut other = Tables::new(&v, format, 8 * MIB);
        let va = 0x1234_5000;
        t.map(va, 32 * MIB, PageSize::Small4K, 0);
        other.map(va, 33 * MIB, PageSize::Small4K, 0);
        let pdb = VramAddr::new(t.root);
        let tlb = Tlb::new();
        assert_eq!(
            tlb.translate(&v, pdb, format, va + 4).unwrap().pa,
            32 * MIB + 4
        );
        // Same VA under another PDB is a separate entry.
        let other_pdb = VramAddr::new(other.root);
        assert_eq!(
            tlb.translate(&v, other_pdb, format, va).unwrap().pa,
            33 * MIB
        );
        t.map(va, 40 * MIB, PageSize::Small4K, 0);
        assert_eq!(walk(&v, t.root, format, va).unwrap().pa, 40 * MIB);
        assert_eq!(
            tlb.translate(&v, pdb, format, va + 8).unwrap().pa,
            32 * MIB + 8
        );
        // Invalidating other PDBs or a system-memory PDB keeps it.
        tlb.invalidate(InvalidateScope::Pdb(other_pdb));
        tlb.invalidate(InvalidateScope::SystemMemoryPdb(t.root));
        assert_eq!(tlb.translate(&v, pdb, format, va).unwrap().pa, 32 * MIB);
        assert_eq!(tlb.invalidate(InvalidateScope::Pdb(pdb)), 1);
        assert_eq!(tlb.translate(&v, pdb, format, va).unwrap().pa, 40 * MIB);
        t.map(va, 44 * MIB, PageSize::Small4K, 0);
        assert_eq!(tlb.invalidate(InvalidateScope::All), 1);
        assert_eq!(tlb.translate(&v, pdb, format, va).unwrap().pa, 44 * MIB);
        let s = tlb.stats();
        assert_eq!(s.invalidations, 4);
        assert_eq!(s.entries, 1);
        assert!(s.hits >= 2 && s.misses >= 4, "{s:?}");
    }
}

#[test]
fn tlb_does_not_cache_faults_and_covers_large_pages_per_4k() {
    let v = vram(64 * MIB);
    let mut t = Tables::new(&v, V3, MIB);
    let pdb = VramAddr::new(t.root);
    let tlb = Tlb::new();
    let va = 0x60_0000; // 2 MiB aligned
    assert!(tlb.translate(&v, pdb, V3, va).is_err());
    t.map(va, 4 * MIB, PageSize::Huge2M, 0);
    // No invalidate needed: the fault was not cached.
    let tr = tlb.translate(&v, pdb, V3, va + 0x1234).unwrap();
    assert_eq!((tr.pa, tr.page_size), (4 * MIB + 0x1234, PageSize::Huge2M));
    // Another 4 KiB of the same 2 MiB page is its own entry, hit on the second access.
    let before = tlb.stats();
    let tr = tlb.translate(&v, pdb, V3, va + 0x5678).unwrap();
    assert_eq!(tr.pa, 4 * MIB + 0x5678);
    let tr = tlb.translate(&v, pdb, V3, va + 0x5000).unwrap();
    assert_eq!(tr.pa, 4 * MIB + 0x5000);
    let after = tlb.stats();
    assert_eq!(after.misses - before.misses, 1);
    assert_eq!(after.hits - before.hits, 1);
    assert_eq!(after.entries, 2);
}

#[test]
fn tlb_is_bounded() {
    let v = vram(64 * MIB);
    let mut t = Tables::new(&v, V2, MIB);
    t.map(0, 16 * MIB, PageSize::Huge2M, 0);
    let tlb = Tlb::with_sets(3);
    assert_eq!(tlb.capacity(), 4 * TLB_WAYS_FOR_TEST);
    for round in 0..2 {
        for page in 0..512u64 {
            let tr = tlb
                .translate(&v, VramAddr::new(t.root), V2, page << 12 | round)
                .unwrap();
            assert_eq!(tr.pa, 16 * MIB + (page << 12 | round));
            assert!(tlb.stats().entries <= tlb.capacity());
        }
    }
    assert_eq!(tlb.stats().entries, tlb.capacity());
}

const TLB_WAYS_FOR_TEST: usize = tlb::TLB_WAYS;

#[test]
fn invalidate_scope_from_registers() {
    // PDB lo = pdb >> 8 | aperture << 1, hi = pdb >> 40 (gpu-facts 4.7).
    let pdb = 0x12_3456_7000u64 | 1 << 40;
    let req = |control: u32, aperture: u32| TlbInvalidateRequest {
        control: MmuInvalidate::from_raw(control),
        pdb: MmuInvalidatePdb::from_raw((pdb >> 8) as u32 & 0xFFFF_FFF0 | aperture << 1),
        upper_pdb: MmuInvalidateUpperPdb::from_raw((pdb >> 40) as u32),
    };
    assert_eq!(
        InvalidateScope::from_request(req(1 << 31 | 1, 0)),
        InvalidateScope::Pdb(VramAddr::new(pdb))
    );
    assert_eq!(
        InvalidateScope::from_request(req(1 << 31 | 1, 1)),
        InvalidateScope::SystemMemoryPdb(pdb)
    );
    assert_eq!(
        InvalidateScope::from_request(req(1 << 31 | 3, 0)),
        InvalidateScope::All
    );
    // ALL_VA = 0 still flushes the whole PDB (VA registers are not modelled).
    assert_eq!(
        InvalidateScope::from_request(req(1 << 31, 0)),
        InvalidateScope::Pdb(VramAddr::new(pdb))
    );
}

// --- BAR1 -----------------------------------------------------------------------------

fn gpu(name: &str) -> EmulatedGpu {
    EmulatedGpu::new(ChipProfile::by_name(name).unwrap()).unwrap()
}

fn format_of(g: &EmulatedGpu) -> MmuVersion {
    g.profile().generation().mmu_version()
}

fn reg(g: &EmulatedGpu, off: u64, value: u64) {
    g.bar0_write(off, Dword, value).unwrap();
}

/// Writes an instance block at `inst` whose PDB is `pdb` in video memory.
fn write_instance(g: &EmulatedGpu, inst: u64, pdb: u64) {
    let v = g.vram();
    // 0x200: TARGET 1:0 = 0 (VID), USE_NEW_PT_FORMAT bit 10, BIG_PAGE_SIZE bit 11 (64 KiB),
    // address bits 31:12 in place; 0x204: address bits 63:32.
    let lo = (pdb as u32 & 0xFFFF_F000) | 1 << 10 | 1 << 11;
    v.write_u32(VramAddr::new(inst + 0x200), lo).unwrap();
    v.write_u32(VramAddr::new(inst + 0x204), (pdb >> 32) as u32)
        .unwrap();
}

/// Binds BAR1 to the instance block at `inst` in virtual mode (`virt`) or physical mode,
/// the way the generation's block registers want it.
fn bind_bar1(g: &EmulatedGpu, inst: u64, target: u64, virt: bool) {
    match g.profile().generation().bar_block_registers() {
        // PTR 27:0 = inst >> 12, TARGET 29:28, MODE bit 31.
        BarBlockRegisterKind::Single0xB80F40 => reg(
            g,
            BAR1_BLOCK,
            (inst >> 12) | target << 28 | u64::from(virt) << 31,
        ),
        // LOW: MODE bit 9, TARGET 11:10, PTR 31:12 in place; HIGH: address bits above 32.
        BarBlockRegisterKind::LowHigh0xB80F60 => {
            reg(
                g,
                BAR1_BLOCK_LOW_ADDR,
                (inst & 0xFFFF_F000) | u64::from(virt) << 9 | target << 10,
            );
            reg(g, BAR1_BLOCK_HIGH_ADDR, inst >> 32);
        }
    }
}

/// Triggers a TLB invalidate through the BAR0 registers.
fn invalidate(g: &EmulatedGpu, pdb: u64, all_pdb: bool) {
    reg(g, MMU_INVALIDATE_PDB, (pdb >> 8) & 0xFFFF_FFF0);
    reg(g, MMU_INVALIDATE_UPPER_PDB, pdb >> 40);
    reg(g, MMU_INVALIDATE, 1 << 31 | u64::from(all_pdb) << 1 | 1);
}

fn read(g: &EmulatedGpu, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    g.bar1_read(off, &mut buf).unwrap();
    buf
}

fn vram_bytes(g: &EmulatedGpu, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    g.vram().read(VramAddr::new(addr), &mut buf).unwrap();
    buf
}

#[test]
fn bar1_physical_mode_is_vram_one_to_one() {
    for name in ["tu102-24g", "gh100-80g", "gh200-96g"] {
        let g = gpu(name);
        assert_eq!(g.bar1_binding().mode, crate::BarMode::Physical);
        g.bar1_write(0x1234_5678, b"physical").unwrap();
        assert_eq!(vram_bytes(&g, 0x1234_5678, 8), b"physical");
        assert_eq!(read(&g, 0x1234_5679, 7), b"hysical");
        let size = g.bar_memory(g.profile().bars()[1].index).map(|m| m.len);
        let bar1_size = g
            .profile()
            .bars()
            .iter()
            .find(|b| b.role == crate::BarRole::Vram { vram_offset: 0 })
            .unwrap()
            .size;
        assert!(size.is_some());
        assert_eq!(read(&g, bar1_size - 4, 4), [0, 0, 0, 0]);
        assert_eq!(
            g.bar1_read(bar1_size - 4, &mut [0u8; 8]),
            Err(Bar1Error::OutOfRange {
                offset: bar1_size - 4,
                len: 8,
                size: bar1_size
            })
        );
        assert!(g.bar1_write(u64::MAX, &[1]).is_err());
        assert_eq!(g.bar1_stats(), Bar1Stats::default());
    }
}

/// BAR1 in virtual mode on `name` with the instance block at `inst` and tables at `arena`.
fn bar1_virtual_mode(name: &str, inst: u64, arena: u64) {
    let g = gpu(name);
    let format = format_of(&g);
    let mut t = Tables::new(g.vram(), format, arena);
    // VA 0 and 0x1000: two 4 KiB pages at unrelated PAs; VA 0x1_0000: a 64 KiB page in the
    // same PD0 entry (big and small tables both present); VA 0x20_0000: a 2 MiB page;
    // VA 0x3000: a read-only 4 KiB page.
    t.map(0, 0x400_0000, PageSize::Small4K, 0);
    t.map(0x1000, 0x500_0000, PageSize::Small4K, 0);
    t.map(0x1_0000, 0x700_0000, PageSize::Big64K, 0);
    t.map(0x20_0000, 0x600_0000, PageSize::Huge2M, 0);
    let ro = match format {
        V2 => V2_READ_ONLY,
        V3 => v3_pcf(0b100),
    };
    t.map(0x3000, 0x510_0000, PageSize::Small4K, ro);
    write_instance(&g, inst, t.root);
    g.vram()
        .write(VramAddr::new(0x510_0000), b"read-only")
        .unwrap();

    bind_bar1(&g, inst, 0, true);
    let b = g.bar1_binding();
    assert_eq!(
        (b.mode, b.instance, b.target_raw),
        (crate::BarMode::Virtual, inst, 0)
    );

    // A write across a page boundary is split between the two pages' PAs.
    g.bar1_write(0xFF8, b"0123456789ABCDEF").unwrap();
    assert_eq!(vram_bytes(&g, 0x400_0FF8, 8), b"01234567");
    assert_eq!(vram_bytes(&g, 0x500_0000, 8), b"89ABCDEF");
    assert_eq!(read(&g, 0xFF8, 16), b"0123456789ABCDEF");
    // 64 KiB and 2 MiB pages.
    g.bar1_write(0x1_0020, b"big").unwrap();
    assert_eq!(vram_bytes(&g, 0x700_0020, 3), b"big");
    g.bar1_write(0x21_2345, b"huge").unwrap();
    assert_eq!(vram_bytes(&g, 0x601_2345, 4), b"huge");
    assert_eq!(read(&g, 0x21_2345, 4), b"huge");
    assert_eq!(g.bar1_stats(), Bar1Stats::default());

    // Unmapped: reads 0xFF, writes dropped, both counted.
    assert_eq!(read(&g, 0x2000, 4), [0xFF; 4]);
    g.bar1_write(0x2000, b"lost").unwrap();
    let s = g.bar1_stats();
    assert_eq!((s.read_faults, s.write_faults), (1, 1));
    assert!(matches!(
        s.last_fault,
        Some(Bar1Fault::Walk {
            va: 0x2000,
            fault: WalkFault::InvalidPte {
                level: Level::SmallPageTable,
                ..
            }
        })
    ));
    // A read straddling a mapped and an unmapped page: only the unmapped part is 0xFF.
    let mut expect = b"89ABCDEF".to_vec();
    expect.extend([0xFF; 4]);
    let mut got = read(&g, 0x1000, 0x1004);
    got.drain(8..0x1000);
    assert_eq!(got, expect);
    // Read-only page: readable, writes dropped and counted.
    assert_eq!(read(&g, 0x3000, 9), b"read-only");
    g.bar1_write(0x3000, b"X").unwrap();
    assert_eq!(read(&g, 0x3000, 1), b"r");
    assert_eq!(
        g.bar1_stats().last_fault,
        Some(Bar1Fault::ReadOnly { va: 0x3000 })
    );

    // TLB: a PTE rewrite is not seen until an invalidate for this PDB is triggered.
    g.vram()
        .write(VramAddr::new(0x480_0000), b"NEWPAGE!")
        .unwrap();
    assert_eq!(read(&g, 0, 8), [0; 8]);
    t.map(0, 0x480_0000, PageSize::Small4K, 0);
    assert_eq!(
        translate_with(&g, VramAddr::new(t.root), 0).unwrap().pa,
        0x480_0000
    );
    assert_eq!(g.bar1_translate(0).unwrap().pa, 0x480_0000);
    assert_eq!(read(&g, 0, 8), [0; 8], "stale translation expected");
    invalidate(&g, t.root + 0x10_0000, false);
    assert_eq!(
        read(&g, 0, 8),
        [0; 8],
        "another PDB's invalidate must not flush"
    );
    invalidate(&g, t.root, false);
    assert_eq!(read(&g, 0, 8), b"NEWPAGE!");
    // ALL_PDB flushes whatever the PDB registers say.
    t.map(0, 0x400_0000, PageSize::Small4K, 0);
    assert_eq!(read(&g, 0, 8), b"NEWPAGE!");
    invalidate(&g, 0, true);
    assert_eq!(read(&g, 0, 8), [0; 8]);
    assert_eq!(g.registers().tlb_invalidations, 3);
    assert_eq!(g.tlb_stats().invalidations, 3);

    // Back to physical mode: BAR1 offset = VRAM address again.
    bind_bar1(&g, inst, 0, false);
    assert_eq!(read(&g, 0x400_0FF8, 8), b"01234567");
    // Reset: physical mode, TLB empty.
    bind_bar1(&g, inst, 0, true);
    assert_eq!(read(&g, 0x1000, 2), b"89");
    g.reset();
    assert_eq!(g.tlb_stats().entries, 0);
    assert_eq!(read(&g, 0x500_0000, 2), b"89");
}

#[test]
fn bar1_virtual_mode_turing() {
    bar1_virtual_mode("tu102-24g", 0x10_0000, 0x20_0000);
}

#[test]
fn bar1_virtual_mode_ampere() {
    bar1_virtual_mode("ga100-80g", 0x3_0000_0000, 0x20_0000);
}

#[test]
fn bar1_virtual_mode_hopper() {
    // Instance block above 4 GiB: exercises BAR1_BLOCK_HIGH_ADDR.
    bar1_virtual_mode("gh100-80g", 0x1_2340_0000, 0x20_0000);
}

#[test]
fn bar1_virtual_mode_blackwell() {
    bar1_virtual_mode("gb202-32g", 0x10_0000, 0x2_0000_0000);
}

#[test]
fn bar1_binding_faults() {
    for name in ["tu102-24g", "gh100-80g"] {
        let g = gpu(name);
        let format = format_of(&g);
        let inst = 0x10_0000;
        let mut t = Tables::new(g.vram(), format, 0x20_0000);
        t.map(0x5000, 0x100_0000, PageSize::Small4K, 0);
        let fault = |g: &EmulatedGpu| {
            assert_eq!(read(g, 0x5000, 2), [0xFF, 0xFF], "{name}");
            g.bar1_stats().last_fault.unwrap()
        };
        // Block register targets system memory.
        write_instance(&g, inst, t.root);
        bind_bar1(&g, inst, 2, true);
        assert_eq!(
            fault(&g),
            Bar1Fault::Instance(InstanceError::BlockNotInVideoMemory(2))
        );
        // Instance block beyond VRAM.
        let beyond = g.vram().size().next_multiple_of(1 << 12);
        bind_bar1(&g, beyond, 0, true);
        assert_eq!(
            fault(&g),
            Bar1Fault::Instance(InstanceError::OutsideVram(beyond))
        );
        // PDB target system memory.
        bind_bar1(&g, inst, 0, true);
        let lo = g.vram().read_u32(VramAddr::new(inst + 0x200)).unwrap();
        g.vram()
            .write_u32(VramAddr::new(inst + 0x200), lo | 2)
            .unwrap();
        assert_eq!(
            fault(&g),
            Bar1Fault::Instance(InstanceError::PdbNotInVideoMemory(2))
        );
        g.vram().write_u32(VramAddr::new(inst + 0x200), lo).unwrap();
        assert_eq!(read(&g, 0x5000, 2), [0, 0]);
        // ADR_LIMIT (0x208/0x20C): VAs above limit | 0xFFF fault.
        g.vram()
            .write_u32(VramAddr::new(inst + 0x208), 0x4000)
            .unwrap();
        assert_eq!(
            fault(&g),
            Bar1Fault::AboveAddressLimit {
                va: 0x5000,
                limit: 0x4000
            }
        );
        g.vram()
            .write_u32(VramAddr::new(inst + 0x208), 0x5000)
            .unwrap();
        assert_eq!(read(&g, 0x5000, 2), [0, 0]);
        // A page outside local video memory.
        t.set(0x5000, PageSize::Small4K, v2_or_v3_sys_pte(format));
        invalidate(&g, 0, true);
        assert!(matches!(
            fault(&g),
            Bar1Fault::NotVideoMemory {
                aperture: PteAperture::SystemCoherent,
                ..
            }
        ));
        // A PA beyond the end of VRAM.
        // (128 GiB - 4 KiB: above every profile's VRAM, and the top of the v2 VID field.)
        let far = (1 << 37) - 0x1000;
        t.map(0x5000, far, PageSize::Small4K, 0);
        invalidate(&g, t.root, false);
        assert_eq!(
            fault(&g),
            Bar1Fault::OutsideVram {
                va: 0x5000,
                pa: far
            }
        );
        // Sparse: reads 0 without a fault.
        let faults = g.bar1_stats().read_faults;
        let sparse = match format {
            V2 => V2_VOL,
            V3 => v3_pcf(1),
        };
        t.set(0x5000, PageSize::Small4K, sparse);
        invalidate(&g, 0, true);
        g.vram().write_u8(VramAddr::new(0x100_0000), 0x77).unwrap();
        assert_eq!(read(&g, 0x5000, 2), [0, 0]);
        g.bar1_write(0x5000, &[1]).unwrap();
        let s = g.bar1_stats();
        assert_eq!((s.read_faults, s.sparse_accesses), (faults, 2));
        assert_eq!(g.vram().read_u8(VramAddr::new(0x100_0000)).unwrap(), 0x77);
    }
}

fn v2_or_v3_sys_pte(format: MmuVersion) -> u64 {
    match format {
        V2 => v2_pte(0x1000, PTE_SYS_COH),
        V3 => v3_pte(0x1000, PTE_SYS_COH),
    }
}

#[test]
fn translate_with_uses_the_chip_format() {
    let g = gpu("gh100-80g");
    let mut t = Tables::new(g.vram(), V3, 0x40_0000);
    t.map(1 << 56 | 0x7000, 0x900_0000, PageSize::Small4K, 0);
    let tr = translate_with(&g, VramAddr::new(t.root), 1 << 56 | 0x7004).unwrap();
    assert_eq!(tr.pa, 0x900_0004);
    let g2 = gpu("tu102-24g");
    assert!(matches!(
        translate_with(&g2, VramAddr::new(0x1000), 1 << 56),
        Err(WalkFault::VaOutOfRange { bits: 49, .. })
    ));
}

#[test]
fn concurrent_bar1_access_and_invalidates() {
    let g = gpu("tu102-24g");
    let mut t = Tables::new(g.vram(), V2, 0x20_0000);
    for p in 0..64u64 {
        t.map(p << 12, 0x100_0000 + (p << 12), PageSize::Small4K, 0);
    }
    write_instance(&g, 0x10_0000, t.root);
    bind_bar1(&g, 0x10_0000, 0, true);
    let root = t.root;
    std::thread::scope(|s| {
        for th in 0..3u64 {
            let g = &g;
            s.spawn(move || {
                for i in 0..500u64 {
                    let off = (((i * 7 + th) % 64) << 12) | (th * 8);
                    g.bar1_write(off, &i.to_le_bytes()).unwrap();
                    let mut b = [0u8; 8];
                    g.bar1_read(off, &mut b).unwrap();
                    assert_eq!(u64::from_le_bytes(b), i);
                }
            });
        }
        s.spawn(|| {
            for i in 0..200 {
                invalidate(&g, root, i % 2 == 0);
            }
        });
    });
    assert_eq!(g.bar1_stats().read_faults, 0);
}

// --- property tests: garbage never panics ------------------------------------------------

/// Garbage qwords, biased towards entries that point inside the first 16 KiB in either
/// format's address encoding, so walks go deep.
fn garbage_entry() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        Just(0u64),
        // v2-style: address >> 4, random low byte.
        (0u64..0x4000, any::<u8>()).prop_map(|(a, low)| (a & !0xFF) >> 4 | u64::from(low)),
        // v3-style: address in place, random low byte.
        (0u64..0x4000, any::<u8>()).prop_map(|(a, low)| (a & !0xFF) | u64::from(low)),
        // Valid-looking leaf with a random address.
        any::<u64>().prop_map(|r| r | 1),
    ]
}

fn garbage_va() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        any::<u64>().prop_map(|v| v & ((1 << 49) - 1)),
        any::<u64>().prop_map(|v| v & ((1 << 57) - 1)),
        0u64..(1 << 24),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn garbage_tables_never_panic(
        entries in proptest::collection::vec(garbage_entry(), 2048),
        pdb in prop_oneof![0u64..0x4000, any::<u64>()],
        vas in proptest::collection::vec(garbage_va(), 1..16),
    ) {
        let v = vram(64 * KIB);
        for (i, e) in entries.iter().enumerate() {
            w64(&v, i as u64 * 8, *e);
        }
        let tlb = Tlb::with_sets(4);
        for format in [V2, V3] {
            for &va in &vas {
                let r = walk(&v, pdb, format, va);
                if let Ok(t) = r {
                    prop_assert_eq!(t.pa & 0xFFF, va & 0xFFF);
                    prop_assert_eq!(t.pa & (t.page_size.bytes() - 1), va & (t.page_size.bytes() - 1));
                }
                // Deterministic, and the TLB agrees with the walker.
                prop_assert_eq!(walk(&v, pdb, format, va), r);
                prop_assert_eq!(tlb.translate(&v, VramAddr::new(pdb), format, va), r);
                prop_assert_eq!(tlb.translate(&v, VramAddr::new(pdb), format, va), r);
            }
        }
    }

    #[test]
    fn corrupted_tables_never_panic(
        v3 in any::<bool>(),
        maps in proptest::collection::vec((0u64..(1 << 34), 0usize..3), 1..12),
        corruptions in proptest::collection::vec((0u64..0x4_0000, garbage_entry()), 1..24),
    ) {
        // Real tables (so walks go deep), then random qwords overwritten among them.
        let format = if v3 { V3 } else { V2 };
        let v = vram(64 * MIB);
        let mut t = Tables::new(&v, format, 0);
        // (No 512 MiB pages: the builder cannot put tables under a PD1 slot holding a PTE.
        // A 2 MiB PTE and tables in one PD0 slot are fine: the last write wins.)
        let sizes = [PageSize::Small4K, PageSize::Big64K, PageSize::Huge2M];
        let mut vas = Vec::new();
        for &(va, s) in &maps {
            let size = sizes[s];
            let va = va & !(size.bytes() - 1);
            t.map(va, 32 * MIB, size, 0);
            vas.push(va);
        }
        let tlb = Tlb::with_sets(2);
        for (i, &(off, val)) in corruptions.iter().enumerate() {
            w64(&v, off & !7, val);
            for &va in &vas {
                let va = va + i as u64 * 0x10;
                let r = walk(&v, t.root, format, va);
                prop_assert_eq!(walk(&v, t.root, format, va), r);
                tlb.invalidate(InvalidateScope::All);
                prop_assert_eq!(tlb.translate(&v, VramAddr::new(t.root), format, va), r);
            }
        }
    }

    #[test]
    fn garbage_bar1_state_never_panics(
        entries in proptest::collection::vec(garbage_entry(), 1024),
        block in any::<u32>(),
        high in any::<u32>(),
        hopper in any::<bool>(),
        accesses in proptest::collection::vec((0u64..(1 << 24), 0usize..0x2100, any::<bool>()), 1..8),
    ) {
        let g = gpu(if hopper { "gh100-80g" } else { "tu102-24g" });
        // Garbage in the first 8 KiB of VRAM, including an instance block at 0.
        for (i, e) in entries.iter().enumerate() {
            w64(g.vram(), i as u64 * 8, *e);
        }
        if hopper {
            reg(&g, BAR1_BLOCK_LOW_ADDR, u64::from(block));
            reg(&g, BAR1_BLOCK_HIGH_ADDR, u64::from(high));
        } else {
            reg(&g, BAR1_BLOCK, u64::from(block));
        }
        for (off, len, write) in accesses {
            let mut buf = vec![0x5Au8; len];
            if write {
                prop_assert!(g.bar1_write(off, &buf).is_ok());
            } else {
                prop_assert!(g.bar1_read(off, &mut buf).is_ok());
            }
        }
    }
}
