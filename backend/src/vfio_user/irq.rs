//! Interrupt lines of one connection: the eventfds the client gave with `SET_IRQS`, per-vector
//! mask and pending state, and triggering (writing `1u64` to the eventfd).
//!
//! A trigger on a masked vector records it as pending; unmasking a pending vector fires it. An
//! automasked type (INTx) masks itself after each delivery.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Mutex, PoisonError};

use super::device::{Errno, IrqInfo};

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

#[derive(Debug)]
struct Vector {
    fd: Option<OwnedFd>,
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

    fn fire(&mut self, i: usize) -> Result<(), Errno> {
        let automasked = self.info.automasked;
        let v = &mut self.vectors[i];
        let Some(fd) = v.fd.as_ref() else {
            return Err(Errno(libc::ENOENT));
        };
        signal_eventfd(fd)?;
        v.pending = false;
        if automasked {
            v.masked = true;
        }
        Ok(())
    }
}

/// Write 1 to an eventfd. A full counter (`EAGAIN`) means an interrupt is already pending there.
fn signal_eventfd(fd: &OwnedFd) -> Result<(), Errno> {
    let one = 1u64.to_ne_bytes();
    loop {
        // SAFETY: writes 8 bytes from a valid local buffer to an fd we own.
        let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n == one.len() as isize {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(()),
            _ => return Err(Errno::from_io(&err)),
        }
    }
}

/// All interrupt types of one connection.
#[derive(Debug)]
pub struct IrqTable {
    types: Vec<Mutex<IrqType>>,
}

impl IrqTable {
    /// A table for the given interrupt types (`None`: index exists but has no vectors).
    pub fn new(infos: &[Option<IrqInfo>]) -> IrqTable {
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
        IrqTable { types }
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
            ty.fire(i).map_err(IrqError::Io)
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
    pub fn assign(&self, index: u32, start: u32, fds: Vec<OwnedFd>) -> Result<(), Errno> {
        self.with_type(index, |ty| {
            let range = ty.range(start, u32::try_from(fds.len()).map_err(|_| Errno::EINVAL)?)?;
            for (v, fd) in ty.vectors[range].iter_mut().zip(fds) {
                v.fd = Some(fd);
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
                    if let Err(e) = ty.fire(i) {
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
                    ty.fire(i)?;
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
    use std::os::fd::FromRawFd;

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

    #[test]
    fn automasked_intx_fires_once_until_unmasked() {
        let table = IrqTable::new(&[Some(IrqInfo {
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
        let table = IrqTable::new(&[Some(IrqInfo {
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
