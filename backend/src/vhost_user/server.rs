//! [`DisplayServer`]: one guest's display on its own vhost-user socket. QEMU's
//! `vhost-user-gpu-pci` connects; the server serves one connection at a time, each with a
//! fresh [`VhostGpuDevice`] and `vhost-user-backend` daemon (vhost-user allows one owner per
//! connection), and accepts the next one when QEMU leaves or reconnects.
//!
//! The guest's [`GpuModel`] lives as long as the server: its resources are in the guest's
//! VRAM slice. They are destroyed and scrubbed whenever QEMU starts the device (the guest
//! driver probing after a reset or reboot sets DRIVER_OK, and QEMU then sends
//! `VHOST_USER_GPU_SET_SOCKET`) and when QEMU disconnects.
//!
//! Each display runs on its own threads (the accepting thread, the daemon's request thread
//! and its vring worker), so a guest flooding its control queue, or a QEMU that stops
//! reading, stalls only its own display, never another guest's or the vfio-user side.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::Mutex;
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::{GpuModel, VhostGpuDevice};
use crate::unix_socket::{bind_listener, BindError, SocketFile};
use crate::vfio_user::shutdown::ShutdownSignal;

/// How long to back off after accepting a connection failed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Errors of a display server.
#[derive(Debug, Error)]
pub enum DisplayError {
    /// Binding the socket failed.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Waiting for connections failed: the listening socket is broken.
    #[error("display listener failed: {0}")]
    Listener(#[source] io::Error),
    /// Setting up a connection's device or daemon failed.
    #[error("cannot set up the display connection: {0}")]
    Setup(String),
}

/// A guest's display, served on a vhost-user socket.
pub struct DisplayServer {
    label: String,
    listener: UnixListener,
    socket_file: Option<SocketFile>,
    model: Arc<Mutex<GpuModel>>,
    connected: Arc<AtomicBool>,
}

impl DisplayServer {
    /// Binds the display socket at `path` with file mode `mode` (a stale socket is replaced;
    /// a live one or a path that is not a socket is an error) for the guest's `model`.
    pub fn bind(path: &Path, mode: u32, model: GpuModel) -> Result<DisplayServer, DisplayError> {
        let (listener, socket_file) = bind_listener(path, mode)?;
        Ok(DisplayServer {
            label: path.display().to_string(),
            listener,
            socket_file: Some(socket_file),
            model: Arc::new(Mutex::new(model)),
            connected: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Set while QEMU is connected to the display.
    pub fn connected(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.connected)
    }

    /// The guest's display model (its resources and scanouts).
    pub fn model(&self) -> &Arc<Mutex<GpuModel>> {
        &self.model
    }

    /// Takes the socket file out of the server: it is removed when the returned value is
    /// dropped instead of with the server.
    pub fn take_socket_file(&mut self) -> Option<SocketFile> {
        self.socket_file.take()
    }

    /// Serves QEMU's connections one after the other until `stop` fires; returns an error
    /// only when the listening socket itself fails.
    pub fn serve(self, stop: ShutdownSignal) -> Result<(), DisplayError> {
        let DisplayServer {
            label,
            listener,
            socket_file,
            model,
            connected,
        } = self;
        // Removed when serving ends, if not taken.
        let _socket_file = socket_file;
        let display = Display {
            label,
            model,
            connected,
        };
        let listener_fd = listener.as_raw_fd();
        let mut listener = Listener::from(listener);
        loop {
            if !wait_for_client(listener_fd, stop.fd()).map_err(DisplayError::Listener)? {
                return Ok(());
            }
            if let Err(e) = display.serve_one(&mut listener, &stop) {
                log::warn!("display {}: {e}", display.label);
                thread::sleep(ACCEPT_BACKOFF);
            }
            // Whatever QEMU left behind is this guest's; scrub it before the next one.
            if let Err(e) = display.model.lock().reset() {
                log::warn!(
                    "display {}: scrubbing the guest's resources failed: {e}",
                    display.label
                );
            }
        }
    }
}

/// What serving a connection needs.
struct Display {
    label: String,
    model: Arc<Mutex<GpuModel>>,
    connected: Arc<AtomicBool>,
}

impl Display {
    /// Accepts one connection (one is waiting) and serves it until it ends or `stop` fires.
    fn serve_one(
        &self,
        listener: &mut Listener,
        stop: &ShutdownSignal,
    ) -> Result<(), DisplayError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = Arc::new(
            VhostGpuDevice::new(self.label.clone(), Arc::clone(&self.model), mem.clone())
                .map_err(|e| DisplayError::Setup(e.to_string()))?,
        );
        let mut daemon =
            VhostUserDaemon::new(format!("display {}", self.label), Arc::clone(&device), mem)
                .map_err(|e| DisplayError::Setup(e.to_string()))?;
        daemon
            .start(listener)
            .map_err(|e| DisplayError::Setup(e.to_string()))?;
        log::info!("display {}: QEMU connected", self.label);
        let _connected = Connected::set(&self.connected);
        // Ends the connection when `stop` fires; itself ended through `ended`.
        let ended =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DisplayError::Setup(e.to_string()))?;
        let watcher = match (daemon.shutdown_handle(), ended.try_clone(), stop.clone()) {
            (Some(handle), Ok(ended), stop) => thread::Builder::new()
                .name("display-stop".into())
                .spawn(move || {
                    if wait_for_either(stop.fd(), ended.as_raw_fd()) {
                        handle.shutdown();
                    }
                })
                .ok(),
            _ => None,
        };
        let result = daemon.wait();
        let _ = ended.write(1);
        if let Some(w) = watcher {
            let _ = w.join();
        }
        device.stop_workers();
        let stats = device.stats();
        // QEMU going away mid-read is how a connection normally ends.
        let result = match result {
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => Ok(()),
            other => other,
        };
        match result {
            Ok(()) => log::info!("display {}: QEMU disconnected ({stats})", self.label),
            Err(e) => log::info!("display {}: connection ended: {e} ({stats})", self.label),
        }
        Ok(())
    }
}

/// Set while a connection is served; cleared however serving it ends.
struct Connected<'a>(&'a AtomicBool);

impl<'a> Connected<'a> {
    fn set(flag: &'a AtomicBool) -> Connected<'a> {
        flag.store(true, Ordering::Release);
        Connected(flag)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Waits until a client connects to `listener` (`true`) or `stop` is readable (`false`).
fn wait_for_client(listener: RawFd, stop: BorrowedFd<'_>) -> io::Result<bool> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(io::Error::other("the listening socket is broken"));
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
    }
}

/// Waits until `stop` (`true`) or `ended` (`false`) is readable.
fn wait_for_either(stop: BorrowedFd<'_>, ended: RawFd) -> bool {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: ended,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return n > 0 && fds[0].revents != 0;
    }
}
