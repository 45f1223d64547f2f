//! Typed addresses: [`VramAddr`] (device-memory byte address), [`GpuVa`] (GPU virtual
//! address), [`SysAddr`] (system-memory / DMA address an entry may point at) and
//! [`PageSize`]. APIs of the host driver never take a VRAM address as a bare `u64`.

use std::fmt;

use thiserror::Error;

/// 1 KiB.
pub const KIB: u64 = 1 << 10;
/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;

/// Errors of address arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AddrError {
    /// `addr + len` does not fit 64 bits.
    #[error("{addr:#x} + {len:#x} overflows")]
    Overflow {
        /// The address.
        addr: u64,
        /// What was added.
        len: u64,
    },
    /// The address is not a multiple of the required alignment.
    #[error("{addr:#x} is not {align:#x}-byte aligned")]
    Misaligned {
        /// The address.
        addr: u64,
        /// The alignment required.
        align: u64,
    },
}

/// `value` is a multiple of `align` (an `align` of 0 counts as 1).
const fn aligned(value: u64, align: u64) -> bool {
    align <= 1 || value % align == 0
}

macro_rules! address_type {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            /// Address zero.
            pub const ZERO: $name = $name(0);

            /// Wraps a raw byte address.
            pub const fn new(raw: u64) -> $name {
                $name(raw)
            }

            /// The raw byte address.
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// `self + len`, or an error on overflow.
            pub const fn checked_add(self, len: u64) -> Result<$name, AddrError> {
                match self.0.checked_add(len) {
                    Some(v) => Ok($name(v)),
                    None => Err(AddrError::Overflow { addr: self.0, len }),
                }
            }

            /// `self + len`, or `None` on overflow.
            pub const fn offset(self, len: u64) -> Option<$name> {
                match self.0.checked_add(len) {
                    Some(v) => Some($name(v)),
                    None => None,
                }
            }

            /// Bytes from `base` up to `self`, or `None` if `self < base`.
            pub const fn offset_from(self, base: $name) -> Option<u64> {
                self.0.checked_sub(base.0)
            }

            /// Whether the address is a multiple of `align` bytes.
            pub const fn is_aligned(self, align: u64) -> bool {
                aligned(self.0, align)
            }

            /// Whether the address is aligned to `size`.
            pub const fn is_page_aligned(self, size: PageSize) -> bool {
                aligned(self.0, size.bytes())
            }

            /// The address if it is a multiple of `align`, else an error.
            pub const fn require_aligned(self, align: u64) -> Result<$name, AddrError> {
                if aligned(self.0, align) {
                    Ok(self)
                } else {
                    Err(AddrError::Misaligned { addr: self.0, align })
                }
            }

            /// Rounded down to a multiple of `align` (an `align` of 0 counts as 1).
            pub const fn align_down(self, align: u64) -> $name {
                if align <= 1 {
                    self
                } else {
                    $name(self.0 - self.0 % align)
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, ":{:#x}"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, ":{:#x}"), self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address_type!(
    /// A byte address in the GPU's device memory (VRAM), as seen through PRAMIN and as
    /// stored in page-table entries with the video-memory aperture.
    VramAddr,
    "vram"
);

address_type!(
    /// A GPU virtual address (translated by the GPU MMU through page tables).
    GpuVa,
    "va"
);

address_type!(
    /// A system-memory (DMA) address, for entries with a system-memory aperture.
    SysAddr,
    "sys"
);

/// A GPU page size the page-table builder maps with.
///
/// 512 MiB pages (PTEs in PD1, GA10x+) are not supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB: small-page table.
    Size4K,
    /// 64 KiB: big-page table.
    Size64K,
    /// 2 MiB: a PTE in a PD0 dual entry.
    Size2M,
}

impl PageSize {
    /// Every supported size, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size64K, PageSize::Size2M];

    /// Bytes per page.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// log2 of the size.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size64K => 16,
            PageSize::Size2M => 21,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageSize::Size4K => "4 KiB",
            PageSize::Size64K => "64 KiB",
            PageSize::Size2M => "2 MiB",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_and_alignment() {
        let a = VramAddr::new(0x1_2345_6000);
        assert!(a.is_aligned(4 * KIB) && !a.is_aligned(64 * KIB));
        assert!(a.is_page_aligned(PageSize::Size4K));
        assert_eq!(a.align_down(64 * KIB), VramAddr::new(0x1_2345_0000));
        assert_eq!(a.align_down(0), a);
        assert_eq!(a.checked_add(0x1000), Ok(VramAddr::new(0x1_2345_7000)));
        assert_eq!(
            VramAddr::new(u64::MAX).checked_add(1),
            Err(AddrError::Overflow {
                addr: u64::MAX,
                len: 1
            })
        );
        assert_eq!(
            a.offset_from(VramAddr::new(0x1_0000_0000)),
            Some(0x2345_6000)
        );
        assert_eq!(VramAddr::ZERO.offset_from(a), None);
        assert!(matches!(
            GpuVa::new(0x1001).require_aligned(0x1000),
            Err(AddrError::Misaligned { .. })
        ));
        assert_eq!(format!("{a}"), "vram:0x123456000");
        assert_eq!(PageSize::Size2M.bytes(), 2 * MIB);
        assert_eq!(PageSize::Size64K.bytes(), 64 * KIB);
    }
}
