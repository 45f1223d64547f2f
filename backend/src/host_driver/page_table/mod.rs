//! GPU page tables: entry codecs for MMU v2 (Turing–Ada) and v3 (Hopper+), the level
//! structure of both formats, a builder that writes mappings into VRAM through PRAMIN,
//! and a software walker that reads them back.
//!
//! Bit layouts follow `gpu-facts.md` 4.1–4.4 exactly; bits the fact sheet marks as
//! unconfirmed are marked so where they are defined.

pub mod builder;
pub mod format;
pub mod v2;
pub mod v3;
pub mod walk;

use thiserror::Error;

use super::addr::{SysAddr, VramAddr};

/// Errors of encoding or decoding a table entry.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EntryError {
    /// An address is not aligned as its field requires.
    #[error("{what} address {addr:#x} is not {align:#x}-byte aligned")]
    Misaligned {
        /// The field.
        what: &'static str,
        /// The address.
        addr: u64,
        /// Alignment the field requires.
        align: u64,
    },
    /// An address is too large for its field.
    #[error("{what} address {addr:#x} does not fit the field (limit {limit:#x})")]
    AddressTooWide {
        /// The field.
        what: &'static str,
        /// The address.
        addr: u64,
        /// First address the field cannot hold.
        limit: u64,
    },
    /// A non-address value is too large for its field.
    #[error("{what} value {value:#x} does not fit its field")]
    FieldTooWide {
        /// The field.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// A combination of values the layout cannot express.
    #[error("cannot encode: {0}")]
    Unencodable(&'static str),
    /// The raw entry sets bits that its layout (for its aperture) does not define.
    #[error("entry {raw:#x} sets undefined bits {bits:#x}")]
    ReservedBits {
        /// The raw entry.
        raw: u128,
        /// The offending bits.
        bits: u128,
    },
    /// A directory slot holds a PTE (bit 0 set), not a pointer to a table.
    #[error("directory entry {raw:#x} holds a PTE (bit 0 set)")]
    IsPte {
        /// The raw entry.
        raw: u64,
    },
}

/// Where a directory entry (or a PDB) points: a table in VRAM or in system memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableTarget {
    /// In video memory.
    Vram(VramAddr),
    /// In coherent system memory.
    SysCoherent(SysAddr),
    /// In non-coherent system memory.
    SysNonCoherent(SysAddr),
}

impl TableTarget {
    /// The PDE aperture value: 1 VIDEO_MEMORY, 2 SYSTEM_COHERENT, 3 SYSTEM_NON_COHERENT
    /// (0 is INVALID, gpu-facts 4.2).
    pub const fn pde_aperture(self) -> u64 {
        match self {
            TableTarget::Vram(_) => 1,
            TableTarget::SysCoherent(_) => 2,
            TableTarget::SysNonCoherent(_) => 3,
        }
    }

    /// The raw byte address.
    pub const fn raw_addr(self) -> u64 {
        match self {
            TableTarget::Vram(a) => a.raw(),
            TableTarget::SysCoherent(a) | TableTarget::SysNonCoherent(a) => a.raw(),
        }
    }

    /// Whether the table is in video memory.
    pub const fn is_vram(self) -> bool {
        matches!(self, TableTarget::Vram(_))
    }

    /// The target for PDE aperture `aperture` (1..=3) at `addr`; `None` for 0 (INVALID).
    pub const fn from_pde_aperture(aperture: u64, addr: u64) -> Option<TableTarget> {
        match aperture {
            1 => Some(TableTarget::Vram(VramAddr::new(addr))),
            2 => Some(TableTarget::SysCoherent(SysAddr::new(addr))),
            3 => Some(TableTarget::SysNonCoherent(SysAddr::new(addr))),
            _ => None,
        }
    }
}

/// What a PTE maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PteTarget {
    /// Local video memory (aperture 0).
    Vram(VramAddr),
    /// Another GPU's video memory (aperture 1).
    Peer {
        /// Peer index (3 bits).
        peer: u8,
        /// Address in the peer's video memory.
        addr: VramAddr,
    },
    /// Coherent system memory (aperture 2).
    SysCoherent(SysAddr),
    /// Non-coherent system memory (aperture 3).
    SysNonCoherent(SysAddr),
}

impl PteTarget {
    /// The PTE aperture value (gpu-facts 4.2).
    pub const fn pte_aperture(self) -> u64 {
        match self {
            PteTarget::Vram(_) => 0,
            PteTarget::Peer { .. } => 1,
            PteTarget::SysCoherent(_) => 2,
            PteTarget::SysNonCoherent(_) => 3,
        }
    }

    /// The raw byte address.
    pub const fn raw_addr(self) -> u64 {
        match self {
            PteTarget::Vram(a) | PteTarget::Peer { addr: a, .. } => a.raw(),
            PteTarget::SysCoherent(a) | PteTarget::SysNonCoherent(a) => a.raw(),
        }
    }

    /// Whether this is a system-memory target.
    pub const fn is_sys(self) -> bool {
        matches!(
            self,
            PteTarget::SysCoherent(_) | PteTarget::SysNonCoherent(_)
        )
    }
}

/// Checks a byte address for a field holding `addr >> shift` in `bits` bits.
pub(crate) fn check_addr(
    what: &'static str,
    addr: u64,
    shift: u32,
    bits: u32,
) -> Result<u64, EntryError> {
    let align = 1u64 << shift;
    if addr % align != 0 {
        return Err(EntryError::Misaligned { what, addr, align });
    }
    let limit = 1u128 << (bits + shift);
    if u128::from(addr) >= limit {
        return Err(EntryError::AddressTooWide {
            what,
            addr,
            limit: limit.min(u128::from(u64::MAX)) as u64,
        });
    }
    Ok(addr >> shift)
}

/// Checks that `raw` has no bits outside `allowed`.
pub(crate) fn check_reserved(raw: u128, allowed: u128) -> Result<(), EntryError> {
    let bits = raw & !allowed;
    if bits != 0 {
        return Err(EntryError::ReservedBits { raw, bits });
    }
    Ok(())
}

/// Checks a small value for a field of `bits` bits.
pub(crate) fn check_small(what: &'static str, value: u64, bits: u32) -> Result<u64, EntryError> {
    if value >> bits != 0 {
        return Err(EntryError::FieldTooWide { what, value });
    }
    Ok(value)
}

#[cfg(test)]
pub(crate) mod strategies {
    //! proptest strategies shared by the v2/v3 codec tests.
    use proptest::prelude::*;

    use super::*;

    /// A 4 KiB-aligned address below `1 << bits`.
    pub fn addr(bits: u32, align_shift: u32) -> impl Strategy<Value = u64> {
        (0u64..(1u64 << (bits - align_shift))).prop_map(move |f| f << align_shift)
    }

    /// A table target with addresses below `1 << vid_bits` (VRAM) / `1 << sys_bits`.
    pub fn table_target(
        vid_bits: u32,
        sys_bits: u32,
        align_shift: u32,
    ) -> impl Strategy<Value = TableTarget> {
        prop_oneof![
            addr(vid_bits, align_shift).prop_map(|a| TableTarget::Vram(VramAddr::new(a))),
            addr(sys_bits, align_shift).prop_map(|a| TableTarget::SysCoherent(SysAddr::new(a))),
            addr(sys_bits, align_shift).prop_map(|a| TableTarget::SysNonCoherent(SysAddr::new(a))),
        ]
    }

    /// A PTE target with addresses below `1 << vid_bits` (VRAM, peer) / `1 << sys_bits`.
    pub fn pte_target(vid_bits: u32, sys_bits: u32) -> impl Strategy<Value = PteTarget> {
        prop_oneof![
            addr(vid_bits, 12).prop_map(|a| PteTarget::Vram(VramAddr::new(a))),
            (0u8..8, addr(vid_bits, 12)).prop_map(|(peer, a)| PteTarget::Peer {
                peer,
                addr: VramAddr::new(a)
            }),
            addr(sys_bits, 12).prop_map(|a| PteTarget::SysCoherent(SysAddr::new(a))),
            addr(sys_bits, 12).prop_map(|a| PteTarget::SysNonCoherent(SysAddr::new(a))),
        ]
    }
}
