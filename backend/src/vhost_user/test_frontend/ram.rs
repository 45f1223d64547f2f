//! [`GuestRam`]: the test guest's RAM, a memfd mapped in the test process and handed to the
//! backend with SET_MEM_TABLE, as QEMU's `memory-backend-memfd,share=on` is.
//!
//! Layout (guest physical addresses, RAM starts at 0):
//! - `[0, QUEUE_AREA)`: the rings of each virtqueue, [`QUEUE_STRIDE`] bytes per queue;
//! - `[QUEUE_AREA, QUEUE_AREA + arena)`: a ring of scratch space for the buffers of descriptor
//!   chains ([`GuestRam::scratch`]), reused from the start when it wraps;
//! - the rest: long-lived guest buffers ([`GuestRam::reserve`]), such as a framebuffer.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::FrontendError;

/// Bytes of guest RAM set aside for each virtqueue's rings (a 1024-entry queue's descriptor
/// table, avail and used rings fit).
pub const QUEUE_STRIDE: u64 = 0x1_0000;
/// Offset of the avail ring in a queue's area.
pub const AVAIL_OFFSET: u64 = 0x4000;
/// Offset of the used ring in a queue's area.
pub const USED_OFFSET: u64 = 0x5000;
/// Rings of up to this many queues.
pub const MAX_QUEUES: u64 = 2;
/// Where the scratch arena starts.
pub const QUEUE_AREA: u64 = QUEUE_STRIDE * MAX_QUEUES;

/// The guest's RAM.
pub struct GuestRam {
    memfd: OwnedFd,
    mem: GuestMemoryMmap,
    size: u64,
    arena_end: u64,
    scratch_next: u64,
    reserve_next: u64,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("size", &self.size)
            .field("arena_end", &self.arena_end)
            .finish_non_exhaustive()
    }
}

fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

impl GuestRam {
    /// `size` bytes of RAM (sparse until touched) with a scratch arena of `arena` bytes;
    /// `seal`: sealed against resizing as QEMU's `memory-backend-memfd` does by default
    /// (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`).
    pub fn new(size: u64, arena: u64, seal: bool) -> Result<GuestRam, FrontendError> {
        let arena_end = QUEUE_AREA
            .checked_add(arena)
            .filter(|&end| end < size)
            .ok_or(FrontendError::Layout(
                "the scratch arena does not fit in guest RAM",
            ))?;
        let len = usize::try_from(size)
            .map_err(|_| FrontendError::Layout("guest RAM larger than the address space"))?;
        // SAFETY: memfd_create with a NUL-terminated name; the fd is checked before use.
        let fd = unsafe {
            libc::memfd_create(
                c"test-guest-ram".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(FrontendError::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = File::from(memfd.try_clone()?);
        file.set_len(size)?;
        if seal {
            let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            // SAFETY: F_ADD_SEALS with an int argument on a memfd we own.
            if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } != 0 {
                return Err(FrontendError::Io(std::io::Error::last_os_error()));
            }
        }
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| FrontendError::Memory(e.to_string()))?;
        Ok(GuestRam {
            memfd,
            mem,
            size,
            arena_end,
            scratch_next: QUEUE_AREA,
            reserve_next: arena_end,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd behind the RAM (what SET_MEM_TABLE sends).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// The test process's address of guest address 0 (SET_MEM_TABLE's `userspace_addr`: the
    /// frontend's own mapping, as QEMU sends its own).
    pub fn host_base(&self) -> u64 {
        self.mem
            .get_host_address(GuestAddress(0))
            .map_or(0, |p| p as u64)
    }

    /// The RAM as `vm-memory` guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Writes `data` at guest address `at`.
    pub fn write(&self, at: u64, data: &[u8]) -> Result<(), FrontendError> {
        self.mem
            .write_slice(data, GuestAddress(at))
            .map_err(|e| FrontendError::Memory(e.to_string()))
    }

    /// Reads `buf.len()` bytes at guest address `at`.
    pub fn read(&self, at: u64, buf: &mut [u8]) -> Result<(), FrontendError> {
        self.mem
            .read_slice(buf, GuestAddress(at))
            .map_err(|e| FrontendError::Memory(e.to_string()))
    }

    /// Reads `len` bytes at guest address `at`.
    pub fn read_vec(&self, at: u64, len: usize) -> Result<Vec<u8>, FrontendError> {
        let mut buf = vec![0u8; len];
        self.read(at, &mut buf)?;
        Ok(buf)
    }

    /// Stores a little-endian `u16` at `at` with release ordering (ring indexes the device
    /// reads while it runs).
    pub fn store_u16(&self, at: u64, value: u16) -> Result<(), FrontendError> {
        self.mem
            .store(value.to_le(), GuestAddress(at), Ordering::Release)
            .map_err(|e| FrontendError::Memory(e.to_string()))
    }

    /// Loads a little-endian `u16` at `at` with acquire ordering (ring indexes the device
    /// writes while it runs).
    pub fn load_u16(&self, at: u64) -> Result<u16, FrontendError> {
        self.mem
            .load::<u16>(GuestAddress(at), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|e| FrontendError::Memory(e.to_string()))
    }

    /// `len` bytes of scratch space (16-byte aligned) for a chain's buffer. The arena is a
    /// ring: space is reused once it wraps, so a buffer lives until about an arena's worth
    /// of later buffers were handed out.
    pub fn scratch(&mut self, len: u64) -> Result<u64, FrontendError> {
        let len = round_up(len.max(1), 16);
        if len > self.arena_end - QUEUE_AREA {
            return Err(FrontendError::Layout(
                "a buffer larger than the scratch arena",
            ));
        }
        if self.scratch_next + len > self.arena_end {
            self.scratch_next = QUEUE_AREA;
        }
        let at = self.scratch_next;
        self.scratch_next += len;
        Ok(at)
    }

    /// `len` bytes of long-lived guest memory (page aligned), never handed out again.
    pub fn reserve(&mut self, len: u64) -> Result<u64, FrontendError> {
        let at = round_up(self.reserve_next, 4096);
        let end = at
            .checked_add(len)
            .filter(|&end| end <= self.size)
            .ok_or(FrontendError::Layout("guest RAM is full"))?;
        self.reserve_next = end;
        Ok(at)
    }

    /// Guest address of queue `index`'s area.
    pub fn queue_base(index: u16) -> u64 {
        u64::from(index) * QUEUE_STRIDE
    }
}
