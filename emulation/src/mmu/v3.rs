//! MMU v3 (Hopper, Blackwell) entry layouts, gpu-facts 4.4.
//!
//! - PTE: VALID 0, APERTURE 2:1, PCF 7:3, KIND 11:8, ADDRESS 51:12 (in place, every
//!   aperture), PEER_ID 63:61. PCF of a valid PTE (RM's enumeration): bit 0 UNCACHED,
//!   bit 1 PRIVILEGE, bit 2 READ_ONLY, bit 3 NO_ATOMIC, bit 4 ACD. PCF of an invalid PTE:
//!   0 INVALID, 1 SPARSE, 2 MAPPING_NOWHERE, 3 NO_VALID_4KB_PAGE.
//! - PDE (PD4..PD1): IS_PTE 0 (the slot holds a PTE), APERTURE 2:1 (0 invalid), PCF 5:3
//!   (invalid entries: 1 or 3 = SPARSE), ADDRESS 51:12 in place.
//! - Dual PDE (PD0): low qword IS_PTE 0 (a 2 MiB PTE), APERTURE_BIG 2:1, PCF_BIG 5:3,
//!   ADDRESS_BIG 51:8 in place (256-byte aligned); high qword APERTURE_SMALL 66:65,
//!   PCF_SMALL 69:67, ADDRESS_SMALL 115:76 (= address bits 51:12 in place in the high qword).
//!
//! In a big-page table an invalid PTE with PCF NO_VALID_4KB_PAGE tells the MMU not to look
//! at the small-page table; MAPPING_NOWHERE is treated the same way (ASSUMPTION: its exact
//! hardware meaning is not in gpu-facts; either way the access faults).

use super::entry::{DualHalf, DualPde, Pde, PdeAperture, Pte, PteAperture, ValidPte};
use crate::regs::register;

/// Invalid-PTE PCF value SPARSE.
pub const PTE_PCF_SPARSE: u64 = 1;
/// Invalid-PTE PCF value MAPPING_NOWHERE.
pub const PTE_PCF_MAPPING_NOWHERE: u64 = 2;
/// Invalid-PTE PCF value NO_VALID_4KB_PAGE.
pub const PTE_PCF_NO_VALID_4KB_PAGE: u64 = 3;

register! {
    /// An MMU v3 page-table entry (also the format of large-page PTEs in PD0 and PD1).
    pub struct V3Pte: u64 {
        /// VALID.
        0:0 => valid, with_valid;
        /// APERTURE (PTE encoding: 0 video, 1 peer, 2 sys coherent, 3 sys non-coherent).
        2:1 => aperture, with_aperture;
        /// PCF (the whole 5-bit field).
        7:3 => pcf, with_pcf;
        /// PCF bit 0: UNCACHED (valid PTEs).
        3:3 => pcf_uncached, with_pcf_uncached;
        /// PCF bit 1: PRIVILEGE (valid PTEs).
        4:4 => pcf_privilege, with_pcf_privilege;
        /// PCF bit 2: READ_ONLY (valid PTEs).
        5:5 => pcf_read_only, with_pcf_read_only;
        /// PCF bit 3: NO_ATOMIC (valid PTEs).
        6:6 => pcf_no_atomic, with_pcf_no_atomic;
        /// PCF bit 4: ACD, access counting disabled (valid PTEs).
        7:7 => pcf_acd, with_pcf_acd;
        /// KIND (0 pitch, 6 generic memory, 7 invalid).
        11:8 => kind, with_kind;
        /// ADDRESS: page address bits 51:12, in place.
        51:12 => address, with_address;
        /// PEER_ID for the PEER aperture.
        63:61 => peer_id, with_peer_id;
    }
}

register! {
    /// An MMU v3 directory entry of PD4..PD1.
    pub struct V3Pde: u64 {
        /// IS_PTE: the slot holds a PTE (a large page), not a table pointer.
        0:0 => is_pte, with_is_pte;
        /// APERTURE (PDE encoding: 0 invalid, 1 video, 2 sys coherent, 3 sys non-coherent).
        2:1 => aperture, with_aperture;
        /// PCF (bit 0 uncached, bit 1 ATS not allowed; invalid entries: 1/3 = sparse).
        5:3 => pcf, with_pcf;
        /// ADDRESS: table address bits 51:12, in place.
        51:12 => address, with_address;
    }
}

register! {
    /// The low qword of an MMU v3 PD0 dual entry: the big-page table pointer.
    pub struct V3DualPdeBig: u64 {
        /// IS_PTE: the low qword is a 2 MiB PTE.
        0:0 => is_pte, with_is_pte;
        /// APERTURE_BIG (PDE encoding).
        2:1 => aperture_big, with_aperture_big;
        /// PCF_BIG (invalid entries: 1/3 = sparse).
        5:3 => pcf_big, with_pcf_big;
        /// ADDRESS_BIG: table address bits 51:8, in place.
        51:8 => address_big, with_address_big;
    }
}

register! {
    /// The high qword of an MMU v3 PD0 dual entry (bits 127:64): the small-page table
    /// pointer. Field positions are relative to bit 64.
    pub struct V3DualPdeSmall: u64 {
        /// APERTURE_SMALL (bits 66:65 of the dual entry).
        2:1 => aperture_small, with_aperture_small;
        /// PCF_SMALL (bits 69:67).
        5:3 => pcf_small, with_pcf_small;
        /// ADDRESS_SMALL (bits 115:76): table address bits 51:12, in place.
        51:12 => address_small, with_address_small;
    }
}

/// Whether an invalid directory entry's PCF marks a sparse range (1 or 3).
const fn pde_pcf_is_sparse(pcf: u64) -> bool {
    pcf == 1 || pcf == 3
}

/// Decodes a v3 PTE.
pub(crate) fn decode_pte(raw: u64) -> Pte {
    let p = V3Pte::from_raw(raw);
    if p.valid() == 0 {
        let pcf = p.pcf();
        return Pte::Invalid {
            sparse: pcf == PTE_PCF_SPARSE,
            no_small: pcf == PTE_PCF_NO_VALID_4KB_PAGE || pcf == PTE_PCF_MAPPING_NOWHERE,
        };
    }
    Pte::Valid(ValidPte {
        frame: p.address() << 12,
        aperture: PteAperture::from_field(p.aperture(), p.peer_id() as u8),
        read_only: p.pcf_read_only() == 1,
        privileged: p.pcf_privilege() == 1,
        uncached: p.pcf_uncached() == 1,
        atomic_disable: p.pcf_no_atomic() == 1,
        kind: p.kind() as u8,
    })
}

/// Decodes a v3 directory entry (PD4..PD1).
pub(crate) fn decode_pde(raw: u64) -> Pde {
    let e = V3Pde::from_raw(raw);
    if e.is_pte() == 1 {
        return Pde::Pte;
    }
    match PdeAperture::from_field(e.aperture()) {
        PdeAperture::Invalid => Pde::Invalid {
            sparse: pde_pcf_is_sparse(e.pcf()),
        },
        aperture => Pde::Table {
            aperture,
            addr: e.address() << 12,
        },
    }
}

/// Decodes a v3 PD0 dual entry from its low and high qwords.
pub(crate) fn decode_dual(lo: u64, hi: u64) -> DualPde {
    let big = V3DualPdeBig::from_raw(lo);
    let small = V3DualPdeSmall::from_raw(hi);
    if big.is_pte() == 1 {
        return DualPde::Pte;
    }
    let big_aperture = PdeAperture::from_field(big.aperture_big());
    let small_aperture = PdeAperture::from_field(small.aperture_small());
    DualPde::Tables {
        big: DualHalf {
            aperture: big_aperture,
            addr: big.address_big() << 8,
        },
        small: DualHalf {
            aperture: small_aperture,
            addr: small.address_small() << 12,
        },
        sparse: big_aperture == PdeAperture::Invalid
            && small_aperture == PdeAperture::Invalid
            && pde_pcf_is_sparse(big.pcf_big()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_positions_match_the_fact_sheet() {
        // Addresses are in place at bits 51:12 (PTE, PDE, small half) / 51:8 (big half).
        let a = 0x000F_1234_5678_9000u64;
        assert_eq!(V3Pte::from_raw(a).address() << 12, a);
        assert_eq!(V3Pde::from_raw(a).address() << 12, a);
        assert_eq!(V3DualPdeSmall::from_raw(a).address_small() << 12, a);
        assert_eq!(
            V3DualPdeBig::from_raw(a | 0x100).address_big() << 8,
            a | 0x100
        );
        // PCF examples from gpu-facts: 0x0C = regular RO, no atomic, cached.
        let p = V3Pte::default().with_pcf(0x0C);
        assert_eq!(
            (p.pcf_read_only(), p.pcf_no_atomic(), p.pcf_uncached()),
            (1, 1, 0)
        );
        assert_eq!(p.raw(), 0x0C << 3);
        assert_eq!(V3Pte::default().with_peer_id(7).raw(), 7 << 61);
        assert_eq!(V3Pte::default().with_kind(0xF).raw(), 0xF00);
    }

    #[test]
    fn decodes() {
        assert_eq!(
            decode_pde(0x1234_5000 | 1 << 1),
            Pde::Table {
                aperture: PdeAperture::VideoMemory,
                addr: 0x1234_5000
            }
        );
        assert_eq!(decode_pde(1 << 3), Pde::Invalid { sparse: true });
        assert_eq!(decode_pde(3 << 3), Pde::Invalid { sparse: true });
        assert_eq!(decode_pde(2 << 3), Pde::Invalid { sparse: false });
        assert_eq!(decode_pde(1), Pde::Pte);
        assert_eq!(
            decode_pte(PTE_PCF_NO_VALID_4KB_PAGE << 3),
            Pte::Invalid {
                sparse: false,
                no_small: true
            }
        );
        let Pte::Valid(v) = decode_pte(0xABC_D000 | 0x0C << 3 | 1) else {
            panic!("valid PTE expected");
        };
        assert_eq!(v.frame, 0xABC_D000);
        assert_eq!(v.aperture, PteAperture::VideoMemory);
        assert!(v.read_only && v.atomic_disable && !v.privileged && !v.uncached);
        assert_eq!(decode_dual(1, 0), DualPde::Pte);
    }
}
