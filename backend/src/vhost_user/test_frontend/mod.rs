//! A test-side vhost-user frontend for the display (feature `test-utils`; not in a shipped
//! build): [`DisplayFrontend`] plays QEMU's `vhost-user-gpu-pci` against a display socket.
//!
//! - [`ram`]: guest RAM, a memfd mapped here and sent with SET_MEM_TABLE.
//! - [`queue`]: the driver's side of a split virtqueue in that RAM: any descriptor chain
//!   (readable bytes split any way, writable buffers of any size, raw descriptors, indirect
//!   tables), used entries read back.
//! - [`qemu_display`]: QEMU's end of the display channel (`VHOST_USER_GPU_SET_SOCKET`).
//! - [`requests`]: the guest driver's virtio-gpu requests, from the spec.
//!
//! The control messages go through `vhost`'s own [`Frontend`]. The message order is the one
//! QEMU 11.1.3 was seen to use: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
//! GET_QUEUE_NUM, SET_OWNER, SET_VRING_CALL/ERR per queue and GET_CONFIG on connect
//! ([`DisplayFrontend::connect_idle`]); then, when the guest driver sets DRIVER_OK
//! ([`DisplayFrontend::start`]): VHOST_USER_GPU_SET_SOCKET, SET_FEATURES (`0x10170000002`),
//! SET_MEM_TABLE, the vring setup and SET_VRING_ENABLE. [`DisplayFrontend::stop`]
//! (GET_VRING_BASE per queue) is what QEMU sends when the guest resets the device.

pub mod qemu_display;
pub mod queue;
pub mod ram;
pub mod requests;

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub use qemu_display::{DisplayHandle, DisplayMsg, FakeQemuDisplay};
pub use queue::{Chain, Desc, Part, SplitQueue, Submitted, Used};
pub use ram::GuestRam;

/// The virtio features QEMU 11.1.3 acked for vhost-user-gpu-pci (measured): VIRTIO_GPU_F_EDID,
/// INDIRECT_DESC, EVENT_IDX, PROTOCOL_FEATURES, VERSION_1, RING_RESET.
pub const QEMU_FEATURES: u64 = 0x101_7000_0002;
/// `VHOST_USER_GPU_SET_SOCKET`.
const GPU_SET_SOCKET: u32 = 33;
/// vhost-user header flags: version 1.
const VHOST_USER_VERSION: u32 = 0x1;
/// The control queue.
pub const CONTROL: usize = 0;
/// The cursor queue.
pub const CURSOR: usize = 1;
/// How long the frontend waits for the backend's control replies.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`DisplayFrontend::request`] waits for an answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors of the test frontend.
#[derive(Debug, Error)]
pub enum FrontendError {
    /// A vhost-user control message failed.
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    /// A socket, eventfd or memfd operation failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest RAM or a queue cannot be laid out as asked.
    #[error("layout: {0}")]
    Layout(&'static str),
    /// Nothing came in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The frontend is not started.
    #[error("the device is not started")]
    NotStarted,
}

impl From<vmm_sys_util::errno::Error> for FrontendError {
    fn from(e: vmm_sys_util::errno::Error) -> FrontendError {
        FrontendError::Io(std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// How the frontend sets the guest up.
#[derive(Debug, Clone, Copy)]
pub struct FrontendOptions {
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// Scratch arena for chain buffers.
    pub arena: u64,
    /// Entries per queue (QEMU's vhost-user-gpu uses 256).
    pub queue_size: u16,
    /// Features to ack (masked with what the backend offers).
    pub features: u64,
    /// Seal the RAM memfd against resizing, as QEMU does by default.
    pub seal: bool,
    /// The region size SET_MEM_TABLE claims (`None`: the RAM's size); a hostile frontend
    /// claims more than the memfd holds.
    pub mem_table_size: Option<u64>,
}

impl Default for FrontendOptions {
    /// 64 MiB of sealed RAM, a 16 MiB arena, 256-entry queues, QEMU's features.
    fn default() -> FrontendOptions {
        FrontendOptions {
            ram_size: 64 << 20,
            arena: 16 << 20,
            queue_size: 256,
            features: QEMU_FEATURES,
            seal: true,
            mem_table_size: None,
        }
    }
}

/// QEMU's side of one display connection.
pub struct DisplayFrontend {
    vhost: Frontend,
    /// A duplicate of the control socket, for the one message `Frontend` has no call for.
    socket: UnixStream,
    ram: GuestRam,
    queues: [SplitQueue; 2],
    display: Option<FakeQemuDisplay>,
    options: FrontendOptions,
    offered: u64,
    started: bool,
}

impl std::fmt::Debug for DisplayFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DisplayFrontend")
            .field("ram", &self.ram)
            .field("offered", &self.offered)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl DisplayFrontend {
    /// Connects to the display socket at `path` and starts the device, as QEMU does once
    /// the guest driver is up.
    pub fn connect(path: &Path) -> Result<DisplayFrontend, FrontendError> {
        let mut frontend = DisplayFrontend::connect_idle(path, FrontendOptions::default())?;
        frontend.start()?;
        Ok(frontend)
    }

    /// Connects and negotiates as QEMU does before the guest driver sets DRIVER_OK; the
    /// device is not started.
    pub fn connect_idle(
        path: &Path,
        options: FrontendOptions,
    ) -> Result<DisplayFrontend, FrontendError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let socket = stream.try_clone()?;
        let mut vhost = Frontend::from_stream(stream, 2);
        let ram = GuestRam::new(options.ram_size, options.arena, options.seal)?;
        let queues = [
            SplitQueue::new(CONTROL as u16, options.queue_size)?,
            SplitQueue::new(CURSOR as u16, options.queue_size)?,
        ];
        let offered = vhost.get_features()?;
        let protocol = vhost.get_protocol_features()?;
        vhost.set_protocol_features(
            protocol & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
        )?;
        let queue_num = vhost.get_queue_num()?;
        if queue_num < 2 {
            return Err(FrontendError::Layout("the backend has fewer than 2 queues"));
        }
        vhost.set_owner()?;
        for q in &queues {
            vhost.set_vring_call(usize::from(q.index()), q.call_fd())?;
            vhost.set_vring_err(usize::from(q.index()), q.call_fd())?;
        }
        let mut frontend = DisplayFrontend {
            vhost,
            socket,
            ram,
            queues,
            display: None,
            options,
            offered,
            started: false,
        };
        // QEMU reads the config space when the guest probes (num_scanouts).
        frontend.config(0, 24)?;
        Ok(frontend)
    }

    /// Features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Reads `size` bytes of the device's config space at `offset`.
    pub fn config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, FrontendError> {
        let buf = vec![0u8; size as usize];
        let (_, data) =
            self.vhost
                .get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf)?;
        Ok(data)
    }

    /// Sends `VHOST_USER_GPU_SET_SOCKET` with `socket`.
    pub fn send_gpu_socket(&self, socket: BorrowedFd<'_>) -> Result<(), FrontendError> {
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&GPU_SET_SOCKET.to_le_bytes());
        msg[4..8].copy_from_slice(&VHOST_USER_VERSION.to_le_bytes());
        self.socket.send_with_fd(&msg[..], socket.as_raw_fd())?;
        Ok(())
    }

    /// Starts the device as QEMU does when the guest driver sets DRIVER_OK: a new display
    /// channel (a fresh [`FakeQemuDisplay`]), the features, guest memory and both vrings
    /// (reset to empty). Returns the new display.
    pub fn start(&mut self) -> Result<&FakeQemuDisplay, FrontendError> {
        let (display, theirs) = FakeQemuDisplay::new()?;
        let theirs = OwnedFd::from(theirs);
        self.send_gpu_socket(std::os::fd::AsFd::as_fd(&theirs))?;
        drop(theirs);
        self.display = Some(display);
        self.vhost
            .set_features(self.options.features & self.offered)?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.options.mem_table_size.unwrap_or(self.ram.size()),
            userspace_addr: self.ram.host_base(),
            mmap_offset: 0,
            mmap_handle: self.ram.fd().as_raw_fd(),
        };
        self.vhost.set_mem_table(&[region])?;
        let host_base = self.ram.host_base();
        for q in &mut self.queues {
            q.reset(&self.ram)?;
            let i = usize::from(q.index());
            self.vhost.set_vring_num(i, q.size())?;
            self.vhost.set_vring_base(i, 0)?;
            self.vhost.set_vring_addr(i, &q.config(host_base))?;
            self.vhost.set_vring_kick(i, q.kick_fd())?;
            self.vhost.set_vring_call(i, q.call_fd())?;
        }
        for q in &self.queues {
            self.vhost.set_vring_enable(usize::from(q.index()), true)?;
        }
        self.started = true;
        self.display.as_ref().ok_or(FrontendError::NotStarted)
    }

    /// Stops the device as QEMU does when the guest resets it: GET_VRING_BASE per queue
    /// (the backend stops the rings). Returns each queue's next avail index.
    pub fn stop(&mut self) -> Result<[u32; 2], FrontendError> {
        let mut bases = [0; 2];
        for (i, base) in bases.iter_mut().enumerate() {
            *base = self.vhost.get_vring_base(i)?;
        }
        self.started = false;
        Ok(bases)
    }

    /// The display channel's QEMU side (of the last start).
    pub fn display(&self) -> Result<&FakeQemuDisplay, FrontendError> {
        self.display.as_ref().ok_or(FrontendError::NotStarted)
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest RAM, to reserve buffers in.
    pub fn ram_mut(&mut self) -> &mut GuestRam {
        &mut self.ram
    }

    /// Queue `q` ([`CONTROL`] or [`CURSOR`]) and the RAM it lives in, to drive it by hand.
    pub fn queue(&mut self, q: usize) -> (&mut SplitQueue, &mut GuestRam) {
        (&mut self.queues[q.min(1)], &mut self.ram)
    }

    /// Submits `chain` on queue `q` (no kick).
    pub fn submit(&mut self, q: usize, chain: &Chain) -> Result<Submitted, FrontendError> {
        let (queue, ram) = self.queue(q);
        queue.submit(ram, chain)
    }

    /// Kicks queue `q`.
    pub fn kick(&self, q: usize) -> Result<(), FrontendError> {
        self.queues[q.min(1)].kick()
    }

    /// Waits up to `timeout` for queue `q`'s next used entry.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Result<Used, FrontendError> {
        let (queue, ram) = self.queue(q);
        queue.wait_used(ram, timeout)
    }

    /// Submits `chain` on queue `q`, kicks, and waits for its used entry; returns the used
    /// entry and the bytes written.
    pub fn exchange(
        &mut self,
        q: usize,
        chain: &Chain,
    ) -> Result<(Used, Submitted, Vec<u8>), FrontendError> {
        let submitted = self.submit(q, chain)?;
        self.kick(q)?;
        let used = self.wait_used(q, ANSWER_TIMEOUT)?;
        if used.id != u32::from(submitted.head) {
            return Err(FrontendError::Memory(format!(
                "used entry for head {} while waiting for {}",
                used.id, submitted.head
            )));
        }
        let response = submitted.response(&self.ram, used.len)?;
        Ok((used, submitted, response))
    }

    /// A control-queue request as the Linux driver posts it (one readable descriptor, one
    /// writable of [`requests::RESPONSE_MAX`] bytes); returns the response.
    pub fn request(&mut self, bytes: &[u8]) -> Result<Vec<u8>, FrontendError> {
        let chain = Chain::request(bytes, requests::RESPONSE_MAX);
        Ok(self.exchange(CONTROL, &chain)?.2)
    }

    /// A cursor-queue request (one readable descriptor; no response); waits until it is used.
    pub fn cursor(&mut self, bytes: &[u8]) -> Result<(), FrontendError> {
        self.exchange(CURSOR, &Chain::new().read(bytes)).map(|_| ())
    }
}
