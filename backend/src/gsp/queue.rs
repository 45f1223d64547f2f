//! Queue geometry and ring arithmetic (gpu-facts 3.1): typed slot indices, the tx header
//! every queue region starts with, and where each field lives.
//!
//! A queue region is 0x40000 bytes: the producer's tx header at +0, the rx header (one
//! `readPtr`, the read index of the *other* queue, written by this region's owner) at
//! +0x20, and 63 slots of 4 KiB from +0x1000. Indices count slots modulo 63; one slot is
//! always left empty, so `free = (rx + 63 − tx − 1) mod 63` and
//! `used = (tx + 63 − rx) mod 63`.

use std::fmt;

use thiserror::Error;

/// Bytes of one slot (`msgSize`).
pub const SLOT_SIZE: u64 = 0x1000;
/// Slots per queue (`msgCount`).
pub const SLOT_COUNT: u32 = 63;
/// Bytes of one queue region (`size`).
pub const QUEUE_SIZE: u64 = 0x40000;
/// Offset of the rx header in a region (`rxHdrOff`).
pub const RX_HEADER_OFFSET: u64 = 0x20;
/// Offset of slot 0 in a region (`entryOff`).
pub const ENTRY_OFFSET: u64 = 0x1000;
/// The tx header `flags` value ("swap RX").
pub const TX_FLAGS_SWAP_RX: u32 = 1;

/// Errors of queue headers and pointers.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// A pointer read from shared memory is not a slot index.
    #[error("queue pointer {0} is not below {SLOT_COUNT}")]
    BadPointer(u32),
    /// A tx header field differs from the fixed geometry.
    #[error("tx header field {field} is {found:#x}, expected {expected:#x}")]
    BadHeader {
        /// Field name.
        field: &'static str,
        /// Value found.
        found: u32,
        /// Value required.
        expected: u32,
    },
}

/// A slot index, always below [`SLOT_COUNT`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SlotIndex(u32);

impl SlotIndex {
    /// Slot 0.
    pub const ZERO: SlotIndex = SlotIndex(0);

    /// Checks a raw pointer value read from shared memory.
    pub fn new(raw: u32) -> Result<SlotIndex, QueueError> {
        if raw < SLOT_COUNT {
            Ok(SlotIndex(raw))
        } else {
            Err(QueueError::BadPointer(raw))
        }
    }

    /// The raw index.
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// The index `n` slots further, wrapping.
    #[must_use]
    pub const fn advance(self, n: u32) -> SlotIndex {
        SlotIndex(((self.0 as u64 + n as u64) % SLOT_COUNT as u64) as u32)
    }

    /// Slots from `self` forward to `to`, wrapping (0 if equal).
    pub const fn distance_to(self, to: SlotIndex) -> u32 {
        (to.0 + SLOT_COUNT - self.0) % SLOT_COUNT
    }
}

impl fmt::Debug for SlotIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {}", self.0)
    }
}

/// Slots a producer at `tx` may still fill while its consumer is at `rx`.
pub const fn free_slots(rx: SlotIndex, tx: SlotIndex) -> u32 {
    (rx.0 + SLOT_COUNT - tx.0 - 1) % SLOT_COUNT
}

/// Slots published by a producer at `tx` not yet consumed by a consumer at `rx`.
pub const fn used_slots(rx: SlotIndex, tx: SlotIndex) -> u32 {
    rx.distance_to(tx)
}

/// `msgqTxHeader`: the 32-byte header a queue's producer writes at the start of its region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxHeader {
    /// Header version (0).
    pub version: u32,
    /// Region size in bytes.
    pub size: u32,
    /// Slot size in bytes.
    pub msg_size: u32,
    /// Slot count.
    pub msg_count: u32,
    /// Producer's write index.
    pub write_ptr: u32,
    /// Flags (1 = swap RX).
    pub flags: u32,
    /// Offset of the rx header.
    pub rx_hdr_off: u32,
    /// Offset of slot 0.
    pub entry_off: u32,
}

impl TxHeader {
    /// Byte offset of `msgCount` in the header.
    pub const MSG_COUNT_OFFSET: u64 = 0x0C;
    /// Byte offset of `writePtr` in the header.
    pub const WRITE_PTR_OFFSET: u64 = 0x10;

    /// The header of a fresh queue with the protocol's geometry (the values the CPU writes
    /// for the command queue, gpu-facts 3.1).
    pub const fn initial() -> TxHeader {
        TxHeader {
            version: 0,
            size: QUEUE_SIZE as u32,
            msg_size: SLOT_SIZE as u32,
            msg_count: SLOT_COUNT,
            write_ptr: 0,
            flags: TX_FLAGS_SWAP_RX,
            rx_hdr_off: RX_HEADER_OFFSET as u32,
            entry_off: ENTRY_OFFSET as u32,
        }
    }

    /// The eight fields in layout order, with their names.
    pub const fn fields(&self) -> [(&'static str, u32); 8] {
        [
            ("version", self.version),
            ("size", self.size),
            ("msgSize", self.msg_size),
            ("msgCount", self.msg_count),
            ("writePtr", self.write_ptr),
            ("flags", self.flags),
            ("rxHdrOff", self.rx_hdr_off),
            ("entryOff", self.entry_off),
        ]
    }

    /// The header from its eight words in layout order.
    pub const fn from_words(w: [u32; 8]) -> TxHeader {
        TxHeader {
            version: w[0],
            size: w[1],
            msg_size: w[2],
            msg_count: w[3],
            write_ptr: w[4],
            flags: w[5],
            rx_hdr_off: w[6],
            entry_off: w[7],
        }
    }

    /// Checks every field but `writePtr` against [`TxHeader::initial`], and `writePtr`
    /// against the slot count.
    pub fn check(&self) -> Result<(), QueueError> {
        for ((field, found), (_, expected)) in
            self.fields().into_iter().zip(Self::initial().fields())
        {
            if field == "writePtr" {
                SlotIndex::new(found)?;
            } else if found != expected {
                return Err(QueueError::BadHeader {
                    field,
                    found,
                    expected,
                });
            }
        }
        Ok(())
    }
}

/// One queue region inside the shared block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRegion {
    base: u64,
}

impl QueueRegion {
    /// The region starting at block offset `base`.
    pub const fn at(base: u64) -> QueueRegion {
        QueueRegion { base }
    }

    /// Block offset of the region (and of its tx header).
    pub const fn base(self) -> u64 {
        self.base
    }

    /// Block offset of tx header word `i` (0..8).
    pub const fn tx_word(self, i: u64) -> u64 {
        self.base + 4 * i
    }

    /// Block offset of the producer's `writePtr`.
    pub const fn write_ptr(self) -> u64 {
        self.base + TxHeader::WRITE_PTR_OFFSET
    }

    /// Block offset of `msgCount`.
    pub const fn msg_count(self) -> u64 {
        self.base + TxHeader::MSG_COUNT_OFFSET
    }

    /// Block offset of the rx header's `readPtr` (the other queue's read index).
    pub const fn rx_read_ptr(self) -> u64 {
        self.base + RX_HEADER_OFFSET
    }

    /// Block offset of slot `slot`.
    pub const fn slot(self, slot: SlotIndex) -> u64 {
        self.base + ENTRY_OFFSET + slot.0 as u64 * SLOT_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(i: u32) -> SlotIndex {
        SlotIndex::new(i).unwrap()
    }

    #[test]
    fn ring_math() {
        assert_eq!(free_slots(s(0), s(0)), 62);
        assert_eq!(free_slots(s(5), s(4)), 0);
        assert_eq!(free_slots(s(0), s(62)), 0);
        assert_eq!(free_slots(s(10), s(60)), 12);
        assert_eq!(used_slots(s(60), s(2)), 5);
        assert_eq!(used_slots(s(7), s(7)), 0);
        for rx in 0..SLOT_COUNT {
            for tx in 0..SLOT_COUNT {
                assert_eq!(free_slots(s(rx), s(tx)) + used_slots(s(rx), s(tx)), 62);
            }
        }
        assert_eq!(s(60).advance(5), s(2));
        assert_eq!(s(0).advance(u32::MAX), s((u32::MAX as u64 % 63) as u32));
        assert_eq!(SlotIndex::new(63), Err(QueueError::BadPointer(63)));
    }

    #[test]
    fn header_layout_and_checks() {
        let h = TxHeader::initial();
        assert_eq!(
            h.fields().map(|(_, v)| v),
            [0, 0x40000, 0x1000, 63, 0, 1, 0x20, 0x1000]
        );
        assert_eq!(TxHeader::from_words(h.fields().map(|(_, v)| v)), h);
        assert_eq!(h.check(), Ok(()));
        let moved = TxHeader { write_ptr: 62, ..h };
        assert_eq!(moved.check(), Ok(()));
        assert_eq!(
            TxHeader { write_ptr: 63, ..h }.check(),
            Err(QueueError::BadPointer(63))
        );
        assert!(matches!(
            TxHeader { msg_count: 64, ..h }.check(),
            Err(QueueError::BadHeader {
                field: "msgCount",
                ..
            })
        ));
        let q = QueueRegion::at(0x41000);
        assert_eq!(q.write_ptr(), 0x41010);
        assert_eq!(q.rx_read_ptr(), 0x41020);
        assert_eq!(q.slot(s(62)), 0x41000 + 0x1000 + 62 * 0x1000);
        assert_eq!(q.slot(s(62)) + SLOT_SIZE, 0x41000 + QUEUE_SIZE);
    }
}
