//! Client interrupt fds: checking that an fd is an eventfd ([`check_eventfd`]) and signalling
//! one without blocking for more than [`WRITE_BOUND`] ([`signal`]).
//!
//! # Why a write needs a bound, and how it gets one
//!
//! Writing 1 to an eventfd blocks only when the counter cannot take it (it is at
//! 2^64 − 2), and only if the file description is blocking. The description is the client's:
//! QEMU's eventfds are non-blocking, but a hostile client can clear `O_NONBLOCK` at any time
//! and fill the counter. Linux offers no way to make one write non-blocking without changing
//! the description's flags for the client too: `pwritev2(RWF_NOWAIT)` on an eventfd fails
//! with `EOPNOTSUPP`, and an anonymous inode cannot be reopened with flags of our own
//! (`open("/proc/self/fd/N")` fails with `ENXIO`). Checking first (`F_GETFL`, `poll`) leaves a
//! window the client can race.
//!
//! So every write runs under a per-thread POSIX timer that sends [`interrupt_signal`] to the
//! writing thread every [`WRITE_BOUND`] until the write returns; the signal has a no-op
//! handler installed without `SA_RESTART`, so a blocked write ends with `EINTR`. A blocked
//! write means the counter was full, that is an interrupt is pending already: nothing is lost
//! by giving up ([`Signalled::Blocked`]). The cost is two `timer_settime` calls per interrupt.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::OnceLock;
use std::time::Duration;

use crate::vfio_user::device::Errno;

/// Longest a write to a client's eventfd may block.
pub const WRITE_BOUND: Duration = Duration::from_millis(10);

/// What the kernel calls an eventfd's file (`readlink /proc/self/fd/N`).
const EVENTFD_LINK: &[u8] = b"anon_inode:[eventfd]";

/// Whether `fd` is an eventfd: `EINVAL` for anything else (a pipe, a socket, a file, another
/// anonymous inode). Reads the fd's name in `/proc/self/fd`; without `/proc`, only an
/// anonymous inode (`fstat` file type 0) is accepted. Does not allocate.
pub fn check_eventfd(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut path = *b"/proc/self/fd/\0\0\0\0\0\0\0\0\0\0\0\0";
    let prefix = b"/proc/self/fd/".len();
    let mut digits = [0u8; 10];
    let mut n = u32::try_from(fd.as_raw_fd()).map_err(|_| Errno::EINVAL)?;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (i, d) in digits[..len].iter().rev().enumerate() {
        path[prefix + i] = *d;
    }
    let mut target = [0u8; 64];
    // SAFETY: `path` is NUL-terminated (at most 10 digits follow the prefix in a buffer with
    // 12 spare bytes); readlink writes at most `target.len()` bytes into the local buffer.
    let n = unsafe {
        libc::readlink(
            path.as_ptr().cast(),
            target.as_mut_ptr().cast(),
            target.len(),
        )
    };
    if let Ok(n) = usize::try_from(n) {
        return if &target[..n] == EVENTFD_LINK {
            Ok(())
        } else {
            Err(Errno::EINVAL)
        };
    }
    // SAFETY: stat is plain data; all-zero is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a pointer to a local stat buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(Errno::EINVAL);
    }
    if st.st_mode & libc::S_IFMT == 0 {
        Ok(())
    } else {
        Err(Errno::EINVAL)
    }
}

/// What a [`signal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signalled {
    /// The counter was incremented.
    Delivered,
    /// The counter was full (`EAGAIN`): an interrupt is pending already.
    Pending,
    /// The write blocked for [`WRITE_BOUND`] (a blocking description with a full counter)
    /// and was given up; an interrupt is pending, but the fd should not be written again.
    Blocked,
}

/// The signal that ends a blocked write: a real-time signal the process does not otherwise
/// use (`SIGRTMIN + 6`), with a no-op handler.
pub fn interrupt_signal() -> libc::c_int {
    libc::SIGRTMIN() + 6
}

extern "C" fn ignore(_: libc::c_int) {}

/// Installs the no-op handler once (without `SA_RESTART`, so blocking calls end in `EINTR`).
fn install_handler() -> Result<(), Errno> {
    static INSTALLED: OnceLock<Result<(), Errno>> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        // SAFETY: sigaction is plain data; all-zero is a valid starting value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = 0;
        // SAFETY: initialises the local signal set.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: installs a handler that does nothing (async-signal-safe) for a signal
        // nothing else in the process uses.
        if unsafe { libc::sigaction(interrupt_signal(), &action, std::ptr::null_mut()) } != 0 {
            return Err(Errno::from_io(&std::io::Error::last_os_error()));
        }
        Ok(())
    })
}

/// A POSIX timer that signals the thread that created it.
struct ThreadTimer(libc::timer_t);

impl ThreadTimer {
    fn new() -> Result<ThreadTimer, Errno> {
        install_handler()?;
        // SAFETY: sigevent is plain data; all-zero is a valid starting value.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = interrupt_signal();
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: valid pointers to a local sigevent and timer id.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            return Err(Errno::from_io(&std::io::Error::last_os_error()));
        }
        Ok(ThreadTimer(timer))
    }

    /// Fires every `period` from `period` on (zero: disarmed).
    fn arm(&self, period: Duration) {
        let ts = libc::timespec {
            tv_sec: period.as_secs() as libc::time_t,
            tv_nsec: period.subsec_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: a timer this thread created and a valid local itimerspec.
        unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) };
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: deletes the timer created in `new`, once.
        unsafe { libc::timer_delete(self.0) };
    }
}

thread_local! {
    static TIMER: Result<ThreadTimer, Errno> = ThreadTimer::new();
}

/// Adds 1 to the eventfd `fd`, blocking for at most about [`WRITE_BOUND`].
pub fn signal(fd: BorrowedFd<'_>) -> Result<Signalled, Errno> {
    TIMER.with(|timer| {
        let timer = timer.as_ref().map_err(|e| *e)?;
        timer.arm(WRITE_BOUND);
        let result = write_one(fd);
        timer.arm(Duration::ZERO);
        result
    })
}

fn write_one(fd: BorrowedFd<'_>) -> Result<Signalled, Errno> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a valid local buffer to a valid fd.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if n == one.len() as isize {
        return Ok(Signalled::Delivered);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) => Ok(Signalled::Pending),
        Some(libc::EINTR) => Ok(Signalled::Blocked),
        _ => Err(Errno::from_io(&err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::time::Instant;

    fn eventfd(flags: libc::c_int) -> OwnedFd {
        // SAFETY: plain eventfd creation.
        let fd = unsafe { libc::eventfd(0, flags | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd we own.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn add(fd: &OwnedFd, value: u64) {
        let b = value.to_ne_bytes();
        // SAFETY: 8-byte write from a local buffer.
        assert_eq!(
            unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), 8) },
            8
        );
    }

    fn read_count(fd: &OwnedFd) -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: 8-byte read into a local buffer.
        assert_eq!(
            unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) },
            8
        );
        u64::from_ne_bytes(b)
    }

    #[test]
    fn only_eventfds_pass() {
        check_eventfd(eventfd(libc::EFD_NONBLOCK).as_fd()).unwrap();
        check_eventfd(eventfd(0).as_fd()).unwrap();
        let (r, w) = std::io::pipe().unwrap();
        assert_eq!(check_eventfd(w.as_fd()), Err(Errno::EINVAL));
        assert_eq!(check_eventfd(r.as_fd()), Err(Errno::EINVAL));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(check_eventfd(a.as_fd()), Err(Errno::EINVAL));
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(check_eventfd(file.as_fd()), Err(Errno::EINVAL));
        // SAFETY: plain timerfd creation: an anonymous inode that is not an eventfd.
        let tfd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        assert!(tfd >= 0);
        // SAFETY: fresh fd we own.
        let tfd = unsafe { OwnedFd::from_raw_fd(tfd) };
        assert_eq!(check_eventfd(tfd.as_fd()), Err(Errno::EINVAL));
    }

    #[test]
    fn a_full_counter_is_pending_whether_or_not_the_fd_blocks() {
        for flags in [libc::EFD_NONBLOCK, 0] {
            let fd = eventfd(flags);
            assert_eq!(signal(fd.as_fd()), Ok(Signalled::Delivered));
            assert_eq!(read_count(&fd), 1);
            add(&fd, u64::MAX - 1);
            let start = Instant::now();
            let outcome = signal(fd.as_fd()).unwrap();
            let took = start.elapsed();
            if flags == 0 {
                assert_eq!(outcome, Signalled::Blocked);
                assert!(took >= WRITE_BOUND, "{took:?}");
            } else {
                assert_eq!(outcome, Signalled::Pending);
            }
            assert!(took < WRITE_BOUND * 20, "{took:?}");
            // The counter is untouched and still readable: the interrupt is pending.
            assert_eq!(read_count(&fd), u64::MAX - 1);
            // After the bound, the thread's blocking calls are not interrupted any more.
            std::thread::sleep(WRITE_BOUND * 3);
            assert_eq!(signal(fd.as_fd()), Ok(Signalled::Delivered));
            assert_eq!(read_count(&fd), 1);
        }
    }

    #[test]
    fn every_thread_gets_its_own_timer() {
        let fd = eventfd(0);
        add(&fd, u64::MAX - 1);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| assert_eq!(signal(fd.as_fd()), Ok(Signalled::Blocked)));
            }
        });
        assert_eq!(read_count(&fd), u64::MAX - 1);
    }
}
