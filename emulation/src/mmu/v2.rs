//! MMU v2 (Pascal–Ada, incl. Turing and Ampere) entry layouts, gpu-facts 4.3.
//!
//! - PTE: VALID 0, APERTURE 2:1, VOL 3, ENCRYPTED 4, PRIVILEGE 5, READ_ONLY 6,
//!   ATOMIC_DISABLE 7, ADDRESS_VID 32:8 (addr >> 12; PEER index 35:33), ADDRESS_SYS 53:8,
//!   KIND 63:56. Invalid + VOL = sparse; in a big-page table invalid + PRIVILEGE = "do not
//!   look at the small PTEs".
//! - PDE (PD3..PD1): APERTURE 2:1 (0 = not present), VOL 3, ADDRESS 32:8 (VID) / 53:8 (SYS)
//!   = table addr >> 12. Bit 0 set means the slot holds a PTE (derived in gpu-facts; the
//!   walker accepts that only in PD1, as a 512 MiB page). Invalid + VOL is taken to be
//!   sparse, by analogy with the dual PDE (ASSUMPTION).
//! - Dual PDE (PD0, 128 bits): low qword = big-page table (APERTURE_BIG 2:1, VOL_BIG 3,
//!   ADDRESS_BIG = addr >> 8 from bit 4: VID 32:4, SYS 53:4); high qword = small-page
//!   table (APERTURE_SMALL 66:65, VOL_SMALL 67, ADDRESS_SMALL = addr >> 12 from bit 72).
//!   Low qword bit 0 set = a 2 MiB PTE in the low qword. Both halves invalid + VOL_BIG =
//!   sparse. The VID address fields end at bit 32 like the PTE's (128 GiB reach; the top
//!   bit of ADDRESS_BIG_VID is derived from that, not stated in gpu-facts).

use super::entry::{DualHalf, DualPde, Pde, PdeAperture, Pte, PteAperture, ValidPte};
use crate::regs::register;

register! {
    /// An MMU v2 page-table entry (also the format of large-page PTEs in PD0 and PD1).
    pub struct V2Pte: u64 {
        /// VALID.
        0:0 => valid, with_valid;
        /// APERTURE (PTE encoding: 0 video, 1 peer, 2 sys coherent, 3 sys non-coherent).
        2:1 => aperture, with_aperture;
        /// VOL (volatile / L2 bypass); with VALID = 0: sparse.
        3:3 => vol, with_vol;
        /// ENCRYPTED.
        4:4 => encrypted, with_encrypted;
        /// PRIVILEGE; with VALID = 0 in a big-page table: ignore the small PTEs.
        5:5 => privilege, with_privilege;
        /// READ_ONLY.
        6:6 => read_only, with_read_only;
        /// ATOMIC_DISABLE.
        7:7 => atomic_disable, with_atomic_disable;
        /// ADDRESS_VID: video (and peer) memory address >> 12.
        32:8 => address_vid, with_address_vid;
        /// Peer index for the PEER aperture.
        35:33 => peer_id, with_peer_id;
        /// ADDRESS_SYS: system memory address >> 12.
        53:8 => address_sys, with_address_sys;
        /// KIND (0x00 pitch, 0x07 invalid).
        63:56 => kind, with_kind;
    }
}

register! {
    /// An MMU v2 directory entry of PD3, PD2 or PD1.
    pub struct V2Pde: u64 {
        /// Set: the slot holds a PTE, not a table pointer.
        0:0 => is_pte, with_is_pte;
        /// APERTURE (PDE encoding: 0 invalid, 1 video, 2 sys coherent, 3 sys non-coherent).
        2:1 => aperture, with_aperture;
        /// VOL; with APERTURE = 0: sparse.
        3:3 => vol, with_vol;
        /// ADDRESS_VID: table address >> 12.
        32:8 => address_vid, with_address_vid;
        /// ADDRESS_SYS: table address >> 12.
        53:8 => address_sys, with_address_sys;
    }
}

register! {
    /// The low qword of an MMU v2 PD0 dual entry: the big-page table pointer.
    pub struct V2DualPdeBig: u64 {
        /// Set: the low qword is a 2 MiB PTE.
        0:0 => is_pte, with_is_pte;
        /// APERTURE_BIG (PDE encoding).
        2:1 => aperture_big, with_aperture_big;
        /// VOL_BIG; with both apertures 0: sparse.
        3:3 => vol_big, with_vol_big;
        /// ADDRESS_BIG_VID: table address >> 8.
        32:4 => address_big_vid, with_address_big_vid;
        /// ADDRESS_BIG_SYS: table address >> 8.
        53:4 => address_big_sys, with_address_big_sys;
    }
}

register! {
    /// The high qword of an MMU v2 PD0 dual entry (bits 127:64): the small-page table
    /// pointer. Field positions are relative to bit 64.
    pub struct V2DualPdeSmall: u64 {
        /// APERTURE_SMALL (bits 66:65 of the dual entry).
        2:1 => aperture_small, with_aperture_small;
        /// VOL_SMALL (bit 67).
        3:3 => vol_small, with_vol_small;
        /// ADDRESS_SMALL_VID (from bit 72): table address >> 12.
        32:8 => address_small_vid, with_address_small_vid;
        /// ADDRESS_SMALL_SYS (from bit 72): table address >> 12.
        53:8 => address_small_sys, with_address_small_sys;
    }
}

/// Decodes a v2 PTE.
pub(crate) fn decode_pte(raw: u64) -> Pte {
    let p = V2Pte::from_raw(raw);
    if p.valid() == 0 {
        return Pte::Invalid {
            sparse: p.vol() == 1,
            no_small: p.privilege() == 1,
        };
    }
    let aperture = PteAperture::from_field(p.aperture(), p.peer_id() as u8);
    let frame = match aperture {
        PteAperture::VideoMemory | PteAperture::Peer { .. } => p.address_vid(),
        PteAperture::SystemCoherent | PteAperture::SystemNonCoherent => p.address_sys(),
    } << 12;
    Pte::Valid(ValidPte {
        frame,
        aperture,
        read_only: p.read_only() == 1,
        privileged: p.privilege() == 1,
        uncached: p.vol() == 1,
        atomic_disable: p.atomic_disable() == 1,
        kind: p.kind() as u8,
    })
}

/// Decodes a v2 directory entry (PD3..PD1).
pub(crate) fn decode_pde(raw: u64) -> Pde {
    let e = V2Pde::from_raw(raw);
    if e.is_pte() == 1 {
        return Pde::Pte;
    }
    match PdeAperture::from_field(e.aperture()) {
        PdeAperture::Invalid => Pde::Invalid {
            sparse: e.vol() == 1,
        },
        aperture @ PdeAperture::VideoMemory => Pde::Table {
            aperture,
            addr: e.address_vid() << 12,
        },
        aperture => Pde::Table {
            aperture,
            addr: e.address_sys() << 12,
        },
    }
}

/// Decodes a v2 PD0 dual entry from its low and high qwords.
pub(crate) fn decode_dual(lo: u64, hi: u64) -> DualPde {
    let big = V2DualPdeBig::from_raw(lo);
    let small = V2DualPdeSmall::from_raw(hi);
    if big.is_pte() == 1 {
        return DualPde::Pte;
    }
    let big_aperture = PdeAperture::from_field(big.aperture_big());
    let small_aperture = PdeAperture::from_field(small.aperture_small());
    let big_addr = match big_aperture {
        PdeAperture::SystemCoherent | PdeAperture::SystemNonCoherent => big.address_big_sys(),
        _ => big.address_big_vid(),
    } << 8;
    let small_addr = match small_aperture {
        PdeAperture::SystemCoherent | PdeAperture::SystemNonCoherent => small.address_small_sys(),
        _ => small.address_small_vid(),
    } << 12;
    DualPde::Tables {
        big: DualHalf {
            aperture: big_aperture,
            addr: big_addr,
        },
        small: DualHalf {
            aperture: small_aperture,
            addr: small_addr,
        },
        sparse: big_aperture == PdeAperture::Invalid
            && small_aperture == PdeAperture::Invalid
            && big.vol_big() == 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_positions_match_the_fact_sheet() {
        // PTE raw = (pa >> 12) << 8 | aperture << 1 | 1 (gpu-facts 4.3).
        let pa = 0x12_3456_7000u64;
        let raw = (pa >> 12) << 8 | 1;
        let p = V2Pte::from_raw(raw);
        assert_eq!((p.valid(), p.aperture(), p.address_vid() << 12), (1, 0, pa));
        assert_eq!(V2Pte::default().with_read_only(1).raw(), 1 << 6);
        assert_eq!(V2Pte::default().with_privilege(1).raw(), 1 << 5);
        assert_eq!(V2Pte::default().with_kind(0xFF).raw(), 0xFF << 56);
        // Dual PDE: the raw big half equals addr >> 4 (plus aperture).
        let big = 0x4_5600u64;
        assert_eq!(V2DualPdeBig::from_raw(big >> 4).address_big_vid() << 8, big);
        assert_eq!(V2DualPdeSmall::DEFINED_MASK & 0xFF, 0x0E);
    }

    #[test]
    fn decodes() {
        assert_eq!(
            decode_pde(0x1234 << 8 | 1 << 1),
            Pde::Table {
                aperture: PdeAperture::VideoMemory,
                addr: 0x123_4000
            }
        );
        assert_eq!(decode_pde(0), Pde::Invalid { sparse: false });
        assert_eq!(decode_pde(1 << 3), Pde::Invalid { sparse: true });
        assert_eq!(decode_pde(1), Pde::Pte);
        assert_eq!(
            decode_pte(1 << 3 | 1 << 5),
            Pte::Invalid {
                sparse: true,
                no_small: true
            }
        );
        let Pte::Valid(v) = decode_pte(7 << 33 | 0x55 << 8 | 1 << 1 | 1) else {
            panic!("valid PTE expected");
        };
        assert_eq!(v.aperture, PteAperture::Peer { id: 7 });
        assert_eq!(v.frame, 0x55 << 12);
        assert_eq!(decode_dual(1, 0xFFFF), DualPde::Pte);
        assert_eq!(
            decode_dual(1 << 3, 0),
            DualPde::Tables {
                big: DualHalf {
                    aperture: PdeAperture::Invalid,
                    addr: 0
                },
                small: DualHalf {
                    aperture: PdeAperture::Invalid,
                    addr: 0
                },
                sparse: true
            }
        );
    }
}
