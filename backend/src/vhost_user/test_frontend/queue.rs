//! The driver's side of one split virtqueue (virtio 1.2, section 2.7) in [`GuestRam`]:
//! descriptor table, avail ring and used ring, a kick eventfd and a call eventfd.
//!
//! Chains are described with [`Chain`] (readable bytes split any way, writable buffers of
//! any size, descriptors given raw, direct or through an indirect table) and placed by
//! [`SplitQueue::submit`]; the ring can also be written entry by entry
//! ([`SplitQueue::write_desc`], [`SplitQueue::publish`], [`SplitQueue::set_avail_idx`]) to
//! build what no driver would.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserVringAddrFlags;
use vhost::VringConfigData;
use vmm_sys_util::eventfd::EventFd;

use super::ram::{GuestRam, AVAIL_OFFSET, USED_OFFSET};
use super::FrontendError;

/// `VIRTQ_DESC_F_NEXT`.
pub const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// Size of one descriptor.
pub const DESC_SIZE: u64 = 16;
/// Bytes after each writable buffer that the device must never write (checked with
/// [`Submitted::guards_intact`]).
pub const GUARD: u64 = 64;
/// What writable buffers and their guards hold before the device writes.
pub const FILL: u8 = 0xEE;
/// Largest queue the ring area holds.
pub const MAX_SIZE: u16 = 1024;

/// One descriptor as it lies in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `DESC_F_*`.
    pub flags: u16,
    /// Index of the next descriptor when `DESC_F_NEXT` is set.
    pub next: u16,
}

impl Desc {
    /// The 16 bytes of the descriptor in a table.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// One descriptor of a [`Chain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Device-readable bytes, placed in scratch memory.
    Read(Vec<u8>),
    /// A device-writable buffer of this many bytes (followed by a [`GUARD`]).
    Write(u32),
    /// A descriptor as given (its `DESC_F_WRITE`/`DESC_F_INDIRECT` bits kept; the link to the
    /// next part is filled in).
    Raw(Desc),
}

/// A descriptor chain to submit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// The descriptors in order.
    pub parts: Vec<Part>,
    /// Put the descriptors in an indirect table (one ring descriptor pointing at it).
    pub indirect: bool,
}

impl Chain {
    /// An empty chain.
    pub fn new() -> Chain {
        Chain::default()
    }

    /// A request in one readable descriptor and a writable one of `response` bytes: what
    /// the Linux driver posts.
    pub fn request(bytes: &[u8], response: u32) -> Chain {
        Chain::new().read(bytes).write(response)
    }

    /// Adds a readable descriptor.
    pub fn read(mut self, bytes: &[u8]) -> Chain {
        self.parts.push(Part::Read(bytes.to_vec()));
        self
    }

    /// Adds `bytes` as readable descriptors of the given sizes in turn (cycling through
    /// `sizes`; a size of 0 is a descriptor of length 0), until all bytes are placed. Without
    /// a non-zero size, the bytes go in one descriptor.
    pub fn read_split(mut self, bytes: &[u8], sizes: &[usize]) -> Chain {
        if sizes.iter().all(|&n| n == 0) {
            return self.read(bytes);
        }
        let mut at = 0;
        for &n in sizes.iter().cycle() {
            if at >= bytes.len() {
                break;
            }
            let end = (at + n).min(bytes.len());
            self.parts.push(Part::Read(bytes[at..end].to_vec()));
            at = end;
        }
        self
    }

    /// Adds a writable descriptor of `len` bytes.
    pub fn write(mut self, len: u32) -> Chain {
        self.parts.push(Part::Write(len));
        self
    }

    /// Adds a raw descriptor.
    pub fn raw(mut self, desc: Desc) -> Chain {
        self.parts.push(Part::Raw(desc));
        self
    }

    /// Puts the chain in an indirect table.
    pub fn indirect(mut self) -> Chain {
        self.indirect = true;
        self
    }
}

/// A submitted chain: its head and where its writable buffers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// Head descriptor index.
    pub head: u16,
    /// Guest address and length of each writable [`Part::Write`] buffer, in order.
    pub writes: Vec<(u64, u32)>,
}

impl Submitted {
    /// The first `len` bytes the device wrote (the used length), joined over the writable
    /// buffers.
    pub fn response(&self, ram: &GuestRam, len: u32) -> Result<Vec<u8>, FrontendError> {
        let mut out = Vec::with_capacity(len as usize);
        let mut left = len as usize;
        for &(at, n) in &self.writes {
            if left == 0 {
                break;
            }
            let take = left.min(n as usize);
            out.extend_from_slice(&ram.read_vec(at, take)?);
            left -= take;
        }
        Ok(out)
    }

    /// Whether the bytes after each writable buffer still hold [`FILL`] (nothing was
    /// written past a buffer).
    pub fn guards_intact(&self, ram: &GuestRam) -> Result<bool, FrontendError> {
        for &(at, n) in &self.writes {
            let guard = ram.read_vec(at + u64::from(n), GUARD as usize)?;
            if guard.iter().any(|&b| b != FILL) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether the writable buffers hold [`FILL`] from byte `from` on (nothing was written
    /// past the used length).
    pub fn untouched_from(&self, ram: &GuestRam, mut from: u64) -> Result<bool, FrontendError> {
        for &(at, n) in &self.writes {
            let n = u64::from(n);
            if from < n {
                let rest = ram.read_vec(at + from, (n - from) as usize)?;
                if rest.iter().any(|&b| b != FILL) {
                    return Ok(false);
                }
            }
            from = from.saturating_sub(n);
        }
        Ok(true)
    }
}

/// A used-ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head index of the chain.
    pub id: u32,
    /// Bytes written.
    pub len: u32,
}

/// The driver's side of one split virtqueue.
#[derive(Debug)]
pub struct SplitQueue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    next_slot: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl SplitQueue {
    /// Queue `index` of `size` entries (a power of two up to [`MAX_SIZE`]) at its area.
    pub fn new(index: u16, size: u16) -> Result<SplitQueue, FrontendError> {
        if !size.is_power_of_two() || size > MAX_SIZE {
            return Err(FrontendError::Layout(
                "queue size not a power of two up to 1024",
            ));
        }
        let base = GuestRam::queue_base(index);
        Ok(SplitQueue {
            index,
            size,
            desc: base,
            avail: base + AVAIL_OFFSET,
            used: base + USED_OFFSET,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            call: EventFd::new(libc::EFD_NONBLOCK)?,
            next_slot: 0,
            avail_idx: 0,
            used_seen: 0,
        })
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The kick eventfd (SET_VRING_KICK).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The call eventfd (SET_VRING_CALL).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// SET_VRING_ADDR's addresses: `host_base` + guest address, as QEMU gives its own.
    pub fn config(&self, host_base: u64) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: VhostUserVringAddrFlags::empty().bits(),
            desc_table_addr: host_base + self.desc,
            used_ring_addr: host_base + self.used,
            avail_ring_addr: host_base + self.avail,
            log_addr: None,
        }
    }

    /// Zeroes the rings and the driver's counters (before the device is started).
    pub fn reset(&mut self, ram: &GuestRam) -> Result<(), FrontendError> {
        let base = GuestRam::queue_base(self.index);
        ram.write(base, &vec![0u8; super::ram::QUEUE_STRIDE as usize])?;
        self.next_slot = 0;
        self.avail_idx = 0;
        self.used_seen = 0;
        Ok(())
    }

    /// Writes descriptor `slot` of the table (any index: a slot past the table lands in the
    /// rings' area, as a driver bug would).
    pub fn write_desc(&self, ram: &GuestRam, slot: u16, desc: Desc) -> Result<(), FrontendError> {
        ram.write(self.desc + u64::from(slot) * DESC_SIZE, &desc.to_bytes())
    }

    /// Takes `n` consecutive descriptor slots (modulo the size) for descriptors written by
    /// hand; returns the first.
    pub fn reserve_slots(&mut self, n: u16) -> u16 {
        let first = self.next_slot;
        self.next_slot = ((u32::from(first) + u32::from(n)) % u32::from(self.size)) as u16;
        first
    }

    /// Places `chain` (its buffers in scratch memory, its descriptors in the next slots, round
    /// robin, or an indirect table) and makes it available; the device sees it at the next
    /// kick. Slots are not tracked: a caller keeps at most a table's worth of descriptors
    /// outstanding, as a driver must.
    pub fn submit(
        &mut self,
        ram: &mut GuestRam,
        chain: &Chain,
    ) -> Result<Submitted, FrontendError> {
        let mut descs = Vec::with_capacity(chain.parts.len());
        let mut writes = Vec::new();
        for part in &chain.parts {
            descs.push(match part {
                Part::Read(bytes) => {
                    let at = ram.scratch(bytes.len() as u64)?;
                    ram.write(at, bytes)?;
                    Desc {
                        addr: at,
                        len: bytes.len() as u32,
                        flags: 0,
                        next: 0,
                    }
                }
                Part::Write(len) => {
                    let at = ram.scratch(u64::from(*len) + GUARD)?;
                    ram.write(at, &vec![FILL; *len as usize + GUARD as usize])?;
                    writes.push((at, *len));
                    Desc {
                        addr: at,
                        len: *len,
                        flags: DESC_F_WRITE,
                        next: 0,
                    }
                }
                Part::Raw(d) => *d,
            });
        }
        if descs.is_empty() {
            return Err(FrontendError::Layout("a chain needs a descriptor"));
        }
        let head = self.next_slot;
        if chain.indirect {
            let n = descs.len();
            for (i, d) in descs.iter_mut().enumerate() {
                if i + 1 < n {
                    d.flags |= DESC_F_NEXT;
                    d.next = (i + 1) as u16;
                }
            }
            let table: Vec<u8> = descs.iter().flat_map(|d| d.to_bytes()).collect();
            let at = ram.scratch(table.len() as u64)?;
            ram.write(at, &table)?;
            let desc = Desc {
                addr: at,
                len: table.len() as u32,
                flags: DESC_F_INDIRECT,
                next: 0,
            };
            self.write_desc(ram, head, desc)?;
            self.next_slot = (head + 1) % self.size;
        } else {
            if descs.len() > usize::from(self.size) {
                return Err(FrontendError::Layout(
                    "a direct chain longer than the queue",
                ));
            }
            let n = descs.len();
            for (i, mut d) in descs.into_iter().enumerate() {
                let slot = (head as usize + i) % usize::from(self.size);
                if i + 1 < n {
                    d.flags |= DESC_F_NEXT;
                    d.next = ((slot + 1) % usize::from(self.size)) as u16;
                }
                self.write_desc(ram, slot as u16, d)?;
            }
            self.next_slot = ((head as usize + n) % usize::from(self.size)) as u16;
        }
        self.publish(ram, head)?;
        Ok(Submitted { head, writes })
    }

    /// Puts `head` in the next avail-ring entry and advances the avail index.
    pub fn publish(&mut self, ram: &GuestRam, head: u16) -> Result<(), FrontendError> {
        let entry = self.avail + 4 + u64::from(self.avail_idx % self.size) * 2;
        ram.write(entry, &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram.store_u16(self.avail + 2, self.avail_idx)
    }

    /// Sets the avail index to anything (a jump past what was published, or back).
    pub fn set_avail_idx(&mut self, ram: &GuestRam, idx: u16) -> Result<(), FrontendError> {
        self.avail_idx = idx;
        ram.store_u16(self.avail + 2, idx)
    }

    /// The avail index as published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Kicks the device.
    pub fn kick(&self) -> Result<(), FrontendError> {
        self.kick.write(1).map_err(FrontendError::Io)
    }

    /// The device's used index.
    pub fn used_idx(&self, ram: &GuestRam) -> Result<u16, FrontendError> {
        ram.load_u16(self.used + 2)
    }

    /// Used entries taken so far.
    pub fn used_seen(&self) -> u16 {
        self.used_seen
    }

    /// Skips every used entry written so far (after chains whose entries do not matter).
    pub fn skip_used(&mut self, ram: &GuestRam) -> Result<u16, FrontendError> {
        let idx = self.used_idx(ram)?;
        let skipped = idx.wrapping_sub(self.used_seen);
        self.used_seen = idx;
        Ok(skipped)
    }

    /// The next used entry, if the device wrote one.
    pub fn take_used(&mut self, ram: &GuestRam) -> Result<Option<Used>, FrontendError> {
        if self.used_idx(ram)? == self.used_seen {
            return Ok(None);
        }
        let at = self.used + 4 + u64::from(self.used_seen % self.size) * 8;
        let elem = ram.read_vec(at, 8)?;
        self.used_seen = self.used_seen.wrapping_add(1);
        Ok(Some(Used {
            id: u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]),
            len: u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]),
        }))
    }

    /// Waits up to `timeout` for the next used entry, asking for a notification
    /// (`used_event`, EVENT_IDX) and sleeping on the call eventfd as a driver does.
    pub fn wait_used(&mut self, ram: &GuestRam, timeout: Duration) -> Result<Used, FrontendError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(used) = self.take_used(ram)? {
                return Ok(used);
            }
            // used_event: notify once the used index passes what was seen.
            ram.store_u16(self.avail + 4 + u64::from(self.size) * 2, self.used_seen)?;
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if let Some(used) = self.take_used(ram)? {
                return Ok(used);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FrontendError::Timeout("a used-ring entry"));
            }
            wait_readable(self.call.as_raw_fd(), left.min(Duration::from_millis(20)));
            let _ = self.call.read();
        }
    }
}

/// Waits up to `timeout` for `fd` to be readable.
pub(super) fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}
