//! [`VhostGpuDevice`]: the virtio-gpu device of one QEMU connection, as
//! `vhost-user-backend` drives it: feature negotiation, config space, and the two
//! virtqueues (control and cursor) fed to the guest's [`GpuModel`]. What the guest shows goes
//! to QEMU through the [`DisplayChannel`] QEMU hands over with `VHOST_USER_GPU_SET_SOCKET`.
//!
//! The model outlives the connection (it belongs to the guest's display, see
//! [`super::server`]); the device is made anew for every connection.
//!
//! Nothing in the rings is trusted: guest memory is touched only once it cannot shrink under
//! the mapping ([`super::guest_memory`]); a chain whose head is past the queue is dropped
//! and the chains behind it are served; an avail index run further ahead than the queue holds
//! stops that queue until the guest puts it right. Ring faults are logged once per connection
//! at warning level, then at debug level, so a guest cannot flood the host's log.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::GpuBackend;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_gpu::VIRTIO_GPU_F_EDID;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::chain::{read_request, write_response};
use super::channel::DisplayChannel;
use super::gpu::device::{DisplayEvent, GpuCommandHandler};
use super::gpu::store::SliceStore;
use super::gpu::wire::{self, ctrl, RespType, Response, ScanoutId, HDR_SIZE};
use super::guest_memory::MemoryCheck;

/// The device model of one guest's display, over the store of its slice.
pub type GpuModel = GpuCommandHandler<Box<dyn SliceStore>>;

/// Index of the control queue.
pub const CONTROL_QUEUE: u16 = 0;
/// Index of the cursor queue.
pub const CURSOR_QUEUE: u16 = 1;
/// Queues of a virtio-gpu.
const NUM_QUEUES: usize = 2;
/// Largest queue QEMU may set up (its vhost-user-gpu uses 256).
const MAX_QUEUE_SIZE: usize = 1024;

/// Virtio feature bits offered. QEMU 11.1.3 acks INDIRECT_DESC, EVENT_IDX and RING_RESET
/// among them, and `vhost-user-backend` refuses acked bits that were not offered.
pub const FEATURES: u64 = 1u64 << VIRTIO_F_VERSION_1
    | 1u64 << VIRTIO_RING_F_INDIRECT_DESC
    | 1u64 << VIRTIO_RING_F_EVENT_IDX
    | 1u64 << VIRTIO_F_RING_RESET
    | 1u64 << VIRTIO_GPU_F_EDID
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The virtio-gpu config space as far as a frontend may read it: `events_read`,
/// `events_clear`, `num_scanouts`, `num_capsets` (virtio 1.2, 16 bytes; QEMU manages the
/// two event fields itself), then zeros. QEMU 11.1.3 reads 20 bytes (measured).
const CONFIG_SIZE: usize = 256;

/// What one connection's device did, for the log and for benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DisplayStats {
    /// Control-queue requests executed.
    pub commands: u64,
    /// Of them, answered with an error.
    pub errors: u64,
    /// UPDATE messages sent to QEMU.
    pub updates: u64,
    /// Pixel bytes in them.
    pub update_bytes: u64,
}

impl std::fmt::Display for DisplayStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} commands ({} refused), {} updates ({} bytes)",
            self.commands, self.errors, self.updates, self.update_bytes
        )
    }
}

/// One connection's virtio-gpu device.
pub struct VhostGpuDevice {
    label: String,
    model: Arc<Mutex<GpuModel>>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    channel: Mutex<Option<DisplayChannel>>,
    event_idx: AtomicBool,
    exit: (EventConsumer, EventNotifier),
    /// A display-channel failure was logged (once per connection).
    channel_failed: AtomicBool,
    stats: Mutex<DisplayStats>,
    /// Scanouts of the model (fixed), so the config space is answered without its lock.
    num_scanouts: u32,
    /// QEMU restarted the device: the model is reset on the vring thread before the next
    /// request. Nothing on QEMU's request thread takes the model lock, which the vring thread
    /// holds while it sends to QEMU: QEMU waits for some replies (GET_CONFIG) holding the lock
    /// its display-channel reader needs.
    reset_pending: AtomicBool,
    /// A fault of the guest's rings was logged at warning level (once per connection).
    ring_warned: AtomicBool,
    /// The last guest memory found safe to touch.
    memory: MemoryCheck,
}

/// Which queue a chain came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Control,
    Cursor,
}

impl VhostGpuDevice {
    /// A device for one connection to the display `label`, over the guest's `model` and
    /// the guest memory QEMU will set (`mem`, shared with the daemon).
    pub fn new(
        label: String,
        model: Arc<Mutex<GpuModel>>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> io::Result<VhostGpuDevice> {
        let num_scanouts = model.lock().config().max_scanouts;
        Ok(VhostGpuDevice {
            label,
            model,
            mem,
            channel: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
            channel_failed: AtomicBool::new(false),
            stats: Mutex::new(DisplayStats::default()),
            num_scanouts,
            reset_pending: AtomicBool::new(false),
            ring_warned: AtomicBool::new(false),
            memory: MemoryCheck::default(),
        })
    }

    /// What the device did so far.
    pub fn stats(&self) -> DisplayStats {
        *self.stats.lock()
    }

    /// Wakes the worker threads so they end (the connection is over).
    pub fn stop_workers(&self) {
        let _ = self.exit.1.notify();
    }

    /// Runs `f` on the display channel, if QEMU gave one; a failure is logged once and the
    /// guest goes on without a display.
    fn with_channel<R>(
        &self,
        f: impl FnOnce(&mut DisplayChannel) -> Result<R, super::channel::ChannelError>,
    ) -> Option<R> {
        let mut channel = self.channel.lock();
        let result = f(channel.as_mut()?);
        match result {
            Ok(r) => Some(r),
            Err(e) => {
                if !self.channel_failed.swap(true, Ordering::Relaxed) {
                    log::warn!("display {}: {e}: the guest goes on without it", self.label);
                }
                None
            }
        }
    }

    /// Before GET_DISPLAY_INFO and GET_EDID: asks QEMU for what it shows now, so a resize
    /// on QEMU's side is what the guest reads.
    fn refresh_outputs(&self, request: &[u8]) {
        let Some(kind) = request
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        else {
            return;
        };
        match kind {
            ctrl::GET_DISPLAY_INFO => {
                if let Some(outputs) = self.with_channel(|c| c.display_info()) {
                    self.model.lock().set_outputs(outputs);
                }
            }
            ctrl::GET_EDID => {
                let Some(id) = request
                    .get(HDR_SIZE..HDR_SIZE + 4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                else {
                    return;
                };
                let scanout = ScanoutId(id);
                if (id as usize) >= self.model.lock().config().max_scanouts as usize {
                    return;
                }
                if let Some(edid) = self.with_channel(|c| c.edid(scanout)) {
                    self.model.lock().set_edid(scanout, edid);
                }
            }
            _ => {}
        }
    }

    /// Sends a display event to QEMU (nothing once the channel failed on this connection).
    fn show(&self, mut event: DisplayEvent) {
        if self.channel_failed.load(Ordering::Relaxed) {
            return;
        }
        let update_bytes = match &event {
            DisplayEvent::Update { pixels, .. } => Some(pixels.len() as u64),
            _ => None,
        };
        if self.with_channel(|c| c.send(&mut event)).is_some() {
            if let Some(n) = update_bytes {
                let mut stats = self.stats.lock();
                stats.updates += 1;
                stats.update_bytes += n;
            }
        }
    }

    /// Executes one chain; returns its used length.
    fn execute(
        &self,
        queue: Queue,
        chain: DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let request = read_request(chain.clone(), mem);
        match queue {
            Queue::Control => {
                let response = match request {
                    Ok(bytes) => {
                        log::trace!(
                            "display {}: control request {:02x?}",
                            self.label,
                            bytes.get(..4)
                        );
                        self.refresh_outputs(&bytes);
                        // Events go out as the model makes them, so what the display must
                        // show is sent before the response: a guest that sees its flush done
                        // finds it shown.
                        self.model
                            .lock()
                            .handle_control_with(mem, &bytes, &mut |e| self.show(e))
                    }
                    Err(e) => {
                        log::debug!("display {}: control chain refused: {e}", self.label);
                        let err = Response::Err(RespType::ErrUnspec);
                        wire::encode_response(None, &err)
                    }
                };
                {
                    let mut stats = self.stats.lock();
                    stats.commands += 1;
                    let ok = response.get(..4).is_some_and(|t| {
                        u32::from_le_bytes([t[0], t[1], t[2], t[3]]) < RespType::ErrUnspec as u32
                    });
                    stats.errors += u64::from(!ok);
                }
                write_response(chain, mem, &response).unwrap_or_else(|e| {
                    log::debug!("display {}: response not written: {e}", self.label);
                    0
                })
            }
            Queue::Cursor => {
                match request {
                    Ok(bytes) => {
                        let events = self.model.lock().handle_cursor(&bytes);
                        events.into_iter().for_each(|e| self.show(e));
                    }
                    Err(e) => log::debug!("display {}: cursor chain refused: {e}", self.label),
                }
                0
            }
        }
    }

    /// Logs a fault of the guest's rings: once per connection at warning level (a guest
    /// that keeps breaking its ring must not flood the host's log), later ones at debug.
    fn ring_fault(&self, queue: Queue, what: &str) {
        if self.ring_warned.swap(true, Ordering::Relaxed) {
            log::debug!("display {}: {queue:?} queue: {what}", self.label);
        } else {
            log::warn!(
                "display {}: {queue:?} queue: {what} (further ring faults of this connection \
                 are logged at debug level)",
                self.label
            );
        }
    }

    /// Executes every chain the driver made available on `vring`, touching guest memory
    /// only through `mem` (checked). A chain that cannot be returned (its head is past the
    /// queue, or the used ring is not in guest memory) is dropped and the next one taken;
    /// an avail ring that is not in guest memory, or whose index ran further ahead than the
    /// queue holds, ends the drain: the queue is broken until the guest fixes it.
    fn drain(
        &self,
        queue: Queue,
        vring: &VringRwLock,
        mem: &GuestMemoryLoadGuard<GuestMemoryMmap>,
    ) -> Result<(), virtio_queue::Error> {
        loop {
            let chain = {
                let mut state = vring.get_mut();
                let mut avail = state.get_queue_mut().iter(mem.clone())?;
                avail.next()
            };
            let Some(chain) = chain else {
                return Ok(());
            };
            let head = chain.head_index();
            let used = self.execute(queue, chain, mem);
            let notify = {
                let mut state = vring.get_mut();
                let q = state.get_queue_mut();
                // Checked here: the queue would log every such head at error level.
                if head >= q.size() {
                    drop(state);
                    self.ring_fault(queue, &format!("head {head} is past the queue: dropped"));
                    continue;
                }
                if let Err(e) = q.add_used(&**mem, head, used) {
                    drop(state);
                    self.ring_fault(queue, &format!("used ring: {e}"));
                    continue;
                }
                q.needs_notification(&**mem).unwrap_or(true)
            };
            if notify {
                if let Err(e) = vring.signal_used_queue() {
                    self.ring_fault(queue, &format!("call eventfd: {e}"));
                }
            }
        }
    }

    /// Processes `vring` until it is empty, with notifications suppressed meanwhile when
    /// EVENT_IDX was negotiated. Guest memory QEMU could shrink under the mapping is not
    /// touched (see [`super::guest_memory`]).
    fn process(&self, queue: Queue, vring: &VringRwLock) {
        if self.reset_pending.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.model.lock().reset() {
                log::warn!("display {}: reset: {e}", self.label);
            }
        }
        let mem = self.mem.memory();
        if let Err(e) = self.memory.check(&mem) {
            self.ring_fault(queue, &format!("not served: {e}"));
            return;
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                let _ = vring.get_mut().get_queue_mut().disable_notification(&*mem);
            }
            let drained = self.drain(queue, vring, &mem);
            let more = if event_idx {
                vring.get_mut().get_queue_mut().enable_notification(&*mem)
            } else {
                Ok(false)
            };
            if let Err(e) = drained {
                // Not retried until the next kick: the ring stays as the guest left it.
                self.ring_fault(queue, &format!("avail ring: {e}"));
                return;
            }
            match more {
                // More arrived while notifications were off.
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    self.ring_fault(queue, &format!("avail ring: {e}"));
                    return;
                }
            }
        }
    }
}

impl VhostUserBackend for VhostGpuDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn acked_features(&self, features: u64) {
        log::debug!("display {}: features {features:#x} acked", self.label);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&self) {
        self.reset_pending.store(true, Ordering::Release);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut config = [0u8; CONFIG_SIZE];
        config[8..12].copy_from_slice(&self.num_scanouts.to_le_bytes());
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= CONFIG_SIZE => config[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    /// `self.mem` is the daemon's own, which it updated already. Memory that QEMU could
    /// shrink under the mapping (SIGBUS for the whole backend) is refused: the error ends the
    /// connection, and the queues never touch it meanwhile (`process` checks too).
    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.memory.check(&mem.memory()).map_err(|e| {
            log::error!("display {}: {e}: QEMU's connection is refused", self.label);
            io::Error::other(e)
        })
    }

    /// QEMU starts the device (the guest driver set DRIVER_OK): a fresh device as the guest
    /// sees it, so what an earlier driver left (resources, scanouts) is destroyed and
    /// scrubbed.
    fn set_gpu_socket(&self, gpu_backend: GpuBackend) -> io::Result<()> {
        self.reset_device();
        *self.channel.lock() = Some(DisplayChannel::new(gpu_backend));
        self.channel_failed.store(false, Ordering::Relaxed);
        log::info!("display {}: QEMU's display channel is set", self.label);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let (queue, vring) = match device_event {
            CONTROL_QUEUE => (Queue::Control, vrings.first()),
            CURSOR_QUEUE => (Queue::Cursor, vrings.get(1)),
            other => return Err(io::Error::other(format!("unknown queue {other}"))),
        };
        let vring = vring.ok_or_else(|| io::Error::other("missing vring"))?;
        // A ring the guest broke stops only its own display's queue.
        self.process(queue, vring);
        Ok(())
    }
}
