//! Interrupt lines of one connection: the eventfds the client gave with `SET_IRQS`, per-vector
//! mask and pending state, and triggering (writing `1u64` to the eventfd).
//!
//! A trigger on a masked vector records it as pending; unmasking a pending vector fires it. An
//! automasked type (INTx) masks itself after each delivery.
//!
//! The fds come from the client, so they are checked before use: each must be an eventfd
//! (anything else, a pipe say, is refused with `EINVAL`), each counts against the
//! connection's fd budget (`ENOSPC` past it, see [`super::budget`]), and a write to one never
//! blocks for more than [`eventfd::WRITE_BOUND`]. A vector whose eventfd blocked that long
//! (the client made it blocking and filled its counter) loses its fd, once, with a warning.

pub mod eventfd;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use super::budget::{Account, Reservation, Resource, Resources};
use super::device::{Errno, IrqInfo};
use eventfd::Signalled;

/// Most vectors of one interrupt type the server tracks (guards against absurd device tables).
pub const MAX_VECTORS: u32 = 1 << 16;

/// Errors raising an interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IrqError {
    /// The client is gone.
    #[error("client not connected")]
    NotConnected,
    /// No such interrupt type.
    #[error("no interrupt type {0}")]
    InvalidIndex(u32),
    /// No such vector.
    #[error("interrupt type {index} has no vector {vector}")]
    InvalidVector {
        /// Interrupt type.
        index: u32,
        /// Vector.
        vector: u32,
    },
    /// The client configured no eventfd for this vector.
    #[error("no eventfd configured for interrupt {index}/{vector}")]
    NotConfigured {
        /// Interrupt type.
        index: u32,
        /// Vector.
        vector: u32,
    },
    /// Writing the eventfd failed.
    #[error("eventfd write failed: {0}")]
    Io(Errno),
}

impl IrqError {
    /// The errno equivalent.
    pub fn errno(&self) -> Errno {
        match self {
            IrqError::NotConnected => Errno::ENOTCONN,
            IrqError::InvalidIndex(_) | IrqError::InvalidVector { .. } => Errno::EINVAL,
            IrqError::NotConfigured { .. } => Errno(libc::ENOENT),
            IrqError::Io(e) => *e,
        }
    }
}

/// Vector selection of a `SET_IRQS` with `DATA_NONE` (all) or `DATA_BOOL` (the true ones).
#[derive(Debug, Clone, Copy)]
pub enum Selection<'a> {
    /// Every vector in the range.
    All,
    /// Vector `start + i` is selected if `bools[i] != 0`.
    Bools(&'a [u8]),
}

impl Selection<'_> {
    fn selects(&self, i: usize) -> bool {
        match self {
            Selection::All => true,
            Selection::Bools(b) => b.get(i).is_some_and(|&v| v != 0),
        }
    }
}

/// A client's eventfd and what it costs the fd budget.
#[derive(Debug)]
struct ClientFd {
    fd: OwnedFd,
    _charge: Reservation,
}

#[derive(Debug)]
struct Vector {
    fd: Option<ClientFd>,
    masked: bool,
    pending: bool,
}

#[derive(Debug)]
struct IrqType {
    info: IrqInfo,
    vectors: Vec<Vector>,
}

impl IrqType {
    fn range(&self, start: u32, count: u32) -> Result<std::ops::Range<usize>, Errno> {
        let end = start.checked_add(count).ok_or(Errno::EINVAL)?;
        if end as usize > self.vectors.len() {
            return Err(Errno::EINVAL);
        }
        Ok(start as usize..end as usize)
    }

    /// Signals vector `i`'s eventfd. A full counter means an interrupt is pending there
    /// already; an eventfd that blocked for the write bound is dropped.
    fn fire(&mut self, index: u32, i: usize) -> Result<(), Errno> {
        let automasked = self.info.automasked;
        let v = &mut self.vectors[i];
        let Some(fd) = v.fd.as_ref() else {
            return Err(Errno(libc::ENOENT));
        };
        if eventfd::signal(fd.fd.as_fd())? == Signalled::Blocked {
            log::warn!(
                "vfio-user: the client's eventfd for interrupt {index}/{i} blocked for {:?} \
                 (made blocking, counter full): dropped; the interrupt stays pending in it",
                eventfd::WRITE_BOUND
            );
            v.fd = None;
        }
        v.pending = false;
        if automasked {
            v.masked = true;
        }
        Ok(())
    }
}

/// All interrupt types of one connection.
#[derive(Debug)]
pub struct IrqTable {
    types: Vec<Mutex<IrqType>>,
    /// The connection's budget (client fds).
    account: Arc<Account>,
}

impl IrqTable {
    /// A table for the given interrupt types (`None`: index exists but has no vectors),
    /// charging the eventfds it is given to `account`.
    pub fn new(infos: &[Option<IrqInfo>], account: Arc<Account>) -> IrqTable {
        let types = infos
            .iter()
            .map(|info| {
                let info = info.unwrap_or_default();
                let count = info.count.min(MAX_VECTORS) as usize;
                Mutex::new(IrqType {
                    info,
                    vectors: (0..count)
                        .map(|_| Vector {
                            fd: None,
                            masked: false,
                            pending: false,
                        })
                        .collect(),
                })
            })
            .collect();
        IrqTable { types, account }
    }

    fn with_type<R>(&self, index: u32, f: impl FnOnce(&mut IrqType) -> R) -> Option<R> {
        let ty = self.types.get(index as usize)?;
        let mut guard = ty.lock().unwrap_or_else(PoisonError::into_inner);
        Some(f(&mut guard))
    }

    /// Raise vector `vector` of type `index` (pending if masked).
    pub fn trigger(&self, index: u32, vector: u32) -> Result<(), IrqError> {
        self.with_type(index, |ty| {
            let i = vector as usize;
            let Some(v) = ty.vectors.get_mut(i) else {
                return Err(IrqError::InvalidVector { index, vector });
            };
            if v.masked {
                v.pending = true;
                return Ok(());
            }
            if v.fd.is_none() {
                return Err(IrqError::NotConfigured { index, vector });
            }
            ty.fire(index, i).map_err(IrqError::Io)
        })
        .unwrap_or(Err(IrqError::InvalidIndex(index)))
    }

    /// Whether an eventfd is configured for the vector.
    pub fn is_configured(&self, index: u32, vector: u32) -> bool {
        self.with_type(index, |ty| {
            ty.vectors
                .get(vector as usize)
                .is_some_and(|v| v.fd.is_some())
        })
        .unwrap_or(false)
    }

    /// Whether the vector is masked.
    pub fn is_masked(&self, index: u32, vector: u32) -> bool {
        self.with_type(index, |ty| {
            ty.vectors.get(vector as usize).is_some_and(|v| v.masked)
        })
        .unwrap_or(false)
    }

    /// `DATA_EVENTFD|ACTION_TRIGGER` with fds: vectors `start..start + fds.len()` get them.
    /// All or nothing: `EINVAL` if one is not an eventfd or the range is bad, `ENOSPC` if
    /// they do not fit the fd budget (the fds they replace still count until replaced).
    pub fn assign(&self, index: u32, start: u32, fds: Vec<OwnedFd>) -> Result<(), Errno> {
        self.with_type(index, |ty| {
            let range = ty.range(start, u32::try_from(fds.len()).map_err(|_| Errno::EINVAL)?)?;
            for fd in &fds {
                eventfd::check_eventfd(fd.as_fd()).inspect_err(|_| {
                    log::debug!(
                        "vfio-user: SET_IRQS {index}: refusing an fd that is not an eventfd"
                    )
                })?;
            }
            let charges = fds
                .iter()
                .map(|_| self.account.reserve(Resources::of(Resource::Fds, 1)))
                .collect::<Result<Vec<_>, _>>()
                .inspect_err(|e| log::debug!("vfio-user: SET_IRQS {index} refused: {e}"))?;
            for ((v, fd), charge) in ty.vectors[range].iter_mut().zip(fds).zip(charges) {
                v.fd = Some(ClientFd {
                    fd,
                    _charge: charge,
                });
            }
            Ok(())
        })
        .unwrap_or(Err(Errno::EINVAL))
    }

    /// `DATA_EVENTFD|ACTION_TRIGGER` without fds: forget the eventfds of the range.
    pub fn deassign(&self, index: u32, start: u32, count: u32) -> Result<(), Errno> {
        self.with_type(index, |ty| {
            let range = ty.range(start, count)?;
            for v in &mut ty.vectors[range] {
                v.fd = None;
                v.pending = false;
            }
            Ok(())
        })
        .unwrap_or(Err(Errno::EINVAL))
    }

    /// `count == 0` with `DATA_NONE|ACTION_TRIGGER`: disable every vector of the type.
    pub fn disable_all(&self, index: u32) -> Result<(), Errno> {
        self.with_type(index, |ty| {
            for v in &mut ty.vectors {
                *v = Vector {
                    fd: None,
                    masked: false,
                    pending: false,
                };
            }
        })
        .ok_or(Errno::EINVAL)
    }

    /// `ACTION_MASK` with `DATA_NONE`/`DATA_BOOL`.
    pub fn mask(
        &self,
        index: u32,
        start: u32,
        count: u32,
        sel: Selection<'_>,
    ) -> Result<(), Errno> {
        self.with_type(index, |ty| {
            let range = ty.range(start, count)?;
            for (i, v) in ty.vectors[range].iter_mut().enumerate() {
                if sel.selects(i) {
                    v.masked = true;
                }
            }
            Ok(())
        })
        .unwrap_or(Err(Errno::EINVAL))
    }

    /// `ACTION_UNMASK` with `DATA_NONE`/`DATA_BOOL`; fires vectors that became pending.
    pub fn unmask(
        &self,
        index: u32,
        start: u32,
        count: u32,
        sel: Selection<'_>,
    ) -> Result<(), Errno> {
        self.with_type(index, |ty| {
            let range = ty.range(start, count)?;
            let mut result = Ok(());
            for (n, i) in range.enumerate() {
                if !sel.selects(n) {
                    continue;
                }
                ty.vectors[i].masked = false;
                if ty.vectors[i].pending && ty.vectors[i].fd.is_some() {
                    if let Err(e) = ty.fire(index, i) {
                        result = Err(e);
                    }
                }
            }
            result
        })
        .unwrap_or(Err(Errno::EINVAL))
    }

    /// `ACTION_TRIGGER` with `DATA_NONE`/`DATA_BOOL`: the client raises the interrupts itself.
    pub fn trigger_range(
        &self,
        index: u32,
        start: u32,
        count: u32,
        sel: Selection<'_>,
    ) -> Result<(), Errno> {
        self.with_type(index, |ty| {
            let range = ty.range(start, count)?;
            for (n, i) in range.enumerate() {
                if !sel.selects(n) {
                    continue;
                }
                if ty.vectors[i].masked {
                    ty.vectors[i].pending = true;
                } else if ty.vectors[i].fd.is_some() {
                    ty.fire(index, i)?;
                }
            }
            Ok(())
        })
        .unwrap_or(Err(Errno::EINVAL))
    }

    /// Drop every eventfd and reset masks (client disconnect).
    pub fn clear(&self) {
        for index in 0..self.types.len() as u32 {
            let _ = self.disable_all(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    fn eventfd() -> OwnedFd {
        // SAFETY: plain eventfd creation.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd we own.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn read_count(fd: &OwnedFd) -> u64 {
        let mut buf = [0u8; 8];
        // SAFETY: 8-byte read into a local buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        if n == 8 {
            u64::from_ne_bytes(buf)
        } else {
            0
        }
    }

    fn dup(fd: &OwnedFd) -> OwnedFd {
        fd.try_clone().unwrap()
    }

    fn table_with(infos: &[Option<IrqInfo>], fds: u64) -> IrqTable {
        let process = Box::leak(Box::new(crate::vfio_user::budget::Usage::new()));
        let budget = Resources {
            fds,
            ..Resources::CONNECTION
        };
        IrqTable::new(
            infos,
            Account::charging(budget, Resources::CONNECTION, process),
        )
    }

    fn table(infos: &[Option<IrqInfo>]) -> IrqTable {
        table_with(infos, Resources::CONNECTION.fds)
    }

    fn msix(count: u32) -> Option<IrqInfo> {
        Some(IrqInfo {
            count,
            eventfd: true,
            maskable: true,
            ..Default::default()
        })
    }

    #[test]
    fn only_eventfds_are_taken_all_or_nothing() {
        let table = table(&[msix(4)]);
        let efd = eventfd();
        let (_r, w) = std::io::pipe().unwrap();
        assert_eq!(
            table.assign(0, 0, vec![dup(&efd), OwnedFd::from(w)]),
            Err(Errno::EINVAL)
        );
        assert!(!table.is_configured(0, 0) && !table.is_configured(0, 1));
        assert_eq!(table.account.usage(), Resources::default());
        table.assign(0, 0, vec![dup(&efd), dup(&efd)]).unwrap();
        table.trigger(0, 1).unwrap();
        assert_eq!(read_count(&efd), 1);
    }

    #[test]
    fn eventfds_count_against_the_fd_budget() {
        let table = table_with(&[msix(4)], 3);
        let efd = eventfd();
        table.assign(0, 0, vec![dup(&efd), dup(&efd)]).unwrap();
        // Two more do not fit (the two held still count): nothing changes.
        assert_eq!(
            table.assign(0, 2, vec![dup(&efd), dup(&efd)]),
            Err(Errno::ENOSPC)
        );
        assert!(!table.is_configured(0, 2));
        assert_eq!(table.account.usage().fds, 2);
        table.assign(0, 2, vec![dup(&efd)]).unwrap();
        // Replacing or dropping fds gives their budget back.
        table.deassign(0, 0, 2).unwrap();
        table.assign(0, 0, vec![dup(&efd), dup(&efd)]).unwrap();
        assert_eq!(table.account.usage().fds, 3);
        table.clear();
        assert_eq!(table.account.usage().fds, 0);
    }

    #[test]
    fn an_eventfd_made_blocking_and_full_is_dropped_after_the_bound() {
        let table = table(&[msix(2)]);
        let efd = eventfd();
        table.assign(0, 0, vec![dup(&efd), dup(&efd)]).unwrap();
        // The client clears O_NONBLOCK on its copy (the same description) and fills it.
        // SAFETY: fcntl on a valid fd, plain int arguments.
        assert_eq!(unsafe { libc::fcntl(efd.as_raw_fd(), libc::F_SETFL, 0) }, 0);
        let fill = (u64::MAX - 1).to_ne_bytes();
        // SAFETY: 8-byte write from a local buffer.
        assert_eq!(
            unsafe { libc::write(efd.as_raw_fd(), fill.as_ptr().cast(), 8) },
            8
        );
        let start = std::time::Instant::now();
        table.trigger_range(0, 0, 2, Selection::All).unwrap();
        // Each vector blocked once for the bound, then lost its fd.
        assert!(start.elapsed() < eventfd::WRITE_BOUND * 20);
        assert!(!table.is_configured(0, 0) && !table.is_configured(0, 1));
        assert_eq!(table.account.usage().fds, 0);
        // Nothing blocks any more: no fd is written.
        table.trigger_range(0, 0, 2, Selection::All).unwrap();
        assert_eq!(read_count(&efd), u64::MAX - 1);
    }

    #[test]
    fn automasked_intx_fires_once_until_unmasked() {
        let table = table(&[Some(IrqInfo {
            count: 1,
            eventfd: true,
            maskable: true,
            automasked: true,
            noresize: false,
        })]);
        let efd = eventfd();
        table.assign(0, 0, vec![dup(&efd)]).unwrap();
        table.trigger(0, 0).unwrap();
        assert_eq!(read_count(&efd), 1);
        assert!(table.is_masked(0, 0));
        table.trigger(0, 0).unwrap();
        assert_eq!(read_count(&efd), 0);
        table.unmask(0, 0, 1, Selection::All).unwrap();
        assert_eq!(read_count(&efd), 1);
    }

    #[test]
    fn ranges_are_checked() {
        let table = table(&[Some(IrqInfo {
            count: 4,
            ..Default::default()
        })]);
        assert_eq!(table.deassign(0, 3, 2), Err(Errno::EINVAL));
        assert_eq!(table.deassign(0, u32::MAX, 2), Err(Errno::EINVAL));
        assert_eq!(table.deassign(1, 0, 1), Err(Errno::EINVAL));
        assert_eq!(
            table.trigger(0, 9),
            Err(IrqError::InvalidVector {
                index: 0,
                vector: 9
            })
        );
        assert_eq!(
            table.trigger(0, 1),
            Err(IrqError::NotConfigured {
                index: 0,
                vector: 1
            })
        );
        assert_eq!(table.trigger(5, 0), Err(IrqError::InvalidIndex(5)));
    }
}
