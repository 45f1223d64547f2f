//! MMU v3 entries (Hopper, Blackwell), gpu-facts 4.2 and 4.4 (RM gh100 `dev_mmu.h`).
//!
//! - PTE (64 bits): VALID 0, APERTURE 2:1, PCF 7:3, KIND 11:8, ADDRESS 51:12 (address
//!   bits in place, every aperture), PEER_ID 63:61. No comptagline, no separate
//!   VOL/PRIV/RO bits (they are folded into PCF).
//! - PDE (PD4..PD1): IS_PTE 0, APERTURE 2:1 (0 invalid), PCF 5:3, ADDRESS 51:12 in place.
//! - Dual PDE (PD0): big half IS_PTE 0, APERTURE_BIG 2:1, PCF_BIG 5:3, ADDRESS_BIG 51:8
//!   (256-byte aligned, in place); small half APERTURE_SMALL 66:65, PCF_SMALL 69:67,
//!   ADDRESS_SMALL 115:76 (address bits 51:12 in place in the upper qword). A 2 MiB page
//!   is a PTE (IS_PTE = VALID = 1) in the low qword, high qword 0.

use super::{check_addr, check_reserved, check_small, EntryError, PteTarget, TableTarget};
use crate::host_driver::addr::{SysAddr, VramAddr};
use crate::host_driver::regs::bitfield;

/// Width of the address fields: a 40-bit frame number, i.e. addresses below 2^52.
pub const ADDRESS_BITS: u32 = 40;
/// Width of ADDRESS_BIG: 44 bits of `addr >> 8`.
pub const ADDRESS_BIG_BITS: u32 = 44;

/// PTE KIND values (gpu-facts 4.4).
pub mod kind {
    /// Pitch (linear).
    pub const PITCH: u8 = 0;
    /// Generic memory.
    pub const GENERIC_MEMORY: u8 = 6;
    /// Invalid.
    pub const INVALID: u8 = 7;
}

/// PTE PCF values and bits (RM enumeration; gpu-facts 4.4 notes nova swaps two of them).
pub mod pte_pcf {
    /// Valid PTE, bit 0: uncached.
    pub const UNCACHED: u8 = 1 << 0;
    /// Valid PTE, bit 1: privileged.
    pub const PRIVILEGE: u8 = 1 << 1;
    /// Valid PTE, bit 2: read-only.
    pub const READ_ONLY: u8 = 1 << 2;
    /// Valid PTE, bit 3: no atomics.
    pub const NO_ATOMIC: u8 = 1 << 3;
    /// Valid PTE, bit 4: access counting disabled.
    pub const ACD: u8 = 1 << 4;
    /// Valid PTE: regular, read-write, atomics, cached.
    pub const REGULAR_RW_ATOMIC_CACHED: u8 = 0;
    /// Invalid PTE: invalid.
    pub const INVALID: u8 = 0;
    /// Invalid PTE: sparse.
    pub const SPARSE: u8 = 1;
    /// Invalid PTE: mapping nowhere.
    pub const MAPPING_NOWHERE: u8 = 2;
    /// Invalid PTE: no valid 4 KiB page.
    pub const NO_VALID_4KB_PAGE: u8 = 3;
}

/// PDE PCF bits (gpu-facts 4.4).
pub mod pde_pcf {
    /// Valid PDE, bit 0: uncached.
    pub const UNCACHED: u8 = 1 << 0;
    /// Valid PDE, bit 1: ATS not allowed.
    pub const NO_ATS: u8 = 1 << 1;
    /// Invalid PDE: sparse (1 or 3).
    pub const SPARSE: u8 = 1;
}

bitfield! {
    /// Raw bit layout of a v3 PTE.
    pub struct PteV3Bits(u64) {
        /// VALID.
        valid, with_valid, VALID: 0:0;
        /// APERTURE: 0 VIDEO_MEMORY, 1 PEER_MEMORY, 2 SYSTEM_COHERENT, 3 SYSTEM_NON_COHERENT.
        aperture, with_aperture, APERTURE: 2:1;
        /// PCF (see [`pte_pcf`]).
        pcf, with_pcf, PCF: 7:3;
        /// KIND (see [`kind`]).
        kind, with_kind, KIND: 11:8;
        /// Address >> 12 (bits 51:12 in place).
        address, with_address, ADDRESS: 51:12;
        /// Peer id (peer aperture).
        peer_id, with_peer_id, PEER_ID: 63:61;
    }
}

bitfield! {
    /// Raw bit layout of a v3 PDE (PD4..PD1).
    pub struct PdeV3Bits(u64) {
        /// Set: the slot holds a large-page PTE.
        is_pte, with_is_pte, IS_PTE: 0:0;
        /// APERTURE: 0 INVALID, 1 VIDEO_MEMORY, 2 SYSTEM_COHERENT, 3 SYSTEM_NON_COHERENT.
        aperture, with_aperture, APERTURE: 2:1;
        /// PCF (see [`pde_pcf`]).
        pcf, with_pcf, PCF: 5:3;
        /// Table address >> 12 (bits 51:12 in place).
        address, with_address, ADDRESS: 51:12;
    }
}

bitfield! {
    /// Raw bit layout of a v3 dual PDE (PD0).
    pub struct DualPdeV3Bits(u128) {
        /// Set: the low qword is a 2 MiB PTE.
        is_pte, with_is_pte, IS_PTE: 0:0;
        /// APERTURE_BIG (PDE encoding).
        aperture_big, with_aperture_big, APERTURE_BIG: 2:1;
        /// PCF_BIG.
        pcf_big, with_pcf_big, PCF_BIG: 5:3;
        /// Big-page table address >> 8 (bits 51:8 in place).
        address_big, with_address_big, ADDRESS_BIG: 51:8;
        /// APERTURE_SMALL (PDE encoding).
        aperture_small, with_aperture_small, APERTURE_SMALL: 66:65;
        /// PCF_SMALL.
        pcf_small, with_pcf_small, PCF_SMALL: 69:67;
        /// Small-page table address >> 12 (address bits 51:12 at 115:76).
        address_small, with_address_small, ADDRESS_SMALL: 115:76;
    }
}

/// A decoded v3 PTE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PteV3 {
    /// VALID.
    pub valid: bool,
    /// Aperture and address (the peer id only for the peer aperture).
    pub target: PteTarget,
    /// PCF (5 bits; meaning depends on VALID, see [`pte_pcf`]).
    pub pcf: u8,
    /// KIND (4 bits, see [`kind`]).
    pub kind: u8,
}

impl PteV3 {
    /// The all-zero PTE: invalid.
    pub const INVALID: PteV3 = PteV3 {
        valid: false,
        target: PteTarget::Vram(VramAddr::ZERO),
        pcf: pte_pcf::INVALID,
        kind: kind::PITCH,
    };

    /// A valid, read-write, cached, pitch-kind PTE for VRAM at `pa`.
    pub const fn vram(pa: VramAddr) -> PteV3 {
        PteV3 {
            valid: true,
            target: PteTarget::Vram(pa),
            pcf: pte_pcf::REGULAR_RW_ATOMIC_CACHED,
            kind: kind::PITCH,
        }
    }

    /// The raw entry.
    pub fn encode(&self) -> Result<u64, EntryError> {
        let address = check_addr("PTE", self.target.raw_addr(), 12, ADDRESS_BITS)?;
        let peer = match self.target {
            PteTarget::Peer { peer, .. } => check_small("PTE peer id", peer.into(), 3)?,
            _ => 0,
        };
        Ok(PteV3Bits::from_raw(0)
            .with_valid(self.valid.into())
            .with_aperture(self.target.pte_aperture())
            .with_pcf(check_small("PTE PCF", self.pcf.into(), 5)?)
            .with_kind(check_small("PTE KIND", self.kind.into(), 4)?)
            .with_address(address)
            .with_peer_id(peer)
            .raw())
    }

    /// Decodes `raw`, rejecting undefined bits (and a peer id without the peer aperture).
    pub fn decode(raw: u64) -> Result<PteV3, EntryError> {
        let b = PteV3Bits::from_raw(raw);
        let mut allowed = PteV3Bits::DEFINED_MASK;
        if b.aperture() != 1 {
            allowed &= !(PteV3Bits::PEER_ID.mask() as u64);
        }
        check_reserved(raw.into(), allowed.into())?;
        let addr = b.address() << 12;
        let target = match b.aperture() {
            0 => PteTarget::Vram(VramAddr::new(addr)),
            1 => PteTarget::Peer {
                peer: b.peer_id() as u8,
                addr: VramAddr::new(addr),
            },
            2 => PteTarget::SysCoherent(SysAddr::new(addr)),
            _ => PteTarget::SysNonCoherent(SysAddr::new(addr)),
        };
        Ok(PteV3 {
            valid: b.valid() != 0,
            target,
            pcf: b.pcf() as u8,
            kind: b.kind() as u8,
        })
    }
}

/// A decoded v3 PDE (PD4..PD1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PdeV3 {
    /// The next-level table, or `None` (aperture INVALID).
    pub table: Option<TableTarget>,
    /// PCF (3 bits, see [`pde_pcf`]).
    pub pcf: u8,
}

fn table_field(
    what: &'static str,
    table: Option<TableTarget>,
    shift: u32,
    bits: u32,
) -> Result<(u64, u64), EntryError> {
    Ok(match table {
        None => (0, 0),
        Some(t) => (
            t.pde_aperture(),
            check_addr(what, t.raw_addr(), shift, bits)?,
        ),
    })
}

impl PdeV3 {
    /// A PDE pointing at a table in VRAM.
    pub const fn vram(table: VramAddr) -> PdeV3 {
        PdeV3 {
            table: Some(TableTarget::Vram(table)),
            pcf: 0,
        }
    }

    /// The raw entry.
    pub fn encode(&self) -> Result<u64, EntryError> {
        let (aperture, address) = table_field("PDE", self.table, 12, ADDRESS_BITS)?;
        Ok(PdeV3Bits::from_raw(0)
            .with_aperture(aperture)
            .with_pcf(check_small("PDE PCF", self.pcf.into(), 3)?)
            .with_address(address)
            .raw())
    }

    /// Decodes `raw`; a slot with IS_PTE set holds a PTE and is an error here.
    pub fn decode(raw: u64) -> Result<PdeV3, EntryError> {
        let b = PdeV3Bits::from_raw(raw);
        if b.is_pte() != 0 {
            return Err(EntryError::IsPte { raw });
        }
        let mut allowed = PdeV3Bits::APERTURE.mask() | PdeV3Bits::PCF.mask();
        if b.aperture() != 0 {
            allowed |= PdeV3Bits::ADDRESS.mask();
        }
        check_reserved(raw.into(), allowed)?;
        Ok(PdeV3 {
            table: TableTarget::from_pde_aperture(b.aperture(), b.address() << 12),
            pcf: b.pcf() as u8,
        })
    }
}

/// A decoded v3 dual PDE (both halves pointing at tables, or absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DualPdeV3 {
    /// Big-page (64 KiB) table, 256-byte aligned.
    pub big: Option<TableTarget>,
    /// PCF_BIG (3 bits).
    pub pcf_big: u8,
    /// Small-page (4 KiB) table, 4 KiB aligned.
    pub small: Option<TableTarget>,
    /// PCF_SMALL (3 bits).
    pub pcf_small: u8,
}

/// A decoded v3 PD0 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pd0EntryV3 {
    /// Pointers to the big- and/or small-page tables.
    Tables(DualPdeV3),
    /// A 2 MiB page: a valid PTE in the low qword, high qword zero.
    Page(PteV3),
}

impl Pd0EntryV3 {
    /// The empty entry (both halves invalid).
    pub const EMPTY: Pd0EntryV3 = Pd0EntryV3::Tables(DualPdeV3 {
        big: None,
        pcf_big: 0,
        small: None,
        pcf_small: 0,
    });

    /// The raw 128-bit entry (low qword first in memory).
    pub fn encode(&self) -> Result<u128, EntryError> {
        match self {
            Pd0EntryV3::Page(pte) => {
                if !pte.valid {
                    return Err(EntryError::Unencodable(
                        "a 2 MiB PTE in PD0 must be valid (IS_PTE is bit 0)",
                    ));
                }
                Ok(pte.encode()?.into())
            }
            Pd0EntryV3::Tables(d) => {
                let (ap_big, big) = table_field("dual PDE big", d.big, 8, ADDRESS_BIG_BITS)?;
                let (ap_small, small) = table_field("dual PDE small", d.small, 12, ADDRESS_BITS)?;
                Ok(DualPdeV3Bits::from_raw(0)
                    .with_aperture_big(ap_big.into())
                    .with_pcf_big(check_small("PCF_BIG", d.pcf_big.into(), 3)?.into())
                    .with_address_big(big.into())
                    .with_aperture_small(ap_small.into())
                    .with_pcf_small(check_small("PCF_SMALL", d.pcf_small.into(), 3)?.into())
                    .with_address_small(small.into())
                    .raw())
            }
        }
    }

    /// Decodes `raw`, rejecting undefined bits.
    pub fn decode(raw: u128) -> Result<Pd0EntryV3, EntryError> {
        type B = DualPdeV3Bits;
        let b = B::from_raw(raw);
        if b.is_pte() != 0 {
            check_reserved(raw, u128::from(u64::MAX))?;
            return Ok(Pd0EntryV3::Page(PteV3::decode(raw as u64)?));
        }
        let mut allowed = B::APERTURE_BIG.mask()
            | B::PCF_BIG.mask()
            | B::APERTURE_SMALL.mask()
            | B::PCF_SMALL.mask();
        if b.aperture_big() != 0 {
            allowed |= B::ADDRESS_BIG.mask();
        }
        if b.aperture_small() != 0 {
            allowed |= B::ADDRESS_SMALL.mask();
        }
        check_reserved(raw, allowed)?;
        Ok(Pd0EntryV3::Tables(DualPdeV3 {
            big: TableTarget::from_pde_aperture(
                b.aperture_big() as u64,
                (b.address_big() as u64) << 8,
            ),
            pcf_big: b.pcf_big() as u8,
            small: TableTarget::from_pde_aperture(
                b.aperture_small() as u64,
                (b.address_small() as u64) << 12,
            ),
            pcf_small: b.pcf_small() as u8,
        }))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::host_driver::page_table::strategies::{pte_target, table_target};

    #[test]
    fn hand_computed_patterns() {
        // VRAM PTE: address bits in place, valid bit 0, aperture 0.
        let pte = PteV3::vram(VramAddr::new(0x12_3456_7000));
        assert_eq!(pte.encode().unwrap(), 0x12_3456_7000 | 1);
        // Sys non-coherent (aperture 3 -> 0x6), PCF read-only|no-atomic (0xC << 3 = 0x60),
        // kind generic (6 << 8).
        let pte = PteV3 {
            valid: true,
            target: PteTarget::SysNonCoherent(SysAddr::new(0xF_0000_0000_1000)),
            pcf: pte_pcf::READ_ONLY | pte_pcf::NO_ATOMIC,
            kind: kind::GENERIC_MEMORY,
        };
        assert_eq!(
            pte.encode().unwrap(),
            0xF_0000_0000_1000 | 0x600 | 0x60 | 0x6 | 1
        );
        // Peer 5: PEER_ID at 63:61.
        let pte = PteV3 {
            target: PteTarget::Peer {
                peer: 5,
                addr: VramAddr::new(0x2000),
            },
            ..PteV3::vram(VramAddr::ZERO)
        };
        assert_eq!(pte.encode().unwrap(), (5 << 61) | 0x2000 | 0x2 | 1);
        // PDE: VRAM table at 0x1_2345_6000 -> aperture 1 (0x2), address in place.
        assert_eq!(
            PdeV3::vram(VramAddr::new(0x1_2345_6000)).encode().unwrap(),
            0x1_2345_6000 | 0x2
        );
        // Dual PDE: big at 0x7_0100 in place in the low qword; small at 0x9000: bits 51:12
        // of the address land at 115:76, i.e. (addr >> 12) << 12 in the upper qword.
        let d = Pd0EntryV3::Tables(DualPdeV3 {
            big: Some(TableTarget::Vram(VramAddr::new(0x7_0100))),
            small: Some(TableTarget::SysCoherent(SysAddr::new(0x9000))),
            ..Default::default()
        });
        let raw = d.encode().unwrap();
        assert_eq!(raw as u64, 0x7_0100 | 0x2);
        assert_eq!((raw >> 64) as u64, 0x9000 | (2 << 1));
        let huge = Pd0EntryV3::Page(PteV3::vram(VramAddr::new(0x20_0000)));
        assert_eq!(huge.encode().unwrap(), 0x20_0001);
    }

    #[test]
    fn encode_and_decode_errors() {
        assert!(matches!(
            PteV3::vram(VramAddr::new(1 << 52)).encode(),
            Err(EntryError::AddressTooWide { .. })
        ));
        assert!(matches!(
            PteV3 {
                pcf: 32,
                ..PteV3::INVALID
            }
            .encode(),
            Err(EntryError::FieldTooWide { .. })
        ));
        assert!(matches!(
            PteV3::decode(1 << 55),
            Err(EntryError::ReservedBits { .. })
        ));
        // Peer id without the peer aperture.
        assert!(matches!(
            PteV3::decode(1 << 62),
            Err(EntryError::ReservedBits { .. })
        ));
        assert_eq!(PdeV3::decode(3), Err(EntryError::IsPte { raw: 3 }));
        assert!(matches!(
            PdeV3::decode(0x1000),
            Err(EntryError::ReservedBits { .. })
        ));
        assert!(Pd0EntryV3::Page(PteV3::INVALID).encode().is_err());
    }

    fn pte_v3() -> impl Strategy<Value = PteV3> {
        (
            any::<bool>(),
            pte_target(ADDRESS_BITS + 12, ADDRESS_BITS + 12),
            0u8..32,
            0u8..16,
        )
            .prop_map(|(valid, target, pcf, kind)| PteV3 {
                valid,
                target,
                pcf,
                kind,
            })
    }

    fn pd0_v3() -> impl Strategy<Value = Pd0EntryV3> {
        prop_oneof![
            pte_v3().prop_map(|p| Pd0EntryV3::Page(PteV3 { valid: true, ..p })),
            (
                proptest::option::of(table_target(ADDRESS_BIG_BITS + 8, ADDRESS_BIG_BITS + 8, 8)),
                0u8..8,
                proptest::option::of(table_target(ADDRESS_BITS + 12, ADDRESS_BITS + 12, 12)),
                0u8..8,
            )
                .prop_map(|(big, pcf_big, small, pcf_small)| Pd0EntryV3::Tables(
                    DualPdeV3 {
                        big,
                        pcf_big,
                        small,
                        pcf_small
                    }
                )),
        ]
    }

    proptest! {
        #[test]
        fn pte_round_trip(p in pte_v3()) {
            prop_assert_eq!(PteV3::decode(p.encode().unwrap()).unwrap(), p);
        }

        #[test]
        fn pte_raw_round_trip(
            raw in any::<u64>(),
            mask in prop::sample::select(vec![
                u64::MAX,
                PteV3Bits::DEFINED_MASK,
                PteV3Bits::DEFINED_MASK & !(PteV3Bits::PEER_ID.mask() as u64),
            ]),
        ) {
            let raw = raw & mask;
            if let Ok(p) = PteV3::decode(raw) {
                prop_assert_eq!(p.encode().unwrap(), raw);
            }
        }

        #[test]
        fn pde_round_trip(
            table in proptest::option::of(table_target(ADDRESS_BITS + 12, ADDRESS_BITS + 12, 12)),
            pcf in 0u8..8,
        ) {
            let p = PdeV3 { table, pcf };
            let raw = p.encode().unwrap();
            prop_assert_eq!(raw & 1, 0);
            prop_assert_eq!(PdeV3::decode(raw).unwrap(), p);
        }

        #[test]
        fn pde_raw_round_trip(
            raw in any::<u64>(),
            mask in prop::sample::select(vec![
                u64::MAX,
                PdeV3Bits::DEFINED_MASK & !1,
                PdeV3Bits::DEFINED_MASK & !1 & !(PdeV3Bits::ADDRESS.mask() as u64),
            ]),
        ) {
            let raw = raw & mask;
            if let Ok(p) = PdeV3::decode(raw) {
                prop_assert_eq!(p.encode().unwrap(), raw);
            }
        }

        #[test]
        fn pd0_round_trip(e in pd0_v3()) {
            prop_assert_eq!(Pd0EntryV3::decode(e.encode().unwrap()).unwrap(), e);
        }

        #[test]
        fn pd0_raw_round_trip(
            lo in any::<u64>(),
            hi in any::<u64>(),
            zero_hi in any::<bool>(),
            mask in prop::sample::select(vec![
                u128::MAX,
                DualPdeV3Bits::DEFINED_MASK,
                DualPdeV3Bits::DEFINED_MASK & !1,
                DualPdeV3Bits::DEFINED_MASK
                    & !1
                    & !DualPdeV3Bits::ADDRESS_BIG.mask()
                    & !DualPdeV3Bits::ADDRESS_SMALL.mask(),
                u128::from(PteV3Bits::DEFINED_MASK & !(PteV3Bits::PEER_ID.mask() as u64)),
            ]),
        ) {
            let raw = (u128::from(lo) | (u128::from(if zero_hi { 0 } else { hi }) << 64)) & mask;
            if let Ok(e) = Pd0EntryV3::decode(raw) {
                prop_assert_eq!(e.encode().unwrap(), raw);
            }
        }
    }
}
