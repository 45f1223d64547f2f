//! Format-independent vocabulary of the GPU MMU: page-table levels, page sizes, apertures,
//! the result of a translation, and the decoded form of directory and page-table entries
//! that the format modules ([`super::v2`], [`super::v3`]) produce for the walker.

use std::fmt;

use crate::chip::MmuVersion;

/// A level of the page-table tree (gpu-facts 4.1). MMU v2 starts at [`Level::Pd3`], v3 at
/// [`Level::Pd4`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// PD4: v3 root, VA bit 56 (2 entries).
    Pd4,
    /// PD3: v2 root (VA bits 48:47, 4 entries) / v3 VA bits 55:47 (512 entries).
    Pd3,
    /// PD2: VA bits 46:38.
    Pd2,
    /// PD1: VA bits 37:29; an entry may hold a 512 MiB page.
    Pd1,
    /// PD0: VA bits 28:21, 16-byte dual entries (big + small page table, or a 2 MiB page).
    Pd0,
    /// Big-page table: VA bits 20:16, 32 PTEs of 64 KiB pages.
    BigPageTable,
    /// Small-page table: VA bits 20:12, 512 PTEs of 4 KiB pages.
    SmallPageTable,
}

impl Level {
    /// The lowest VA bit this level's index consumes.
    pub const fn va_shift(self) -> u32 {
        match self {
            Level::Pd4 => 56,
            Level::Pd3 => 47,
            Level::Pd2 => 38,
            Level::Pd1 => 29,
            Level::Pd0 => 21,
            Level::BigPageTable => 16,
            Level::SmallPageTable => 12,
        }
    }

    /// Number of VA bits this level's index consumes in `format`.
    pub const fn index_bits(self, format: MmuVersion) -> u32 {
        match (self, format) {
            (Level::Pd4, _) => 1,
            (Level::Pd3, MmuVersion::V2) => 2,
            (Level::Pd3, MmuVersion::V3) | (Level::Pd2, _) | (Level::Pd1, _) => 9,
            (Level::Pd0, _) => 8,
            (Level::BigPageTable, _) => 5,
            (Level::SmallPageTable, _) => 9,
        }
    }

    /// Size in bytes of one entry: 16 for PD0's dual entries, 8 otherwise.
    pub const fn entry_size(self) -> u64 {
        match self {
            Level::Pd0 => 16,
            _ => 8,
        }
    }

    /// Index into this level's table for `va` in `format`.
    pub const fn index(self, va: u64, format: MmuVersion) -> u64 {
        (va >> self.va_shift()) & ((1 << self.index_bits(format)) - 1)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Pd4 => "PD4",
            Level::Pd3 => "PD3",
            Level::Pd2 => "PD2",
            Level::Pd1 => "PD1",
            Level::Pd0 => "PD0",
            Level::BigPageTable => "big-page PT",
            Level::SmallPageTable => "small-page PT",
        })
    }
}

/// Size of a mapped page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB, from a small-page table.
    Small4K,
    /// 64 KiB, from a big-page table.
    Big64K,
    /// 2 MiB, a PTE in a PD0 entry.
    Huge2M,
    /// 512 MiB, a PTE in a PD1 entry.
    Huge512M,
}

impl PageSize {
    /// The page size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Small4K => 1 << 12,
            PageSize::Big64K => 1 << 16,
            PageSize::Huge2M => 1 << 21,
            PageSize::Huge512M => 1 << 29,
        }
    }
}

/// Where a directory entry's table lives (PDE aperture encoding, gpu-facts 4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PdeAperture {
    /// 0: no table (the entry is not present).
    Invalid,
    /// 1: video memory.
    VideoMemory,
    /// 2: coherent system memory.
    SystemCoherent,
    /// 3: non-coherent system memory.
    SystemNonCoherent,
}

impl PdeAperture {
    /// Decodes a 2-bit PDE aperture field (only the low two bits are used).
    pub const fn from_field(raw: u64) -> PdeAperture {
        match raw & 3 {
            0 => PdeAperture::Invalid,
            1 => PdeAperture::VideoMemory,
            2 => PdeAperture::SystemCoherent,
            _ => PdeAperture::SystemNonCoherent,
        }
    }
}

/// Where a page lives (PTE aperture encoding, gpu-facts 4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PteAperture {
    /// 0: local video memory.
    VideoMemory,
    /// 1: a peer GPU's memory; `id` is the PTE's peer index.
    Peer {
        /// Peer index (v2 PTE bits 35:33, v3 PEER_ID bits 63:61).
        id: u8,
    },
    /// 2: coherent system memory.
    SystemCoherent,
    /// 3: non-coherent system memory.
    SystemNonCoherent,
}

impl PteAperture {
    /// Decodes a 2-bit PTE aperture field (only the low two bits are used); `peer_id` is
    /// the PTE's peer index, kept for the peer aperture.
    pub(crate) const fn from_field(raw: u64, peer_id: u8) -> PteAperture {
        match raw & 3 {
            0 => PteAperture::VideoMemory,
            1 => PteAperture::Peer { id: peer_id },
            2 => PteAperture::SystemCoherent,
            _ => PteAperture::SystemNonCoherent,
        }
    }
}

/// A successful translation of one virtual address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The physical address the VA maps to, in `aperture` (page base + offset in page).
    pub pa: u64,
    /// Size of the page the VA lies in.
    pub page_size: PageSize,
    /// Where the page lives.
    pub aperture: PteAperture,
    /// The page is read-only (v2 READ_ONLY bit; v3 PCF READ_ONLY).
    pub read_only: bool,
    /// The page is privileged (v2 PRIVILEGE bit; v3 PCF PRIVILEGE).
    pub privileged: bool,
    /// Uncached / volatile access (v2 VOL bit; v3 PCF UNCACHED).
    pub uncached: bool,
    /// Atomics are disabled (v2 ATOMIC_DISABLE; v3 PCF NO_ATOMIC).
    pub atomic_disable: bool,
    /// The PTE's KIND field (v2 bits 63:56, v3 bits 11:8).
    pub kind: u8,
    /// The level the PTE was found in.
    pub level: Level,
    /// The raw PTE.
    pub pte: u64,
}

impl Translation {
    /// The same translation for another VA in the same page.
    pub(crate) const fn rebased(self, page_pa: u64, offset_in_page: u64) -> Translation {
        Translation {
            pa: page_pa | offset_in_page,
            ..self
        }
    }
}

/// A decoded PTE (format independent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pte {
    /// A valid PTE.
    Valid(ValidPte),
    /// An invalid PTE.
    Invalid {
        /// The entry marks a sparse range (reads 0, writes dropped, no fault).
        sparse: bool,
        /// In a big-page table: the hardware must not look at the small-page table
        /// (v2 invalid + PRIVILEGE; v3 PCF NO_VALID_4KB_PAGE or MAPPING_NOWHERE).
        no_small: bool,
    },
}

/// The fields of a valid PTE that a translation reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ValidPte {
    /// Page frame address (the address field, not masked to the page size).
    pub frame: u64,
    pub aperture: PteAperture,
    pub read_only: bool,
    pub privileged: bool,
    pub uncached: bool,
    pub atomic_disable: bool,
    pub kind: u8,
}

impl ValidPte {
    /// The translation of `va` through this PTE, found at `level` for a page of `size`.
    /// Address bits of the PTE below the page size are ignored (ASSUMPTION: hardware
    /// takes the in-page offset from the VA alone).
    pub(crate) const fn translate(
        self,
        va: u64,
        size: PageSize,
        level: Level,
        raw: u64,
    ) -> Translation {
        let mask = size.bytes() - 1;
        Translation {
            pa: (self.frame & !mask) | (va & mask),
            page_size: size,
            aperture: self.aperture,
            read_only: self.read_only,
            privileged: self.privileged,
            uncached: self.uncached,
            atomic_disable: self.atomic_disable,
            kind: self.kind,
            level,
            pte: raw,
        }
    }
}

/// A decoded directory entry of PD4..PD1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pde {
    /// Points at the next-level table.
    Table {
        /// Where the table lives.
        aperture: PdeAperture,
        /// Table address.
        addr: u64,
    },
    /// The slot holds a PTE (a large page), in PTE format.
    Pte,
    /// Not present.
    Invalid {
        /// The entry marks a sparse range.
        sparse: bool,
    },
}

/// One half of a PD0 dual entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DualHalf {
    /// Where the page table lives ([`PdeAperture::Invalid`]: no table).
    pub aperture: PdeAperture,
    /// Page-table address.
    pub addr: u64,
}

/// A decoded PD0 dual entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DualPde {
    /// The low 64 bits hold a 2 MiB PTE (in PTE format).
    Pte,
    /// Pointers to a big-page and a small-page table (either may be invalid).
    Tables {
        /// The big-page (64 KiB) table.
        big: DualHalf,
        /// The small-page (4 KiB) table.
        small: DualHalf,
        /// Both halves invalid and the entry marks a sparse range.
        sparse: bool,
    },
}
