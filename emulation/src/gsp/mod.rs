//! The emulated GSP: the GPU System Processor's end of the command/message queues
//! (gpu-facts section 3), played by a thread of the emulator.
//!
//! # How the host reaches it
//! - **Memory.** The host owns the shared block (129 pages: page-table array, command
//!   queue, message queue). It hands the emulated GPU the block's memfd, which the GPU maps
//!   a second time into its emulated IOMMU ([`DmaSpace`]) at a DMA address; the page-table
//!   array the host writes into page 0 holds the DMA address of every page, and the GSP
//!   finds each page through it ([`GspQueues::attach`]), as firmware does.
//! - **Start.** [`EmulatedGsp::start`] plays the whole firmware boot chain: it takes the
//!   MESSAGE_QUEUE_INIT_ARGUMENTS ([`MessageQueueInitArgs`]) that hardware would find in
//!   GSP_ARGUMENTS_CACHED, checks the command queue header, initialises the message queue
//!   header, and starts the GSP thread, which then consumes whatever the host queued
//!   before (SET_SYSTEM_INFO, SET_REGISTRY) and posts GSP_INIT_DONE ([`firmware`]).
//! - **Doorbell.** A BAR0 write to `NV_PGSP_QUEUE_HEAD(0)` (0x110C00) wakes the thread
//!   through a condition variable ([`falcon`]); the write returns at once, so the host's
//!   own waiting and timeouts are real. The thread also wakes every 5 ms when idle (to
//!   notice [`GspFaults::resume`]) and every 100 µs while replies wait for room in the
//!   message queue (hardware would poll the CPU's read pointer the same way).
//! - **Interrupt.** After posting messages the GSP raises SWGEN0 (bit 6 of the falcon
//!   IRQSTAT, 0x110008); the host acks through IRQSCLR (0x110004).
//!
//! Backpressure: the GSP consumes a command only once the replies of the previous one are
//! posted, so a host that stops draining the message queue eventually finds the command
//! queue full.
//!
//! Resynchronisation after a corrupt command: the GSP skips `elemCount` slots when that is
//! between 1 and 16 and within what the writer published, else it jumps to the writer's
//! pointer. The host driver applies the same rule to messages.

pub mod dma;
pub mod falcon;
pub mod faults;
pub mod fb;
pub mod firmware;
pub mod objects;
pub mod queues;
pub mod rm;
pub mod shared_memory;
pub mod wire;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

pub use dma::{DmaError, DmaSpace};
pub use falcon::{FalconIrq, GspFalcon};
pub use faults::{Corruption, GspFaults};
pub use firmware::FirmwareState;
pub use queues::{EndpointStats, GspQueues, MessageQueueInitArgs, QueueError};
pub use shared_memory::{SharedMemory, SharedMemoryError};

use crate::profile::ChipProfile;
use firmware::{Firmware, Outgoing};

/// Idle wake-up period of the GSP thread.
const IDLE_POLL: Duration = Duration::from_millis(5);
/// Wake-up period while replies wait for room in the message queue.
const BACKLOG_POLL: Duration = Duration::from_micros(100);
/// Most error strings kept in [`GspStats::errors`].
const ERRORS_KEPT: usize = 32;

/// Errors of starting the emulated GSP.
#[derive(Debug, Error)]
pub enum GspError {
    /// The shared block could not be found or is not set up as the protocol requires.
    #[error("GSP queue setup failed: {0}")]
    Queues(#[from] QueueError),
    /// The GSP thread could not be started.
    #[error("starting the GSP thread failed: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Counters of the emulated GSP (across boots).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GspStats {
    /// Counters of the current (or last) boot's queue endpoint.
    pub endpoint: EndpointStats,
    /// Replies dropped by [`GspFaults::drop_next_replies`].
    pub replies_dropped: u64,
    /// Messages damaged by [`GspFaults::corrupt_next_message`].
    pub messages_corrupted: u64,
    /// Times the thread woke up.
    pub wakeups: u64,
    /// The latest errors (corrupt commands, queue failures), oldest first.
    pub errors: Vec<String>,
}

/// State shared between [`EmulatedGsp`] and its thread.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    posts: Mutex<VecDeque<Outgoing>>,
    firmware: Mutex<Option<Firmware>>,
    stats: Mutex<GspStats>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn error(&self, e: String) {
        log::warn!("emulated GSP: {e}");
        let mut s = lock(&self.stats);
        if s.errors.len() == ERRORS_KEPT {
            s.errors.remove(0);
        }
        s.errors.push(e);
    }
}

/// The emulated GSP of one [`crate::EmulatedGpu`].
#[derive(Debug)]
pub struct EmulatedGsp {
    profile: &'static ChipProfile,
    falcon: Arc<GspFalcon>,
    dma: Arc<DmaSpace>,
    faults: Arc<GspFaults>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl EmulatedGsp {
    /// A halted GSP of `profile` behind `falcon`'s registers, reaching host memory
    /// through `dma`.
    pub(crate) fn new(
        profile: &'static ChipProfile,
        falcon: Arc<GspFalcon>,
        dma: Arc<DmaSpace>,
    ) -> EmulatedGsp {
        EmulatedGsp {
            profile,
            falcon,
            dma,
            faults: Arc::default(),
            shared: Arc::default(),
            thread: Mutex::new(None),
        }
    }

    /// Boots the GSP on the queues `args` describes (halting a running one first, as a
    /// falcon reset would). Fails at once if the shared block cannot be reached or its
    /// command queue header is wrong.
    pub fn start(&self, args: &MessageQueueInitArgs) -> Result<(), GspError> {
        self.halt();
        let queues = GspQueues::attach(&self.dma, args)?;
        *lock(&self.shared.firmware) = Some(Firmware::new(self.profile));
        lock(&self.shared.posts).clear();
        self.shared.stop.store(false, Ordering::Release);
        let (shared, falcon, faults) = (
            Arc::clone(&self.shared),
            Arc::clone(&self.falcon),
            Arc::clone(&self.faults),
        );
        let handle = std::thread::Builder::new()
            .name(format!("gsp-{}", self.profile.name()))
            .spawn(move || GspThread::new(shared, falcon, faults, queues).run())
            .map_err(GspError::Spawn)?;
        *lock(&self.thread) = Some(handle);
        Ok(())
    }

    /// Stops the GSP thread (if running) and waits for it. Messages not yet posted are
    /// lost.
    pub fn halt(&self) {
        let Some(handle) = lock(&self.thread).take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::Release);
        self.falcon.doorbell.ring();
        if handle.join().is_err() {
            log::error!("emulated GSP thread panicked");
        }
    }

    /// Whether the GSP thread is running.
    pub fn is_running(&self) -> bool {
        lock(&self.thread)
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }

    /// A GSP-side queue endpoint on `args` without the firmware thread (halting a running
    /// GSP first), for tests that step both sides of the queues by hand.
    pub fn manual_endpoint(&self, args: &MessageQueueInitArgs) -> Result<GspQueues, GspError> {
        self.halt();
        Ok(GspQueues::attach(&self.dma, args)?)
    }

    /// The misbehaviour controls.
    pub fn faults(&self) -> &GspFaults {
        &self.faults
    }

    /// Posts an unsolicited event (any number, known or not) at the GSP's next
    /// opportunity; dropped if the GSP is not running.
    pub fn post_event(&self, function: u32, payload: Vec<u8>) {
        lock(&self.shared.posts).push_back(Outgoing::event(function, payload));
        self.falcon.doorbell.ring();
    }

    /// The firmware state of the current (or last) boot, if there was one.
    pub fn state(&self) -> Option<FirmwareState> {
        lock(&self.shared.firmware).as_ref().map(Firmware::state)
    }

    /// Counters and recent errors.
    pub fn stats(&self) -> GspStats {
        lock(&self.shared.stats).clone()
    }
}

impl Drop for EmulatedGsp {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The GSP thread's state.
struct GspThread {
    shared: Arc<Shared>,
    falcon: Arc<GspFalcon>,
    faults: Arc<GspFaults>,
    queues: GspQueues,
    /// Messages waiting for room in the message queue.
    backlog: VecDeque<Outgoing>,
}

impl GspThread {
    fn new(
        shared: Arc<Shared>,
        falcon: Arc<GspFalcon>,
        faults: Arc<GspFaults>,
        queues: GspQueues,
    ) -> GspThread {
        GspThread {
            shared,
            falcon,
            faults,
            queues,
            backlog: VecDeque::new(),
        }
    }

    fn run(mut self) {
        loop {
            // Read the doorbell count before looking at the queues: a ring after this
            // point ends the wait below at once, so no doorbell is lost.
            let seen = self.falcon.doorbell.count();
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            let progress = if self.faults.is_stalled() {
                false
            } else {
                match self.step() {
                    Ok(p) => p,
                    Err(e) => {
                        self.shared.error(format!("queue failure: {e}"));
                        false
                    }
                }
            };
            lock(&self.shared.stats).endpoint = self.queues.stats();
            if !progress {
                let period = if self.backlog.is_empty() {
                    IDLE_POLL
                } else {
                    BACKLOG_POLL
                };
                self.falcon.doorbell.wait(seen, period);
                lock(&self.shared.stats).wakeups += 1;
            }
        }
    }

    /// One round: post what is pending, then consume commands while their replies fit.
    /// Returns whether anything happened.
    fn step(&mut self) -> Result<bool, QueueError> {
        while let Some(f) = self.faults.take_unknown_event() {
            self.backlog.push_back(Outgoing::event(f, Vec::new()));
        }
        self.backlog.extend(lock(&self.shared.posts).drain(..));
        let mut progress = self.flush()?;
        while self.backlog.is_empty() {
            match self.queues.receive() {
                Ok(Some(cmd)) => {
                    let out = match lock(&self.shared.firmware).as_mut() {
                        Some(fw) => fw.handle(&cmd),
                        None => Vec::new(),
                    };
                    self.backlog.extend(out);
                    self.flush()?;
                    progress = true;
                }
                Ok(None) => break,
                Err(QueueError::Corrupt(e)) => {
                    self.shared.error(format!("command skipped: {e}"));
                    progress = true;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(progress)
    }

    /// Posts backlog messages while they fit; raises SWGEN0 if any was posted.
    fn flush(&mut self) -> Result<bool, QueueError> {
        let mut posted = false;
        while let Some(out) = self.backlog.front() {
            if out.is_reply && self.faults.take_drop_reply() {
                self.backlog.pop_front();
                lock(&self.shared.stats).replies_dropped += 1;
                continue;
            }
            if out.msg.payload.len() > wire::MAX_PAYLOAD {
                let e = format!("message {:#x} too large to post", out.msg.function);
                self.backlog.pop_front();
                self.shared.error(e);
                continue;
            }
            let slots = wire::slots_for((wire::RPC_HEADER_SIZE + out.msg.payload.len()) as u32);
            if self.queues.free_message_slots()? < slots {
                break;
            }
            let corruption = self.faults.take_corruption();
            if corruption.is_some() {
                lock(&self.shared.stats).messages_corrupted += 1;
            }
            let sent = self.queues.send(&out.msg, corruption)?;
            debug_assert!(sent, "room was checked");
            self.backlog.pop_front();
            posted = true;
        }
        if posted {
            self.falcon.raise_swgen0();
        }
        Ok(posted)
    }
}

#[cfg(test)]
mod tests;
