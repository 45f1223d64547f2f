//! A shutdown request shared by a server, its connections and whoever handles SIGTERM.
//!
//! It is a flag plus an eventfd: blocking loops `poll()` the eventfd next to their socket, so a
//! trigger wakes them at once. [`ShutdownSignal::trigger`] only does an atomic store and an
//! eventfd `write(2)`, both async-signal-safe, so a signal handler may call it (on a clone made
//! before the handler was installed).
//!
//! A connection waits for its next message blocked in `recvmsg()` rather than in `poll()` (see
//! [`super::socket`]); its [`ShutdownWaker`] turns the trigger into a `shutdown(SHUT_RDWR)` of
//! the socket, which ends that wait, and also a send blocked on a client that stopped
//! reading (it fails with `EPIPE` at once instead of running into the message timeout).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors creating a [`ShutdownSignal`] or a [`ShutdownWaker`].
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// `eventfd(2)` failed.
    #[error("cannot create the shutdown eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The waker thread could not be started.
    #[error("cannot start the shutdown waker thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl From<ShutdownError> for std::io::Error {
    fn from(e: ShutdownError) -> std::io::Error {
        match e {
            ShutdownError::EventFd(e) | ShutdownError::Thread(e) => e,
        }
    }
}

struct Inner {
    triggered: AtomicBool,
    event: EventFd,
}

/// A cloneable "stop now" signal. Once triggered it stays triggered.
#[derive(Clone)]
pub struct ShutdownSignal {
    inner: Arc<Inner>,
}

impl ShutdownSignal {
    /// A new, untriggered signal.
    pub fn new() -> Result<ShutdownSignal, ShutdownError> {
        let event =
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ShutdownError::EventFd)?;
        Ok(ShutdownSignal {
            inner: Arc::new(Inner {
                triggered: AtomicBool::new(false),
                event,
            }),
        })
    }

    /// Request shutdown and wake every waiter. Async-signal-safe.
    pub fn trigger(&self) {
        self.inner.triggered.store(true, Ordering::SeqCst);
        // The counter never gets read, so the fd stays readable for every poller. A failure
        // (counter overflow after ~2^64 triggers) leaves it readable anyway.
        let _ = self.inner.event.write(1);
    }

    /// Whether shutdown was requested.
    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::SeqCst)
    }

    /// The fd to `poll()` for `POLLIN`: readable once triggered.
    pub fn fd(&self) -> BorrowedFd<'_> {
        let raw = self.inner.event.as_raw_fd();
        // SAFETY: `raw` is owned by `self.inner.event`, which outlives the returned borrow
        // (tied to `&self`).
        unsafe { BorrowedFd::borrow_raw(raw) }
    }
}

impl std::fmt::Debug for ShutdownSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownSignal")
            .field("triggered", &self.is_triggered())
            .finish()
    }
}

impl AsFd for ShutdownSignal {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }
}

/// Shuts a socket down (both ways) when a [`ShutdownSignal`] fires, so a thread blocked in
/// `recvmsg()` on it returns at once (with 0 bytes; the reader tells shutdown from EOF by the
/// signal) and one blocked in `sendmsg()` fails at once. A small thread of its own waits in `poll()` for the signal or for the waker to be
/// dropped; dropping the waker stops and joins it.
pub struct ShutdownWaker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ShutdownWaker {
    /// Watch `signal` for `socket` (a clone of the connection's stream, owned by the waker so
    /// its fd cannot be closed and reused while the waker may still shut it down).
    pub fn spawn(
        signal: &ShutdownSignal,
        socket: UnixStream,
    ) -> Result<ShutdownWaker, ShutdownError> {
        let stop =
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ShutdownError::EventFd)?;
        let stopped = stop.try_clone().map_err(ShutdownError::EventFd)?;
        let signal = signal.clone();
        let thread = std::thread::Builder::new()
            .name("vfio-user-wake".into())
            .stack_size(64 << 10)
            .spawn(move || {
                let mut pfds = [
                    libc::pollfd {
                        fd: signal.fd().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: stopped.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                loop {
                    // SAFETY: two valid pollfd entries for fds owned by this closure.
                    let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
                    if signal.is_triggered() {
                        let _ = socket.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    if n > 0 && pfds[1].revents != 0 {
                        return;
                    }
                    if n < 0
                        && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                    {
                        // poll() itself failed (out of memory): retry shortly.
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            })
            .map_err(ShutdownError::Thread)?;
        Ok(ShutdownWaker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ShutdownWaker {
    fn drop(&mut self) {
        // The counter never overflows from one write; on failure the thread still ends when
        // the signal fires.
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for ShutdownWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownWaker").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_makes_fd_readable_for_all_clones() {
        let s = ShutdownSignal::new().unwrap();
        let c = s.clone();
        assert!(!c.is_triggered());
        s.trigger();
        assert!(c.is_triggered());
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&c.fd()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        assert_eq!(n, 1);
        s.trigger();
        assert!(c.is_triggered());
    }

    #[test]
    fn waker_ends_a_send_blocked_on_a_peer_that_does_not_read() {
        use std::io::Write;
        let (_a, b) = UnixStream::pair().unwrap();
        let s = ShutdownSignal::new().unwrap();
        let _waker = ShutdownWaker::spawn(&s, b.try_clone().unwrap()).unwrap();
        let writer = std::thread::spawn(move || {
            // Far more than the socket buffers hold: blocks until the shutdown.
            let chunk = vec![0u8; 1 << 20];
            loop {
                if let Err(e) = (&b).write_all(&chunk) {
                    return e.kind();
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let t = std::time::Instant::now();
        s.trigger();
        assert_eq!(writer.join().unwrap(), std::io::ErrorKind::BrokenPipe);
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn waker_ends_a_blocked_recv_and_stops_on_drop() {
        use std::io::Read;
        let (_a, b) = UnixStream::pair().unwrap();
        let s = ShutdownSignal::new().unwrap();
        let waker = ShutdownWaker::spawn(&s, b.try_clone().unwrap()).unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8];
            (&b).read(&mut buf).unwrap()
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        s.trigger();
        assert_eq!(reader.join().unwrap(), 0);
        drop(waker);
        // Dropped before any trigger: the thread ends and the socket is left alone.
        let (a, b) = UnixStream::pair().unwrap();
        let s = ShutdownSignal::new().unwrap();
        drop(ShutdownWaker::spawn(&s, b.try_clone().unwrap()).unwrap());
        s.trigger();
        std::io::Write::write_all(&mut &a, b"x").unwrap();
        let mut one = [0u8; 1];
        assert_eq!((&b).read(&mut one).unwrap(), 1);
    }
}
