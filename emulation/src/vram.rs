//! Emulated video memory: a sparse memfd mapped once, plus a typed VRAM address.
//!
//! The memfd is shared with QEMU, which maps it for direct guest access, so the memory can
//! change under our feet at any time. All access therefore goes through raw pointers
//! (`copy_nonoverlapping`, volatile loads/stores); no Rust reference to the mapped bytes is
//! ever created. Untouched pages cost nothing: the file is only `ftruncate`d, never written
//! to, and the mapping is `MAP_NORESERVE`.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use thiserror::Error;

/// A typed address in (emulated) VRAM: a byte offset from the start of device memory.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct VramAddr(u64);

impl VramAddr {
    /// VRAM address 0.
    pub const ZERO: VramAddr = VramAddr(0);

    /// Wraps a raw byte offset into VRAM.
    pub const fn new(raw: u64) -> VramAddr {
        VramAddr(raw)
    }

    /// The raw byte offset.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// `self + bytes`, or `None` on overflow.
    pub const fn checked_add(self, bytes: u64) -> Option<VramAddr> {
        match self.0.checked_add(bytes) {
            Some(v) => Some(VramAddr(v)),
            None => None,
        }
    }

    /// `self - bytes`, or `None` on underflow.
    pub const fn checked_sub(self, bytes: u64) -> Option<VramAddr> {
        match self.0.checked_sub(bytes) {
            Some(v) => Some(VramAddr(v)),
            None => None,
        }
    }

    /// Distance in bytes from `base` up to `self`, or `None` if `self < base`.
    pub const fn offset_from(self, base: VramAddr) -> Option<u64> {
        self.0.checked_sub(base.0)
    }

    /// Whether the address is a multiple of `align` (which must be a power of two; any
    /// other `align` yields `false`).
    pub const fn is_aligned(self, align: u64) -> bool {
        align.is_power_of_two() && self.0 & (align - 1) == 0
    }

    /// The address rounded down to a multiple of `align`, or `None` if `align` is not a
    /// power of two.
    pub const fn align_down(self, align: u64) -> Option<VramAddr> {
        if align.is_power_of_two() {
            Some(VramAddr(self.0 & !(align - 1)))
        } else {
            None
        }
    }
}

impl fmt::Debug for VramAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VramAddr({:#x})", self.0)
    }
}

impl fmt::Display for VramAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vram:{:#x}", self.0)
    }
}

/// Errors of VRAM creation and access.
#[derive(Debug, Error)]
pub enum VramError {
    /// A VRAM of size zero was requested.
    #[error("VRAM size must not be zero")]
    ZeroSize,
    /// The requested size is larger than [`Vram::MAX_SIZE`].
    #[error("VRAM size {size:#x} exceeds the maximum of {max:#x} bytes")]
    TooLarge {
        /// The requested size.
        size: u64,
        /// The maximum supported size.
        max: u64,
    },
    /// The requested size is not a multiple of [`Vram::SIZE_ALIGN`].
    #[error("VRAM size {0:#x} is not a multiple of 4 KiB")]
    UnalignedSize(u64),
    /// `memfd_create` failed.
    #[error("memfd_create failed: {0}")]
    MemfdCreate(#[source] io::Error),
    /// `ftruncate` of the memfd failed.
    #[error("ftruncate of the VRAM memfd to {size:#x} bytes failed: {source}")]
    Truncate {
        /// The requested size.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `mmap` of the memfd failed.
    #[error("mmap of {size:#x} bytes of VRAM failed: {source}")]
    Map {
        /// The requested size.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `fstat` of the memfd failed.
    #[error("fstat of the VRAM memfd failed: {0}")]
    Stat(#[source] io::Error),
    /// An access (or an address computation) that does not lie inside VRAM.
    #[error("VRAM access of {len:#x} bytes at {addr} is outside VRAM of {size:#x} bytes")]
    OutOfBounds {
        /// Start of the access.
        addr: VramAddr,
        /// Length of the access in bytes.
        len: u64,
        /// Size of this VRAM.
        size: u64,
    },
}

/// Emulated device memory: a memfd of a fixed size, mapped shared once over its whole size.
///
/// The memory is sparse (untouched pages are not resident) and may be concurrently
/// modified through other mappings of [`Vram::as_fd`] (QEMU maps it for the guest). All
/// accessors are bounds-checked and return errors instead of panicking. The same type backs
/// the instance-memory BAR.
pub struct Vram {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    size: u64,
}

// SAFETY: `Vram` owns a shared mapping that stays valid until `Drop`; it is never remapped.
// All access goes through raw-pointer copies or volatile operations on that mapping, which
// are sound from any thread (the memory is plain shared memory; concurrent writers can only
// make the bytes read unpredictable, not cause undefined behaviour in our code, since we
// never create references to it).
unsafe impl Send for Vram {}
// SAFETY: see `Send`; every method takes `&self` and uses only raw-pointer accesses to the
// mapping, so sharing `&Vram` between threads is sound.
unsafe impl Sync for Vram {}

impl Vram {
    /// Sizes must be multiples of this (4 KiB), so the whole memfd can be mmapped by QEMU.
    pub const SIZE_ALIGN: u64 = 4096;
    /// Largest supported size: 1 TiB (above any real board; guards against absurd sizes).
    pub const MAX_SIZE: u64 = 1 << 40;

    /// Creates a zero-filled VRAM of `size` bytes backed by an anonymous memfd.
    ///
    /// `size` must be non-zero, a multiple of [`Vram::SIZE_ALIGN`] and at most
    /// [`Vram::MAX_SIZE`]. No page is touched: the memory is allocated on first access.
    pub fn new(size: u64) -> Result<Vram, VramError> {
        Vram::new_named(c"gpu-emulation-vram", size)
    }

    /// Like [`Vram::new`], with `name` as the memfd name (visible in `/proc/<pid>/maps`
    /// and `/proc/<pid>/fd`).
    pub fn new_named(name: &CStr, size: u64) -> Result<Vram, VramError> {
        if size % Self::SIZE_ALIGN != 0 && size <= Self::MAX_SIZE {
            return Err(VramError::UnalignedSize(size));
        }
        Vram::create(name, size)
    }

    /// A VRAM whose size need not be page aligned, for tests of end-of-memory handling.
    #[cfg(test)]
    pub(crate) fn new_unaligned_for_test(size: u64) -> Result<Vram, VramError> {
        Vram::create(c"gpu-emulation-test", size)
    }

    /// Creates the memfd and mapping; `size` alignment is the caller's business.
    fn create(name: &CStr, size: u64) -> Result<Vram, VramError> {
        if size == 0 {
            return Err(VramError::ZeroSize);
        }
        if size > Self::MAX_SIZE {
            return Err(VramError::TooLarge {
                size,
                max: Self::MAX_SIZE,
            });
        }
        // `size` ≤ 1 TiB, so these conversions cannot fail on a 64-bit host; on a 32-bit
        // host they fail cleanly.
        let len = usize::try_from(size).map_err(|_| VramError::TooLarge {
            size,
            max: usize::MAX as u64,
        })?;
        let off_len = libc::off_t::try_from(size).map_err(|_| VramError::TooLarge {
            size,
            max: libc::off_t::MAX as u64,
        })?;

        // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other
        // memory-safety preconditions.
        let raw_fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw_fd < 0 {
            return Err(VramError::MemfdCreate(io::Error::last_os_error()));
        }
        // SAFETY: `raw_fd` was just returned by memfd_create, is valid and owned by nobody
        // else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw_fd) };

        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), off_len) } != 0 {
            return Err(VramError::Truncate {
                size,
                source: io::Error::last_os_error(),
            });
        }

        // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL), over a file of
        // exactly `len` bytes; it does not alias any Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VramError::Map {
                size,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| VramError::Map {
            size,
            source: io::Error::other("mmap returned NULL"),
        })?;
        Ok(Vram { fd, ptr, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd backing this memory, for other processes (QEMU) to mmap. Offsets in the
    /// file are VRAM addresses.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Bytes of memory the memfd actually holds (allocated pages), from `fstat`. An
    /// untouched VRAM reports (close to) zero.
    pub fn allocated_bytes(&self) -> Result<u64, VramError> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `st` is a valid out-pointer to a `stat` buffer; the fd is ours.
        let rc = unsafe { libc::fstat(self.fd.as_raw_fd(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(VramError::Stat(io::Error::last_os_error()));
        }
        // SAFETY: fstat succeeded, so it initialised the buffer.
        let st = unsafe { st.assume_init() };
        Ok(u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512))
    }

    /// Checks that `[addr, addr + len)` lies inside VRAM and returns the start as a byte
    /// offset usable with the mapping.
    fn check(&self, addr: VramAddr, len: u64) -> Result<usize, VramError> {
        let out = || VramError::OutOfBounds {
            addr,
            len,
            size: self.size,
        };
        let end = addr.raw().checked_add(len).ok_or_else(out)?;
        if end > self.size {
            return Err(out());
        }
        // `addr < size ≤ MAX_SIZE`, and `new` checked that `size` fits a usize.
        usize::try_from(addr.raw()).map_err(|_| out())
    }

    /// Pointer to byte `off` of the mapping.
    ///
    /// # Safety
    /// `off` must have been validated by [`Vram::check`] (so `off ≤ size`).
    unsafe fn at(&self, off: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `off ≤ size`, so the result stays inside (or one
        // past the end of) the mapping.
        unsafe { self.ptr.as_ptr().add(off) }
    }

    /// Copies `buf.len()` bytes starting at `addr` into `buf`.
    pub fn read(&self, addr: VramAddr, buf: &mut [u8]) -> Result<(), VramError> {
        let off = self.check(addr, buf.len() as u64)?;
        // SAFETY: `check` proved `[off, off + buf.len())` lies inside the live mapping; `buf`
        // is a distinct Rust buffer, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.at(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into VRAM starting at `addr`.
    pub fn write(&self, addr: VramAddr, data: &[u8]) -> Result<(), VramError> {
        let off = self.check(addr, data.len() as u64)?;
        // SAFETY: `check` proved `[off, off + data.len())` lies inside the live, writable
        // mapping; `data` is a distinct Rust buffer, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.at(off), data.len()) };
        Ok(())
    }

    /// Sets `len` bytes starting at `addr` to `byte`.
    ///
    /// Filling with zero releases whole pages inside the range back to the host
    /// (`fallocate(PUNCH_HOLE)`), so scrubbing a large VRAM range does not make it resident.
    pub fn fill(&self, addr: VramAddr, len: u64, byte: u8) -> Result<(), VramError> {
        let off = self.check(addr, len)?;
        let len_usize = usize::try_from(len).map_err(|_| VramError::OutOfBounds {
            addr,
            len,
            size: self.size,
        })?;
        if byte == 0 && self.punch_hole(addr.raw(), len) {
            return Ok(());
        }
        // SAFETY: `check` proved `[off, off + len)` lies inside the live, writable mapping.
        unsafe { std::ptr::write_bytes(self.at(off), byte, len_usize) };
        Ok(())
    }

    /// Zeroes `[start, start + len)` by punching out whole pages and writing zeros to the
    /// partial pages at the edges. Returns false (having changed nothing) if the kernel
    /// refused the punch, so the caller can fall back to writing zeros.
    /// The range must already be bounds-checked.
    fn punch_hole(&self, start: u64, len: u64) -> bool {
        const PAGE: u64 = Vram::SIZE_ALIGN;
        let end = start + len; // checked by the caller
        let first_page = start.next_multiple_of(PAGE);
        let last_page = end - end % PAGE;
        if first_page >= last_page {
            return false; // no whole page inside: plain writes are cheaper
        }
        let (Ok(off), Ok(plen)) = (
            libc::off_t::try_from(first_page),
            libc::off_t::try_from(last_page - first_page),
        ) else {
            return false;
        };
        // SAFETY: plain syscall on our fd; the range is inside the file.
        let rc = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                plen,
            )
        };
        if rc != 0 {
            return false;
        }
        for (lo, hi) in [(start, first_page), (last_page, end)] {
            if hi > lo {
                // `lo..hi` lies inside the already-checked range, and is < 1 page long.
                // SAFETY: inside the live writable mapping (see above).
                unsafe { std::ptr::write_bytes(self.at(lo as usize), 0, (hi - lo) as usize) };
            }
        }
        true
    }
}

macro_rules! scalar_access {
    ($ty:ty, $read:ident, $write:ident) => {
        #[doc = concat!(
            "Reads a little-endian `", stringify!($ty), "` at `addr`. Naturally aligned ",
            "addresses are read with one volatile load (no tearing against other mappings)."
        )]
        pub fn $read(&self, addr: VramAddr) -> Result<$ty, VramError> {
            const N: usize = std::mem::size_of::<$ty>();
            let off = self.check(addr, N as u64)?;
            if addr.is_aligned(N as u64) {
                // SAFETY: in bounds (checked) and naturally aligned: the mapping start is
                // page aligned and `off` is a multiple of the size.
                let v = unsafe { std::ptr::read_volatile(self.at(off).cast::<$ty>()) };
                Ok(<$ty>::from_le(v))
            } else {
                let mut bytes = [0u8; N];
                // SAFETY: in bounds (checked); `bytes` is a distinct local buffer.
                unsafe { std::ptr::copy_nonoverlapping(self.at(off), bytes.as_mut_ptr(), N) };
                Ok(<$ty>::from_le_bytes(bytes))
            }
        }

        #[doc = concat!(
            "Writes `value` as a little-endian `", stringify!($ty), "` at `addr`. Naturally ",
            "aligned addresses are written with one volatile store."
        )]
        pub fn $write(&self, addr: VramAddr, value: $ty) -> Result<(), VramError> {
            const N: usize = std::mem::size_of::<$ty>();
            let off = self.check(addr, N as u64)?;
            if addr.is_aligned(N as u64) {
                // SAFETY: in bounds (checked), naturally aligned, writable mapping.
                unsafe { std::ptr::write_volatile(self.at(off).cast::<$ty>(), value.to_le()) };
            } else {
                let bytes = value.to_le_bytes();
                // SAFETY: in bounds (checked); `bytes` is a distinct local buffer.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.at(off), N) };
            }
            Ok(())
        }
    };
}

impl Vram {
    scalar_access!(u8, read_u8, write_u8);
    scalar_access!(u16, read_u16, write_u16);
    scalar_access!(u32, read_u32, write_u32);
    scalar_access!(u64, read_u64, write_u64);
}

impl AsFd for Vram {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl fmt::Debug for Vram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vram")
            .field("fd", &self.fd.as_raw_fd())
            .field("size", &format_args!("{:#x}", self.size))
            .finish()
    }
}

impl Drop for Vram {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`size` describe the mapping created in `new`, which nothing else
        // unmaps; no reference into it can outlive `self`. `size` fits a usize (checked in
        // `new`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.size as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn vram_is_send_and_sync() {
        assert_send_sync::<Vram>();
        assert_send_sync::<VramAddr>();
    }

    #[test]
    fn vram_addr_arithmetic() {
        let a = VramAddr::new(0x1_0000);
        assert_eq!(a.checked_add(0x10), Some(VramAddr::new(0x1_0010)));
        assert_eq!(VramAddr::new(u64::MAX).checked_add(1), None);
        assert_eq!(a.checked_sub(0x1_0001), None);
        assert_eq!(a.checked_sub(0x1_0000), Some(VramAddr::ZERO));
        assert_eq!(VramAddr::new(0x1_0040).offset_from(a), Some(0x40));
        assert_eq!(a.offset_from(VramAddr::new(0x1_0040)), None);
        assert!(a.is_aligned(0x1_0000));
        assert!(!a.is_aligned(0x2_0000));
        assert!(!a.is_aligned(3));
        assert_eq!(
            VramAddr::new(0x1_2345).align_down(0x1_0000),
            Some(VramAddr::new(0x1_0000))
        );
        assert_eq!(a.align_down(6), None);
        assert_eq!(a.to_string(), "vram:0x10000");
        assert_eq!(format!("{a:?}"), "VramAddr(0x10000)");
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(Vram::new(0), Err(VramError::ZeroSize)));
        assert!(matches!(
            Vram::new(4095),
            Err(VramError::UnalignedSize(4095))
        ));
        assert!(matches!(
            Vram::new(Vram::MAX_SIZE + 4096),
            Err(VramError::TooLarge { .. })
        ));
        assert!(matches!(
            Vram::new(u64::MAX),
            Err(VramError::TooLarge { .. })
        ));
    }

    #[test]
    fn read_write_round_trip_and_zero_initialised() {
        let v = Vram::new(2 * MIB).unwrap();
        assert_eq!(v.size(), 2 * MIB);
        let mut buf = [0xAAu8; 16];
        v.read(VramAddr::new(0x1000), &mut buf).unwrap();
        assert_eq!(buf, [0u8; 16]);
        v.write(VramAddr::new(0x1F_FFF0), b"0123456789abcdef")
            .unwrap();
        v.read(VramAddr::new(0x1F_FFF0), &mut buf).unwrap();
        assert_eq!(&buf, b"0123456789abcdef");
        // Zero-length accesses at the very end are fine.
        v.read(VramAddr::new(2 * MIB), &mut []).unwrap();
        v.write(VramAddr::new(2 * MIB), &[]).unwrap();
    }

    #[test]
    fn out_of_bounds_accesses_are_errors() {
        let v = Vram::new(MIB).unwrap();
        let mut buf = [0u8; 8];
        assert!(matches!(
            v.read(VramAddr::new(MIB - 4), &mut buf),
            Err(VramError::OutOfBounds { len: 8, .. })
        ));
        assert!(v.write(VramAddr::new(MIB), &[1]).is_err());
        assert!(v.read(VramAddr::new(u64::MAX - 2), &mut buf).is_err());
        assert!(v.read_u32(VramAddr::new(MIB - 2)).is_err());
        assert!(v.write_u64(VramAddr::new(u64::MAX), 0).is_err());
        assert!(v.fill(VramAddr::new(1), MIB, 0).is_err());
        assert!(v.fill(VramAddr::new(u64::MAX), 2, 0).is_err());
        assert!(v.read(VramAddr::new(MIB + 1), &mut []).is_err());
        // Nothing was written by the failed accesses.
        assert_eq!(v.read_u64(VramAddr::new(MIB - 8)).unwrap(), 0);
        let e = v.read_u8(VramAddr::new(MIB)).unwrap_err();
        assert!(e.to_string().contains("outside VRAM"), "{e}");
    }

    #[test]
    fn scalar_helpers_are_little_endian_aligned_or_not() {
        let v = Vram::new(MIB).unwrap();
        v.write_u32(VramAddr::new(0x100), 0x1122_3344).unwrap();
        let mut b = [0u8; 4];
        v.read(VramAddr::new(0x100), &mut b).unwrap();
        assert_eq!(b, [0x44, 0x33, 0x22, 0x11]);
        v.write_u64(VramAddr::new(0x203), 0x0102_0304_0506_0708)
            .unwrap();
        assert_eq!(
            v.read_u64(VramAddr::new(0x203)).unwrap(),
            0x0102_0304_0506_0708
        );
        assert_eq!(v.read_u8(VramAddr::new(0x203)).unwrap(), 0x08);
        assert_eq!(v.read_u16(VramAddr::new(0x209)).unwrap(), 0x0102);
        v.write_u16(VramAddr::new(0x300), 0xBEEF).unwrap();
        v.write_u8(VramAddr::new(0x302), 0x7F).unwrap();
        assert_eq!(v.read_u32(VramAddr::new(0x300)).unwrap(), 0x007F_BEEF);
    }

    #[test]
    fn fill_sets_bytes_and_zero_fill_releases_pages() {
        let v = Vram::new(4 * MIB).unwrap();
        v.fill(VramAddr::new(0x10), 3 * MIB, 0x5A).unwrap();
        assert_eq!(v.read_u8(VramAddr::new(0xF)).unwrap(), 0);
        assert_eq!(v.read_u8(VramAddr::new(0x10)).unwrap(), 0x5A);
        assert_eq!(v.read_u8(VramAddr::new(3 * MIB + 0xF)).unwrap(), 0x5A);
        assert_eq!(v.read_u8(VramAddr::new(3 * MIB + 0x10)).unwrap(), 0);
        let before = v.allocated_bytes().unwrap();
        assert!(before >= 3 * MIB, "{before}");
        // Zero an unaligned range: edges written, middle punched.
        v.fill(VramAddr::new(0x20), 3 * MIB - 0x20, 0).unwrap();
        // Checked before reading back: reading a hole through the mapping allocates it.
        let after = v.allocated_bytes().unwrap();
        assert!(after < 64 * 1024, "allocated after zero fill: {after}");
        assert_eq!(v.read_u8(VramAddr::new(0x1F)).unwrap(), 0x5A);
        let mut buf = vec![0xFFu8; (3 * MIB - 0x20) as usize];
        v.read(VramAddr::new(0x20), &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(v.read_u8(VramAddr::new(3 * MIB)).unwrap(), 0x5A);
        // Small (sub-page) zero fill works too.
        v.fill(VramAddr::new(0x10), 0x10, 0).unwrap();
        assert_eq!(v.read_u8(VramAddr::new(0x1F)).unwrap(), 0);
    }

    /// QEMU maps the fd itself: a second mapping must see our writes and we must see its.
    #[test]
    fn other_mappings_of_the_fd_share_the_memory() {
        let v = Vram::new(MIB).unwrap();
        v.write_u32(VramAddr::new(0x40), 0xCAFE_F00D).unwrap();
        // SAFETY: a fresh shared mapping of the VRAM memfd, unmapped below; accessed only
        // through volatile raw-pointer operations within its 1 MiB length.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                MIB as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                v.as_fd().as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let p = p.cast::<u32>();
            assert_eq!(std::ptr::read_volatile(p.add(0x10)), 0xCAFE_F00D);
            std::ptr::write_volatile(p.add(0x20), 0x1234_5678);
            assert_eq!(v.read_u32(VramAddr::new(0x80)).unwrap(), 0x1234_5678);
            libc::munmap(p.cast(), MIB as usize);
        }
    }

    fn vm_rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS line");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    const RSS_CHILD_ENV: &str = "GPU_EMULATION_RSS_CHILD";

    /// An untouched 96 GiB VRAM must not become resident. RSS is process-wide and other
    /// tests run in parallel threads, so the measurement runs in a re-executed copy of this
    /// test binary that runs only this test, single-threaded.
    #[test]
    fn untouched_96g_vram_has_tiny_rss() {
        if std::env::var_os(RSS_CHILD_ENV).is_none() {
            let exe = std::env::current_exe().unwrap();
            let out = std::process::Command::new(exe)
                .args([
                    "vram::tests::untouched_96g_vram_has_tiny_rss",
                    "--exact",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(RSS_CHILD_ENV, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "child failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.contains("1 passed"), "child ran no test:\n{stdout}");
            return;
        }
        let before = vm_rss_kib();
        let v = Vram::new(96 * GIB).unwrap();
        // Touch one page at each end to prove the mapping is live over its whole size.
        v.write_u32(VramAddr::new(0), 1).unwrap();
        v.write_u32(VramAddr::new(96 * GIB - 4), 2).unwrap();
        assert_eq!(v.read_u32(VramAddr::new(96 * GIB - 4)).unwrap(), 2);
        let after = vm_rss_kib();
        let grown = after.saturating_sub(before);
        eprintln!("VmRSS before {before} KiB, after {after} KiB");
        assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
        assert!(v.allocated_bytes().unwrap() < MIB);
    }
}
