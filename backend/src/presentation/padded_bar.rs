//! Power-of-two ("padded") BARs over a backing region of arbitrary length.
//!
//! PCI BARs are naturally aligned powers of two, but the memory behind a
//! presented BAR (for example the usable HBM of a Grace Hopper GPU) usually
//! is not. Following the nvgrace-gpu VFIO variant driver, a [`PaddedBar`]
//! presents `roundup_pow2(L)` bytes over a backing of real length `L`:
//!
//! | access                                   | read                 | write              |
//! |------------------------------------------|----------------------|--------------------|
//! | offset at or past the presented size     | error (`EINVAL`)     | error (`EINVAL`)   |
//! | count running past the presented size    | clipped              | clipped            |
//! | bytes in `[0, L)`                        | from the backing     | to the backing     |
//! | bytes in `[L, presented)` (the padding)  | `0xFF`               | silently dropped   |
//! | return value                             | the clipped count    | the clipped count  |
//!
//! A write that lands entirely in the padding is still a successful
//! emulated write and returns its (clipped) count; callers that track a file
//! position advance it by the returned count.
//!
//! The real part is the only part that may be mapped directly: see
//! [`PaddedBar::mappable_area`], which is what a guest-facing sparse-mmap
//! description should advertise so that users of the BAR learn its real
//! extent. The padding is served by [`PaddedBar::read`] / [`PaddedBar::write`].

use std::sync::{Arc, Mutex, MutexGuard};

/// Granularity of direct mappings (mmap works on whole host pages).
pub const MMAP_PAGE_SIZE: u64 = 4096;

/// Largest real length whose power-of-two round-up still fits in a `u64`.
pub const MAX_REAL_SIZE: u64 = 1 << 63;

/// Value every byte of the padding reads as.
pub const PADDING_READ_BYTE: u8 = 0xFF;

/// Failure reported by a [`BarBacking`] implementation, as an errno value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("backing access failed (errno {errno})")]
pub struct BackingError {
    errno: i32,
}

impl BackingError {
    /// A failure described by a positive errno value (e.g. `libc::EFAULT`).
    pub fn from_errno(errno: i32) -> Self {
        Self { errno }
    }

    /// A generic I/O failure (`EIO`).
    pub fn io() -> Self {
        Self::from_errno(libc::EIO)
    }

    /// The errno value describing the failure.
    pub fn errno(&self) -> i32 {
        self.errno
    }
}

impl From<std::io::Error> for BackingError {
    fn from(err: std::io::Error) -> Self {
        Self::from_errno(err.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// The real memory behind a presented BAR.
///
/// Callers (in particular [`PaddedBar`]) guarantee that every access lies
/// inside `[0, len())`: `offset + buf.len() <= self.len()` without overflow.
/// Implementations should still return an error rather than panic if that
/// contract is broken.
pub trait BarBacking: Send + Sync {
    /// Real length of the backing region in bytes.
    fn len(&self) -> u64;

    /// Whether the backing region is empty (such a backing cannot be presented).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fill `buf` with the bytes at `[offset, offset + buf.len())`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError>;

    /// Store `data` at `[offset, offset + data.len())`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackingError>;
}

impl<T: BarBacking + ?Sized> BarBacking for Arc<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        (**self).read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
        (**self).write(offset, data)
    }
}

/// Errors of padded-BAR construction and access.
#[derive(Debug, thiserror::Error)]
pub enum PaddedBarError {
    /// The backing region has length 0; there is nothing to present.
    #[error("backing region is empty")]
    EmptyBacking,
    /// The real length is above 2^63, so its power-of-two round-up overflows.
    #[error("real size {real:#x} is too large to round up to a power of two")]
    TooLarge {
        /// The offending real length.
        real: u64,
    },
    /// The access starts at or past the presented (power-of-two) size.
    #[error("offset {offset:#x} is outside the presented BAR of {presented:#x} bytes")]
    OffsetOutOfRange {
        /// Start of the rejected access.
        offset: u64,
        /// Presented size of the BAR.
        presented: u64,
    },
    /// A direct-mapping request is unaligned, empty, or not inside the mappable area.
    #[error("map request offset {offset:#x} length {len:#x} is outside the mappable area of {mappable:#x} bytes or not page aligned")]
    InvalidMapRange {
        /// Requested start offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Size of the mappable area (0 if there is none).
        mappable: u64,
    },
    /// A direct-mapping request whose end overflows a `u64`.
    #[error("map request offset {offset:#x} length {len:#x} overflows")]
    MapOverflow {
        /// Requested start offset.
        offset: u64,
        /// Requested length.
        len: u64,
    },
    /// The backing region failed an access.
    #[error("backing access at offset {offset:#x} length {len:#x} failed")]
    Backing {
        /// Start of the failed backing access.
        offset: u64,
        /// Length of the failed backing access.
        len: usize,
        /// What the backing reported.
        #[source]
        source: BackingError,
    },
}

impl PaddedBarError {
    /// The errno a device-region read/write/mmap handler should report.
    ///
    /// `EINVAL` for empty backings and out-of-range accesses or mappings,
    /// `EOVERFLOW` for sizes or mapping ranges that overflow, and `EIO` for
    /// backing failures.
    pub fn errno(&self) -> i32 {
        match self {
            Self::EmptyBacking | Self::OffsetOutOfRange { .. } | Self::InvalidMapRange { .. } => {
                libc::EINVAL
            }
            Self::TooLarge { .. } | Self::MapOverflow { .. } => libc::EOVERFLOW,
            Self::Backing { .. } => libc::EIO,
        }
    }
}

/// Presented (power-of-two) size of a BAR backed by `real` bytes.
///
/// Fails for `real == 0` and for `real > 2^63`, whose round-up does not fit in a `u64`.
pub fn presented_size_for(real: u64) -> Result<u64, PaddedBarError> {
    if real == 0 {
        return Err(PaddedBarError::EmptyBacking);
    }
    real.checked_next_power_of_two()
        .ok_or(PaddedBarError::TooLarge { real })
}

/// A range of a BAR that may be mapped directly (one sparse-mmap area).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappableArea {
    /// Offset of the area inside the BAR.
    pub offset: u64,
    /// Length of the area in bytes (a multiple of [`MMAP_PAGE_SIZE`]).
    pub size: u64,
}

/// How an in-range access splits into a backed head and a padding tail.
struct Span {
    /// Total bytes the access covers after clipping to the presented size.
    count: usize,
    /// Leading bytes of those that lie below the real size.
    backed: usize,
}

/// A BAR presenting `roundup_pow2(L)` bytes over a backing of real length `L`.
///
/// See the [module documentation](self) for the access semantics.
pub struct PaddedBar<B: BarBacking> {
    backing: B,
    real: u64,
    presented: u64,
}

impl<B: BarBacking> std::fmt::Debug for PaddedBar<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaddedBar")
            .field("real", &self.real)
            .field("presented", &self.presented)
            .finish_non_exhaustive()
    }
}

impl<B: BarBacking> PaddedBar<B> {
    /// Wrap `backing`, presenting its length rounded up to a power of two.
    ///
    /// Fails if the backing is empty or longer than 2^63 bytes.
    pub fn new(backing: B) -> Result<Self, PaddedBarError> {
        let real = backing.len();
        let presented = presented_size_for(real)?;
        Ok(Self {
            backing,
            real,
            presented,
        })
    }

    /// Real length `L` of the backing region.
    pub fn real_size(&self) -> u64 {
        self.real
    }

    /// Presented size: `L` rounded up to a power of two.
    pub fn presented_size(&self) -> u64 {
        self.presented
    }

    /// Length of the padding `[L, presented)`, which reads `0xFF` and drops writes.
    pub fn padding(&self) -> u64 {
        self.presented - self.real
    }

    /// The one directly mappable area: offset 0, size `L` rounded DOWN to
    /// [`MMAP_PAGE_SIZE`].
    ///
    /// Mappings have page granularity, so a partial last page of real memory
    /// is not included (it, like the padding, is served by read/write).
    /// Returns `None` if `L` is smaller than one page.
    pub fn mappable_area(&self) -> Option<MappableArea> {
        let size = self.real - self.real % MMAP_PAGE_SIZE;
        (size != 0).then_some(MappableArea { offset: 0, size })
    }

    /// Check a request to map `[offset, offset + len)` of the BAR directly.
    ///
    /// The range must be non-empty, page aligned and inside
    /// [`mappable_area`](Self::mappable_area); the padding can never be mapped.
    pub fn check_map_range(&self, offset: u64, len: u64) -> Result<(), PaddedBarError> {
        let end = offset
            .checked_add(len)
            .ok_or(PaddedBarError::MapOverflow { offset, len })?;
        let mappable = self.mappable_area().map_or(0, |area| area.size);
        let aligned = offset % MMAP_PAGE_SIZE == 0 && len % MMAP_PAGE_SIZE == 0;
        if len == 0 || !aligned || end > mappable {
            return Err(PaddedBarError::InvalidMapRange {
                offset,
                len,
                mappable,
            });
        }
        Ok(())
    }

    /// The backing region.
    pub fn backing(&self) -> &B {
        &self.backing
    }

    /// Read up to `buf.len()` bytes at `offset`.
    ///
    /// Returns the count clipped to the presented size; bytes at or past the
    /// real size read `0xFF`. Only the first returned-count bytes of `buf`
    /// are written. Fails if `offset` is at or past the presented size, or if
    /// the backing fails.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize, PaddedBarError> {
        let span = self.span(offset, buf.len())?;
        let (backed, padding) = buf[..span.count].split_at_mut(span.backed);
        if !backed.is_empty() {
            self.backing
                .read(offset, backed)
                .map_err(|source| PaddedBarError::Backing {
                    offset,
                    len: backed.len(),
                    source,
                })?;
        }
        padding.fill(PADDING_READ_BYTE);
        Ok(span.count)
    }

    /// Write up to `data.len()` bytes at `offset`.
    ///
    /// Returns the count clipped to the presented size; bytes at or past the
    /// real size are dropped but still count as written. Fails if `offset` is
    /// at or past the presented size, or if the backing fails.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<usize, PaddedBarError> {
        let span = self.span(offset, data.len())?;
        let backed = &data[..span.backed];
        if !backed.is_empty() {
            self.backing
                .write(offset, backed)
                .map_err(|source| PaddedBarError::Backing {
                    offset,
                    len: backed.len(),
                    source,
                })?;
        }
        Ok(span.count)
    }

    /// Read up to `buf.len()` bytes at `offset` without touching the backing:
    /// every byte reads `0xFF`, as the padding does (a function in D3hot).
    /// Returns and fails as [`read`](Self::read).
    pub fn read_ones(&self, offset: u64, buf: &mut [u8]) -> Result<usize, PaddedBarError> {
        let span = self.span(offset, buf.len())?;
        buf[..span.count].fill(PADDING_READ_BYTE);
        Ok(span.count)
    }

    /// Drop a write of up to `data.len()` bytes at `offset` without touching
    /// the backing, as the padding does. Returns and fails as
    /// [`write`](Self::write).
    pub fn drop_write(&self, offset: u64, data: &[u8]) -> Result<usize, PaddedBarError> {
        Ok(self.span(offset, data.len())?.count)
    }

    /// Validate an access of `len` bytes at `offset` and split it into its
    /// backed head and padding tail (shared by read and write).
    fn span(&self, offset: u64, len: usize) -> Result<Span, PaddedBarError> {
        if offset >= self.presented {
            return Err(PaddedBarError::OffsetOutOfRange {
                offset,
                presented: self.presented,
            });
        }
        let count = clip(len, self.presented - offset);
        let backed = if offset < self.real {
            clip(count, self.real - offset)
        } else {
            0
        };
        Ok(Span { count, backed })
    }
}

/// `min(len, limit)` without lossy casts.
fn clip(len: usize, limit: u64) -> usize {
    usize::try_from(limit).map_or(len, |limit| len.min(limit))
}

/// A simple in-memory [`BarBacking`] (a `Mutex<Vec<u8>>`), for tests and as a
/// reference implementation.
#[derive(Debug, Default)]
pub struct VecBacking {
    data: Mutex<Vec<u8>>,
}

impl VecBacking {
    /// A zero-filled backing of `len` bytes.
    pub fn new(len: usize) -> Self {
        Self::from_vec(vec![0; len])
    }

    /// A backing holding exactly `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self {
            data: Mutex::new(data),
        }
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // The data stays consistent even if a holder panicked: every access
        // is a plain copy.
        self.data
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The byte range `[offset, offset + len)` as indices into a slice of `total` bytes.
fn slice_range(
    offset: u64,
    len: usize,
    total: usize,
) -> Result<std::ops::Range<usize>, BackingError> {
    let start = usize::try_from(offset).map_err(|_| BackingError::from_errno(libc::EFAULT))?;
    match start.checked_add(len) {
        Some(end) if end <= total => Ok(start..end),
        _ => Err(BackingError::from_errno(libc::EFAULT)),
    }
}

impl BarBacking for VecBacking {
    fn len(&self) -> u64 {
        // A `Vec` never holds more than `isize::MAX` bytes.
        self.lock().len() as u64
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        let data = self.lock();
        let range = slice_range(offset, buf.len(), data.len())?;
        buf.copy_from_slice(&data[range]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
        let mut mem = self.lock();
        let range = slice_range(offset, data.len(), mem.len())?;
        mem[range].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// A backing that only has a length: any data access fails. Used for
    /// realistic multi-GiB sizes without allocating memory.
    struct LenOnly(u64);

    impl BarBacking for LenOnly {
        fn len(&self) -> u64 {
            self.0
        }
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), BackingError> {
            Err(BackingError::from_errno(libc::ENXIO))
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), BackingError> {
            Err(BackingError::from_errno(libc::ENXIO))
        }
    }

    fn bar_of(len: u64) -> PaddedBar<LenOnly> {
        PaddedBar::new(LenOnly(len)).expect("valid length")
    }

    #[test]
    fn gh200_96g_usemem_pads_to_128g() {
        // 96 GiB part, 1 GiB carved out as resmem: 95 GiB usable.
        let bar = bar_of(95 * GIB);
        assert_eq!(bar.real_size(), 95 * GIB);
        assert_eq!(bar.presented_size(), 128 * GIB);
        assert_eq!(bar.padding(), 33 * GIB);
        // The 1 GiB resmem is already a power of two.
        let resmem = bar_of(GIB);
        assert_eq!(resmem.presented_size(), GIB);
        assert_eq!(resmem.padding(), 0);
    }

    #[test]
    fn gh200_95_75g_part() {
        // usemem rounded down to 512 MiB blocks: 95.75 - 1 = 94.75 -> 94.5 GiB.
        let usemem = 94 * GIB + 512 * MIB;
        let resmem = 95 * GIB + 768 * MIB - usemem;
        assert_eq!(resmem, GIB + 256 * MIB);
        assert_eq!(presented_size_for(usemem).unwrap(), 128 * GIB);
        assert_eq!(presented_size_for(resmem).unwrap(), 2 * GIB);
        assert_eq!(bar_of(resmem).padding(), 768 * MIB);
    }

    #[test]
    fn hbm3e_143g_pads_to_256g() {
        assert_eq!(bar_of(143 * GIB).presented_size(), 256 * GIB);
    }

    #[test]
    fn exact_power_of_two_has_no_padding() {
        for shift in [0u32, 1, 12, 30, 37, 63] {
            let bar = bar_of(1 << shift);
            assert_eq!(bar.presented_size(), 1 << shift);
            assert_eq!(bar.padding(), 0);
        }
    }

    #[test]
    fn read_at_last_byte_is_clipped_and_padding() {
        let bar = bar_of(95 * GIB);
        let mut buf = [0u8; 16];
        // The len-only backing fails any data access: this succeeds only if
        // the padding is served without touching the backing.
        assert_eq!(bar.read(128 * GIB - 1, &mut buf).unwrap(), 1);
        assert_eq!(buf[0], 0xFF);
        assert_eq!(buf[1..], [0u8; 15]);
        assert_eq!(bar.write(128 * GIB - 1, &buf).unwrap(), 1);
        assert_eq!(bar.write(95 * GIB, &buf).unwrap(), 16);
    }

    #[test]
    fn out_of_range_offsets_are_einval() {
        let bar = bar_of(95 * GIB);
        let mut buf = [0u8; 4];
        for offset in [128 * GIB, 128 * GIB + 1, u64::MAX] {
            let err = bar.read(offset, &mut buf).unwrap_err();
            assert!(matches!(err, PaddedBarError::OffsetOutOfRange { .. }));
            assert_eq!(err.errno(), libc::EINVAL);
            assert_eq!(bar.write(offset, &buf).unwrap_err().errno(), libc::EINVAL);
            assert_eq!(bar.read(offset, &mut []).unwrap_err().errno(), libc::EINVAL);
        }
    }

    #[test]
    fn zero_length_access_in_range_is_ok_zero() {
        let bar = bar_of(95 * GIB);
        assert_eq!(bar.read(0, &mut []).unwrap(), 0);
        assert_eq!(bar.write(128 * GIB - 1, &[]).unwrap(), 0);
    }

    #[test]
    fn construction_errors() {
        let err = PaddedBar::new(LenOnly(0)).unwrap_err();
        assert!(matches!(err, PaddedBarError::EmptyBacking));
        assert_eq!(err.errno(), libc::EINVAL);
        assert!(PaddedBar::new(VecBacking::new(0)).is_err());
        let err = PaddedBar::new(LenOnly(MAX_REAL_SIZE + 1)).unwrap_err();
        assert!(matches!(err, PaddedBarError::TooLarge { .. }));
        assert_eq!(err.errno(), libc::EOVERFLOW);
        assert!(presented_size_for(u64::MAX).is_err());
        assert_eq!(presented_size_for(MAX_REAL_SIZE).unwrap(), MAX_REAL_SIZE);
    }

    #[test]
    fn largest_bar_never_overflows() {
        let bar = bar_of(MAX_REAL_SIZE - 3);
        let mut buf = [0u8; 64];
        assert_eq!(bar.read(MAX_REAL_SIZE - 2, &mut buf).unwrap(), 2);
        assert_eq!(buf[..2], [0xFF, 0xFF]);
        assert!(bar.read(MAX_REAL_SIZE, &mut buf).is_err());
        assert!(bar.write(u64::MAX - 1, &buf).is_err());
    }

    #[test]
    fn backing_failure_is_eio() {
        let bar = bar_of(95 * GIB);
        let mut buf = [0u8; 8];
        let err = bar.read(0, &mut buf).unwrap_err();
        assert!(matches!(err, PaddedBarError::Backing { len: 8, .. }));
        assert_eq!(err.errno(), libc::EIO);
        // An access straddling L reports the backed part's length.
        let err = bar.write(95 * GIB - 3, &buf).unwrap_err();
        assert!(matches!(err, PaddedBarError::Backing { len: 3, .. }));
    }

    #[test]
    fn mappable_area_is_real_size_rounded_down_to_pages() {
        assert_eq!(
            bar_of(95 * GIB).mappable_area(),
            Some(MappableArea {
                offset: 0,
                size: 95 * GIB
            })
        );
        assert_eq!(bar_of(4 * KIB + 5).mappable_area().unwrap().size, 4 * KIB);
        assert_eq!(bar_of(4 * KIB).mappable_area().unwrap().size, 4 * KIB);
        assert_eq!(bar_of(4 * KIB - 1).mappable_area(), None);
        assert_eq!(bar_of(1).mappable_area(), None);
    }

    #[test]
    fn map_range_checks() {
        let bar = bar_of(95 * GIB + 100);
        assert!(bar.check_map_range(0, 95 * GIB).is_ok());
        assert!(bar.check_map_range(GIB, 4 * KIB).is_ok());
        // Into the partial last page or the padding.
        let err = bar.check_map_range(0, 95 * GIB + 4 * KIB).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
        assert!(bar.check_map_range(96 * GIB, 4 * KIB).is_err());
        // Unaligned or empty.
        assert!(bar.check_map_range(1, 4 * KIB).is_err());
        assert!(bar.check_map_range(0, 100).is_err());
        assert!(bar.check_map_range(0, 0).is_err());
        let err = bar.check_map_range(u64::MAX - 4095, 8 * KIB).unwrap_err();
        assert_eq!(err.errno(), libc::EOVERFLOW);
        assert!(bar_of(100).check_map_range(0, 4 * KIB).is_err());
    }

    #[test]
    fn vec_backing_round_trip_and_straddle() {
        let bar = PaddedBar::new(VecBacking::new(5)).unwrap();
        assert_eq!(bar.presented_size(), 8);
        assert_eq!(bar.write(3, &[1, 2, 3, 4, 5, 6]).unwrap(), 5);
        assert_eq!(bar.backing().snapshot(), vec![0, 0, 0, 1, 2]);
        let mut buf = [0u8; 10];
        assert_eq!(bar.read(2, &mut buf).unwrap(), 6);
        assert_eq!(buf[..6], [0, 1, 2, 0xFF, 0xFF, 0xFF]);
        assert_eq!(buf[6..], [0; 4]);
    }

    #[test]
    fn vec_backing_rejects_out_of_contract_access() {
        let backing = VecBacking::new(4);
        let mut buf = [0u8; 2];
        assert!(backing.read(3, &mut buf).is_err());
        assert!(backing.write(u64::MAX, &buf).is_err());
        assert!(backing.read(2, &mut buf).is_ok());
    }

    // ---- Property tests against a plain byte-by-byte model. ----

    /// Guard bytes kept after the real length in [`Guarded`].
    const GUARD: usize = 64;
    const GUARD_BYTE: u8 = 0xA5;

    /// A backing that reports length `len`, keeps `GUARD` sentinel bytes
    /// after it, and logs every access it receives.
    struct Guarded {
        len: usize,
        inner: Mutex<GuardedInner>,
    }

    struct GuardedInner {
        mem: Vec<u8>,
        /// `(offset, len, is_write)` of every access.
        log: Vec<(u64, usize, bool)>,
    }

    impl Guarded {
        fn new(len: usize) -> Self {
            let mut mem: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            mem.resize(len + GUARD, GUARD_BYTE);
            Self {
                len,
                inner: Mutex::new(GuardedInner {
                    mem,
                    log: Vec::new(),
                }),
            }
        }

        fn access(&self, offset: u64, n: usize, is_write: bool) -> std::ops::Range<usize> {
            let mut inner = self.inner.lock().unwrap();
            inner.log.push((offset, n, is_write));
            let start = offset as usize;
            // Out-of-contract accesses are recorded in the log and checked by
            // the test; clamp so that they still cannot overwrite the guard.
            let start = start.min(inner.mem.len());
            start..(start + n).min(inner.mem.len())
        }
    }

    impl BarBacking for Guarded {
        fn len(&self) -> u64 {
            self.len as u64
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
            let range = self.access(offset, buf.len(), false);
            let inner = self.inner.lock().unwrap();
            buf[..range.len()].copy_from_slice(&inner.mem[range]);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
            let range = self.access(offset, data.len(), true);
            let mut inner = self.inner.lock().unwrap();
            let n = range.len();
            inner.mem[range].copy_from_slice(&data[..n]);
            Ok(())
        }
    }

    /// The specification, byte by byte: memory of `len` bytes shown as
    /// `presented` bytes.
    struct Model {
        mem: Vec<u8>,
        presented: u64,
    }

    impl Model {
        fn read(&self, offset: u64, n: usize) -> Option<Vec<u8>> {
            if offset >= self.presented {
                return None;
            }
            let mut out = Vec::new();
            for i in 0..n as u64 {
                let addr = offset + i;
                if addr >= self.presented {
                    break;
                }
                if addr < self.mem.len() as u64 {
                    out.push(self.mem[addr as usize]);
                } else {
                    out.push(0xFF);
                }
            }
            Some(out)
        }

        fn write(&mut self, offset: u64, data: &[u8]) -> Option<usize> {
            if offset >= self.presented {
                return None;
            }
            let mut written = 0;
            for (i, byte) in data.iter().enumerate() {
                let addr = offset + i as u64;
                if addr >= self.presented {
                    break;
                }
                if addr < self.mem.len() as u64 {
                    self.mem[addr as usize] = *byte;
                }
                written += 1;
            }
            Some(written)
        }
    }

    fn smallest_pow2_at_least(len: u64) -> u64 {
        let mut p = 1;
        while p < len {
            p *= 2;
        }
        p
    }

    /// Real lengths in 1..=64 KiB, biased towards powers of two and their neighbours.
    fn real_len() -> impl Strategy<Value = usize> {
        prop_oneof![
            1usize..=65536,
            (0u32..=16).prop_map(|s| 1usize << s),
            (1u32..=16).prop_map(|s| (1usize << s) - 1),
            (0u32..=15).prop_map(|s| (1usize << s) + 1),
            1usize..=40,
        ]
    }

    /// Where an access starts, resolved once the sizes are known.
    #[derive(Debug, Clone)]
    enum Place {
        /// Uniform over [0, 2 * presented).
        Anywhere(u64),
        /// Near the real length.
        NearReal(i32),
        /// Near the presented size.
        NearPresented(i32),
        /// Far away, up to `u64::MAX`.
        Far(u64),
    }

    impl Place {
        fn resolve(&self, real: u64, presented: u64) -> u64 {
            let near = |base: u64, delta: i32| {
                if delta < 0 {
                    base.saturating_sub(delta.unsigned_abs() as u64)
                } else {
                    base.saturating_add(delta as u64)
                }
            };
            match *self {
                Place::Anywhere(x) => x % (2 * presented),
                Place::NearReal(d) => near(real, d),
                Place::NearPresented(d) => near(presented, d),
                Place::Far(x) => x,
            }
        }
    }

    fn place() -> impl Strategy<Value = Place> {
        prop_oneof![
            4 => any::<u64>().prop_map(Place::Anywhere),
            2 => (-40i32..=40).prop_map(Place::NearReal),
            2 => (-40i32..=40).prop_map(Place::NearPresented),
            1 => prop_oneof![Just(u64::MAX), any::<u64>()].prop_map(Place::Far),
        ]
    }

    fn count() -> impl Strategy<Value = usize> {
        prop_oneof![4 => 0usize..=64, 2 => 0usize..=4096, 1 => 0usize..=70_000]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Read(Place, usize),
        Write(Place, usize, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (place(), count()).prop_map(|(p, n)| Op::Read(p, n)),
            (place(), count(), any::<u8>()).prop_map(|(p, n, seed)| Op::Write(p, n, seed)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn padded_bar_matches_model(len in real_len(), ops in prop::collection::vec(op(), 1..24)) {
            let backing = Guarded::new(len);
            let mut model = Model {
                mem: backing.inner.lock().unwrap().mem[..len].to_vec(),
                presented: smallest_pow2_at_least(len as u64),
            };
            let bar = PaddedBar::new(backing).unwrap();
            prop_assert_eq!(bar.real_size(), len as u64);
            prop_assert_eq!(bar.presented_size(), model.presented);
            prop_assert_eq!(bar.padding(), model.presented - len as u64);
            let expected_map = (len as u64 / 4096) * 4096;
            prop_assert_eq!(bar.mappable_area().map_or(0, |a| a.size), expected_map);

            for op in ops {
                match op {
                    Op::Read(place, n) => {
                        let offset = place.resolve(len as u64, model.presented);
                        let mut buf = vec![0x5Au8; n];
                        let got = bar.read(offset, &mut buf);
                        match model.read(offset, n) {
                            None => prop_assert_eq!(got.map_err(|e| e.errno()), Err(libc::EINVAL)),
                            Some(want) => {
                                prop_assert_eq!(got.unwrap(), want.len());
                                prop_assert_eq!(&buf[..want.len()], &want[..]);
                                // Bytes past the returned count are untouched.
                                prop_assert!(buf[want.len()..].iter().all(|&b| b == 0x5A));
                            }
                        }
                    }
                    Op::Write(place, n, seed) => {
                        let offset = place.resolve(len as u64, model.presented);
                        let data: Vec<u8> = (0..n).map(|i| seed.wrapping_add(i as u8)).collect();
                        let got = bar.write(offset, &data);
                        match model.write(offset, &data) {
                            None => prop_assert_eq!(got.map_err(|e| e.errno()), Err(libc::EINVAL)),
                            Some(want) => prop_assert_eq!(got.unwrap(), want),
                        }
                    }
                }
                let inner = bar.backing().inner.lock().unwrap();
                prop_assert_eq!(&inner.mem[..len], &model.mem[..]);
                prop_assert!(inner.mem[len..].iter().all(|&b| b == GUARD_BYTE));
                for &(offset, n, _) in &inner.log {
                    prop_assert!(n > 0, "empty backing access at {}", offset);
                    prop_assert!(offset + n as u64 <= len as u64,
                        "backing access {}+{} past real length {}", offset, n, len);
                }
            }
        }
    }
}
