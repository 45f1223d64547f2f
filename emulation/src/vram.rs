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
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

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
    /// Sealing the memfd's size (`F_ADD_SEALS`) failed.
    #[error("sealing the VRAM memfd's size failed: {0}")]
    Seal(#[source] io::Error),
    /// A [`Vram::carve`] request that is misaligned, empty, out of range or overlaps an
    /// existing carve, or a [`Vram::uncarve`] of a range that is not exactly one carve.
    #[error("cannot carve {len:#x} bytes at {addr}: {reason}")]
    BadCarve {
        /// Start of the requested range.
        addr: VramAddr,
        /// Its length.
        len: u64,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A system call of [`Vram::carve`] or [`Vram::uncarve`] failed.
    #[error("carving VRAM failed: {what}: {source}")]
    CarveOs {
        /// The failing step.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The VRAM file cannot be opened, created or sized.
    #[error("VRAM file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An existing VRAM file of another size.
    #[error("VRAM file {path} holds {found:#x} bytes, not the {size:#x} of this GPU")]
    FileSize {
        /// The file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The VRAM size.
        size: u64,
    },
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
/// The memfd's size is sealed (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`), like every carve's:
/// whoever is handed [`Vram::as_fd`] can map it but cannot resize it under our mapping.
///
/// The memory is sparse (untouched pages are not resident) and may be concurrently
/// modified through other mappings of [`Vram::as_fd`] (QEMU maps it for the guest). All
/// accessors are bounds-checked and return errors instead of panicking. The same type backs
/// the instance-memory BAR.
///
/// Ranges handed to [`Vram::carve`] move to memfds of their own (so a range can be shared
/// with one process without exposing the rest of VRAM); the mapping stays one contiguous
/// address range, so accesses do not care.
pub struct Vram {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    size: u64,
    /// Carved ranges, sorted by start. Only `carve`, `fill` and `allocated_bytes` take the
    /// lock; plain accesses go through the mapping and never look at it.
    carves: Mutex<Vec<Carve>>,
    /// Backed by a regular file ([`Vram::open_file`]): never shared, never carved.
    file_backed: bool,
}

/// One range of VRAM backed by its own memfd (see [`Vram::carve`]).
struct Carve {
    start: u64,
    len: u64,
    fd: Arc<OwnedFd>,
}

impl Carve {
    fn end(&self) -> u64 {
        self.start + self.len
    }
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

    /// VRAM of `size` bytes kept in the file at `path` across runs (created sparse, mode
    /// 0600, if missing; an existing file must hold exactly `size` bytes, which are the
    /// VRAM). A regular file's size cannot be sealed, and a peer that truncated it would make
    /// our accesses fault, so a file-backed VRAM is never handed to another process:
    /// [`Vram::carve`] refuses it and [`Vram::is_file_backed`] tells its owner not to share
    /// [`Vram::as_fd`].
    pub fn open_file(path: &Path, size: u64) -> Result<Vram, VramError> {
        use std::os::unix::fs::OpenOptionsExt;
        if size % Self::SIZE_ALIGN != 0 {
            return Err(VramError::UnalignedSize(size));
        }
        Self::check_size(size)?;
        let file_err = |source| VramError::File {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(file_err)?;
        let found = file.metadata().map_err(file_err)?.len();
        if found == 0 {
            file.set_len(size).map_err(file_err)?;
        } else if found != size {
            return Err(VramError::FileSize {
                path: path.to_path_buf(),
                found,
                size,
            });
        }
        Vram::map(OwnedFd::from(file), size, true)
    }

    /// Non-zero and at most [`Vram::MAX_SIZE`].
    fn check_size(size: u64) -> Result<(), VramError> {
        if size == 0 {
            return Err(VramError::ZeroSize);
        }
        if size > Self::MAX_SIZE {
            return Err(VramError::TooLarge {
                size,
                max: Self::MAX_SIZE,
            });
        }
        Ok(())
    }

    /// The VRAM over all `size` bytes of `fd`, mapped whole.
    fn map(fd: OwnedFd, size: u64, file_backed: bool) -> Result<Vram, VramError> {
        let ptr = map_whole(fd.as_fd(), size)?;
        Ok(Vram {
            fd,
            ptr,
            size,
            carves: Mutex::new(Vec::new()),
            file_backed,
        })
    }

    /// Whether the VRAM is kept in a file ([`Vram::open_file`]): then it must not be shared.
    pub fn is_file_backed(&self) -> bool {
        self.file_backed
    }

    /// Creates the memfd and mapping; `size` alignment is the caller's business.
    fn create(name: &CStr, size: u64) -> Result<Vram, VramError> {
        Self::check_size(size)?;
        // `size` ≤ 1 TiB, so this conversion cannot fail on a 64-bit host; on a 32-bit host
        // it fails cleanly.
        let off_len = libc::off_t::try_from(size).map_err(|_| VramError::TooLarge {
            size,
            max: libc::off_t::MAX as u64,
        })?;

        // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other
        // memory-safety preconditions.
        let raw_fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
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
        seal_size(fd.as_fd()).map_err(VramError::Seal)?;
        Vram::map(fd, size, false)
    }

    /// Moves `[addr, addr + len)` to a memfd of its own and returns that memfd (file offset
    /// 0 = `addr`), so the range can be shared with another process (QEMU of one guest)
    /// without handing out the rest of VRAM.
    ///
    /// The new memfd (named `gpu-emulation-vram-slice@<addr in hex>`, exactly `len` bytes,
    /// sealed against shrinking and growing) is mapped over the range of the existing
    /// mapping, so every access through this `Vram` reaches it from now on; the range of
    /// the base memfd ([`Vram::as_fd`]) is punched out and stays a hole that no access of
    /// ours touches again. The carved range starts zero-filled: its previous contents are
    /// discarded (carving is meant for slices at hand-out, which are scrubbed anyway).
    ///
    /// `addr` and `len` must be multiples of [`Vram::SIZE_ALIGN`], `len` non-zero, the range
    /// inside VRAM and disjoint from every other carve. A carve lasts until
    /// [`Vram::uncarve`] or as long as the `Vram`.
    pub fn carve(&self, addr: VramAddr, len: u64) -> Result<Arc<OwnedFd>, VramError> {
        let bad = |reason| VramError::BadCarve { addr, len, reason };
        if self.file_backed {
            return Err(bad("file-backed VRAM is never shared"));
        }
        if len == 0 {
            return Err(bad("empty range"));
        }
        if !addr.is_aligned(Self::SIZE_ALIGN) || len % Self::SIZE_ALIGN != 0 {
            return Err(bad("not page aligned"));
        }
        let off = self.check(addr, len)?;
        let start = addr.raw();
        let end = start + len; // checked
        let (Ok(len_usize), Ok(off_len), Ok(off_start)) = (
            usize::try_from(len),
            libc::off_t::try_from(len),
            libc::off_t::try_from(start),
        ) else {
            return Err(bad("range does not fit the host's types"));
        };
        let mut carves = self.carves.lock().unwrap_or_else(PoisonError::into_inner);
        if carves.iter().any(|c| c.start < end && start < c.end()) {
            return Err(bad("overlaps an earlier carve"));
        }
        let os = |what| VramError::CarveOs {
            what,
            source: io::Error::last_os_error(),
        };

        let name = std::ffi::CString::new(format!("gpu-emulation-vram-slice@{start:#x}"))
            .map_err(|_| bad("memfd name"))?;
        // SAFETY: `name` is a valid NUL-terminated string; no other preconditions.
        let raw_fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw_fd < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `raw_fd` was just returned by memfd_create and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw_fd) };
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), off_len) } != 0 {
            return Err(os("ftruncate"));
        }
        if seal_size(fd.as_fd()).is_err() {
            return Err(os("F_ADD_SEALS"));
        }

        let mapped = self.map_over(off, len_usize, fd.as_fd(), 0);
        if !mapped {
            let error = os("mmap over VRAM");
            // A failed MAP_FIXED may have unmapped the range: map the base memfd back.
            let restored = self.map_over(off, len_usize, self.fd.as_fd(), off_start);
            assert!(restored, "VRAM mapping lost at {addr} after a failed carve");
            return Err(error);
        }
        // The base memfd must no longer hold any byte of the range.
        // SAFETY: plain syscall on our fd; the range is inside the file.
        let rc = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off_start,
                off_len,
            )
        };
        if rc != 0 {
            // Nothing maps the base memfd's range any more; the carve stands, but the old
            // bytes would stay readable through the base memfd: overwrite them instead.
            let zeros = vec![0u8; 1 << 16];
            let mut at = start;
            while at < end {
                let n = (end - at).min(zeros.len() as u64) as usize;
                // SAFETY: `zeros[..n]` is a valid buffer; the fd is ours.
                let w = unsafe {
                    libc::pwrite(
                        self.fd.as_raw_fd(),
                        zeros.as_ptr().cast(),
                        n,
                        at as libc::off_t,
                    )
                };
                if w <= 0 {
                    return Err(os("clearing the base memfd"));
                }
                at += w as u64;
            }
        }
        let fd = Arc::new(fd);
        let at = carves.partition_point(|c| c.start < start);
        carves.insert(
            at,
            Carve {
                start,
                len,
                fd: Arc::clone(&fd),
            },
        );
        Ok(fd)
    }

    /// Undoes [`Vram::carve`] of exactly `[addr, addr + len)`: the base memfd is mapped
    /// back over the range (so accesses through this `Vram` reach the base memfd's range,
    /// a zero-filled hole, again) and the carve is forgotten, so the range can be carved
    /// afresh. The carve's memfd stays valid for whoever still holds or maps it, but is no
    /// longer connected to this VRAM: nothing written through it reaches VRAM, and nothing
    /// written to VRAM shows through it. Its pages are released (best effort), since the
    /// contents of a released range do not matter (slices are scrubbed at hand-out).
    ///
    /// `[addr, addr + len)` must be exactly the range of an existing carve.
    pub fn uncarve(&self, addr: VramAddr, len: u64) -> Result<(), VramError> {
        let bad = |reason| VramError::BadCarve { addr, len, reason };
        let mut carves = self.carves.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(at) = carves
            .iter()
            .position(|c| (c.start, c.len) == (addr.raw(), len))
        else {
            return Err(bad("not a carved range"));
        };
        // A carved range was checked and converted when it was carved.
        let off = self.check(addr, len)?;
        let (Ok(len_usize), Ok(off_len), Ok(off_start)) = (
            usize::try_from(len),
            libc::off_t::try_from(len),
            libc::off_t::try_from(addr.raw()),
        ) else {
            return Err(bad("range does not fit the host's types"));
        };
        let mapped = self.map_over(off, len_usize, self.fd.as_fd(), off_start);
        if !mapped {
            let error = VramError::CarveOs {
                what: "mmap of the base memfd over a carve",
                source: io::Error::last_os_error(),
            };
            // A failed MAP_FIXED may have unmapped the range: map the carve back, which
            // stays in place (the range is still carved).
            let restored = self.map_over(off, len_usize, carves[at].fd.as_fd(), 0);
            assert!(
                restored,
                "VRAM mapping lost at {addr} after a failed uncarve"
            );
            return Err(error);
        }
        let carve = carves.remove(at);
        // Release the old carve's pages; a failure only costs memory.
        let _ = punch(carve.fd.as_fd(), 0, off_len);
        Ok(())
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd backing this memory, for other processes (QEMU) to mmap. Offsets in the
    /// file are VRAM addresses; ranges moved out by [`Vram::carve`] are holes in it.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Bytes of memory the memfds actually hold (allocated pages of the base memfd and of
    /// every carve), from `fstat`. An untouched VRAM reports (close to) zero.
    pub fn allocated_bytes(&self) -> Result<u64, VramError> {
        let carves = self.carves.lock().unwrap_or_else(PoisonError::into_inner);
        std::iter::once(self.fd.as_fd())
            .chain(carves.iter().map(|c| c.fd.as_fd()))
            .try_fold(0u64, |sum, fd| Ok(sum.saturating_add(allocated_of(fd)?)))
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

    /// Replaces the pages of `[off, off + len)` of our mapping with a shared mapping of
    /// `len` bytes of `fd` at `file_offset`; returns whether `mmap` succeeded. A failed
    /// `MAP_FIXED` may have left the range unmapped: the caller must map something back.
    ///
    /// The range must come from [`Vram::check`] (inside the live mapping).
    fn map_over(
        &self,
        off: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        file_offset: libc::off_t,
    ) -> bool {
        debug_assert!(off
            .checked_add(len)
            .is_some_and(|end| end as u64 <= self.size));
        // SAFETY: `[off, off + len)` lies inside our own live mapping (the caller took it
        // from `check`), which no Rust reference points into (all access is by raw
        // pointer), so replacing its pages with another shared, writable file mapping is
        // sound: accesses racing with the replacement see either mapping, both valid.
        let mapped = unsafe {
            libc::mmap(
                self.at(off).cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                file_offset,
            )
        };
        mapped != libc::MAP_FAILED
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
        if !punch(self.fd.as_fd(), off, plen) {
            return false;
        }
        // Carved pages live in their carve's memfd (the base memfd holds holes there).
        let carves = self.carves.lock().unwrap_or_else(PoisonError::into_inner);
        for c in carves.iter() {
            let (lo, hi) = (first_page.max(c.start), last_page.min(c.end()));
            if lo >= hi {
                continue;
            }
            let (Ok(off), Ok(plen)) = (
                libc::off_t::try_from(lo - c.start),
                libc::off_t::try_from(hi - lo),
            ) else {
                return false;
            };
            if !punch(c.fd.as_fd(), off, plen) {
                return false;
            }
        }
        drop(carves);
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

/// Seals a memfd's size for good (`F_SEAL_SHRINK | F_SEAL_GROW`, then `F_SEAL_SEAL` so no
/// other seal, `F_SEAL_FUTURE_WRITE` say, can be added later). Every memfd of VRAM is handed
/// to other processes (QEMU maps it for its guest): sealed, none of them can `ftruncate` it
/// under our mapping, which would make our next access past the new end fault with SIGBUS.
/// Punching holes (`fallocate(PUNCH_HOLE | KEEP_SIZE)`, what scrubbing and carving do) and
/// new shared writable mappings (`MAP_FIXED` remaps) stay allowed under these seals.
fn seal_size(fd: BorrowedFd<'_>) -> io::Result<()> {
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS with an int argument on a valid memfd; no memory is involved.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Maps all `size` bytes of `fd` shared, read-write, without reserving swap.
fn map_whole(fd: BorrowedFd<'_>, size: u64) -> Result<NonNull<u8>, VramError> {
    let len = usize::try_from(size).map_err(|_| VramError::TooLarge {
        size,
        max: usize::MAX as u64,
    })?;
    // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL), over a file of exactly
    // `len` bytes; it does not alias any Rust object.
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
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| VramError::Map {
        size,
        source: io::Error::other("mmap returned NULL"),
    })
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` of `[off, off + len)` of `fd`; false if refused.
fn punch(fd: BorrowedFd<'_>, off: libc::off_t, len: libc::off_t) -> bool {
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    rc == 0
}

/// Bytes `fd` holds (allocated blocks), from `fstat`.
fn allocated_of(fd: BorrowedFd<'_>) -> Result<u64, VramError> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a valid out-pointer to a `stat` buffer; the fd is valid.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(VramError::Stat(io::Error::last_os_error()));
    }
    // SAFETY: fstat succeeded, so it initialised the buffer.
    let st = unsafe { st.assume_init() };
    Ok(u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512))
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
        let carves = self.carves.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Vram")
            .field("fd", &self.fd.as_raw_fd())
            .field("size", &format_args!("{:#x}", self.size))
            .field("carves", &carves.len())
            .finish()
    }
}

impl Drop for Vram {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`size` describe the mapping created in `new` (carves only replaced
        // parts of it in place), which nothing else unmaps; no reference into it can outlive
        // `self`. `size` fits a usize (checked in `new`). The memfds (base and carves) are
        // closed after this, when the fields drop; other holders of a carve's fd keep it.
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
    fn file_backed_vram_keeps_its_bytes_across_opens_and_is_never_carved() {
        let path = std::env::temp_dir().join(format!("gpu-emulation-vram-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let v = Vram::open_file(&path, 64 * MIB).unwrap();
        assert!(v.is_file_backed());
        v.write(VramAddr::new(3 * MIB), b"kept").unwrap();
        v.fill(VramAddr::new(8 * MIB), 2 * MIB, 0x5A).unwrap();
        v.fill(VramAddr::new(8 * MIB), MIB, 0).unwrap(); // hole punch in a regular file
        assert!(matches!(
            v.carve(VramAddr::new(0), MIB),
            Err(VramError::BadCarve { .. })
        ));
        drop(v);
        let v = Vram::open_file(&path, 64 * MIB).unwrap();
        let mut buf = [0u8; 4];
        v.read(VramAddr::new(3 * MIB), &mut buf).unwrap();
        assert_eq!(&buf, b"kept");
        let mut tail = [0u8; 2];
        v.read(VramAddr::new(9 * MIB - 1), &mut tail).unwrap();
        assert_eq!(tail, [0, 0x5A]);
        drop(v);
        assert!(matches!(
            Vram::open_file(&path, 32 * MIB),
            Err(VramError::FileSize { .. })
        ));
        let _ = std::fs::remove_file(&path);
    }

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

    /// Maps `len` bytes of `fd` shared; the caller unmaps.
    fn map_fd(fd: BorrowedFd<'_>, len: u64) -> *mut u8 {
        // SAFETY: a fresh shared mapping chosen by the kernel; callers access it only
        // through raw pointers within `len` and unmap it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p.cast()
    }

    fn fd_size(fd: BorrowedFd<'_>) -> u64 {
        std::fs::File::from(fd.try_clone_to_owned().unwrap())
            .metadata()
            .unwrap()
            .len()
    }

    fn pread_base(v: &Vram, at: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::from(v.as_fd().try_clone_to_owned().unwrap());
        let mut buf = vec![0xEEu8; len];
        file.read_exact_at(&mut buf, at).unwrap();
        buf
    }

    #[test]
    fn the_memfds_cannot_be_resized_or_sealed_further() {
        let v = Vram::new(4 * MIB).unwrap();
        let fd = v.carve(VramAddr::new(MIB), MIB).unwrap();
        for fd in [v.as_fd(), fd.as_fd()] {
            let size = fd_size(fd);
            // SAFETY: plain syscalls on valid fds; a failure is the expected outcome.
            unsafe {
                assert_eq!(libc::ftruncate(fd.as_raw_fd(), 4096), -1);
                assert_eq!(libc::ftruncate(fd.as_raw_fd(), (size * 2) as i64), -1);
                assert_eq!(
                    libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_FUTURE_WRITE),
                    -1
                );
                let seals = libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS);
                assert_eq!(
                    seals,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL
                );
            }
            assert_eq!(fd_size(fd), size);
        }
        // Scrubbing still punches holes, carving still remaps, through the sealed base memfd.
        v.write_u32(VramAddr::new(3 * MIB), 0xAB).unwrap();
        v.fill(VramAddr::ZERO, 4 * MIB, 0).unwrap();
        assert_eq!(v.read_u32(VramAddr::new(3 * MIB)).unwrap(), 0);
        v.uncarve(VramAddr::new(MIB), MIB).unwrap();
        v.carve(VramAddr::new(MIB), 2 * MIB).unwrap();
    }

    #[test]
    fn carve_moves_a_range_to_its_own_memfd() {
        let v = Vram::new(16 * MIB).unwrap();
        // Data written before the carve leaves the base memfd (the carve starts zeroed).
        v.fill(VramAddr::new(4 * MIB), 2 * MIB, 0x5A).unwrap();
        v.write_u32(VramAddr::new(4 * MIB - 4), 0x1111_1111)
            .unwrap();
        v.write_u32(VramAddr::new(8 * MIB), 0x2222_2222).unwrap();
        let fd = v.carve(VramAddr::new(4 * MIB), 4 * MIB).unwrap();
        assert_eq!(fd_size(fd.as_fd()), 4 * MIB);
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert!(
            link.to_string_lossy()
                .contains("memfd:gpu-emulation-vram-slice@0x400000"),
            "{link:?}"
        );
        assert_eq!(v.read_u32(VramAddr::new(4 * MIB)).unwrap(), 0);
        // Neighbours keep their bytes.
        assert_eq!(v.read_u32(VramAddr::new(4 * MIB - 4)).unwrap(), 0x1111_1111);
        assert_eq!(v.read_u32(VramAddr::new(8 * MIB)).unwrap(), 0x2222_2222);
        // Emulator writes show through the carved fd, and the other way round.
        v.write_u32(VramAddr::new(4 * MIB + 0x40), 0xCAFE_F00D)
            .unwrap();
        v.write(VramAddr::new(8 * MIB - 8), b"lastbyte").unwrap();
        let p = map_fd(fd.as_fd(), 4 * MIB);
        // SAFETY: inside the 4 MiB mapping made above, unmapped at the end.
        unsafe {
            assert_eq!(
                std::ptr::read_volatile(p.add(0x40).cast::<u32>()),
                0xCAFE_F00D
            );
            let mut last = [0u8; 8];
            std::ptr::copy_nonoverlapping(p.add((4 * MIB - 8) as usize), last.as_mut_ptr(), 8);
            assert_eq!(&last, b"lastbyte");
            std::ptr::write_volatile(p.add(0x1000).cast::<u32>(), 0x1234_5678);
        }
        assert_eq!(
            v.read_u32(VramAddr::new(4 * MIB + 0x1000)).unwrap(),
            0x1234_5678
        );
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p.cast(), (4 * MIB) as usize) };
        // The base memfd holds nothing of the carved range, only its neighbours.
        assert!(pread_base(&v, 4 * MIB, (4 * MIB) as usize)
            .iter()
            .all(|&b| b == 0));
        assert_eq!(pread_base(&v, 4 * MIB - 4, 4), 0x1111_1111u32.to_le_bytes());
        assert_eq!(pread_base(&v, 8 * MIB, 4), 0x2222_2222u32.to_le_bytes());
        // The carve is sealed against resizing.
        // SAFETY: plain syscall on a valid fd.
        assert_ne!(unsafe { libc::ftruncate(fd.as_raw_fd(), 0) }, 0);
    }

    #[test]
    fn bad_carves_are_errors() {
        let v = Vram::new(16 * MIB).unwrap();
        v.carve(VramAddr::new(2 * MIB), 2 * MIB).unwrap();
        for (addr, len) in [
            (2 * MIB, 2 * MIB),  // the same range again
            (MIB, 2 * MIB),      // overlaps its start
            (3 * MIB, 4 * MIB),  // overlaps its end
            (0, 16 * MIB),       // contains it
            (0x800, 0x1000),     // misaligned start
            (4 * MIB, 0x800),    // misaligned length
            (4 * MIB, 0),        // empty
            (14 * MIB, 4 * MIB), // past the end
            (!0xFFF, 0x1000),    // overflows
        ] {
            let e = v.carve(VramAddr::new(addr), len).unwrap_err();
            assert!(
                matches!(
                    e,
                    VramError::BadCarve { .. } | VramError::OutOfBounds { .. }
                ),
                "{addr:#x}+{len:#x}: {e}"
            );
        }
        // Adjacent ranges are fine.
        v.carve(VramAddr::new(0), 2 * MIB).unwrap();
        v.carve(VramAddr::new(4 * MIB), 2 * MIB).unwrap();
        assert!(format!("{v:?}").contains("carves: 3"));
    }

    #[test]
    fn fill_and_allocated_bytes_see_carves() {
        let v = Vram::new(16 * MIB).unwrap();
        let fd = v.carve(VramAddr::new(4 * MIB), 4 * MIB).unwrap();
        assert!(v.allocated_bytes().unwrap() < 64 * 1024);
        // A fill across the carve's start: half in the base memfd, half in the carve.
        v.fill(VramAddr::new(2 * MIB), 4 * MIB, 0x77).unwrap();
        let in_carve = allocated_of(fd.as_fd()).unwrap();
        assert!(in_carve >= 2 * MIB, "{in_carve}");
        let total = v.allocated_bytes().unwrap();
        assert!(total >= 4 * MIB, "{total}");
        assert!(pread_base(&v, 4 * MIB, 0x1000).iter().all(|&b| b == 0));
        // Zeroing (unaligned edges) punches both memfds.
        v.fill(VramAddr::new(2 * MIB + 0x10), 4 * MIB - 0x20, 0)
            .unwrap();
        let after = v.allocated_bytes().unwrap();
        assert!(after < 64 * 1024, "allocated after zero fill: {after}");
        assert!(allocated_of(fd.as_fd()).unwrap() < 64 * 1024);
        assert_eq!(v.read_u8(VramAddr::new(2 * MIB + 0xF)).unwrap(), 0x77);
        assert_eq!(v.read_u8(VramAddr::new(6 * MIB - 0x10)).unwrap(), 0x77);
        let mut buf = vec![0xFFu8; (4 * MIB - 0x20) as usize];
        v.read(VramAddr::new(2 * MIB + 0x10), &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // A zero fill entirely inside the carve (reading back above allocated pages again).
        let read_back = allocated_of(fd.as_fd()).unwrap();
        v.fill(VramAddr::new(6 * MIB), MIB, 0x33).unwrap();
        assert!(allocated_of(fd.as_fd()).unwrap() >= read_back + MIB);
        v.fill(VramAddr::new(6 * MIB), MIB, 0).unwrap();
        assert!(allocated_of(fd.as_fd()).unwrap() <= read_back);
        assert_eq!(v.read_u64(VramAddr::new(6 * MIB + 8)).unwrap(), 0);
    }

    /// After `uncarve` the old carve's fd is disconnected from VRAM in both directions, and
    /// carving the range again yields a different memfd.
    #[test]
    fn uncarve_disconnects_the_old_fd_and_allows_a_fresh_carve() {
        let v = Vram::new(8 * MIB).unwrap();
        let old = v.carve(VramAddr::new(2 * MIB), 2 * MIB).unwrap();
        let p = map_fd(old.as_fd(), 2 * MIB);
        v.write_u32(VramAddr::new(2 * MIB + 0x10), 0x1111_1111)
            .unwrap();
        for (addr, len) in [(2 * MIB, MIB), (0, 2 * MIB), (2 * MIB + 0x1000, 2 * MIB)] {
            let e = v.uncarve(VramAddr::new(addr), len).unwrap_err();
            assert!(matches!(e, VramError::BadCarve { .. }), "{e}");
        }
        v.uncarve(VramAddr::new(2 * MIB), 2 * MIB).unwrap();
        assert!(v.uncarve(VramAddr::new(2 * MIB), 2 * MIB).is_err());
        assert!(format!("{v:?}").contains("carves: 0"));
        let new = v.carve(VramAddr::new(2 * MIB), 2 * MIB).unwrap();
        assert!(!Arc::ptr_eq(&old, &new));
        v.write_u32(VramAddr::new(2 * MIB + 0x20), 0x2222_2222)
            .unwrap();
        // SAFETY: inside the 2 MiB mapping of the old fd made above, unmapped at the end.
        unsafe {
            assert_eq!(std::ptr::read_volatile(p.add(0x20).cast::<u32>()), 0);
            std::ptr::write_volatile(p.add(0x40).cast::<u32>(), 0x3333_3333);
            libc::munmap(p.cast(), (2 * MIB) as usize);
        }
        assert_eq!(v.read_u32(VramAddr::new(2 * MIB + 0x40)).unwrap(), 0);
        assert_eq!(v.read_u32(VramAddr::new(2 * MIB + 0x10)).unwrap(), 0);
        assert_eq!(pread_base(&v, 2 * MIB + 0x40, 4), [0; 4]);
        // The new carve is the range now, from both sides.
        let q = map_fd(new.as_fd(), 2 * MIB);
        // SAFETY: inside the 2 MiB mapping of the new fd, unmapped at the end.
        unsafe {
            assert_eq!(
                std::ptr::read_volatile(q.add(0x20).cast::<u32>()),
                0x2222_2222
            );
            libc::munmap(q.cast(), (2 * MIB) as usize);
        }
        // Uncarving without a new carve puts the base memfd back under the range.
        v.uncarve(VramAddr::new(2 * MIB), 2 * MIB).unwrap();
        v.write_u32(VramAddr::new(2 * MIB + 0x80), 0x4444_4444)
            .unwrap();
        assert_eq!(
            pread_base(&v, 2 * MIB + 0x80, 4),
            0x4444_4444u32.to_le_bytes()
        );
    }

    /// The carved fd outlives the `Vram` (a peer may still hold it); the `Vram` unmaps and
    /// closes its own copies on drop.
    #[test]
    fn carved_fd_outlives_the_vram() {
        let v = Vram::new(4 * MIB).unwrap();
        let fd = v.carve(VramAddr::new(2 * MIB), 2 * MIB).unwrap();
        v.write_u32(VramAddr::new(2 * MIB), 0xABCD_0123).unwrap();
        drop(v);
        let p = map_fd(fd.as_fd(), 2 * MIB);
        // SAFETY: inside the mapping made above, then unmapped.
        unsafe {
            assert_eq!(std::ptr::read_volatile(p.cast::<u32>()), 0xABCD_0123);
            libc::munmap(p.cast(), (2 * MIB) as usize);
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
