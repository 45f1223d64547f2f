//! MMU v2 entries (Pascal–Ada; used here for Turing, Ampere, Ada), gpu-facts 4.2–4.3
//! (RM `dev_mmu.h` of gp100/tu102).
//!
//! - PTE (64 bits): VALID 0, APERTURE 2:1, VOL 3, ENCRYPTED 4, PRIVILEGE 5, READ_ONLY 6,
//!   ATOMIC_DISABLE 7, ADDRESS_VID 32:8 (= addr >> 12) with PEER 35:33 for the peer
//!   aperture, or ADDRESS_SYS 53:8; COMPTAGLINE 55:36 (Turing layout); KIND 63:56.
//! - PDE (PD3/PD2/PD1, 64 bits): APERTURE 2:1 (0 = not present), VOL 3, address = table
//!   addr >> 12 at 32:8 (VID) / 53:8 (SYS). Bit 0 set means the slot holds a PTE and
//!   bit 5 is NO_ATS — both **unconfirmed** for v2 (nova names them; the published RM v2
//!   headers do not).
//! - Dual PDE (PD0, 128 bits): big half in the low qword (APERTURE_BIG 2:1, VOL_BIG 3,
//!   ADDRESS_BIG = addr >> 8 at 32:4 VID / 53:4 SYS); small half in the high qword
//!   (APERTURE_SMALL 66:65, VOL_SMALL 67, ADDRESS_SMALL = addr >> 12 at 96:72 VID /
//!   117:72 SYS). A 2 MiB page is a PTE (VALID = bit 0 = 1) in the low qword, high qword 0.

use super::{check_addr, check_reserved, check_small, EntryError, PteTarget, TableTarget};
use crate::host_driver::addr::{SysAddr, VramAddr};
use crate::host_driver::regs::bitfield;

/// Width of the VID address fields (PTE, PDE, small half): 25 bits of `addr >> 12`,
/// i.e. VRAM addresses below 128 GiB.
pub const ADDRESS_VID_BITS: u32 = 25;
/// Width of the SYS address fields (PTE, PDE, small half): 46 bits of `addr >> 12`.
pub const ADDRESS_SYS_BITS: u32 = 46;
/// Width of ADDRESS_BIG_VID: 29 bits of `addr >> 8`.
pub const ADDRESS_BIG_VID_BITS: u32 = 29;
/// Width of ADDRESS_BIG_SYS: 50 bits of `addr >> 8`.
pub const ADDRESS_BIG_SYS_BITS: u32 = 50;
/// KIND value for pitch (linear) memory.
pub const KIND_PITCH: u8 = 0x00;
/// KIND value marking an invalid kind.
pub const KIND_INVALID: u8 = 0x07;

bitfield! {
    /// Raw bit layout of a v2 PTE.
    pub struct PteV2Bits(u64) {
        /// VALID.
        valid, with_valid, VALID: 0:0;
        /// APERTURE: 0 VIDEO_MEMORY, 1 PEER_MEMORY, 2 SYSTEM_COHERENT, 3 SYSTEM_NON_COHERENT.
        aperture, with_aperture, APERTURE: 2:1;
        /// VOL (volatile / L2 bypass).
        vol, with_vol, VOL: 3:3;
        /// ENCRYPTED (read-only per header).
        encrypted, with_encrypted, ENCRYPTED: 4:4;
        /// PRIVILEGE.
        privilege, with_privilege, PRIVILEGE: 5:5;
        /// READ_ONLY.
        read_only, with_read_only, READ_ONLY: 6:6;
        /// ATOMIC_DISABLE.
        atomic_disable, with_atomic_disable, ATOMIC_DISABLE: 7:7;
        /// ADDRESS_VID = VRAM addr >> 12 (video and peer apertures).
        address_vid, with_address_vid, ADDRESS_VID: 32:8;
        /// Peer index (peer aperture).
        peer, with_peer, PEER: 35:33;
        /// ADDRESS_SYS = system addr >> 12 (system apertures).
        address_sys, with_address_sys, ADDRESS_SYS: 53:8;
        /// COMPTAGLINE (Turing layout 55:36; Pascal had 53:36). Video/peer apertures only.
        comptagline, with_comptagline, COMPTAGLINE: 55:36;
        /// KIND (0x00 pitch, 0x07 invalid).
        kind, with_kind, KIND: 63:56;
    }
}

bitfield! {
    /// Raw bit layout of a v2 PDE (PD3, PD2, PD1).
    pub struct PdeV2Bits(u64) {
        /// Set: the slot holds a PTE, not a table pointer (**unconfirmed** for v2).
        is_pte, with_is_pte, IS_PTE: 0:0;
        /// APERTURE: 0 INVALID, 1 VIDEO_MEMORY, 2 SYSTEM_COHERENT, 3 SYSTEM_NON_COHERENT.
        aperture, with_aperture, APERTURE: 2:1;
        /// VOL.
        vol, with_vol, VOL: 3:3;
        /// NO_ATS (**unconfirmed**: named by nova, not in the published RM v2 headers).
        no_ats, with_no_ats, NO_ATS: 5:5;
        /// ADDRESS_VID = table addr >> 12.
        address_vid, with_address_vid, ADDRESS_VID: 32:8;
        /// ADDRESS_SYS = table addr >> 12.
        address_sys, with_address_sys, ADDRESS_SYS: 53:8;
    }
}

bitfield! {
    /// Raw bit layout of a v2 dual PDE (PD0).
    pub struct DualPdeV2Bits(u128) {
        /// Set: the low qword is a 2 MiB PTE.
        is_pte, with_is_pte, IS_PTE: 0:0;
        /// APERTURE_BIG (PDE encoding).
        aperture_big, with_aperture_big, APERTURE_BIG: 2:1;
        /// VOL_BIG.
        vol_big, with_vol_big, VOL_BIG: 3:3;
        /// ADDRESS_BIG_VID = big-page table addr >> 8.
        address_big_vid, with_address_big_vid, ADDRESS_BIG_VID: 32:4;
        /// ADDRESS_BIG_SYS = big-page table addr >> 8.
        address_big_sys, with_address_big_sys, ADDRESS_BIG_SYS: 53:4;
        /// APERTURE_SMALL (PDE encoding).
        aperture_small, with_aperture_small, APERTURE_SMALL: 66:65;
        /// VOL_SMALL.
        vol_small, with_vol_small, VOL_SMALL: 67:67;
        /// ADDRESS_SMALL_VID = small-page table addr >> 12.
        address_small_vid, with_address_small_vid, ADDRESS_SMALL_VID: 96:72;
        /// ADDRESS_SMALL_SYS = small-page table addr >> 12.
        address_small_sys, with_address_small_sys, ADDRESS_SMALL_SYS: 117:72;
    }
}

/// A decoded v2 PTE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PteV2 {
    /// VALID.
    pub valid: bool,
    /// Aperture and address.
    pub target: PteTarget,
    /// VOL (an invalid PTE with VOL is sparse).
    pub vol: bool,
    /// ENCRYPTED.
    pub encrypted: bool,
    /// PRIVILEGE.
    pub privileged: bool,
    /// READ_ONLY.
    pub read_only: bool,
    /// ATOMIC_DISABLE.
    pub atomic_disable: bool,
    /// COMPTAGLINE (20 bits; must be 0 with a system aperture, where the field overlaps
    /// the address).
    pub comptagline: u32,
    /// KIND.
    pub kind: u8,
}

impl PteV2 {
    /// The all-zero PTE: invalid (not sparse).
    pub const INVALID: PteV2 = PteV2 {
        valid: false,
        target: PteTarget::Vram(VramAddr::ZERO),
        vol: false,
        encrypted: false,
        privileged: false,
        read_only: false,
        atomic_disable: false,
        comptagline: 0,
        kind: KIND_PITCH,
    };

    /// A valid, read-write, cached, pitch-kind PTE for VRAM at `pa`.
    pub const fn vram(pa: VramAddr) -> PteV2 {
        PteV2 {
            valid: true,
            target: PteTarget::Vram(pa),
            ..PteV2::INVALID
        }
    }

    /// The raw entry.
    pub fn encode(&self) -> Result<u64, EntryError> {
        let mut b = PteV2Bits::from_raw(0)
            .with_valid(self.valid.into())
            .with_aperture(self.target.pte_aperture())
            .with_vol(self.vol.into())
            .with_encrypted(self.encrypted.into())
            .with_privilege(self.privileged.into())
            .with_read_only(self.read_only.into())
            .with_atomic_disable(self.atomic_disable.into())
            .with_kind(self.kind.into());
        match self.target {
            PteTarget::Vram(a) => {
                b = b.with_address_vid(check_addr("PTE VID", a.raw(), 12, ADDRESS_VID_BITS)?);
            }
            PteTarget::Peer { peer, addr } => {
                b = b
                    .with_address_vid(check_addr("PTE peer", addr.raw(), 12, ADDRESS_VID_BITS)?)
                    .with_peer(check_small("PTE peer index", peer.into(), 3)?);
            }
            PteTarget::SysCoherent(a) | PteTarget::SysNonCoherent(a) => {
                if self.comptagline != 0 {
                    return Err(EntryError::Unencodable(
                        "COMPTAGLINE overlaps ADDRESS_SYS: it must be 0 with a system aperture",
                    ));
                }
                b = b.with_address_sys(check_addr("PTE SYS", a.raw(), 12, ADDRESS_SYS_BITS)?);
            }
        }
        if !self.target.is_sys() {
            b = b.with_comptagline(check_small(
                "COMPTAGLINE",
                self.comptagline.into(),
                PteV2Bits::COMPTAGLINE.width(),
            )?);
        }
        Ok(b.raw())
    }

    /// Decodes `raw`, rejecting bits the layout does not define for its aperture (so
    /// `encode(decode(raw)) == raw` whenever decoding succeeds).
    pub fn decode(raw: u64) -> Result<PteV2, EntryError> {
        let b = PteV2Bits::from_raw(raw);
        let flag = |v: u64| v != 0;
        let (target, comptagline) = match b.aperture() {
            0 | 1 => {
                let addr = VramAddr::new(b.address_vid() << 12);
                let target = if b.aperture() == 0 {
                    check_reserved(raw.into(), (!PteV2Bits::PEER.mask()) & u128::from(u64::MAX))?;
                    PteTarget::Vram(addr)
                } else {
                    PteTarget::Peer {
                        peer: b.peer() as u8,
                        addr,
                    }
                };
                (target, b.comptagline() as u32)
            }
            ap => {
                // Bits 55:54 lie above ADDRESS_SYS and below KIND: undefined here.
                let allowed = !(PteV2Bits::COMPTAGLINE.mask() & !PteV2Bits::ADDRESS_SYS.mask());
                check_reserved(raw.into(), allowed & u128::from(u64::MAX))?;
                let addr = SysAddr::new(b.address_sys() << 12);
                let target = if ap == 2 {
                    PteTarget::SysCoherent(addr)
                } else {
                    PteTarget::SysNonCoherent(addr)
                };
                (target, 0)
            }
        };
        Ok(PteV2 {
            valid: flag(b.valid()),
            target,
            vol: flag(b.vol()),
            encrypted: flag(b.encrypted()),
            privileged: flag(b.privilege()),
            read_only: flag(b.read_only()),
            atomic_disable: flag(b.atomic_disable()),
            comptagline,
            kind: b.kind() as u8,
        })
    }
}

/// A decoded v2 PDE (PD3, PD2, PD1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PdeV2 {
    /// The next-level table, or `None` (aperture INVALID).
    pub table: Option<TableTarget>,
    /// VOL (with no table: sparse).
    pub vol: bool,
    /// NO_ATS (**unconfirmed**).
    pub no_ats: bool,
}

/// Encodes a table pointer's aperture and address into the given VID/SYS fields.
fn table_fields(
    what: &'static str,
    table: Option<TableTarget>,
    shift: u32,
    vid_bits: u32,
    sys_bits: u32,
) -> Result<(u64, u64), EntryError> {
    Ok(match table {
        None => (0, 0),
        Some(t @ TableTarget::Vram(a)) => (
            t.pde_aperture(),
            check_addr(what, a.raw(), shift, vid_bits)?,
        ),
        Some(t) => (
            t.pde_aperture(),
            check_addr(what, t.raw_addr(), shift, sys_bits)?,
        ),
    })
}

impl PdeV2 {
    /// A PDE pointing at a table in VRAM.
    pub const fn vram(table: VramAddr) -> PdeV2 {
        PdeV2 {
            table: Some(TableTarget::Vram(table)),
            vol: false,
            no_ats: false,
        }
    }

    /// The raw entry.
    pub fn encode(&self) -> Result<u64, EntryError> {
        let (aperture, field) =
            table_fields("PDE", self.table, 12, ADDRESS_VID_BITS, ADDRESS_SYS_BITS)?;
        // VID and SYS fields share their low bits; the wider SYS setter covers both.
        Ok(PdeV2Bits::from_raw(0)
            .with_aperture(aperture)
            .with_vol(self.vol.into())
            .with_no_ats(self.no_ats.into())
            .with_address_sys(field)
            .raw())
    }

    /// Decodes `raw`; a slot with bit 0 set holds a PTE and is an error here.
    pub fn decode(raw: u64) -> Result<PdeV2, EntryError> {
        let b = PdeV2Bits::from_raw(raw);
        if b.is_pte() != 0 {
            return Err(EntryError::IsPte { raw });
        }
        let flags = PdeV2Bits::APERTURE.mask() | PdeV2Bits::VOL.mask() | PdeV2Bits::NO_ATS.mask();
        let address = match b.aperture() {
            0 => 0,
            1 => PdeV2Bits::ADDRESS_VID.mask(),
            _ => PdeV2Bits::ADDRESS_SYS.mask(),
        };
        check_reserved(raw.into(), flags | address)?;
        let field = if b.aperture() == 1 {
            b.address_vid()
        } else {
            b.address_sys()
        };
        Ok(PdeV2 {
            table: TableTarget::from_pde_aperture(b.aperture(), field << 12),
            vol: b.vol() != 0,
            no_ats: b.no_ats() != 0,
        })
    }
}

/// A decoded v2 dual PDE (both halves pointing at tables, or absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DualPdeV2 {
    /// Big-page (64 KiB) table, 256-byte aligned.
    pub big: Option<TableTarget>,
    /// VOL_BIG (with no big table: sparse).
    pub vol_big: bool,
    /// Small-page (4 KiB) table, 4 KiB aligned.
    pub small: Option<TableTarget>,
    /// VOL_SMALL.
    pub vol_small: bool,
}

/// A decoded v2 PD0 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pd0EntryV2 {
    /// Pointers to the big- and/or small-page tables.
    Tables(DualPdeV2),
    /// A 2 MiB page: a valid PTE in the low qword, high qword zero.
    Page(PteV2),
}

impl Pd0EntryV2 {
    /// The empty entry (both halves invalid).
    pub const EMPTY: Pd0EntryV2 = Pd0EntryV2::Tables(DualPdeV2 {
        big: None,
        vol_big: false,
        small: None,
        vol_small: false,
    });

    /// The raw 128-bit entry (low qword first in memory).
    pub fn encode(&self) -> Result<u128, EntryError> {
        match self {
            Pd0EntryV2::Page(pte) => {
                if !pte.valid {
                    return Err(EntryError::Unencodable(
                        "a 2 MiB PTE in PD0 must be valid (bit 0 tells PTE from dual PDE)",
                    ));
                }
                Ok(pte.encode()?.into())
            }
            Pd0EntryV2::Tables(d) => {
                let (ap_big, big) = table_fields(
                    "dual PDE big",
                    d.big,
                    8,
                    ADDRESS_BIG_VID_BITS,
                    ADDRESS_BIG_SYS_BITS,
                )?;
                let (ap_small, small) = table_fields(
                    "dual PDE small",
                    d.small,
                    12,
                    ADDRESS_VID_BITS,
                    ADDRESS_SYS_BITS,
                )?;
                Ok(DualPdeV2Bits::from_raw(0)
                    .with_aperture_big(ap_big.into())
                    .with_vol_big(d.vol_big.into())
                    .with_address_big_sys(big.into())
                    .with_aperture_small(ap_small.into())
                    .with_vol_small(d.vol_small.into())
                    .with_address_small_sys(small.into())
                    .raw())
            }
        }
    }

    /// Decodes `raw`, rejecting undefined bits.
    pub fn decode(raw: u128) -> Result<Pd0EntryV2, EntryError> {
        let b = DualPdeV2Bits::from_raw(raw);
        if b.is_pte() != 0 {
            check_reserved(raw, u128::from(u64::MAX))?;
            return Ok(Pd0EntryV2::Page(PteV2::decode(raw as u64)?));
        }
        type B = DualPdeV2Bits;
        let mut allowed = B::APERTURE_BIG.mask()
            | B::VOL_BIG.mask()
            | B::APERTURE_SMALL.mask()
            | B::VOL_SMALL.mask();
        allowed |= match b.aperture_big() {
            0 => 0,
            1 => B::ADDRESS_BIG_VID.mask(),
            _ => B::ADDRESS_BIG_SYS.mask(),
        };
        allowed |= match b.aperture_small() {
            0 => 0,
            1 => B::ADDRESS_SMALL_VID.mask(),
            _ => B::ADDRESS_SMALL_SYS.mask(),
        };
        check_reserved(raw, allowed)?;
        let big = if b.aperture_big() == 1 {
            b.address_big_vid()
        } else {
            b.address_big_sys()
        };
        let small = if b.aperture_small() == 1 {
            b.address_small_vid()
        } else {
            b.address_small_sys()
        };
        Ok(Pd0EntryV2::Tables(DualPdeV2 {
            big: TableTarget::from_pde_aperture(b.aperture_big() as u64, (big as u64) << 8),
            vol_big: b.vol_big() != 0,
            small: TableTarget::from_pde_aperture(b.aperture_small() as u64, (small as u64) << 12),
            vol_small: b.vol_small() != 0,
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
        // gpu-facts 4.3: a VRAM PTE for 0x1234_5000 = valid | aperture 0 | (pa >> 12) << 8.
        let pte = PteV2::vram(VramAddr::new(0x1234_5000));
        assert_eq!(pte.encode().unwrap(), (0x12345 << 8) | 1);
        // "address field = physical_address >> 4".
        assert_eq!(pte.encode().unwrap() & !0xFF, 0x1234_5000 >> 4);
        // Sys coherent, read-only, kind 0xFE.
        let pte = PteV2 {
            target: PteTarget::SysCoherent(SysAddr::new(0xF_FFFF_F000)),
            read_only: true,
            kind: 0xFE,
            ..PteV2::vram(VramAddr::ZERO)
        };
        assert_eq!(
            pte.encode().unwrap(),
            0xFE00_0000_0000_0000 | (0xF_FFFF_F000 >> 4) | 0x40 | 0x4 | 1
        );
        // PDE to a VRAM table at 0x2000: aperture 1 (bits 2:1 = 0b01 -> 0x2), addr >> 4.
        assert_eq!(
            PdeV2::vram(VramAddr::new(0x2000)).encode().unwrap(),
            0x200 | 0x2
        );
        // nouveau's UPDATE_BAR_PDE value for a PD: (pt_addr >> 4) | 2.
        let pd = VramAddr::new(0x7_6543_2000);
        assert_eq!(PdeV2::vram(pd).encode().unwrap(), (pd.raw() >> 4) | 2);
        // Dual PDE: big table at 0x1_0100 (256-byte aligned) in VRAM, small at 0x7000 in
        // VRAM: low = (0x10100 >> 8) << 4 | 2; high = (0x7000 >> 12) << 8 | 2.
        let d = Pd0EntryV2::Tables(DualPdeV2 {
            big: Some(TableTarget::Vram(VramAddr::new(0x1_0100))),
            small: Some(TableTarget::Vram(VramAddr::new(0x7000))),
            ..Default::default()
        });
        let raw = d.encode().unwrap();
        assert_eq!(raw as u64, (0x1_0100 >> 4) | 2);
        assert_eq!((raw >> 64) as u64, (0x7000 >> 4) | 2);
        // 2 MiB page in the low qword, high qword 0.
        let huge = Pd0EntryV2::Page(PteV2::vram(VramAddr::new(0x4020_0000)));
        assert_eq!(huge.encode().unwrap(), ((0x4020_0000u128 >> 4) | 1));
        assert_eq!(Pd0EntryV2::EMPTY.encode().unwrap(), 0);
    }

    #[test]
    fn encode_errors() {
        let too_far = PteV2::vram(VramAddr::new(1 << 37));
        assert!(matches!(
            too_far.encode(),
            Err(EntryError::AddressTooWide { .. })
        ));
        let misaligned = PteV2::vram(VramAddr::new(0x1800));
        assert!(matches!(
            misaligned.encode(),
            Err(EntryError::Misaligned { .. })
        ));
        let sys_ctl = PteV2 {
            target: PteTarget::SysCoherent(SysAddr::new(0)),
            comptagline: 1,
            ..PteV2::INVALID
        };
        assert!(matches!(sys_ctl.encode(), Err(EntryError::Unencodable(_))));
        let big_misaligned = Pd0EntryV2::Tables(DualPdeV2 {
            big: Some(TableTarget::Vram(VramAddr::new(0x80))),
            ..Default::default()
        });
        assert!(matches!(
            big_misaligned.encode(),
            Err(EntryError::Misaligned { .. })
        ));
        assert!(Pd0EntryV2::Page(PteV2::INVALID).encode().is_err());
        assert_eq!(PdeV2::decode(1), Err(EntryError::IsPte { raw: 1 }));
        // VID aperture with bits above the VID address field.
        assert!(matches!(
            PdeV2::decode(2 | (1 << 40)),
            Err(EntryError::ReservedBits { .. })
        ));
        // Invalid PDE with address bits.
        assert!(matches!(
            PdeV2::decode(0x100),
            Err(EntryError::ReservedBits { .. })
        ));
    }

    fn pte_v2() -> impl Strategy<Value = PteV2> {
        (
            any::<[bool; 6]>(),
            pte_target(ADDRESS_VID_BITS + 12, ADDRESS_SYS_BITS + 12),
            0u32..(1 << 20),
            any::<u8>(),
        )
            .prop_map(|(f, target, ctl, kind)| PteV2 {
                valid: f[0],
                target,
                vol: f[1],
                encrypted: f[2],
                privileged: f[3],
                read_only: f[4],
                atomic_disable: f[5],
                comptagline: if target.is_sys() { 0 } else { ctl },
                kind,
            })
    }

    fn pde_v2() -> impl Strategy<Value = PdeV2> {
        (
            proptest::option::of(table_target(
                ADDRESS_VID_BITS + 12,
                ADDRESS_SYS_BITS + 12,
                12,
            )),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(table, vol, no_ats)| PdeV2 { table, vol, no_ats })
    }

    fn pd0_v2() -> impl Strategy<Value = Pd0EntryV2> {
        prop_oneof![
            pte_v2().prop_map(|p| Pd0EntryV2::Page(PteV2 { valid: true, ..p })),
            (
                proptest::option::of(table_target(
                    ADDRESS_BIG_VID_BITS + 8,
                    ADDRESS_BIG_SYS_BITS + 8,
                    8
                )),
                any::<bool>(),
                proptest::option::of(table_target(
                    ADDRESS_VID_BITS + 12,
                    ADDRESS_SYS_BITS + 12,
                    12
                )),
                any::<bool>(),
            )
                .prop_map(|(big, vol_big, small, vol_small)| Pd0EntryV2::Tables(
                    DualPdeV2 {
                        big,
                        vol_big,
                        small,
                        vol_small
                    }
                )),
        ]
    }

    proptest! {
        #[test]
        fn pte_round_trip(p in pte_v2()) {
            let raw = p.encode().unwrap();
            prop_assert_eq!(PteV2::decode(raw).unwrap(), p);
        }

        #[test]
        fn pte_raw_round_trip(raw in any::<u64>()) {
            if let Ok(p) = PteV2::decode(raw) {
                prop_assert_eq!(p.encode().unwrap(), raw);
            }
        }

        #[test]
        fn pde_round_trip(p in pde_v2()) {
            let raw = p.encode().unwrap();
            prop_assert_eq!(raw & 1, 0);
            prop_assert_eq!(PdeV2::decode(raw).unwrap(), p);
        }

        #[test]
        fn pde_raw_round_trip(
            raw in any::<u64>(),
            mask in prop::sample::select(vec![
                u64::MAX,
                PdeV2Bits::DEFINED_MASK,
                PdeV2Bits::DEFINED_MASK & !1,
                (PdeV2Bits::DEFINED_MASK & !1) & !(PdeV2Bits::ADDRESS_SYS.mask() as u64),
                (PdeV2Bits::DEFINED_MASK & !1) & !(PdeV2Bits::ADDRESS_SYS.mask() as u64)
                    | PdeV2Bits::ADDRESS_VID.mask() as u64,
            ]),
        ) {
            let raw = raw & mask;
            if let Ok(p) = PdeV2::decode(raw) {
                prop_assert_eq!(p.encode().unwrap(), raw);
            }
        }

        #[test]
        fn pd0_round_trip(e in pd0_v2()) {
            let raw = e.encode().unwrap();
            prop_assert_eq!(Pd0EntryV2::decode(raw).unwrap(), e);
        }

        #[test]
        fn pd0_raw_round_trip(
            lo in any::<u64>(),
            hi in any::<u64>(),
            zero_hi in any::<bool>(),
            mask in prop::sample::select(vec![
                u128::MAX,
                DualPdeV2Bits::DEFINED_MASK,
                DualPdeV2Bits::DEFINED_MASK & !1,
                (DualPdeV2Bits::DEFINED_MASK & !1)
                    & !DualPdeV2Bits::ADDRESS_BIG_SYS.mask()
                    & !DualPdeV2Bits::ADDRESS_SMALL_SYS.mask()
                    | DualPdeV2Bits::ADDRESS_BIG_VID.mask()
                    | DualPdeV2Bits::ADDRESS_SMALL_VID.mask(),
                (DualPdeV2Bits::DEFINED_MASK & !1)
                    & !DualPdeV2Bits::ADDRESS_BIG_SYS.mask()
                    & !DualPdeV2Bits::ADDRESS_SMALL_SYS.mask(),
            ]),
        ) {
            let raw = (u128::from(lo) | (u128::from(if zero_hi { 0 } else { hi }) << 64)) & mask;
            if let Ok(e) = Pd0EntryV2::decode(raw) {
                prop_assert_eq!(e.encode().unwrap(), raw);
            }
        }
    }
}
