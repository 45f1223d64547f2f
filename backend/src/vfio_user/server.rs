//! The listening side: a unix socket that serves one device, one client at a time.
//!
//! Each accepted client is served on its own thread. The spec expects one client per device,
//! so while a client is connected another one is **refused**: accepted and closed at once (it
//! sees EOF), and a warning is logged. A newcomer that arrives while the previous client has
//! already hung up waits (up to the message timeout) for that connection to finish its
//! cleanup, so an immediate reconnect works.
//!
//! Several servers can run in one process, each `serve()` on its own thread. `serve()` returns
//! when the [`ShutdownSignal`] fires (after the active connection has ended). The socket file a
//! server created is removed when the server is dropped.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::config::ServerConfig;
use super::connection::{Connection, ConnectionStats};
use super::device::VfioUserDevice;
use super::shutdown::ShutdownSignal;
use super::socket::{wait_readable, Readiness};

/// The default mode of the socket file: owner read/write only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Errors of the listening side.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another live server answers on the path.
    #[error("{0} is in use by a live server")]
    InUse(PathBuf),
    /// The path exists and is not a socket (never removed).
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Checking, removing or binding the path failed.
    #[error("cannot bind {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Setting the socket file mode failed.
    #[error("cannot set mode {mode:o} on {path}: {source}")]
    Mode {
        /// The socket path.
        path: PathBuf,
        /// The mode.
        mode: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Accepting or polling failed.
    #[error("listener error: {0}")]
    Listener(#[source] io::Error),
    /// Preparing a connection failed.
    #[error("cannot set up connection: {0}")]
    Connection(#[source] io::Error),
}

/// The socket file a server created; removed on drop if it is still the same file.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// A vfio-user server socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    socket_file: Option<SocketFile>,
    config: ServerConfig,
}

/// Replace a stale socket at `path` (its server is gone: `connect()` is refused); refuse a live
/// one or anything that is not a socket.
fn clear_stale_socket(path: &Path) -> Result<(), ServerError> {
    let bind_err = |source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(bind_err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("vfio-user: replacing stale socket {}", path.display());
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(bind_err(e)),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(bind_err(e)),
    }
}

/// The connection being served and how to tell whether its client already left.
struct Active {
    thread: JoinHandle<ConnectionStats>,
    peer: UnixStream,
}

impl Active {
    fn peer_hung_up(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.peer.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Wait up to `timeout` for the connection thread to end; `Err(self)` if it did not.
    fn join_within(self, timeout: Duration) -> Result<ConnectionStats, Active> {
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() {
            if Instant::now() >= deadline {
                return Err(self);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(self.thread.join().unwrap_or_else(|_| ConnectionStats {
            end: "connection thread panicked".into(),
            ..Default::default()
        }))
    }
}

impl Server {
    /// Create the socket at `path` with file mode `mode` (use [`DEFAULT_SOCKET_MODE`]). A stale
    /// socket file whose server is gone is replaced; a live one is an error.
    ///
    /// The mode is applied right after `bind()`; in between, the process umask applies.
    pub fn bind(path: impl AsRef<Path>, mode: u32) -> Result<Server, ServerError> {
        let path = path.as_ref();
        clear_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let meta = fs::symlink_metadata(path).map_err(|source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let socket_file = SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
            ServerError::Mode {
                path: path.to_path_buf(),
                mode,
                source,
            }
        })?;
        Ok(Server {
            listener,
            socket_file: Some(socket_file),
            config: ServerConfig::default(),
        })
    }

    /// Serve on an existing listener (its socket file, if any, is left alone).
    pub fn from_listener(listener: UnixListener) -> Server {
        Server {
            listener,
            socket_file: None,
            config: ServerConfig::default(),
        }
    }

    /// Use `config` for the connections.
    pub fn with_config(mut self, config: ServerConfig) -> Server {
        self.config = config.sanitized();
        self
    }

    /// The configuration in use.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The socket path this server created, if it created one.
    pub fn path(&self) -> Option<&Path> {
        self.socket_file.as_ref().map(|f| f.path.as_path())
    }

    /// Accept clients for `device` until `shutdown` fires, one at a time, each on its own
    /// thread. Returns after the active connection (if any) has ended.
    pub fn serve(
        &self,
        device: Arc<dyn VfioUserDevice>,
        shutdown: ShutdownSignal,
    ) -> Result<(), ServerError> {
        self.listener
            .set_nonblocking(true)
            .map_err(ServerError::Listener)?;
        let mut active: Option<Active> = None;
        let result = loop {
            if active.as_ref().is_some_and(|a| a.thread.is_finished()) {
                if let Some(done) = active
                    .take()
                    .and_then(|a| a.join_within(Duration::ZERO).ok())
                {
                    log::debug!("vfio-user: connection done: {done:?}");
                }
            }
            match wait_readable(self.listener.as_fd(), Some(&shutdown), None) {
                Ok(Readiness::Shutdown) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(ServerError::Listener(e)),
            }
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    // Out of fds or memory: back off instead of spinning.
                    log::warn!("vfio-user: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if let Some(current) = active.take() {
                if current.peer_hung_up() {
                    match current.join_within(self.config.msg_timeout) {
                        Ok(_) => {}
                        Err(still) => active = Some(still),
                    }
                } else {
                    active = Some(current);
                }
                if active.is_some() {
                    log::warn!("vfio-user: refusing a second client while one is connected");
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    continue;
                }
            }
            match self.spawn(stream, Arc::clone(&device), shutdown.clone()) {
                Ok(a) => active = Some(a),
                Err(e) => log::warn!("vfio-user: cannot serve client: {e}"),
            }
        };
        if let Some(a) = active {
            let _ = a.thread.join();
        }
        result
    }

    fn spawn(
        &self,
        stream: UnixStream,
        device: Arc<dyn VfioUserDevice>,
        shutdown: ShutdownSignal,
    ) -> Result<Active, ServerError> {
        let peer = stream.try_clone().map_err(ServerError::Connection)?;
        let connection = Connection::new(stream, device, self.config, Some(shutdown))
            .map_err(ServerError::Connection)?;
        let thread = std::thread::Builder::new()
            .name("vfio-user-conn".into())
            .spawn(move || connection.run())
            .map_err(ServerError::Connection)?;
        Ok(Active { thread, peer })
    }
}

/// Serve one already-connected client on the calling thread (for the `--fd=N` convention and
/// for tests); returns when it leaves.
pub fn serve_stream(
    stream: UnixStream,
    device: Arc<dyn VfioUserDevice>,
    config: ServerConfig,
    shutdown: Option<ShutdownSignal>,
) -> Result<ConnectionStats, ServerError> {
    let connection =
        Connection::new(stream, device, config, shutdown).map_err(ServerError::Connection)?;
    Ok(connection.run())
}
