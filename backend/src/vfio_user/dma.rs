//! The DMA space of one connection: the ranges the client announced with `DMA_MAP`.
//!
//! A map that came with an fd that **cannot shrink** is `mmap()`ed (a vm-memory
//! [`GuestRegionMmap`](vm_memory::GuestRegionMmap)) and accessed directly, if the device
//! reaches guest memory from this process at all; any other map is recorded and reached with
//! server-to-client `DMA_READ`/`DMA_WRITE` messages (done by the caller, see
//! [`Segment::Socket`]).
//!
//! # No fds held, budgets
//!
//! The fd that comes with a map is closed before `DMA_MAP` is answered: once mapped, the
//! mapping keeps the memory (`mapping::FdMapping`); a map reached over the socket needs no fd.
//! So a client cannot use up the process's fds with DMA maps. What it can use up instead is
//! charged to the connection's [`Account`]: one DMA map per map (`ENOSPC` past the budget),
//! and for an mmapped map its bytes of address space and one mapping (`ENOMEM`); see
//! [`super::budget`].
//!
//! # Mapped only if the device uses it
//!
//! A device that never reaches guest memory from this process (a sliced guest's: the GPU is
//! the host's and nothing in it does DMA to the guest) says so with
//! [`VfioUserDevice::maps_dma`](super::VfioUserDevice::maps_dma); its connection's maps are
//! all recorded without being mapped, so they cost no address space at all, and any access
//! a device did make would go over the socket.
//!
//! # Why an fd must be sealed to be mapped
//!
//! Touching a shared file mapping past the end of its file faults with SIGBUS, which takes the
//! whole server down. A map is checked against the file size when it is added (`offset + size`
//! must fit, else `EINVAL`), but a client could `ftruncate` the file afterwards. So an fd is
//! mapped only if it carries `F_SEAL_SHRINK` (`fcntl(F_GET_SEALS)`): QEMU's
//! `memory-backend-memfd` seals its memfd that way by default (`seal=on`: grow, shrink and seal
//! seals; `seal=off` leaves only `F_SEAL_SEAL`; both checked against QEMU 11.1.3 by the
//! real-QEMU test). The seals are read *before* the size, and seals can only be added, so the
//! size checked is a floor for the map's lifetime. An fd without the seal
//! (`memory-backend-file`, `memory-backend-memfd,seal=off`, a plain memfd) still works, through
//! socket DMA, and the first such map of a connection logs at info level why. Fds that are not
//! regular files (a device-dax character device, say) have no size to check and cannot be
//! sealed: they are accepted and served through socket DMA too.
//!
//! The table sits behind a `RwLock`: direct accesses hold the read lock while they copy, and
//! `DMA_UNMAP` takes the write lock, so by the time the unmap is answered no access to that
//! range is in flight and its mapping is gone (the spec's rule, and what keeps a disconnected
//! client's memory from staying mapped). The mapping is unmapped, and its budget given back,
//! when the last reference to it (the table's, or a live gate's) goes.
//!
//! # Unmap follows VFIO type1
//!
//! `DMA_UNMAP [iova, iova + size)` removes every map lying wholly inside the range, like the
//! kernel's `VFIO_IOMMU_UNMAP_DMA` (type1): a range covering no map succeeds and removes
//! nothing; a range that would split a map (one only partly inside, at either end) is
//! `EINVAL` and removes nothing; so is a size of 0 or a range wrapping past 2^64 (ending
//! exactly at 2^64 is fine). QEMU with a vIOMMU relies on this: it unmaps large power-of-two
//! ranges covering several earlier maps, and finally everything up to 2^64.
//!
//! # Gates: a map's memory outside the table
//!
//! Every map has a `MapGate` through which a device reaches that one map directly
//! ([`ClientDmaMap`](super::ClientDmaMap)), without the table lock. Removing a map revokes
//! its gate first: the revocation waits for copies in flight through the gate, after which
//! the gate reaches nothing (and no longer keeps the mapping alive).

mod mapping;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use vm_memory::{Bytes, MemoryRegionAddress};

use crate::shared_memory::FdSafety;

use super::budget::{Account, Reservation, Resources};
use super::device::Errno;
use mapping::FdMapping;

/// DMA page size the server supports (the only `pgsizes` bit announced).
pub const DMA_PAGE_SIZE: u64 = 4096;

/// Errors of device DMA through a [`ClientHandle`](super::ClientHandle).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// The client is gone.
    #[error("client not connected")]
    NotConnected,
    /// No DMA map covers the address.
    #[error("no DMA mapping at {iova:#x}")]
    Unmapped {
        /// The address.
        iova: u64,
    },
    /// The map covering the address does not allow this direction.
    #[error("DMA mapping at {iova:#x} does not allow {access}")]
    Permission {
        /// The address.
        iova: u64,
        /// "read" or "write".
        access: &'static str,
    },
    /// The access wraps around the address space.
    #[error("DMA access at {iova:#x} of {len} bytes overflows")]
    Overflow {
        /// The address.
        iova: u64,
        /// The length.
        len: usize,
    },
    /// Socket DMA was attempted on the connection thread, which must stay free to read the reply.
    #[error("socket DMA from the connection thread would deadlock")]
    WouldDeadlock,
    /// The client did not answer a DMA request in time.
    #[error("DMA request timed out")]
    Timeout,
    /// The client answered a DMA request with an error, or a malformed reply.
    #[error("client failed DMA request: {0}")]
    Remote(Errno),
    /// Sending the request failed, or copying through the mapping failed.
    #[error("DMA I/O error: {0}")]
    Io(Errno),
}

impl DmaError {
    /// The errno equivalent.
    pub fn errno(&self) -> Errno {
        match self {
            DmaError::NotConnected => Errno::ENOTCONN,
            DmaError::Unmapped { .. } | DmaError::Overflow { .. } => Errno::EFAULT,
            DmaError::Permission { .. } => Errno::EPERM,
            DmaError::WouldDeadlock => Errno::EDEADLK,
            DmaError::Timeout => Errno::ETIMEDOUT,
            DmaError::Remote(e) | DmaError::Io(e) => *e,
        }
    }
}

/// A `DMA_MAP` request, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMapRequest {
    /// DMA address.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset into the fd (ignored without one).
    pub offset: u64,
    /// The server may read.
    pub readable: bool,
    /// The server may write.
    pub writable: bool,
}

#[derive(Debug)]
enum Backing {
    /// mmapped from the client's fd (sealed against shrinking).
    Mapped(Arc<FdMapping>),
    /// No fd, one that could shrink, or a device that does not map DMA: reach it with
    /// DMA_READ/DMA_WRITE messages.
    Socket,
}

#[derive(Debug)]
struct Mapping {
    size: u64,
    readable: bool,
    writable: bool,
    backing: Backing,
    gate: Arc<MapGate>,
    /// What the map costs the connection's (and the process's) budget, until removed.
    _charge: Reservation,
}

#[derive(Debug, Default)]
struct DmaState {
    maps: BTreeMap<u64, Mapping>,
}

impl DmaState {
    fn find(&self, iova: u64) -> Option<(u64, &Mapping)> {
        let (&base, map) = self.maps.range(..=iova).next_back()?;
        (iova - base < map.size).then_some((base, map))
    }
}

/// What one step of an access did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// Copied this many bytes through a mapping.
    Done(usize),
    /// The next this-many bytes lie in an fd-less map: use a socket DMA request.
    Socket(usize),
}

/// What a live gate reaches.
#[derive(Debug, Clone)]
pub(crate) enum GateMemory {
    /// The map's mmapped memory.
    Mapped(Arc<FdMapping>),
    /// An fd-less (or unsealed) map: reached with socket DMA messages.
    Socket,
}

/// One map's memory as handed out beyond the table: live until the map is removed, then
/// revoked for good.
#[derive(Debug)]
pub(crate) struct MapGate {
    /// `None` once revoked.
    memory: RwLock<Option<GateMemory>>,
}

impl MapGate {
    fn new(backing: &Backing) -> MapGate {
        let memory = match backing {
            Backing::Mapped(region) => GateMemory::Mapped(Arc::clone(region)),
            Backing::Socket => GateMemory::Socket,
        };
        MapGate {
            memory: RwLock::new(Some(memory)),
        }
    }

    /// Runs `f` on the map's memory if the map is live; revocation waits until it returns.
    pub(crate) fn with_live<R>(&self, f: impl FnOnce(&GateMemory) -> R) -> Option<R> {
        let memory = self.memory.read().unwrap_or_else(PoisonError::into_inner);
        memory.as_ref().map(f)
    }

    /// Revokes the gate once every access in flight through it has returned; it then
    /// reaches nothing and holds no reference to the mapping.
    pub(crate) fn revoke(&self) {
        *self.memory.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Whether the gate was revoked.
    pub(crate) fn is_revoked(&self) -> bool {
        self.with_live(|_| ()).is_none()
    }
}

/// One map of the table: its range, permissions and gate.
#[derive(Debug, Clone)]
pub struct MapEntry {
    /// DMA address of the first byte.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// The server may read.
    pub readable: bool,
    /// The server may write.
    pub writable: bool,
    pub(crate) gate: Arc<MapGate>,
}

impl MapEntry {
    fn of(iova: u64, map: &Mapping) -> MapEntry {
        MapEntry {
            iova,
            size: map.size,
            readable: map.readable,
            writable: map.writable,
            gate: Arc::clone(&map.gate),
        }
    }
}

/// The DMA maps of one connection.
#[derive(Debug)]
pub struct DmaSpace {
    state: RwLock<DmaState>,
    /// The connection's budget.
    account: Arc<Account>,
    /// Whether fd-backed maps are mmapped (the device reaches guest memory from here).
    map_fds: bool,
    /// The "fd not sealed, using socket DMA" notice was logged.
    unsealed_logged: AtomicBool,
    /// The "past the mapped-memory budget, using socket DMA" notice was logged.
    over_budget_logged: AtomicBool,
}

/// Logs a refused map (debug: the errno is the answer).
fn refused(req: &DmaMapRequest, e: &super::budget::BudgetError) {
    log::debug!(
        "vfio-user: DMA map [{:#x}, +{:#x}) refused: {e}",
        req.iova,
        req.size
    );
}

/// Check an fd-backed map `[offset, offset + size)` of `fd` against the file (`EINVAL` if a
/// regular file is too short for it) and return what decides whether it may be mapped
/// ([`FdSafety::is_sealed`]; the seals are read before the size).
fn check_fd(fd: &OwnedFd, offset: u64, size: u64) -> Result<FdSafety, Errno> {
    let safety = FdSafety::of(fd.as_fd()).map_err(|e| Errno::from_io(&e))?;
    // Only regular files (memfd, tmpfs, hugetlbfs, disk files) have a meaningful size; other
    // fds (a device-dax char device, say) cannot be sealed, so they are never mapped.
    if safety.holds(offset, size) == Some(false) {
        return Err(Errno::EINVAL);
    }
    Ok(safety)
}

/// `mmap()` `len` bytes of `fd` at `req.offset` with the map's protection; closes `fd`.
fn map_fd(fd: OwnedFd, req: &DmaMapRequest, len: usize) -> Result<FdMapping, Errno> {
    let mut prot = 0;
    if req.readable {
        prot |= libc::PROT_READ;
    }
    if req.writable {
        prot |= libc::PROT_WRITE;
    }
    FdMapping::map(fd, req.offset, len, prot, req.iova)
}

impl DmaSpace {
    /// An empty DMA space charging `account`; with `map_fds`, maps whose fd is sealed
    /// against shrinking are mmapped, otherwise every map is reached over the socket.
    pub fn new(account: Arc<Account>, map_fds: bool) -> DmaSpace {
        DmaSpace {
            state: RwLock::new(DmaState::default()),
            account,
            map_fds,
            unsealed_logged: AtomicBool::new(false),
            over_budget_logged: AtomicBool::new(false),
        }
    }

    /// The connection's budget account.
    pub fn account(&self) -> &Arc<Account> {
        &self.account
    }

    /// Say once per connection that maps past its mapped-memory budget are served through
    /// socket DMA.
    fn log_over_budget(&self, req: &DmaMapRequest) {
        if !self.over_budget_logged.swap(true, Ordering::Relaxed) {
            log::warn!(
                "vfio-user: DMA map [{:#x}, +{:#x}) is past the client's budget of mapped DMA \
                 memory: it and further such maps are reached through DMA_READ/DMA_WRITE \
                 messages instead of being mapped (slower, but no address space)",
                req.iova,
                req.size
            );
        }
    }

    /// Say once per connection why a map with an fd is not mapped.
    fn log_unsealed(&self, req: &DmaMapRequest, seals: libc::c_int) {
        if !self.unsealed_logged.swap(true, Ordering::Relaxed) {
            log::info!(
                "vfio-user: DMA map [{:#x}, +{:#x}) came with an fd that is not sealed against \
                 shrinking (seals {seals:#x}; e.g. memory-backend-file, or memory-backend-memfd \
                 with seal=off): mapping it would let a truncated file crash the server with \
                 SIGBUS, so it and any other such map of this client are reached through \
                 DMA_READ/DMA_WRITE messages instead (slower); use memory-backend-memfd \
                 (sealed by default) for direct access",
                req.iova,
                req.size
            );
        }
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, DmaState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, DmaState> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Number of maps.
    pub fn len(&self) -> usize {
        self.read_state().maps.len()
    }

    /// No maps at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of maps that are mmapped (fd-backed and sealed against shrinking).
    pub fn mapped_count(&self) -> usize {
        self.read_state()
            .maps
            .values()
            .filter(|m| matches!(m.backing, Backing::Mapped(_)))
            .count()
    }

    /// Add a map. `EEXIST` if it overlaps one, `ENOSPC` past `max_maps` or the DMA map
    /// budget, `EINVAL` for a
    /// bad range, an fd offset that is not page-aligned or a range past the end of the file.
    /// An fd is mmapped only if the space maps fds and the fd is sealed against shrinking
    /// (see the module docs) and the mapped-memory budgets (see [`super::budget`]) have room
    /// for it; otherwise the map is served through socket DMA. The fd is closed before this
    /// returns either way.
    pub fn map(
        &self,
        req: DmaMapRequest,
        fd: Option<OwnedFd>,
        max_maps: usize,
    ) -> Result<(), Errno> {
        if req.size == 0 {
            return Err(Errno::EINVAL);
        }
        let end = req.iova.checked_add(req.size).ok_or(Errno::EINVAL)?;
        let mut unsealed = None;
        let mut to_map = None;
        if let Some(fd) = fd.filter(|_| req.readable || req.writable) {
            if req.offset % DMA_PAGE_SIZE != 0 {
                return Err(Errno::EINVAL);
            }
            let len = usize::try_from(req.size).map_err(|_| Errno::EINVAL)?;
            let safety = check_fd(&fd, req.offset, req.size)?;
            let (seals, sealed) = (safety.seals, safety.is_sealed());
            let mapped = sealed && self.map_fds;
            log::debug!(
                "vfio-user: DMA map [{:#x}, +{:#x}): fd seals {seals:#x}, {}",
                req.iova,
                req.size,
                if mapped { "mapped" } else { "socket DMA" }
            );
            if mapped {
                to_map = Some((fd, len));
            } else if self.map_fds {
                unsealed = Some(seals);
            }
        }
        // Without access allowed, or not to be mapped, the fd (if any) is closed here.
        let charge = Resources {
            dma_maps: 1,
            mapped_bytes: if to_map.is_some() { req.size } else { 0 },
            mappings: u64::from(to_map.is_some()),
            fds: 0,
        };
        let mut state = self.write_state();
        if state.maps.len() >= max_maps {
            return Err(Errno::ENOSPC);
        }
        if let Some((&base, prev)) = state.maps.range(..end).next_back() {
            if base + prev.size > req.iova {
                return Err(Errno::EEXIST);
            }
        }
        let charge = match self.account.reserve(charge) {
            Ok(charge) => charge,
            // Past the mapped-memory budgets the map is still kept, reached over the socket
            // like an unsealed one: it costs no address space, and a guest whose driver maps
            // many small ranges (a vIOMMU) keeps working instead of getting an error QEMU
            // cannot recover from.
            Err(e) if e.errno() == Errno(libc::ENOMEM) && to_map.is_some() => {
                to_map = None;
                self.log_over_budget(&req);
                self.account.reserve(Resources {
                    dma_maps: 1,
                    ..Resources::default()
                })
            }
            .inspect_err(|e| refused(&req, e))?,
            Err(e) => {
                refused(&req, &e);
                return Err(e.into());
            }
        };
        let backing = match to_map {
            Some((fd, len)) => Backing::Mapped(Arc::new(map_fd(fd, &req, len)?)),
            None => Backing::Socket,
        };
        state.maps.insert(
            req.iova,
            Mapping {
                size: req.size,
                readable: req.readable,
                writable: req.writable,
                gate: Arc::new(MapGate::new(&backing)),
                backing,
                _charge: charge,
            },
        );
        drop(state);
        if let Some(seals) = unsealed {
            self.log_unsealed(&req, seals);
        }
        Ok(())
    }

    /// The map starting at `iova`, if any.
    pub fn entry(&self, iova: u64) -> Option<MapEntry> {
        let state = self.read_state();
        state.maps.get(&iova).map(|map| MapEntry::of(iova, map))
    }

    /// Every map, in IOVA order.
    pub fn entries(&self) -> Vec<MapEntry> {
        let state = self.read_state();
        state
            .maps
            .iter()
            .map(|(&iova, map)| MapEntry::of(iova, map))
            .collect()
    }

    /// The maps an unmap of `[iova, iova + size)` removes (VFIO type1, see the module
    /// docs): every map wholly inside the range, possibly none. `EINVAL` if `size` is 0,
    /// the range wraps past 2^64 (it may end exactly there: QEMU unmaps up to the top of the
    /// address space), or a map lies only partly inside it.
    pub fn covered(&self, iova: u64, size: u64) -> Result<Vec<MapEntry>, Errno> {
        if size == 0 {
            return Err(Errno::EINVAL);
        }
        // The last byte, inclusive, so that a range ending at 2^64 is representable.
        let last = iova.checked_add(size - 1).ok_or(Errno::EINVAL)?;
        let state = self.read_state();
        // A map that starts below the range and reaches into it would be split at `iova`.
        if let Some((&base, map)) = state.maps.range(..iova).next_back() {
            if base + map.size > iova {
                return Err(Errno::EINVAL);
            }
        }
        let mut covered = Vec::new();
        for (&base, map) in state.maps.range(iova..=last) {
            // A map that starts inside the range and ends past it would be split at its end.
            if base + (map.size - 1) > last {
                return Err(Errno::EINVAL);
            }
            covered.push(MapEntry::of(base, map));
        }
        Ok(covered)
    }

    /// Remove `entries` (from [`DmaSpace::covered`] or [`DmaSpace::entries`]): each gate is
    /// revoked (waiting for accesses in flight through it), then the map leaves the table
    /// (waiting for table accesses in flight) and is unmapped. An entry whose map was
    /// already removed, or replaced by another at the same IOVA, is skipped.
    pub fn remove(&self, entries: &[MapEntry]) {
        for entry in entries {
            entry.gate.revoke();
        }
        let mut state = self.write_state();
        for entry in entries {
            let same = state
                .maps
                .get(&entry.iova)
                .is_some_and(|map| Arc::ptr_eq(&map.gate, &entry.gate));
            if same {
                state.maps.remove(&entry.iova);
            }
        }
    }

    /// Unmap `[iova, iova + size)` with VFIO type1 semantics (see [`DmaSpace::covered`]):
    /// returns the number of bytes unmapped (0 if the range covered no map). Returns once
    /// no access to the removed maps is in flight and they are unmapped.
    pub fn unmap(&self, iova: u64, size: u64) -> Result<u64, Errno> {
        let covered = self.covered(iova, size)?;
        self.remove(&covered);
        Ok(covered.iter().map(|entry| entry.size).sum())
    }

    /// Remove every map (`UNMAP_ALL`, disconnect).
    pub fn unmap_all(&self) {
        self.revoke_all();
        self.write_state().maps.clear();
    }

    /// Revoke every map's gate (the maps stay in the table).
    pub fn revoke_all(&self) {
        for entry in self.entries() {
            entry.gate.revoke();
        }
    }

    /// Copy from `iova` into `buf` as far as one map reaches.
    pub fn read_step(&self, iova: u64, buf: &mut [u8]) -> Result<Segment, DmaError> {
        let state = self.read_state();
        let (base, map) = state.find(iova).ok_or(DmaError::Unmapped { iova })?;
        if !map.readable {
            return Err(DmaError::Permission {
                iova,
                access: "read",
            });
        }
        let n = buf
            .len()
            .min(usize::try_from(base + map.size - iova).unwrap_or(usize::MAX));
        match &map.backing {
            Backing::Mapped(mapping) => {
                mapping
                    .region()
                    .read_slice(&mut buf[..n], MemoryRegionAddress(iova - base))
                    .map_err(|_| DmaError::Io(Errno::EFAULT))?;
                Ok(Segment::Done(n))
            }
            Backing::Socket => Ok(Segment::Socket(n)),
        }
    }

    /// Copy `data` to `iova` as far as one map reaches.
    pub fn write_step(&self, iova: u64, data: &[u8]) -> Result<Segment, DmaError> {
        let state = self.read_state();
        let (base, map) = state.find(iova).ok_or(DmaError::Unmapped { iova })?;
        if !map.writable {
            return Err(DmaError::Permission {
                iova,
                access: "write",
            });
        }
        let n = data
            .len()
            .min(usize::try_from(base + map.size - iova).unwrap_or(usize::MAX));
        match &map.backing {
            Backing::Mapped(mapping) => {
                mapping
                    .region()
                    .write_slice(&data[..n], MemoryRegionAddress(iova - base))
                    .map_err(|_| DmaError::Io(Errno::EFAULT))?;
                Ok(Segment::Done(n))
            }
            Backing::Socket => Ok(Segment::Socket(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::fd::{AsRawFd, FromRawFd};

    /// A memfd of `size` bytes with `seals` added (`F_ADD_SEALS`, none if 0).
    fn memfd_with_seals(size: u64, seals: libc::c_int) -> OwnedFd {
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe {
            libc::memfd_create(c"dma".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: valid fd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
        if seals != 0 {
            // SAFETY: F_ADD_SEALS with an int argument on a valid memfd.
            assert_eq!(
                unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) },
                0
            );
        }
        fd
    }

    /// A memfd sealed against shrinking and growing, like QEMU's `memory-backend-memfd`.
    fn memfd(size: u64) -> OwnedFd {
        memfd_with_seals(size, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)
    }

    /// A space that maps fds, with the default connection budget and a process budget of
    /// its own.
    fn space() -> DmaSpace {
        space_with(Resources::CONNECTION, true)
    }

    fn space_with(budget: Resources, map_fds: bool) -> DmaSpace {
        let process = Box::leak(Box::new(super::super::budget::Usage::new()));
        let account = Account::charging(budget, Resources::process_default(), process);
        DmaSpace::new(account, map_fds)
    }

    /// How many of this process's fds are a memfd called `name`.
    fn open_memfds(name: &str) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|link| link.to_string_lossy() == format!("/memfd:{name} (deleted)"))
            .count()
    }

    fn named_memfd(name: &std::ffi::CStr, size: u64) -> OwnedFd {
        // SAFETY: memfd_create with a NUL-terminated name.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: valid fd; sealing a memfd we created.
        unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), size as i64), 0);
            assert_eq!(
                libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK),
                0
            );
        }
        fd
    }

    #[test]
    fn maps_keep_no_fd_and_are_charged_to_the_budget() {
        let budget = Resources {
            dma_maps: 4,
            mapped_bytes: 0x3000,
            mappings: 2,
            fds: 0,
        };
        let dma = space_with(budget, true);
        let name = c"dma-budget-test";
        dma.map(req(0x10000, 0x2000), Some(named_memfd(name, 0x2000)), 99)
            .unwrap();
        // Mapped, and the fd is gone: the mapping keeps the memory.
        assert_eq!(dma.mapped_count(), 1);
        assert_eq!(open_memfds("dma-budget-test"), 0);
        assert_eq!(dma.write_step(0x10000, b"kept").unwrap(), Segment::Done(4));
        let charged = Resources {
            dma_maps: 1,
            mapped_bytes: 0x2000,
            mappings: 1,
            fds: 0,
        };
        assert_eq!(dma.account().usage(), charged);
        // Past the address-space budget: kept, but reached over the socket (a count only),
        // the fd closed.
        dma.map(req(0x20000, 0x2000), Some(named_memfd(name, 0x2000)), 99)
            .unwrap();
        assert_eq!(open_memfds("dma-budget-test"), 0);
        assert_eq!(dma.mapped_count(), 1);
        let counted = |n: u64| Resources {
            dma_maps: n,
            ..charged
        };
        assert_eq!((dma.len(), dma.account().usage()), (2, counted(2)));
        assert!(dma.over_budget_logged.load(Ordering::Relaxed));
        assert_eq!(
            dma.read_step(0x20000, &mut [0u8; 4]).unwrap(),
            Segment::Socket(4)
        );
        dma.unmap(0x20000, 0x2000).unwrap();
        dma.map(req(0x20000, 0x1000), Some(memfd(0x1000)), 99)
            .unwrap();
        // Past the mappings budget: the same, over the socket.
        dma.map(req(0x30000, 0x1000), Some(memfd(0x1000)), 99)
            .unwrap();
        assert_eq!(dma.mapped_count(), 2);
        dma.map(req(0x40000, 0x1000), None, 99).unwrap();
        // Past the count budget: ENOSPC.
        assert_eq!(dma.map(req(0x50000, 0x1000), None, 99), Err(Errno::ENOSPC));
        // Unmapping gives the budget back.
        dma.unmap(0x10000, 0x2000).unwrap();
        assert_eq!(
            dma.account().usage(),
            Resources {
                dma_maps: 3,
                mapped_bytes: 0x1000,
                mappings: 1,
                fds: 0
            }
        );
        dma.unmap_all();
        assert_eq!(dma.account().usage(), Resources::default());
    }

    #[test]
    fn a_space_that_does_not_map_records_sealed_maps_for_socket_dma() {
        let dma = space_with(Resources::CONNECTION, false);
        // A sparse 1 TiB sealed memfd costs no address space: nothing is mapped.
        let name = c"dma-unmapped-test";
        dma.map(req(0, 1 << 40), Some(named_memfd(name, 1 << 40)), 9)
            .unwrap();
        assert_eq!((dma.len(), dma.mapped_count()), (1, 0));
        assert_eq!(open_memfds("dma-unmapped-test"), 0);
        assert_eq!(
            dma.account().usage(),
            Resources::of(super::super::budget::Resource::DmaMaps, 1)
        );
        let mut buf = [0u8; 8];
        assert_eq!(dma.read_step(0x1000, &mut buf).unwrap(), Segment::Socket(8));
        // Files are still checked against the map.
        assert_eq!(
            dma.map(req(1 << 41, 0x2000), Some(memfd(0x1000)), 9),
            Err(Errno::EINVAL)
        );
        // Only the first unsealed fd of a mapping space is worth a notice; here none is.
        assert!(!dma.unsealed_logged.load(Ordering::Relaxed));
    }

    fn req(iova: u64, size: u64) -> DmaMapRequest {
        DmaMapRequest {
            iova,
            size,
            offset: 0,
            readable: true,
            writable: true,
        }
    }

    #[test]
    fn overlaps_limits_and_exact_unmap() {
        let dma = space();
        dma.map(req(0x1000, 0x1000), None, 3).unwrap();
        assert_eq!(dma.map(req(0x1800, 0x1000), None, 3), Err(Errno::EEXIST));
        assert_eq!(dma.map(req(0x0, 0x1001), None, 3), Err(Errno::EEXIST));
        dma.map(req(0x2000, 0x1000), None, 3).unwrap();
        dma.map(req(0x0, 0x1000), None, 3).unwrap();
        assert_eq!(dma.map(req(0x9000, 0x1000), None, 3), Err(Errno::ENOSPC));
        assert_eq!(dma.map(req(u64::MAX, 2), None, 9), Err(Errno::EINVAL));
        assert_eq!(dma.map(req(0x9000, 0), None, 9), Err(Errno::EINVAL));
        assert_eq!(dma.unmap(0x1000, 0x800), Err(Errno::EINVAL));
        assert_eq!(dma.unmap(0x1800, 0x1000), Err(Errno::EINVAL));
        dma.unmap(0x1000, 0x1000).unwrap();
        assert_eq!(dma.len(), 2);
        dma.unmap_all();
        assert!(dma.is_empty());
    }

    #[test]
    fn unmap_follows_vfio_type1() {
        let dma = space();
        for base in [0x1000, 0x2000, 0x4000] {
            dma.map(req(base, 0x1000), None, 9).unwrap();
        }
        dma.map(req(0x10000, 0x2000), Some(memfd(0x2000)), 9)
            .unwrap();
        let bases = |dma: &DmaSpace| -> Vec<u64> { dma.entries().iter().map(|e| e.iova).collect() };
        let all = vec![0x1000, 0x2000, 0x4000, 0x10000];
        // Size 0 and ranges wrapping past 2^64 are invalid.
        assert_eq!(dma.unmap(0x1000, 0), Err(Errno::EINVAL));
        assert_eq!(dma.unmap(u64::MAX - 0xFFF, 0x2000), Err(Errno::EINVAL));
        assert_eq!(dma.unmap(0x1000, u64::MAX), Err(Errno::EINVAL));
        // A range covering no map succeeds and removes nothing (past the maps, in a hole).
        assert_eq!(dma.unmap(0x20000, 0x1000), Ok(0));
        assert_eq!(dma.unmap(0x3000, 0x1000), Ok(0));
        assert_eq!(bases(&dma), all);
        // Splitting a map at the start of the range: EINVAL, nothing removed (not even the
        // maps wholly inside).
        assert_eq!(dma.unmap(0x1800, 0x4000), Err(Errno::EINVAL));
        assert_eq!(bases(&dma), all);
        // Splitting a map at the end of the range: EINVAL, nothing removed.
        assert_eq!(dma.unmap(0x0, 0x4800), Err(Errno::EINVAL));
        assert_eq!(dma.unmap(0x4000, 0x800), Err(Errno::EINVAL));
        assert_eq!(dma.unmap(0x10000, 0x1000), Err(Errno::EINVAL));
        assert_eq!(bases(&dma), all);
        // Several maps (with a hole between them) covered: all removed, their gates revoked.
        let gates: Vec<_> = dma.entries().into_iter().take(3).collect();
        assert_eq!(dma.unmap(0x0, 0x8000), Ok(0x3000));
        assert_eq!(bases(&dma), vec![0x10000]);
        assert!(gates.iter().all(|e| e.gate.is_revoked()));
        // Exact match of the fd-backed map: unmapped, its address space given back.
        let mapped = dma.entry(0x10000).unwrap();
        assert!(!mapped.gate.is_revoked());
        assert_eq!(dma.unmap(0x10000, 0x2000), Ok(0x2000));
        assert!(dma.is_empty() && mapped.gate.is_revoked());
        assert_eq!(dma.account().usage(), Resources::default());
        // A large power-of-two range over maps re-added; UNMAP_ALL still clears everything.
        dma.map(req(0x1000, 0x1000), None, 9).unwrap();
        dma.map(req(0x7000_0000, 0x2000), Some(memfd(0x2000)), 9)
            .unwrap();
        assert_eq!(dma.unmap(0x0, 1 << 31), Ok(0x3000));
        // A range up to the top of the address space (QEMU's last unmap with a vIOMMU):
        // the whole space in one range, or from 0xfef00000 on.
        dma.map(req(0x1000, 0x1000), None, 9).unwrap();
        dma.map(req(0xFFFF_F000_0000_0000, 0x1000), None, 9)
            .unwrap();
        assert_eq!(
            dma.unmap(0xFEF0_0000, 0u64.wrapping_sub(0xFEF0_0000)),
            Ok(0x1000)
        );
        assert_eq!(dma.len(), 1);
        assert_eq!(dma.unmap(0x0, u64::MAX), Ok(0x1000));
        assert!(dma.is_empty());
        dma.map(req(0x1000, 0x1000), None, 9).unwrap();
        let last = dma.entry(0x1000).unwrap();
        dma.unmap_all();
        assert!(dma.is_empty() && last.gate.is_revoked());
    }

    #[test]
    fn remove_skips_a_map_replaced_at_the_same_iova() {
        let dma = space();
        dma.map(req(0x1000, 0x1000), None, 9).unwrap();
        let old = dma.covered(0x1000, 0x1000).unwrap();
        dma.remove(&old);
        dma.map(req(0x1000, 0x1000), None, 9).unwrap();
        dma.remove(&old);
        assert_eq!(dma.len(), 1, "the new map survives a stale removal");
        assert!(!dma.entry(0x1000).unwrap().gate.is_revoked());
    }

    #[test]
    fn fd_maps_are_checked_against_the_file() {
        let dma = space();
        assert_eq!(
            dma.map(req(0, 0x2000), Some(memfd(0x1000)), 9),
            Err(Errno::EINVAL)
        );
        let mut r = req(0, 0x1000);
        r.offset = 12;
        assert_eq!(dma.map(r, Some(memfd(0x2000)), 9), Err(Errno::EINVAL));
        dma.map(req(0x10000, 0x2000), Some(memfd(0x2000)), 9)
            .unwrap();
        assert_eq!(
            dma.write_step(0x10ffe, &[1, 2, 3, 4]).unwrap(),
            Segment::Done(4)
        );
        let mut buf = [0u8; 4];
        assert_eq!(dma.read_step(0x10ffe, &mut buf).unwrap(), Segment::Done(4));
        assert_eq!(buf, [1, 2, 3, 4]);
        // Crossing the end of the map stops at the boundary.
        let mut big = [0u8; 16];
        assert_eq!(dma.read_step(0x11ff8, &mut big).unwrap(), Segment::Done(8));
        assert_eq!(
            dma.read_step(0x12000, &mut big),
            Err(DmaError::Unmapped { iova: 0x12000 })
        );
        assert_eq!(dma.mapped_count(), 1);
        let mut ro = req(0x20000, 0x1000);
        ro.writable = false;
        dma.map(ro, Some(memfd(0x1000)), 9).unwrap();
        assert!(matches!(
            dma.write_step(0x20000, &[1]),
            Err(DmaError::Permission { .. })
        ));
        dma.unmap(0x10000, 0x2000).unwrap();
        assert_eq!(dma.mapped_count(), 1);
    }

    #[test]
    fn only_fds_sealed_against_shrinking_are_mapped() {
        let dma = space();
        // Unsealed: recorded, reached through socket DMA; truncating it later cannot fault.
        let unsealed = memfd_with_seals(0x2000, 0);
        dma.map(req(0x10000, 0x2000), Some(unsealed.try_clone().unwrap()), 9)
            .unwrap();
        assert_eq!((dma.len(), dma.mapped_count()), (1, 0));
        // SAFETY: valid fd.
        assert_eq!(unsafe { libc::ftruncate(unsealed.as_raw_fd(), 0) }, 0);
        let mut buf = [0u8; 16];
        assert_eq!(
            dma.read_step(0x11ff8, &mut buf).unwrap(),
            Segment::Socket(8)
        );
        assert_eq!(dma.write_step(0x10000, &buf).unwrap(), Segment::Socket(16));
        assert_eq!(dma.mapped_count(), 0);
        // Only grow/write seals: still able to shrink.
        dma.map(
            req(0x20000, 0x1000),
            Some(memfd_with_seals(0x1000, libc::F_SEAL_GROW)),
            9,
        )
        .unwrap();
        assert_eq!(dma.mapped_count(), 0);
        // F_SEAL_SHRINK alone is enough.
        dma.map(
            req(0x30000, 0x1000),
            Some(memfd_with_seals(0x1000, libc::F_SEAL_SHRINK)),
            9,
        )
        .unwrap();
        assert_eq!(dma.mapped_count(), 1);
        assert_eq!(dma.read_step(0x30000, &mut buf).unwrap(), Segment::Done(16));
        // Too small is refused whether sealed or not; so is a range past the end of the file
        // at an offset.
        for seals in [0, libc::F_SEAL_SHRINK] {
            assert_eq!(
                dma.map(
                    req(0x40000, 0x2000),
                    Some(memfd_with_seals(0x1000, seals)),
                    9
                ),
                Err(Errno::EINVAL)
            );
            let mut r = req(0x40000, 0x1000);
            r.offset = 0x1000;
            assert_eq!(
                dma.map(r, Some(memfd_with_seals(0x1000, seals)), 9),
                Err(Errno::EINVAL)
            );
        }
        // A non-regular fd cannot be sealed: socket DMA, no size check.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        dma.map(req(0x50000, 0x1000), Some(OwnedFd::from(a)), 9)
            .unwrap();
        assert_eq!((dma.len(), dma.mapped_count()), (4, 1));
        assert!(dma.unsealed_logged.load(Ordering::Relaxed));
    }
}
