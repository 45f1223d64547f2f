//! The GSP's end of the shared queues (gpu-facts 3.1): it consumes the CPU→GSP command
//! queue and produces the GSP→CPU message queue, reaching the shared block through its
//! page-table array, page by page, as the firmware does.
//!
//! Pointer ownership: the GSP writes the message queue's tx header (`writePtr` at +0x10)
//! and its own read pointer of the command queue, which lives in the message queue region
//! at +0x20. It reads the CPU's `writePtr` at cmdq +0x10 and the CPU's read pointer of the
//! message queue at cmdq +0x20.

use std::sync::Arc;

use thiserror::Error;

use super::dma::{DmaError, DmaSpace, DmaTarget};
use super::faults::Corruption;
use super::wire::{self, WireError, WireMessage, SLOT_SIZE};

/// Size of one GSP page (and of a page-table array entry's page).
pub const GSP_PAGE: u64 = 0x1000;
/// Slots per queue.
pub const SLOT_COUNT: u32 = 63;
/// Bytes of one queue region: header page plus 63 slots.
pub const QUEUE_SIZE: u64 = 0x40000;
/// Offset in a queue region of the rx header (the other queue's read pointer).
pub const RX_HEADER_OFFSET: u64 = 0x20;
/// Offset in a queue region of the first slot.
pub const ENTRY_OFFSET: u64 = 0x1000;
/// Offset of `writePtr` in the tx header.
const WRITE_PTR: u64 = 0x10;
/// The `flags` value of a tx header ("swap RX").
const TX_FLAGS: u32 = 1;

/// MESSAGE_QUEUE_INIT_ARGUMENTS: where the shared block is (gpu-facts 3.1). It travels to
/// the GSP inside GSP_ARGUMENTS_CACHED, which the emulated GSP reads at STARTCPU
/// ([`super::libos`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageQueueInitArgs {
    /// DMA address of the page-table array (page 0 of the shared block).
    pub shared_mem_phys_addr: u64,
    /// Entries of the page-table array (pages of the block, 129 on silicon).
    pub page_table_entry_count: u32,
    /// Offset in the block of the command queue (0x1000).
    pub cmd_queue_offset: u64,
    /// Offset in the block of the status (message) queue (0x41000).
    pub stat_queue_offset: u64,
}

/// Errors of the GSP's queue endpoint.
#[derive(Debug, Error)]
pub enum QueueError {
    /// A DMA address did not resolve, or the memory behind it failed an access.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// The init arguments or the page table are unusable.
    #[error("unusable queue setup: {0}")]
    Setup(String),
    /// The CPU's command queue header is not the one the protocol fixes.
    #[error("command queue header field {field} is {found:#x}, expected {expected:#x}")]
    BadCmdqHeader {
        /// Field name.
        field: &'static str,
        /// Value found.
        found: u32,
        /// Value required.
        expected: u32,
    },
    /// The CPU's write pointer (or read pointer) is not a slot index.
    #[error("CPU queue pointer {0} is not below {SLOT_COUNT}")]
    BadPointer(u32),
    /// A command failed verification; it was skipped (see the module documentation of
    /// [`super`] for the resynchronisation rule).
    #[error("command skipped: {0}")]
    Corrupt(#[from] WireError),
    /// The message does not fit one element.
    #[error("message of {0} bytes does not fit one element")]
    TooLarge(usize),
}

/// The shared block as the GSP sees it: 4 KiB pages found through the page-table array,
/// each a (target, offset) pair; pages may live in different targets.
#[derive(Debug)]
struct Pages {
    pages: Vec<(Arc<dyn DmaTarget>, u64)>,
}

impl Pages {
    fn locate(&self, offset: u64) -> Result<(&dyn DmaTarget, u64), QueueError> {
        let page = usize::try_from(offset / GSP_PAGE).unwrap_or(usize::MAX);
        let (mem, base) = self
            .pages
            .get(page)
            .ok_or_else(|| QueueError::Setup(format!("offset {offset:#x} past the block")))?;
        Ok((mem.as_ref(), base + offset % GSP_PAGE))
    }

    /// Runs `f` on each page-contained piece of `[offset, offset + len)`.
    fn split(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(&dyn DmaTarget, u64, std::ops::Range<usize>) -> Result<(), QueueError>,
    ) -> Result<(), QueueError> {
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let room = (GSP_PAGE - at % GSP_PAGE) as usize;
            let n = room.min(len - done);
            let (mem, off) = self.locate(at)?;
            f(mem, off, done..done + n)?;
            done += n;
        }
        Ok(())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), QueueError> {
        let len = buf.len();
        self.split(offset, len, |mem, off, r| Ok(mem.read(off, &mut buf[r])?))
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), QueueError> {
        self.split(offset, data.len(), |mem, off, r| {
            Ok(mem.write(off, &data[r])?)
        })
    }

    fn load_u32(&self, offset: u64) -> Result<u32, QueueError> {
        let (mem, off) = self.locate(offset)?;
        Ok(mem.load_u32(off)?)
    }

    fn store_u32(&self, offset: u64, value: u32) -> Result<(), QueueError> {
        let (mem, off) = self.locate(offset)?;
        Ok(mem.store_u32(off, value)?)
    }
}

/// Counters of the GSP endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Commands received intact.
    pub commands: u64,
    /// Commands skipped as corrupt.
    pub corrupt_commands: u64,
    /// Commands whose message sequence number was not the expected one.
    pub sequence_gaps: u64,
    /// Messages posted.
    pub messages: u64,
}

/// The GSP's end of the queues.
#[derive(Debug)]
pub struct GspQueues {
    mem: Pages,
    cmdq: u64,
    msgq: u64,
    /// GSP's read index in the command queue (published at msgq +0x20).
    cmd_read: u32,
    /// GSP's write index in the message queue (published at msgq +0x10).
    msg_write: u32,
    /// Next message sequence number.
    tx_seq: u32,
    /// Expected sequence number of the next command, once known.
    rx_seq: Option<u32>,
    stats: EndpointStats,
}

impl GspQueues {
    /// Finds the shared block through `args` in `dma`, checks the command queue header the
    /// CPU wrote, and initialises the message queue header and the GSP's read pointer.
    pub fn attach(dma: &DmaSpace, args: &MessageQueueInitArgs) -> Result<GspQueues, QueueError> {
        let n = args.page_table_entry_count;
        if n == 0 || u64::from(n) * 8 > GSP_PAGE {
            return Err(QueueError::Setup(format!("{n} page-table entries")));
        }
        let (table, table_off) = dma.resolve(args.shared_mem_phys_addr, GSP_PAGE)?;
        let mut raw = vec![0u8; n as usize * 8];
        table.read(table_off, &mut raw)?;
        let mut pages = Vec::with_capacity(n as usize);
        for entry in raw.chunks_exact(8) {
            let addr = u64::from_le_bytes(entry.try_into().expect("8-byte chunk"));
            if addr % GSP_PAGE != 0 {
                return Err(QueueError::Setup(format!(
                    "page address {addr:#x} unaligned"
                )));
            }
            pages.push(dma.resolve(addr, GSP_PAGE)?);
        }
        let size = u64::from(n) * GSP_PAGE;
        for (name, off) in [
            ("command", args.cmd_queue_offset),
            ("status", args.stat_queue_offset),
        ] {
            if off % GSP_PAGE != 0 || off.checked_add(QUEUE_SIZE).is_none_or(|e| e > size) {
                return Err(QueueError::Setup(format!(
                    "{name} queue at {off:#x} does not fit {size:#x} bytes"
                )));
            }
        }
        let q = GspQueues {
            mem: Pages { pages },
            cmdq: args.cmd_queue_offset,
            msgq: args.stat_queue_offset,
            cmd_read: 0,
            msg_write: 0,
            tx_seq: 0,
            rx_seq: None,
            stats: EndpointStats::default(),
        };
        q.check_cmdq_header()?;
        q.init_msgq_header()?;
        Ok(q)
    }

    fn tx_header(&self) -> [(&'static str, u32); 8] {
        [
            ("version", 0),
            ("size", QUEUE_SIZE as u32),
            ("msgSize", SLOT_SIZE as u32),
            ("msgCount", SLOT_COUNT),
            ("writePtr", 0),
            ("flags", TX_FLAGS),
            ("rxHdrOff", RX_HEADER_OFFSET as u32),
            ("entryOff", ENTRY_OFFSET as u32),
        ]
    }

    fn check_cmdq_header(&self) -> Result<(), QueueError> {
        for (i, (field, expected)) in self.tx_header().into_iter().enumerate() {
            let found = self.mem.load_u32(self.cmdq + 4 * i as u64)?;
            // writePtr may already have moved (commands queued before the GSP started).
            if field != "writePtr" && found != expected {
                return Err(QueueError::BadCmdqHeader {
                    field,
                    found,
                    expected,
                });
            }
        }
        Ok(())
    }

    fn init_msgq_header(&self) -> Result<(), QueueError> {
        // Every header field is accessed atomically by both sides; msgCount goes last: the
        // CPU trusts the header once msgCount reads 63.
        self.mem.store_u32(self.msgq + RX_HEADER_OFFSET, 0)?;
        for (i, (field, v)) in self.tx_header().into_iter().enumerate() {
            if field != "msgCount" {
                self.mem.store_u32(self.msgq + 4 * i as u64, v)?;
            }
        }
        self.mem.store_u32(self.msgq + 0x0C, SLOT_COUNT)?;
        Ok(())
    }

    /// Counters so far.
    pub fn stats(&self) -> EndpointStats {
        self.stats
    }

    /// Loads a pointer the CPU wrote (in the command queue region), checked to be a slot.
    fn cpu_ptr(&self, offset: u64) -> Result<u32, QueueError> {
        let p = self.mem.load_u32(self.cmdq + offset)?;
        if p >= SLOT_COUNT {
            return Err(QueueError::BadPointer(p));
        }
        Ok(p)
    }

    fn cpu_write_ptr(&self) -> Result<u32, QueueError> {
        self.cpu_ptr(WRITE_PTR)
    }

    fn cpu_read_ptr(&self) -> Result<u32, QueueError> {
        self.cpu_ptr(RX_HEADER_OFFSET)
    }

    fn slot_offset(queue: u64, slot: u32) -> u64 {
        queue + ENTRY_OFFSET + u64::from(slot) * SLOT_SIZE as u64
    }

    /// Slots of commands waiting.
    pub fn pending_command_slots(&self) -> Result<u32, QueueError> {
        Ok((self.cpu_write_ptr()? + SLOT_COUNT - self.cmd_read) % SLOT_COUNT)
    }

    /// Free slots in the message queue.
    pub fn free_message_slots(&self) -> Result<u32, QueueError> {
        Ok((self.cpu_read_ptr()? + SLOT_COUNT - self.msg_write - 1) % SLOT_COUNT)
    }

    fn copy_slots(
        &self,
        queue: u64,
        first: u32,
        count: u32,
        out: &mut [u8],
    ) -> Result<(), QueueError> {
        for i in 0..count {
            let slot = (first + i) % SLOT_COUNT;
            let dst = &mut out[i as usize * SLOT_SIZE..(i as usize + 1) * SLOT_SIZE];
            self.mem.read(Self::slot_offset(queue, slot), dst)?;
        }
        Ok(())
    }

    fn advance_read(&mut self, slots: u32) -> Result<(), QueueError> {
        self.cmd_read = (self.cmd_read + slots) % SLOT_COUNT;
        self.mem
            .store_u32(self.msgq + RX_HEADER_OFFSET, self.cmd_read)
    }

    /// Takes the next command, if any: copies it out of the ring, verifies it, then
    /// releases its slots. A corrupt command is skipped (its `elemCount` slots if that is
    /// plausible, else everything up to the CPU's write pointer) and reported as
    /// [`QueueError::Corrupt`].
    pub fn receive(&mut self) -> Result<Option<WireMessage>, QueueError> {
        let avail = self.pending_command_slots()?;
        if avail == 0 {
            return Ok(None);
        }
        let mut first = vec![0u8; SLOT_SIZE];
        self.copy_slots(self.cmdq, self.cmd_read, 1, &mut first)?;
        let slots = match wire::claimed_slots(&first) {
            Ok(n) if n <= avail => n,
            Ok(n) => {
                // More slots than the writer published: the element cannot be delimited.
                let length = wire::RpcHeader::parse(&first).length;
                let e = WireError::BadLength {
                    elem_count: n,
                    length,
                };
                return self.skip(avail, e);
            }
            Err(e) => {
                let claimed = wire::ElementHeader::parse(&first).elem_count;
                let skip = if (1..=avail.min(wire::MAX_ELEMENT_SLOTS)).contains(&claimed) {
                    claimed
                } else {
                    avail
                };
                return self.skip(skip, e);
            }
        };
        let mut element = first;
        element.resize(slots as usize * SLOT_SIZE, 0);
        self.copy_slots(
            self.cmdq,
            (self.cmd_read + 1) % SLOT_COUNT,
            slots - 1,
            &mut element[SLOT_SIZE..],
        )?;
        match wire::decode(&element) {
            Ok((header, msg)) => {
                self.advance_read(slots)?;
                if self.rx_seq.is_some_and(|s| s != header.seq_num) {
                    self.stats.sequence_gaps += 1;
                }
                self.rx_seq = Some(header.seq_num.wrapping_add(1));
                self.stats.commands += 1;
                Ok(Some(msg))
            }
            Err(e) => self.skip(slots, e),
        }
    }

    fn skip(&mut self, slots: u32, e: WireError) -> Result<Option<WireMessage>, QueueError> {
        self.advance_read(slots)?;
        self.rx_seq = None;
        self.stats.corrupt_commands += 1;
        Err(QueueError::Corrupt(e))
    }

    /// Posts `msg` if the message queue has room (returns `false` if not), damaged as
    /// `corruption` says.
    pub fn send(
        &mut self,
        msg: &WireMessage,
        corruption: Option<Corruption>,
    ) -> Result<bool, QueueError> {
        let mut b =
            wire::encode(msg, self.tx_seq).map_err(|_| QueueError::TooLarge(msg.payload.len()))?;
        let slots = (b.len() / SLOT_SIZE) as u32;
        if self.free_message_slots()? < slots {
            return Ok(false);
        }
        match corruption {
            Some(Corruption::Checksum) => b[0x20] ^= 0x01,
            Some(Corruption::Length) => {
                b[0x38..0x3C].copy_from_slice(&0x0010_0000u32.to_le_bytes())
            }
            Some(Corruption::ElemCount) => b[0x28..0x2C].fill(0),
            None => {}
        }
        for i in 0..slots {
            let slot = (self.msg_write + i) % SLOT_COUNT;
            let chunk = &b[i as usize * SLOT_SIZE..(i as usize + 1) * SLOT_SIZE];
            self.mem.write(Self::slot_offset(self.msgq, slot), chunk)?;
        }
        self.msg_write = (self.msg_write + slots) % SLOT_COUNT;
        // Release store: the slots above are visible before the new pointer.
        self.mem.store_u32(self.msgq + WRITE_PTR, self.msg_write)?;
        self.tx_seq = self.tx_seq.wrapping_add(1);
        self.stats.messages += 1;
        Ok(true)
    }
}
