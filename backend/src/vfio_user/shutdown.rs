//! A shutdown request shared by a server, its connections and whoever handles SIGTERM.
//!
//! It is a flag plus an eventfd: blocking loops `poll()` the eventfd next to their socket, so a
//! trigger wakes them at once. [`ShutdownSignal::trigger`] only does an atomic store and an
//! eventfd `write(2)`, both async-signal-safe, so a signal handler may call it (on a clone made
//! before the handler was installed).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors creating a [`ShutdownSignal`].
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// `eventfd(2)` failed.
    #[error("cannot create the shutdown eventfd: {0}")]
    EventFd(#[source] std::io::Error),
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
}
