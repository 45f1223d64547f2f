//! The one rule for mapping memory a peer hands over (vfio-user DMA maps, vhost-user guest
//! RAM): touching a shared file mapping past the end of its file faults with SIGBUS, which
//! takes the whole backend (every guest) down. So a peer's file is mapped only if it is
//! sealed against shrinking (`F_SEAL_SHRINK`), on hugetlbfs also against writes
//! (`F_SEAL_WRITE`: there punching a hole frees pages, and touching the hole once the pool is
//! empty is SIGBUS), and, read after the seals (which are never removed, so the size can only
//! grow from then on), long enough for the range.

use std::os::fd::{AsRawFd, BorrowedFd};

/// `HUGETLBFS_MAGIC` of linux/magic.h.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// What a peer's fd is, as far as mapping it safely goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdSafety {
    /// `F_GET_SEALS` (0 for files without sealing support).
    pub seals: libc::c_int,
    /// On hugetlbfs (or on a file system that could not be told: the safe answer).
    pub hugetlbfs: bool,
    /// The file's size, read after the seals; `None` for what is not a regular file (a
    /// device, say), which has no meaningful size.
    pub size: Option<u64>,
}

impl FdSafety {
    /// Reads the seals, then the file system and the size of `fd`.
    pub fn of(fd: BorrowedFd<'_>) -> std::io::Result<FdSafety> {
        // SAFETY: F_GET_SEALS takes no argument and only reads the seals of a valid fd.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) }.max(0);
        // SAFETY: statfs is plain data; all-zero is a valid value for fstatfs to overwrite.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and a pointer to a local statfs buffer.
        let hugetlbfs = unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } != 0
            || fs.f_type as i64 == HUGETLBFS_MAGIC;
        // SAFETY: stat is plain data; all-zero is a valid value for fstat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and a pointer to a local stat buffer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let size = (st.st_mode & libc::S_IFMT == libc::S_IFREG)
            .then(|| u64::try_from(st.st_size).unwrap_or(0));
        Ok(FdSafety {
            seals,
            hugetlbfs,
            size,
        })
    }

    /// Sealed as the rule asks (see the module docs).
    pub fn is_sealed(&self) -> bool {
        self.seals & libc::F_SEAL_SHRINK != 0
            && (self.seals & libc::F_SEAL_WRITE != 0 || !self.hugetlbfs)
    }

    /// Whether a regular file holds all of `[offset, offset + len)` (`None` for what is not
    /// a regular file).
    pub fn holds(&self, offset: u64, len: u64) -> Option<bool> {
        let size = self.size?;
        Some(offset.checked_add(len).is_some_and(|end| end <= size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn memfd(size: i64, seals: libc::c_int) -> OwnedFd {
        // SAFETY: a fresh memfd with a static name.
        let fd = unsafe { libc::memfd_create(c"seals".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain syscalls on our memfd.
        unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), size), 0);
            if seals != 0 {
                assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals), 0);
            }
        }
        fd
    }

    #[test]
    fn hugetlbfs_files_are_told_apart() {
        // SAFETY: memfd_create with a valid name; the result is checked.
        let plain = unsafe { libc::memfd_create(c"plain".as_ptr(), 0) };
        assert!(plain >= 0);
        // SAFETY: a fresh fd we own.
        let plain = unsafe { OwnedFd::from_raw_fd(plain) };
        assert!(!FdSafety::of(plain.as_fd()).unwrap().hugetlbfs);
        // SAFETY: as above; without a huge-page pool the kernel may still create the file.
        let huge = unsafe { libc::memfd_create(c"huge".as_ptr(), libc::MFD_HUGETLB) };
        if huge >= 0 {
            // SAFETY: a fresh fd we own.
            let huge = unsafe { OwnedFd::from_raw_fd(huge) };
            assert!(FdSafety::of(huge.as_fd()).unwrap().hugetlbfs);
        }
    }

    #[test]
    fn seals_and_size_decide() {
        let sealed = FdSafety::of(memfd(0x4000, libc::F_SEAL_SHRINK).as_fd()).unwrap();
        assert!(sealed.is_sealed() && !sealed.hugetlbfs);
        assert_eq!(sealed.holds(0x1000, 0x3000), Some(true));
        assert_eq!(sealed.holds(0x1000, 0x3001), Some(false));
        assert_eq!(sealed.holds(u64::MAX, 2), Some(false));
        let open = FdSafety::of(memfd(0x4000, libc::F_SEAL_GROW).as_fd()).unwrap();
        assert!(!open.is_sealed());
        // A hugetlbfs file needs the write seal too.
        let huge = FdSafety {
            seals: libc::F_SEAL_SHRINK,
            hugetlbfs: true,
            size: Some(1 << 21),
        };
        assert!(!huge.is_sealed());
        assert!(FdSafety {
            seals: libc::F_SEAL_SHRINK | libc::F_SEAL_WRITE,
            ..huge
        }
        .is_sealed());
        // Not a regular file: no size.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let socket = FdSafety::of(a.as_fd()).unwrap();
        assert_eq!((socket.size, socket.holds(0, 1)), (None, None));
        assert!(!socket.is_sealed());
    }
}
