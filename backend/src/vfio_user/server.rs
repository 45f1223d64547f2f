//! The listening side: a unix socket that serves one device, one client at a time.
//!
//! Each accepted client is served on its own thread. Before anything else, its credentials
//! (`SO_PEERCRED`) are checked against the server's [`PeerPolicy`]: a peer it does not admit
//! is closed at once, and logged once per uid. The spec expects one client per device, so
//! while a client is connected another one is **refused**: accepted and closed at once (it
//! sees EOF); the first refusal of an episode is logged, later ones are counted and
//! summarized once a minute and when the connected client leaves. A newcomer that arrives
//! while the previous client has already hung up waits (up to the message timeout) for that
//! connection to finish its cleanup, so an immediate reconnect works.
//!
//! Several servers can run in one process, each `serve()` on its own thread. `serve()` returns
//! `Ok` when the [`ShutdownSignal`] fires (after the active connection has ended, or after
//! [`STOP_GRACE`] if it does not), and an error only when the listening socket itself fails
//! (it was shut down, or `poll`/`accept` report it broken); a full fd table or a failing
//! client only delays accepting. The socket file a server created is removed when the server
//! is dropped, or when the [`SocketFile`] taken from it with [`Server::take_socket_file`] is.
//!
//! [`adopt_connected_fd`] takes a socket a launcher connected for us (the `--fd N`
//! convention): [`serve_stream`] serves it.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::admission::{
    Occurrence, PeerCred, PeerPolicy, RefusedPeers, RepeatedWarning, REPEAT_PERIOD,
};
use super::config::ServerConfig;
use super::connection::{Connection, ConnectionStats};
use super::device::VfioUserDevice;
use super::shutdown::ShutdownSignal;
use super::socket::{wait_readable, Readiness};
use crate::unix_socket::bind_listener;
pub use crate::unix_socket::{BindError, SocketFile};

/// The default mode of the socket file: owner read/write only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// How long `serve()` waits, once shutdown fires, for the active connection to end before
/// returning without it (its thread is left behind: a connection stuck in a syscall must not
/// keep the process alive).
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// How long to back off after `accept` fails for lack of fds or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Errors of the listening side.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the socket failed.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Accepting or polling failed.
    #[error("listener error: {0}")]
    Listener(#[source] io::Error),
    /// Preparing a connection failed.
    #[error("cannot set up connection: {0}")]
    Connection(#[source] io::Error),
    /// The fd given by the launcher is not a connected unix stream socket.
    #[error("fd {fd} is not a connected unix stream socket: {reason}")]
    NotConnectedSocket {
        /// The fd.
        fd: i32,
        /// What it is instead.
        reason: String,
    },
}

/// A vfio-user server socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    socket_file: Option<SocketFile>,
    config: ServerConfig,
    peers: PeerPolicy,
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
    /// The socket file is created with `mode` already (the umask is narrowed around
    /// `bind()`), so no peer the mode shuts out can connect between `bind()` and the
    /// `chmod()` that follows; the umask is process-wide, so a file another thread creates in
    /// that instant gets at most `mode`'s permissions too.
    pub fn bind(path: impl AsRef<Path>, mode: u32) -> Result<Server, ServerError> {
        let (listener, socket_file) = bind_listener(path.as_ref(), mode)?;
        Ok(Server {
            listener,
            socket_file: Some(socket_file),
            config: ServerConfig::default(),
            peers: PeerPolicy::anyone(),
        })
    }

    /// Serve on an existing listener (its socket file, if any, is left alone).
    pub fn from_listener(listener: UnixListener) -> Server {
        Server {
            listener,
            socket_file: None,
            config: ServerConfig::default(),
            peers: PeerPolicy::anyone(),
        }
    }

    /// Use `config` for the connections.
    pub fn with_config(mut self, config: ServerConfig) -> Server {
        self.config = config.sanitized();
        self
    }

    /// Serve only peers `peers` admits (checked with `SO_PEERCRED` on accept).
    pub fn with_peers(mut self, peers: PeerPolicy) -> Server {
        self.peers = peers;
        self
    }

    /// The configuration in use.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The socket path this server created, if it created one (and still owns it).
    pub fn path(&self) -> Option<&Path> {
        self.socket_file.as_ref().map(|f| f.path())
    }

    /// Takes the socket file from the server: dropping it removes the file, dropping the
    /// server no longer does (for a supervisor that must remove it even if the server's
    /// thread never ends).
    pub fn take_socket_file(&mut self) -> Option<SocketFile> {
        self.socket_file.take()
    }

    /// Accept clients for `device` until `shutdown` fires, one at a time, each on its own
    /// thread. Returns after the active connection (if any) has ended, or after
    /// [`STOP_GRACE`] without it; an error means the listening socket failed.
    pub fn serve(
        &self,
        device: Arc<dyn VfioUserDevice>,
        shutdown: ShutdownSignal,
    ) -> Result<(), ServerError> {
        self.listener
            .set_nonblocking(true)
            .map_err(ServerError::Listener)?;
        let mut active: Option<Active> = None;
        let mut log = ServerLog::default();
        let result = loop {
            if active.as_ref().is_some_and(|a| a.thread.is_finished()) {
                if let Some(done) = active
                    .take()
                    .and_then(|a| a.join_within(Duration::ZERO).ok())
                {
                    log::debug!("vfio-user: connection done: {done:?}");
                }
            }
            if active.is_none() {
                log.client_gone();
            }
            // Wake up for a summary that falls due even if nobody else connects.
            let timeout = log.tick();
            match wait_readable(self.listener.as_fd(), Some(&shutdown), timeout) {
                Ok(Readiness::Shutdown) => break Ok(()),
                Ok(Readiness::TimedOut) => continue,
                Ok(Readiness::Readable) => {}
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
                    // Readable but nothing to accept: a listening socket that was shut down
                    // stays "readable" (POLLHUP) for ever and accepts nothing.
                    if let Some(broken) = self.listener_failure() {
                        break Err(ServerError::Listener(broken));
                    }
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) if listener_is_broken(&e) => break Err(ServerError::Listener(e)),
                Err(e) => {
                    // Out of fds or memory: back off instead of spinning.
                    log.accept_failed(&e);
                    std::thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            log.accepted();
            if !self.admits(&stream, &mut log.refused) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                continue;
            }
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
                    log.second_client();
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    continue;
                }
            }
            log.client_gone();
            match self.spawn(stream, Arc::clone(&device), shutdown.clone()) {
                Ok(a) => {
                    active = Some(a);
                    log.served();
                }
                // Out of fds, memory or threads: the client is closed.
                Err(e) => log.setup_failed(&e),
            }
        };
        if let Some(a) = active {
            if let Err(stuck) = a.join_within(STOP_GRACE) {
                log::warn!(
                    "vfio-user: the connection did not end within {STOP_GRACE:?} of shutdown; \
                     leaving its thread behind"
                );
                drop(stuck);
            }
        }
        result
    }

    /// Whether the peer of `stream` may be served; a refusal is logged once per uid.
    fn admits(&self, stream: &UnixStream, refused: &mut RefusedPeers) -> bool {
        if self.peers.is_open() {
            return true;
        }
        let where_ = self
            .path()
            .map_or_else(String::new, |p| format!(" on {}", p.display()));
        match PeerCred::of(stream) {
            Ok(cred) if self.peers.admits(&cred) => true,
            Ok(cred) => {
                if refused.should_log(&cred) {
                    log::warn!(
                        "vfio-user: refusing a client{where_} running as uid {} gid {} (pid {}): \
                         only {} may connect (further refusals of this uid are not logged)",
                        cred.uid,
                        cred.gid,
                        cred.pid,
                        self.peers
                    );
                } else {
                    log::debug!("vfio-user: refused uid {} again", cred.uid);
                }
                false
            }
            Err(e) => {
                log::warn!(
                    "vfio-user: refusing a client{where_} whose credentials are unknown: {e}"
                );
                false
            }
        }
    }

    /// Why the listening socket cannot accept any more (it was shut down or has an error
    /// pending), if it cannot.
    fn listener_failure(&self) -> Option<io::Error> {
        let mut pfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n <= 0 {
            return None;
        }
        if pfd.revents & libc::POLLNVAL != 0 {
            return Some(io::Error::from_raw_os_error(libc::EBADF));
        }
        if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return Some(
                self.listener
                    .take_error()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| io::Error::other("the listening socket was shut down")),
            );
        }
        None
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

/// What a server logs about its clients and its listener, once per episode or per peer (see
/// [`RepeatedWarning`]) rather than once per attempt.
#[derive(Debug)]
struct ServerLog {
    /// Second clients refused while one is connected.
    busy: RepeatedWarning,
    /// `accept` failing for lack of fds or memory.
    accept_failures: RepeatedWarning,
    /// Accepted clients that could not be set up.
    setup_failures: RepeatedWarning,
    /// Peers refused for their credentials.
    refused: RefusedPeers,
}

impl Default for ServerLog {
    fn default() -> Self {
        ServerLog {
            busy: RepeatedWarning::new(REPEAT_PERIOD),
            accept_failures: RepeatedWarning::new(REPEAT_PERIOD),
            setup_failures: RepeatedWarning::new(REPEAT_PERIOD),
            refused: RefusedPeers::default(),
        }
    }
}

impl ServerLog {
    /// Logs a summary that fell due; returns how long until the next one can.
    fn tick(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if let Some(n) = self.busy.due(now) {
            log::warn!(
                "vfio-user: refused {n} more client(s) in the last {} s while one is connected",
                REPEAT_PERIOD.as_secs()
            );
        }
        self.busy.next_due(now)
    }

    fn second_client(&mut self) {
        match self.busy.occur(Instant::now()) {
            Occurrence::First => log::warn!(
                "vfio-user: refusing a second client while one is connected (further \
                 refusals are counted)"
            ),
            Occurrence::Summary(n) => log::warn!(
                "vfio-user: refused {n} more client(s) in the last {} s while one is connected",
                REPEAT_PERIOD.as_secs()
            ),
            Occurrence::Counted => {}
        }
    }

    /// No client is connected any more: the episode of refusals ends.
    fn client_gone(&mut self) {
        if let Some(n) = self.busy.end() {
            log::warn!("vfio-user: refused {n} more client(s) while one was connected");
        }
    }

    fn accept_failed(&mut self, e: &io::Error) {
        match self.accept_failures.occur(Instant::now()) {
            Occurrence::First => log::warn!(
                "vfio-user: accept failed: {e} (retrying every {} ms)",
                ACCEPT_BACKOFF.as_millis()
            ),
            Occurrence::Summary(n) => log::warn!(
                "vfio-user: accept failed {n} more time(s) in the last {} s: {e}",
                REPEAT_PERIOD.as_secs()
            ),
            Occurrence::Counted => {}
        }
    }

    fn accepted(&mut self) {
        if let Some(n) = self.accept_failures.end() {
            log::info!("vfio-user: accepting again (after {n} more failure(s))");
        }
    }

    fn setup_failed(&mut self, e: &ServerError) {
        match self.setup_failures.occur(Instant::now()) {
            Occurrence::First => log::warn!("vfio-user: cannot serve client: {e}"),
            Occurrence::Summary(n) => log::warn!(
                "vfio-user: could not serve {n} more client(s) in the last {} s: {e}",
                REPEAT_PERIOD.as_secs()
            ),
            Occurrence::Counted => {}
        }
    }

    fn served(&mut self) {
        if let Some(n) = self.setup_failures.end() {
            log::info!("vfio-user: serving clients again (after {n} more failure(s))");
        }
    }
}

/// Whether `accept` failing with `e` means the listening socket itself is unusable (rather
/// than a shortage of fds or memory, or a client that went away, which pass).
fn listener_is_broken(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    )
}

/// Takes ownership of `fd`, a connected `AF_UNIX` stream socket a launcher passed us (the
/// `--fd N` convention), after checking that it is one (and not a listening socket); sets it
/// close-on-exec.
///
/// # Safety
///
/// Nothing else in the process may own `fd` (call it once per fd, for an fd inherited from
/// the launcher): the returned stream closes it.
pub unsafe fn adopt_connected_fd(fd: i32) -> Result<UnixStream, ServerError> {
    let not = |reason: String| ServerError::NotConnectedSocket { fd, reason };
    let int_opt = |opt| -> Result<libc::c_int, ServerError> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for writes; `len` is `value`'s size. A bad fd
        // only makes the call fail.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(not(io::Error::last_os_error().to_string()));
        }
        Ok(value)
    };
    // SAFETY: F_GETFD only reads the descriptor's flags; a bad fd makes it fail.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(not("not an open file descriptor".into()));
    }
    if int_opt(libc::SO_DOMAIN)? != libc::AF_UNIX {
        return Err(not("not an AF_UNIX socket".into()));
    }
    if int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(not("not a stream socket".into()));
    }
    if int_opt(libc::SO_ACCEPTCONN)? != 0 {
        return Err(not("a listening socket (pass a connected one)".into()));
    }
    // SAFETY: `fd` is open (F_GETFD succeeded) and, by the caller's contract, owned by
    // nothing else in the process.
    let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: F_SETFD on an fd we now own.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(ServerError::Connection(io::Error::last_os_error()));
    }
    Ok(stream)
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
