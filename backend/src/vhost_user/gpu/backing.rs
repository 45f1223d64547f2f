//! A resource's backing: the guest-physical ranges RESOURCE_ATTACH_BACKING names (per the
//! virtio 1.2 spec, section 5.7.6.8, "VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING"), validated
//! against guest memory, and reads of byte ranges across them for TRANSFER_TO_HOST_2D.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::wire::MemEntry;

/// Why a backing was refused or could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BackingError {
    /// No entries at all.
    #[error("backing has no entries")]
    Empty,
    /// An entry of length 0.
    #[error("backing entry {0} has length 0")]
    ZeroLength(usize),
    /// An entry that is not entirely guest memory.
    #[error("backing entry {index} ({addr:#x}+{length:#x}) is outside guest memory")]
    OutsideGuestMemory {
        /// Entry index.
        index: usize,
        /// Guest-physical address.
        addr: u64,
        /// Length.
        length: u32,
    },
    /// Two entries overlap.
    #[error("backing entries overlap at {0:#x}")]
    Overlap(u64),
    /// The total length overflows.
    #[error("backing length overflows")]
    Overflow,
    /// A read past the end of the backing.
    #[error("read of {len} bytes at {offset:#x} is past the {total:#x}-byte backing")]
    OutOfRange {
        /// Offset in the backing.
        offset: u64,
        /// Length read.
        len: u64,
        /// Backing length.
        total: u64,
    },
    /// Guest memory refused a read (it changed since the backing was attached).
    #[error("guest memory read at {0:#x} failed")]
    GuestRead(u64),
}

/// Validated backing of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    entries: Vec<MemEntry>,
    total: u64,
}

impl Backing {
    /// Validates `entries` against `mem`: each non-empty, inside guest memory, no two
    /// overlapping, total length representable.
    pub fn new<M: GuestMemory + ?Sized>(
        mem: &M,
        entries: Vec<MemEntry>,
    ) -> Result<Backing, BackingError> {
        if entries.is_empty() {
            return Err(BackingError::Empty);
        }
        let mut total = 0u64;
        for (index, e) in entries.iter().enumerate() {
            if e.length == 0 {
                return Err(BackingError::ZeroLength(index));
            }
            let inside = e.addr.checked_add(u64::from(e.length)).is_some()
                && mem.check_range(GuestAddress(e.addr), e.length as usize, Permissions::Read);
            if !inside {
                return Err(BackingError::OutsideGuestMemory {
                    index,
                    addr: e.addr,
                    length: e.length,
                });
            }
            total = total
                .checked_add(u64::from(e.length))
                .ok_or(BackingError::Overflow)?;
        }
        let mut sorted: Vec<(u64, u64)> = entries
            .iter()
            .map(|e| (e.addr, e.addr + u64::from(e.length)))
            .collect();
        sorted.sort_unstable();
        for pair in sorted.windows(2) {
            if pair[1].0 < pair[0].1 {
                return Err(BackingError::Overlap(pair[1].0));
            }
        }
        Ok(Backing { entries, total })
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether the backing holds no bytes (never, once validated).
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Copies `buf.len()` bytes at byte `offset` of the backing (the entries laid end to end)
    /// into `buf`.
    pub fn read<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), BackingError> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.total) {
            return Err(BackingError::OutOfRange {
                offset,
                len,
                total: self.total,
            });
        }
        let mut skip = offset;
        let mut done = 0usize;
        for e in &self.entries {
            if done == buf.len() {
                break;
            }
            let elen = u64::from(e.length);
            if skip >= elen {
                skip -= elen;
                continue;
            }
            let n = ((elen - skip) as usize).min(buf.len() - done);
            let addr = e.addr + skip;
            mem.read_slice(&mut buf[done..done + n], GuestAddress(addr))
                .map_err(|_| BackingError::GuestRead(addr))?;
            done += n;
            skip = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x4000)]).unwrap()
    }

    fn e(addr: u64, length: u32) -> MemEntry {
        MemEntry { addr, length }
    }

    #[test]
    fn validation_refuses_bad_entries() {
        let m = mem();
        assert_eq!(Backing::new(&m, vec![]), Err(BackingError::Empty));
        assert_eq!(
            Backing::new(&m, vec![e(0x1000, 0)]),
            Err(BackingError::ZeroLength(0))
        );
        assert!(matches!(
            Backing::new(&m, vec![e(0x0, 0x10)]),
            Err(BackingError::OutsideGuestMemory { .. })
        ));
        assert!(matches!(
            Backing::new(&m, vec![e(0x4ff0, 0x20)]),
            Err(BackingError::OutsideGuestMemory { .. })
        ));
        assert!(matches!(
            Backing::new(&m, vec![e(u64::MAX - 4, 0x20)]),
            Err(BackingError::OutsideGuestMemory { .. })
        ));
        assert_eq!(
            Backing::new(&m, vec![e(0x2000, 0x100), e(0x1f80, 0x100)]),
            Err(BackingError::Overlap(0x2000))
        );
        assert_eq!(
            Backing::new(&m, vec![e(0x2000, 0x100), e(0x2100, 1)])
                .unwrap()
                .len(),
            0x101
        );
    }

    #[test]
    fn reads_span_entries_in_order() {
        let m = mem();
        m.write_slice(&[1, 2, 3, 4], GuestAddress(0x3000)).unwrap();
        m.write_slice(&[5, 6, 7, 8], GuestAddress(0x1000)).unwrap();
        let b = Backing::new(&m, vec![e(0x3000, 4), e(0x1000, 4)]).unwrap();
        let mut buf = [0u8; 4];
        b.read(&m, 2, &mut buf).unwrap();
        assert_eq!(buf, [3, 4, 5, 6]);
        assert!(b.read(&m, 5, &mut buf).is_err());
        assert!(b.read(&m, u64::MAX, &mut buf).is_err());
    }
}
