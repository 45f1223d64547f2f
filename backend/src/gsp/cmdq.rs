//! The CPU's end of the queues: sending commands and receiving messages.
//!
//! **Send:** encode the element (checksummed), wait (bounded) until the GSP has freed
//! enough command-queue slots, copy the slots in (wrapping at the ring end), publish the
//! new `writePtr` with a release store (after the data), then ring the doorbell (BAR0
//! write of 0 to `NV_PGSP_QUEUE_HEAD(0)`, 0x110C00).
//!
//! **Receive:** read the GSP's `writePtr` (acquire), **copy** the element out of the ring
//! into an owned buffer (first slot, then the rest once its slot count is known), verify the
//! copy (length, slot count, checksum, RPC header), and only then advance our read pointer,
//! which hands the slots back to the GSP. Nothing ever refers into the ring: the GSP may
//! rewrite a slot as soon as the read pointer passes it, and a GSP that misbehaves could
//! rewrite it even earlier, so every check is made on the copy.
//!
//! **Resynchronisation** after a bad element (reported as [`CmdqError::Corrupt`]; the
//! queue stays usable): if the element's `elemCount` is plausible (1–16 and within what the
//! GSP published) its slots are skipped; otherwise the read pointer jumps to the GSP's
//! write pointer, dropping everything published so far. Either way the next message's
//! sequence number is accepted as the new expectation.

use std::time::{Duration, Instant};

use thiserror::Error;

use super::element::{self, Element, ElementError, MessageHeader, Outgoing, MAX_ELEMENT_SLOTS};
use super::queue::{self, QueueError, SlotIndex, TxHeader, SLOT_COUNT, SLOT_SIZE};
use super::shmem::GspMem;
use crate::host_gpu::{AccessWidth, HostGpu, HostGpuError};

/// `NV_PGSP_QUEUE_HEAD(0)`: the CPU→GSP doorbell (gpu-facts 3.3).
pub const GSP_DOORBELL: u64 = 0x11_0C00;
/// GSP falcon `IRQSCLR`: write 1s to clear interrupt bits.
pub const GSP_IRQSCLR: u64 = 0x11_0004;
/// GSP falcon `IRQSTAT`.
pub const GSP_IRQSTAT: u64 = 0x11_0008;
/// SWGEN0 in IRQSTAT/IRQSCLR: the GSP's "messages posted" interrupt.
pub const IRQ_SWGEN0: u32 = 1 << 6;

/// How the receiver got back in step after a bad element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resync {
    /// The element's own slot count was plausible: its slots were skipped.
    SkippedElement {
        /// Slots skipped.
        slots: u32,
    },
    /// The slot count was not usable: the read pointer jumped to the writer's.
    JumpedToWriter {
        /// Slots dropped.
        slots: u32,
    },
}

/// Errors of the queues.
#[derive(Debug, Error)]
pub enum CmdqError {
    /// Access to the shared block failed.
    #[error("GSP shared memory access failed: {0}")]
    Shared(#[source] HostGpuError),
    /// The doorbell or interrupt register write failed.
    #[error("GSP register access failed: {0}")]
    Register(#[source] HostGpuError),
    /// The command cannot be encoded (too large for one element).
    #[error(transparent)]
    Encode(ElementError),
    /// No room for the command right now ([`Cmdq::try_send`]).
    #[error("command queue full: {needed} slot(s) needed, {free} free")]
    Full {
        /// Slots the command needs.
        needed: u32,
        /// Slots free.
        free: u32,
    },
    /// The GSP did not free room for the command in time.
    #[error("command queue stayed full for {waited:?}: {needed} slot(s) needed, {free} free")]
    SendTimeout {
        /// Slots the command needs.
        needed: u32,
        /// Slots free at the end.
        free: u32,
        /// How long the send waited.
        waited: Duration,
    },
    /// No message arrived in time.
    #[error("no GSP message within {0:?}")]
    ReceiveTimeout(Duration),
    /// The GSP did not initialise the message queue header in time.
    #[error("the GSP did not initialise its message queue within {0:?}")]
    MsgqNotReady(Duration),
    /// A pointer or header the GSP wrote is invalid.
    #[error("GSP message queue: {0}")]
    Queue(#[from] QueueError),
    /// A message failed verification; it was dropped and the queue resynchronised.
    #[error("GSP message dropped ({resync:?}): {error}")]
    Corrupt {
        /// What was wrong.
        error: ElementError,
        /// How the receiver recovered.
        resync: Resync,
    },
}

/// Counters of one [`Cmdq`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Commands sent.
    pub sent: u64,
    /// Messages received intact.
    pub received: u64,
    /// Messages dropped as corrupt.
    pub corrupt: u64,
    /// Resynchronisations that jumped to the writer's pointer.
    pub jumped_to_writer: u64,
    /// Messages whose `seqNum` was not the expected one (logged, not fatal).
    pub sequence_gaps: u64,
    /// Sends that found the queue full and had to wait.
    pub sends_waited: u64,
}

/// Spin, then yield, then sleep: cheap when the other side answers within microseconds,
/// gentle when it does not.
#[derive(Debug)]
pub(crate) struct Backoff {
    start: Instant,
    rounds: u32,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff {
            start: Instant::now(),
            rounds: 0,
        }
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub(crate) fn snooze(&mut self) {
        self.rounds = self.rounds.saturating_add(1);
        if self.rounds < 64 {
            std::hint::spin_loop();
        } else if self.rounds < 1024 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// The CPU's end of the GSP queues.
pub struct Cmdq<'a> {
    host: &'a dyn HostGpu,
    mem: GspMem,
    /// Our write index in the command queue (published at cmdq +0x10).
    tx: SlotIndex,
    /// Our read index in the message queue (published at cmdq +0x20).
    rx: SlotIndex,
    /// `seqNum` of the next command.
    tx_seq: u32,
    /// Expected `seqNum` of the next message, once known.
    rx_seq: Option<u32>,
    msgq_ready: bool,
    stats: QueueStats,
}

impl std::fmt::Debug for Cmdq<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmdq")
            .field("gpu", &self.host.identity().name)
            .field("tx", &self.tx)
            .field("rx", &self.rx)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<'a> Cmdq<'a> {
    /// The queues of a freshly initialised block `mem`, driven through `host`.
    pub fn new(host: &'a dyn HostGpu, mem: GspMem) -> Cmdq<'a> {
        Cmdq {
            host,
            mem,
            tx: SlotIndex::ZERO,
            rx: SlotIndex::ZERO,
            tx_seq: 0,
            rx_seq: None,
            msgq_ready: false,
            stats: QueueStats::default(),
        }
    }

    /// The shared block.
    pub fn memory(&self) -> &GspMem {
        &self.mem
    }

    /// Counters so far.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    fn load(&self, offset: u64) -> Result<u32, CmdqError> {
        self.mem
            .buffer()
            .load_u32(offset)
            .map_err(CmdqError::Shared)
    }

    fn store(&self, offset: u64, value: u32) -> Result<(), CmdqError> {
        self.mem
            .buffer()
            .store_u32(offset, value)
            .map_err(CmdqError::Shared)
    }

    /// Free command-queue slots right now.
    pub fn free_slots(&self) -> Result<u32, CmdqError> {
        // The GSP's read index of the command queue lives in the message queue region.
        let gsp_rx = SlotIndex::new(self.load(GspMem::msgq().rx_read_ptr())?)?;
        Ok(queue::free_slots(gsp_rx, self.tx))
    }

    /// Sends a command if it fits now; [`CmdqError::Full`] if not.
    pub fn try_send(&mut self, msg: Outgoing<'_>) -> Result<(), CmdqError> {
        let bytes = element::encode(msg, self.tx_seq).map_err(CmdqError::Encode)?;
        let needed = (bytes.len() as u64 / SLOT_SIZE) as u32;
        let free = self.free_slots()?;
        if free < needed {
            return Err(CmdqError::Full { needed, free });
        }
        self.publish(&bytes)
    }

    /// Sends a command, waiting up to `timeout` for room.
    pub fn send(&mut self, msg: Outgoing<'_>, timeout: Duration) -> Result<(), CmdqError> {
        let bytes = element::encode(msg, self.tx_seq).map_err(CmdqError::Encode)?;
        let needed = (bytes.len() as u64 / SLOT_SIZE) as u32;
        let mut backoff = Backoff::new();
        let mut waited = false;
        loop {
            let expired = backoff.elapsed() >= timeout;
            let free = self.free_slots()?;
            if free >= needed {
                return self.publish(&bytes);
            }
            if expired {
                return Err(CmdqError::SendTimeout {
                    needed,
                    free,
                    waited: backoff.elapsed(),
                });
            }
            if !waited {
                waited = true;
                self.stats.sends_waited += 1;
            }
            backoff.snooze();
        }
    }

    /// Copies an encoded element into the ring at `tx`, publishes `writePtr`, rings.
    fn publish(&mut self, bytes: &[u8]) -> Result<(), CmdqError> {
        let cmdq = GspMem::cmdq();
        let buffer = self.mem.buffer();
        let mut slot = self.tx;
        for chunk in bytes.chunks(SLOT_SIZE as usize) {
            buffer
                .write(cmdq.slot(slot), chunk)
                .map_err(CmdqError::Shared)?;
            slot = slot.advance(1);
        }
        // The slots must be visible before the pointer that publishes them: the store is a
        // release store; the fence makes the intent explicit for any buffer implementation.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.store(cmdq.write_ptr(), slot.raw())?;
        self.tx = slot;
        self.tx_seq = self.tx_seq.wrapping_add(1);
        self.stats.sent += 1;
        self.host
            .bar0_write(GSP_DOORBELL, AccessWidth::Dword, 0)
            .map_err(CmdqError::Register)
    }

    /// Whether the GSP has initialised the message queue header (checked once it has).
    fn msgq_ready(&mut self) -> Result<bool, CmdqError> {
        if self.msgq_ready {
            return Ok(true);
        }
        let msgq = GspMem::msgq();
        if self.load(msgq.msg_count())? != SLOT_COUNT {
            return Ok(false);
        }
        let mut words = [0u32; 8];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self.load(msgq.tx_word(i as u64))?;
        }
        TxHeader::from_words(words).check()?;
        self.msgq_ready = true;
        Ok(true)
    }

    /// Waits up to `timeout` for the GSP to initialise the message queue.
    pub fn wait_msgq_ready(&mut self, timeout: Duration) -> Result<(), CmdqError> {
        let mut backoff = Backoff::new();
        while !self.msgq_ready()? {
            if backoff.elapsed() >= timeout {
                return Err(CmdqError::MsgqNotReady(timeout));
            }
            backoff.snooze();
        }
        Ok(())
    }

    fn copy_slots(&self, first: SlotIndex, out: &mut [u8]) -> Result<(), CmdqError> {
        let msgq = GspMem::msgq();
        let mut slot = first;
        for chunk in out.chunks_mut(SLOT_SIZE as usize) {
            self.mem
                .buffer()
                .read(msgq.slot(slot), chunk)
                .map_err(CmdqError::Shared)?;
            slot = slot.advance(1);
        }
        Ok(())
    }

    /// Hands `slots` slots back to the GSP.
    fn release(&mut self, slots: u32) -> Result<(), CmdqError> {
        self.rx = self.rx.advance(slots);
        // Our read index of the message queue lives in the command queue region.
        self.store(GspMem::cmdq().rx_read_ptr(), self.rx.raw())
    }

    /// Takes the next message if one is there. A bad message is dropped, the queue
    /// resynchronised, and [`CmdqError::Corrupt`] returned; the next call carries on.
    pub fn try_receive(&mut self) -> Result<Option<Element>, CmdqError> {
        if !self.msgq_ready()? {
            return Ok(None);
        }
        let write = SlotIndex::new(self.load(GspMem::msgq().write_ptr())?)?;
        let available = queue::used_slots(self.rx, write);
        if available == 0 {
            return Ok(None);
        }
        self.host
            .bar0_write(GSP_IRQSCLR, AccessWidth::Dword, u64::from(IRQ_SWGEN0))
            .map_err(CmdqError::Register)?;
        let mut bytes = vec![0u8; SLOT_SIZE as usize];
        self.copy_slots(self.rx, &mut bytes)?;
        let slots = match element::claimed_slots(&bytes, available) {
            Ok(slots) => slots,
            Err(error) => {
                let claimed = MessageHeader::decode(&bytes).elem_count;
                let plausible = (1..=MAX_ELEMENT_SLOTS.min(available)).contains(&claimed);
                let resync = if plausible {
                    Resync::SkippedElement { slots: claimed }
                } else {
                    Resync::JumpedToWriter { slots: available }
                };
                return self.drop_corrupt(error, resync);
            }
        };
        bytes.resize(slots as usize * SLOT_SIZE as usize, 0);
        self.copy_slots(self.rx.advance(1), &mut bytes[SLOT_SIZE as usize..])?;
        match element::decode(&bytes) {
            Ok(element) => {
                self.release(slots)?;
                if let Some(expected) = self.rx_seq {
                    if element.header.seq_num != expected {
                        log::warn!(
                            "GSP message seqNum {} where {expected} was expected",
                            element.header.seq_num
                        );
                        self.stats.sequence_gaps += 1;
                    }
                }
                self.rx_seq = Some(element.header.seq_num.wrapping_add(1));
                self.stats.received += 1;
                Ok(Some(element))
            }
            Err(error) => self.drop_corrupt(error, Resync::SkippedElement { slots }),
        }
    }

    fn drop_corrupt(
        &mut self,
        error: ElementError,
        resync: Resync,
    ) -> Result<Option<Element>, CmdqError> {
        let slots = match resync {
            Resync::SkippedElement { slots } => slots,
            Resync::JumpedToWriter { slots } => {
                self.stats.jumped_to_writer += 1;
                slots
            }
        };
        self.release(slots)?;
        self.rx_seq = None;
        self.stats.corrupt += 1;
        log::warn!("GSP message dropped ({resync:?}): {error}");
        Err(CmdqError::Corrupt { error, resync })
    }

    /// Waits up to `timeout` for the next message (a corrupt one is returned as an error).
    pub fn receive(&mut self, timeout: Duration) -> Result<Element, CmdqError> {
        let mut backoff = Backoff::new();
        loop {
            let expired = backoff.elapsed() >= timeout;
            if let Some(element) = self.try_receive()? {
                return Ok(element);
            }
            if expired {
                return Err(CmdqError::ReceiveTimeout(timeout));
            }
            backoff.snooze();
        }
    }
}
