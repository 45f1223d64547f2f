//! [`SharedMemory`]: a mapping of a memfd that another party (the host driver, or the
//! emulated GSP) maps and writes at the same time.
//!
//! Nothing here ever creates a Rust reference (`&[u8]`, `&u32`) to the mapped bytes: the
//! peer may change them at any moment, which would make such a reference unsound. Bulk
//! copies are volatile (8 bytes at a time where aligned), and the 32-bit queue pointers
//! are accessed atomically ([`SharedMemory::load_u32`] with acquire,
//! [`SharedMemory::store_u32`] with release ordering), so a pointer update published after
//! the data it covers is seen after that data.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;

/// Errors of creating, mapping and accessing shared memory.
#[derive(Debug, Error)]
pub enum SharedMemoryError {
    /// A size of zero, or one that is not a multiple of 4 KiB.
    #[error("shared memory size {0:#x} must be a non-zero multiple of 4 KiB")]
    BadSize(u64),
    /// The size does not fit the address space.
    #[error("shared memory size {0:#x} is too large")]
    TooLarge(u64),
    /// `memfd_create` failed.
    #[error("memfd_create failed: {0}")]
    MemfdCreate(#[source] io::Error),
    /// `ftruncate` failed.
    #[error("ftruncate of the shared memfd failed: {0}")]
    Truncate(#[source] io::Error),
    /// `fstat` failed, or the file is smaller than the mapping asked for.
    #[error("the fd holds {file:#x} bytes, fewer than the {len:#x} to map")]
    FileTooSmall {
        /// Bytes in the file.
        file: u64,
        /// Bytes requested.
        len: u64,
    },
    /// `fstat` failed.
    #[error("fstat of the shared memfd failed: {0}")]
    Stat(#[source] io::Error),
    /// Duplicating the fd failed.
    #[error("duplicating the shared memfd failed: {0}")]
    Dup(#[source] io::Error),
    /// `mmap` failed.
    #[error("mmap of {len:#x} bytes of shared memory failed: {source}")]
    Map {
        /// Requested length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An access outside the mapping.
    #[error("shared-memory access of {len:#x} bytes at {offset:#x} is outside {size:#x} bytes")]
    OutOfBounds {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the mapping.
        size: u64,
    },
    /// A 32-bit atomic access at an offset that is not 4-byte aligned.
    #[error("32-bit shared-memory access at {0:#x} is not 4-byte aligned")]
    Misaligned(u64),
}

/// A shared, read-write mapping of a memfd (created here or received as an fd).
///
/// `Send + Sync`; every accessor takes `&self` and is bounds-checked.
pub struct SharedMemory {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: u64,
}

// SAFETY: the mapping is owned by this value, stays valid until `Drop` and is never
// remapped; every access is a volatile or atomic raw-pointer access, which is sound from
// any thread (no references to the shared bytes are created).
unsafe impl Send for SharedMemory {}
// SAFETY: see `Send`: all methods take `&self` and use only raw-pointer accesses.
unsafe impl Sync for SharedMemory {}

/// Size granularity of shared memory: one 4 KiB page.
pub const SHARED_PAGE: u64 = 0x1000;

impl SharedMemory {
    /// Creates a zero-filled memfd of `len` bytes named `name` and maps it.
    pub fn create(name: &CStr, len: u64) -> Result<SharedMemory, SharedMemoryError> {
        check_size(len)?;
        let off_len = libc::off_t::try_from(len).map_err(|_| SharedMemoryError::TooLarge(len))?;
        // SAFETY: `name` is NUL-terminated; memfd_create has no other preconditions.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(SharedMemoryError::MemfdCreate(io::Error::last_os_error()));
        }
        // SAFETY: `raw` was just returned by memfd_create and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), off_len) } != 0 {
            return Err(SharedMemoryError::Truncate(io::Error::last_os_error()));
        }
        SharedMemory::map_owned(fd, len)
    }

    /// Maps the first `len` bytes of `fd` (duplicated; the caller keeps its own fd), the
    /// way a second party maps memory it was handed.
    pub fn map(fd: BorrowedFd<'_>, len: u64) -> Result<SharedMemory, SharedMemoryError> {
        check_size(len)?;
        let fd = fd.try_clone_to_owned().map_err(SharedMemoryError::Dup)?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `st` is a valid out-pointer; the fd is ours.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(SharedMemoryError::Stat(io::Error::last_os_error()));
        }
        // SAFETY: fstat succeeded and initialised the buffer.
        let file = u64::try_from(unsafe { st.assume_init() }.st_size).unwrap_or(0);
        if file < len {
            return Err(SharedMemoryError::FileTooSmall { file, len });
        }
        SharedMemory::map_owned(fd, len)
    }

    fn map_owned(fd: OwnedFd, len: u64) -> Result<SharedMemory, SharedMemoryError> {
        let ulen = usize::try_from(len).map_err(|_| SharedMemoryError::TooLarge(len))?;
        // SAFETY: a fresh shared mapping placed by the kernel over `ulen` bytes of a file at
        // least that long; it aliases no Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ulen,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SharedMemoryError::Map {
                len,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| SharedMemoryError::Map {
            len,
            source: io::Error::other("mmap returned NULL"),
        })?;
        Ok(SharedMemory { fd, ptr, len })
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the mapping is empty (never: sizes are checked at creation).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd, for handing to the other party.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Pointer to byte `offset` after checking `[offset, offset + len)` is inside.
    fn at(&self, offset: u64, len: u64) -> Result<*mut u8, SharedMemoryError> {
        let out = || SharedMemoryError::OutOfBounds {
            offset,
            len,
            size: self.len,
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => return Err(out()),
        }
        // SAFETY: `offset <= self.len`, which fits a usize (checked at mapping time), so the
        // result stays inside (or one past the end of) the live mapping.
        Ok(unsafe { self.ptr.as_ptr().add(offset as usize) })
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping (volatile loads).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SharedMemoryError> {
        let src = self.at(offset, buf.len() as u64)?;
        // SAFETY: `at` proved `[src, src + buf.len())` lies inside the live mapping; `buf`
        // is a distinct Rust buffer.
        unsafe { volatile_copy_from(src, buf) };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset` (volatile stores).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), SharedMemoryError> {
        let dst = self.at(offset, data.len() as u64)?;
        // SAFETY: `at` proved `[dst, dst + data.len())` lies inside the live, writable
        // mapping; `data` is a distinct Rust buffer.
        unsafe { volatile_copy_to(dst, data) };
        Ok(())
    }

    /// Atomically loads the little-endian `u32` at `offset` (4-byte aligned) with acquire
    /// ordering: data the peer wrote before publishing this value is visible afterwards.
    pub fn load_u32(&self, offset: u64) -> Result<u32, SharedMemoryError> {
        let p = self.atomic_at(offset)?;
        // SAFETY: `p` is 4-byte aligned, inside the live mapping for as long as `self`
        // lives, and this location is only ever accessed atomically (queue pointers).
        let cell = unsafe { AtomicU32::from_ptr(p) };
        Ok(u32::from_le(cell.load(Ordering::Acquire)))
    }

    /// Atomically stores `value` (little-endian) at `offset` (4-byte aligned) with release
    /// ordering: everything written before is visible to a peer that loads this value.
    pub fn store_u32(&self, offset: u64, value: u32) -> Result<(), SharedMemoryError> {
        let p = self.atomic_at(offset)?;
        // SAFETY: as in `load_u32`.
        let cell = unsafe { AtomicU32::from_ptr(p) };
        cell.store(value.to_le(), Ordering::Release);
        Ok(())
    }

    fn atomic_at(&self, offset: u64) -> Result<*mut u32, SharedMemoryError> {
        if offset % 4 != 0 {
            return Err(SharedMemoryError::Misaligned(offset));
        }
        // The mapping is page aligned, so a 4-aligned offset gives a 4-aligned pointer.
        Ok(self.at(offset, 4)?.cast::<u32>())
    }
}

fn check_size(len: u64) -> Result<(), SharedMemoryError> {
    if len == 0 || len % SHARED_PAGE != 0 {
        return Err(SharedMemoryError::BadSize(len));
    }
    Ok(())
}

/// Copies `buf.len()` bytes from `src` with volatile loads, 8 bytes at a time where `src`
/// is 8-byte aligned.
///
/// # Safety
/// `[src, src + buf.len())` must be valid for reads.
unsafe fn volatile_copy_from(src: *const u8, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() && (src as usize + i) % 8 != 0 {
        // SAFETY: `i < buf.len()`, inside the range the caller vouches for.
        buf[i] = unsafe { std::ptr::read_volatile(src.add(i)) };
        i += 1;
    }
    while i + 8 <= buf.len() {
        // SAFETY: inside the range, 8-byte aligned by the loop above.
        let word = unsafe { std::ptr::read_volatile(src.add(i).cast::<u64>()) };
        buf[i..i + 8].copy_from_slice(&word.to_ne_bytes());
        i += 8;
    }
    while i < buf.len() {
        // SAFETY: `i < buf.len()`, inside the range.
        buf[i] = unsafe { std::ptr::read_volatile(src.add(i)) };
        i += 1;
    }
}

/// Copies `data` to `dst` with volatile stores, 8 bytes at a time where aligned.
///
/// # Safety
/// `[dst, dst + data.len())` must be valid for writes.
unsafe fn volatile_copy_to(dst: *mut u8, data: &[u8]) {
    let mut i = 0;
    while i < data.len() && (dst as usize + i) % 8 != 0 {
        // SAFETY: `i < data.len()`, inside the range the caller vouches for.
        unsafe { std::ptr::write_volatile(dst.add(i), data[i]) };
        i += 1;
    }
    while i + 8 <= data.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&data[i..i + 8]);
        // SAFETY: inside the range, 8-byte aligned by the loop above.
        unsafe { std::ptr::write_volatile(dst.add(i).cast::<u64>(), u64::from_ne_bytes(word)) };
        i += 8;
    }
    while i < data.len() {
        // SAFETY: `i < data.len()`, inside the range.
        unsafe { std::ptr::write_volatile(dst.add(i), data[i]) };
        i += 1;
    }
}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory")
            .field("fd", &self.fd.as_raw_fd())
            .field("len", &format_args!("{:#x}", self.len))
            .finish()
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping made in `map_owned`, which nothing else
        // unmaps; no reference into it exists.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_of_one_memfd_see_each_other() {
        let a = SharedMemory::create(c"test-shm", 0x2000).unwrap();
        let b = SharedMemory::map(a.as_fd(), 0x2000).unwrap();
        a.write(0x0FFD, b"hello, world").unwrap();
        let mut buf = [0u8; 12];
        b.read(0x0FFD, &mut buf).unwrap();
        assert_eq!(&buf, b"hello, world");
        b.store_u32(0x1004, 0xDEAD_BEEF).unwrap();
        assert_eq!(a.load_u32(0x1004).unwrap(), 0xDEAD_BEEF);
        let mut le = [0u8; 4];
        a.read(0x1004, &mut le).unwrap();
        assert_eq!(u32::from_le_bytes(le), 0xDEAD_BEEF);
    }

    #[test]
    fn bounds_sizes_and_alignment_are_checked() {
        assert!(matches!(
            SharedMemory::create(c"t", 0),
            Err(SharedMemoryError::BadSize(0))
        ));
        assert!(matches!(
            SharedMemory::create(c"t", 100),
            Err(SharedMemoryError::BadSize(100))
        ));
        let a = SharedMemory::create(c"t", 0x1000).unwrap();
        assert!(matches!(
            SharedMemory::map(a.as_fd(), 0x2000),
            Err(SharedMemoryError::FileTooSmall { .. })
        ));
        let mut buf = [0u8; 2];
        assert!(a.read(0xFFF, &mut buf).is_err());
        assert!(a.write(u64::MAX, &buf).is_err());
        assert!(matches!(
            a.load_u32(2),
            Err(SharedMemoryError::Misaligned(2))
        ));
        assert!(a.store_u32(0x1000, 0).is_err());
        assert!(a.load_u32(0xFFC).is_ok());
    }
}
