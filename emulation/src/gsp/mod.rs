//! The emulated GSP: the GPU System Processor's end of the command/message queues
//! (gpu-facts section 3), played by a thread of the emulator.
//!
//! # How the host reaches it
//! - **Memory.** The host owns the shared block (129 pages: page-table array, command
//!   queue, message queue) and makes it reachable by DMA: the emulated GPU puts it into
//!   its emulated IOMMU ([`DmaSpace`]) at a DMA address, either a memfd the backend
//!   allocated ([`DmaSpace::map`]) or memory reached some other way, such as the DMA map of
//!   a guest that owns the whole GPU ([`DmaSpace::map_at`] with a [`DmaTarget`]). The
//!   page-table array the host writes into page 0 holds the DMA address of every page, and
//!   the GSP finds each page through it ([`GspQueues::attach`]), as firmware does; pages
//!   may live in different targets.
//! - **Start, through registers** ([`falcon`]). The host writes the DMA address of its
//!   LibOS init-argument array to MAILBOX0 (low half) and MAILBOX1 (high half), then
//!   STARTCPU to CPUCTL. The GSP reads the array, finds the RMARGS entry, reads
//!   GSP_ARGUMENTS_CACHED and takes the MESSAGE_QUEUE_INIT_ARGUMENTS from it ([`libos`]),
//!   checks the command queue header, initialises the message queue header, and starts
//!   the GSP thread, which then consumes whatever the host queued before
//!   (SET_SYSTEM_INFO, SET_REGISTRY) and posts GSP_INIT_DONE ([`firmware`]). On success
//!   MAILBOX0 reads 0 and CPUCTL.HALTED 0. These reads are the only DMA done inside the
//!   BAR0 write (a page, 0x48 bytes, the page table and two queue headers).
//!
//!   The real chain is **not modelled**: on hardware STARTCPU runs a bootloader, SEC2's
//!   booter (Turing–Ada) or the FSP chain of trust (Hopper, Blackwell) verifies and loads
//!   GSP-RM into WPR using the WPR metadata, and GSP-RM asks the CPU to run
//!   RUN_CPU_SEQUENCER before it is up (gpu-facts 3.6, 3.7). Here the emulated GSP-RM
//!   takes its LibOS arguments at STARTCPU itself.
//! - **Start failures** leave the GSP halted (CPUCTL.HALTED stays 1), record the error in
//!   [`GspStats::errors`] and put a code in MAILBOX0 (project-defined; none has 0xBAD in
//!   its top 12 bits, which Open RM reads as a PRI error): [`START_ARGS_UNREACHABLE`],
//!   [`START_NO_RMARGS`], [`START_BAD_RMARGS_ENTRY`], [`START_RMARGS_UNREACHABLE`],
//!   [`START_QUEUES_REFUSED`], [`START_THREAD_FAILED`].
//! - **Halt.** ENGINE.RESET = 1 stops the thread (messages not yet posted are lost) and
//!   resets the falcon registers; the write waits for the thread at most
//!   [`HALT_WAIT`] (it normally stops within one wake-up), after which CPUCTL.HALTED
//!   reads 1 as soon as the thread is gone.
//! - **Doorbell.** A BAR0 write to `NV_PGSP_QUEUE_HEAD(0)` (0x110C00) wakes the thread
//!   through a condition variable; the write returns at once, so the host's own waiting
//!   and timeouts are real. The thread also wakes every 5 ms when idle (to notice
//!   [`GspFaults::resume`]) and every 100 µs while replies wait for room in the message
//!   queue (hardware would poll the CPU's read pointer the same way).
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
pub mod libos;
pub mod objects;
pub mod queues;
pub mod rm;
pub mod shared_memory;
pub mod wire;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

pub use dma::{DmaError, DmaSpace, DmaTarget};
pub use falcon::{FalconAction, FalconIrq, GspFalcon};
pub use faults::{Corruption, GspFaults};
pub use firmware::FirmwareState;
pub use libos::{GspArgumentsCached, LibosError};
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
/// Longest an ENGINE.RESET write waits for the GSP thread to stop.
pub const HALT_WAIT: Duration = Duration::from_millis(100);

/// MAILBOX0 after a failed STARTCPU: the LibOS argument array at MAILBOX1:MAILBOX0 is not
/// mapped (or not readable) for a whole page.
pub const START_ARGS_UNREACHABLE: u32 = 0x4753_0001;
/// MAILBOX0 after a failed STARTCPU: the array has no RMARGS entry before its end.
pub const START_NO_RMARGS: u32 = 0x4753_0002;
/// MAILBOX0 after a failed STARTCPU: the RMARGS entry is not contiguous system memory or
/// is smaller than GSP_ARGUMENTS_CACHED.
pub const START_BAD_RMARGS_ENTRY: u32 = 0x4753_0003;
/// MAILBOX0 after a failed STARTCPU: GSP_ARGUMENTS_CACHED is not readable at the entry's
/// address.
pub const START_RMARGS_UNREACHABLE: u32 = 0x4753_0004;
/// MAILBOX0 after a failed STARTCPU: the queues the arguments describe are unusable
/// (unmapped pages, bad geometry, wrong command queue header).
pub const START_QUEUES_REFUSED: u32 = 0x4753_0005;
/// MAILBOX0 after a failed STARTCPU: the emulator could not start the GSP thread.
pub const START_THREAD_FAILED: u32 = 0x4753_0006;

/// Errors of starting the emulated GSP.
#[derive(Debug, Error)]
pub enum GspError {
    /// The LibOS arguments could not be read.
    #[error("GSP start: {0}")]
    Libos(#[from] LibosError),
    /// The shared block could not be found or is not set up as the protocol requires.
    #[error("GSP queue setup failed: {0}")]
    Queues(#[from] QueueError),
    /// The GSP thread could not be started.
    #[error("starting the GSP thread failed: {0}")]
    Spawn(#[source] std::io::Error),
}

impl GspError {
    /// The code a failed STARTCPU leaves in MAILBOX0 (see the module documentation).
    pub fn mailbox_code(&self) -> u32 {
        match self {
            GspError::Libos(LibosError::ArrayUnreachable { .. }) => START_ARGS_UNREACHABLE,
            GspError::Libos(LibosError::NoRmArgs) => START_NO_RMARGS,
            GspError::Libos(LibosError::UnsupportedEntry { .. } | LibosError::EntryTooSmall(_)) => {
                START_BAD_RMARGS_ENTRY
            }
            GspError::Libos(LibosError::ArgsUnreachable { .. }) => START_RMARGS_UNREACHABLE,
            GspError::Queues(_) => START_QUEUES_REFUSED,
            GspError::Spawn(_) => START_THREAD_FAILED,
        }
    }
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

    /// STARTCPU: boots the GSP on the LibOS arguments at MAILBOX1:MAILBOX0 (see the module
    /// documentation). Ignored while the GSP runs (its previous thread has not ended).
    /// On failure the GSP stays halted, MAILBOX0 holds the failure's code and the error
    /// is recorded; on success MAILBOX0 is 0.
    pub(crate) fn start_cpu(&self) {
        let mut thread = lock(&self.thread);
        if let Some(old) = thread.take() {
            // CPUCTL.HALTED (the running flag) is what the host sees: a thread that already
            // cleared it is ending, so it is waited for rather than the start ignored.
            if !old.is_finished() && self.falcon.is_running() {
                log::debug!("emulated GSP: STARTCPU ignored, the GSP is running");
                *thread = Some(old);
                return;
            }
            join(old);
        }
        let addr = self.falcon.mailbox_address();
        match self.launch(addr) {
            Ok(handle) => *thread = Some(handle),
            Err(e) => {
                self.falcon.set_mailbox0(e.mailbox_code());
                self.shared
                    .error(format!("STARTCPU with LibOS arguments at {addr:#x}: {e}"));
            }
        }
    }

    /// Starts the GSP thread (no thread may be running), which first reads its LibOS
    /// arguments at `args_addr` and attaches to its queues, all by DMA. That reading
    /// happens on the GSP's own thread, never on the thread that wrote STARTCPU: host
    /// memory may be reached through a vfio-user client's socket (DMA_READ), which must not
    /// be waited for on the connection thread that carried the register write.
    fn launch(&self, args_addr: u64) -> Result<JoinHandle<()>, GspError> {
        *lock(&self.shared.firmware) = Some(Firmware::new(self.profile));
        lock(&self.shared.posts).clear();
        self.shared.stop.store(false, Ordering::Release);
        let (shared, falcon, faults, dma) = (
            Arc::clone(&self.shared),
            Arc::clone(&self.falcon),
            Arc::clone(&self.faults),
            Arc::clone(&self.dma),
        );
        self.falcon.set_running(true);
        let spawned = std::thread::Builder::new()
            .name(format!("gsp-{}", self.profile.name()))
            .spawn(move || {
                let _running = RunningFlag(Arc::clone(&falcon));
                let attached = libos::read_rm_args(&dma, args_addr)
                    .map_err(GspError::from)
                    .and_then(|args| Ok(GspQueues::attach(&dma, &args.queues)?));
                // An ENGINE reset during the attach (which may wait on guest DMA) wins: the
                // registers it reset are not written again by a start it cancelled.
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                match attached {
                    Ok(queues) => {
                        falcon.set_mailbox0(0);
                        GspThread::new(shared, falcon, faults, queues).run();
                    }
                    Err(e) => {
                        falcon.set_mailbox0(e.mailbox_code());
                        shared.error(format!(
                            "STARTCPU with LibOS arguments at {args_addr:#x}: {e}"
                        ));
                    }
                }
            });
        spawned.map_err(|e| {
            self.falcon.set_running(false);
            GspError::Spawn(e)
        })
    }

    /// ENGINE.RESET: stops the GSP thread, waiting for it at most [`HALT_WAIT`] (a thread
    /// that takes longer is left to finish on its own; CPUCTL.HALTED reads 1 once it has),
    /// and puts the falcon registers back to power-on.
    pub(crate) fn engine_reset(&self) {
        let mut thread = lock(&self.thread);
        if let Some(handle) = thread.take() {
            self.shared.stop.store(true, Ordering::Release);
            self.falcon.doorbell.ring();
            let start = Instant::now();
            while !handle.is_finished() && start.elapsed() < HALT_WAIT {
                std::thread::sleep(Duration::from_micros(50));
            }
            if handle.is_finished() {
                join(handle);
            } else {
                log::warn!("emulated GSP: still stopping {HALT_WAIT:?} after ENGINE reset");
                *thread = Some(handle);
            }
        }
        self.falcon.reset_registers();
    }

    /// Stops the GSP thread (if running) and waits for it. Messages not yet posted are
    /// lost.
    pub fn halt(&self) {
        let Some(handle) = lock(&self.thread).take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::Release);
        self.falcon.doorbell.ring();
        join(handle);
    }

    /// Whether the GSP runs (CPUCTL.HALTED reads 0).
    pub fn is_running(&self) -> bool {
        self.falcon.is_running()
    }

    /// A GSP-side queue endpoint on `args` without the firmware thread (halting a running
    /// GSP first), for tests that step both sides of the queues by hand. A test tool, not
    /// a way to start the GSP: the falcon stays halted and nothing answers the host.
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

/// Joins a GSP thread that was told to stop.
fn join(handle: JoinHandle<()>) {
    if handle.join().is_err() {
        log::error!("emulated GSP thread panicked");
    }
}

/// Held by the GSP thread: clears the falcon's running state when the thread ends, even by
/// a panic.
struct RunningFlag(Arc<GspFalcon>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        self.0.set_running(false);
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
