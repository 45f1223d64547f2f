//! [`ControlServer`]: the control socket of a running backend (`serve --control PATH`, mode
//! 0600). Each client gets the greeting, then one answer per request line
//! ([`super::protocol`]); requests go to the [`GuestManager`] (see there how they overlap). At most
//! [`MAX_CLIENTS`] clients are served at once (a further one gets an error line and is
//! closed); a line longer than [`MAX_LINE`] ends its connection after an error answer.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use thiserror::Error;

use super::protocol::{
    AddArgs, Answer, ErrorClass, Greeting, RemoveArgs, Request, Size, StatsArgs, MAX_LINE,
};
use crate::guests::{GuestError, GuestManager};
use crate::slice::{parse_slice_size, GuestSpec};
use crate::unix_socket::{bind_listener, BindError, SocketFile};
use crate::vfio_user::shutdown::ShutdownWaker;
use crate::vfio_user::socket::{wait_readable, Readiness};
use crate::vfio_user::ShutdownSignal;

/// Clients served at once.
pub const MAX_CLIENTS: usize = 16;

/// The control socket's file mode: the backend's user only.
pub const CONTROL_SOCKET_MODE: u32 = 0o600;

/// How long to back off after `accept` fails for lack of fds or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Errors of the control server.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Binding the socket failed.
    #[error("control socket: {0}")]
    Bind(#[from] BindError),
    /// The listening socket failed.
    #[error("control socket {path}: {source}")]
    Listener {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The control socket.
pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
    socket_file: Option<SocketFile>,
    manager: Arc<GuestManager>,
}

impl ControlServer {
    /// Binds the control socket at `path` (mode 0600; a stale socket is replaced, a live
    /// one or a non-socket refused) for `manager`.
    pub fn bind(path: &Path, manager: Arc<GuestManager>) -> Result<ControlServer, ControlError> {
        let (listener, socket_file) = bind_listener(path, CONTROL_SOCKET_MODE)?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            listener,
            socket_file: Some(socket_file),
            manager,
        })
    }

    /// Takes the socket file (removed when the returned value is dropped).
    pub fn take_socket_file(&mut self) -> Option<SocketFile> {
        self.socket_file.take()
    }

    /// Serves clients until `stop` fires; an error means the listening socket failed.
    pub fn serve(self, stop: ShutdownSignal) -> Result<(), ControlError> {
        let listener_err = |source| ControlError::Listener {
            path: self.path.clone(),
            source,
        };
        self.listener.set_nonblocking(true).map_err(listener_err)?;
        let live = Arc::new(AtomicUsize::new(0));
        loop {
            match wait_readable(self.listener.as_fd(), Some(&stop), None) {
                Ok(Readiness::Shutdown) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(listener_err(e)),
            }
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
                    ) =>
                {
                    log::warn!("control socket: accept failed: {e}");
                    thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
                Err(e) => return Err(listener_err(e)),
            };
            if live.load(Ordering::Acquire) >= MAX_CLIENTS {
                refuse(stream);
                continue;
            }
            live.fetch_add(1, Ordering::AcqRel);
            let (manager, stop, live_here) =
                (Arc::clone(&self.manager), stop.clone(), Arc::clone(&live));
            let spawned = thread::Builder::new()
                .name("control-client".into())
                .spawn(move || {
                    // The slot is given back however the client thread ends.
                    let _slot = Slot(&live_here);
                    if let Err(e) = serve_client(stream, &manager, &stop) {
                        log::debug!("control client: {e}");
                    }
                });
            if let Err(e) = spawned {
                live.fetch_sub(1, Ordering::AcqRel);
                log::warn!("control socket: cannot start a client thread: {e}");
            }
        }
    }
}

/// One of the [`MAX_CLIENTS`] client slots, given back when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Tells a client over the limit why it is closed.
fn refuse(mut stream: UnixStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let answer = Answer::error(
        ErrorClass::GenericError,
        format!("too many control clients (at most {MAX_CLIENTS})"),
        None,
    );
    let _ = writeln!(stream, "{}", to_line(&answer));
}

fn to_line(answer: &Answer) -> String {
    serde_json::to_string(answer).unwrap_or_else(|_| {
        r#"{"error":{"class":"GenericError","desc":"unencodable answer"}}"#.to_owned()
    })
}

/// Greets a client and answers its requests until it leaves, sends a line too long, or
/// `stop` fires.
fn serve_client(
    stream: UnixStream,
    manager: &GuestManager,
    stop: &ShutdownSignal,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    // A stuck reader must not keep a client thread for ever.
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let _waker = ShutdownWaker::spawn(stop, stream.try_clone()?).map_err(std::io::Error::other)?;
    let mut writer = stream.try_clone()?;
    let greeting = serde_json::to_string(&Greeting::ours()).map_err(std::io::Error::other)?;
    writeln!(writer, "{greeting}")?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 || stop.is_triggered() {
            return Ok(());
        }
        if !line.ends_with(b"\n") && line.len() >= MAX_LINE {
            let answer = Answer::error(
                ErrorClass::InvalidRequest,
                format!("request line longer than {MAX_LINE} bytes"),
                None,
            );
            writeln!(writer, "{}", to_line(&answer))?;
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        let answer = dispatch(manager, text.trim());
        writeln!(writer, "{}", to_line(&answer))?;
    }
}

/// Answers one request line.
pub fn dispatch(manager: &GuestManager, line: &str) -> Answer {
    let request: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            return Answer::error(
                ErrorClass::InvalidRequest,
                format!("not a request: {e}"),
                None,
            )
        }
    };
    let id = request.id.clone();
    match execute(manager, &request) {
        Ok(value) => Answer::Return { value, id },
        Err((class, desc)) => Answer::error(class, desc, id),
    }
}

type Failure = (ErrorClass, String);

fn args<T: serde::de::DeserializeOwned + Default>(request: &Request) -> Result<T, Failure> {
    match &request.arguments {
        None => Ok(T::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            (
                ErrorClass::InvalidParameter,
                format!("arguments of {}: {e}", request.execute),
            )
        }),
    }
}

fn required<T: serde::de::DeserializeOwned>(request: &Request) -> Result<T, Failure> {
    let v = request.arguments.clone().ok_or_else(|| {
        (
            ErrorClass::InvalidParameter,
            format!("{} needs arguments", request.execute),
        )
    })?;
    serde_json::from_value(v).map_err(|e| {
        (
            ErrorClass::InvalidParameter,
            format!("arguments of {}: {e}", request.execute),
        )
    })
}

fn guest_failure(e: GuestError) -> Failure {
    let class = match &e {
        GuestError::NotFound(_) => ErrorClass::NotFound,
        GuestError::Connected(_) | GuestError::InProgress(_) => ErrorClass::Busy,
        _ if e.is_bad_request() => ErrorClass::InvalidParameter,
        _ => ErrorClass::GenericError,
    };
    (class, e.to_string())
}

fn execute(manager: &GuestManager, request: &Request) -> Result<Value, Failure> {
    let encode = |v: Result<Value, serde_json::Error>| {
        v.map_err(|e| {
            (
                ErrorClass::GenericError,
                format!("encoding the answer: {e}"),
            )
        })
    };
    match request.execute.as_str() {
        "list" => {
            let NoArgs {} = args(request)?;
            encode(serde_json::to_value(manager.report()))
        }
        "add" => {
            let a: AddArgs = required(request)?;
            let size = match &a.vram {
                Size::Bytes(n) => parse_slice_size(&n.to_string()),
                Size::Text(t) => parse_slice_size(t),
            }
            .map_err(|e| (ErrorClass::InvalidParameter, format!("vram: {e}")))?;
            // Relative paths would be the backend's working directory's, not the caller's.
            let relative = |p: &str| !Path::new(p).is_absolute();
            if relative(&a.socket) || a.display.as_deref().is_some_and(relative) {
                return Err((
                    ErrorClass::InvalidParameter,
                    "socket and display paths must be absolute".to_owned(),
                ));
            }
            let spec = GuestSpec {
                socket: Some(PathBuf::from(&a.socket)),
                size,
                display: a.display.as_ref().map(PathBuf::from),
                without_msix: !a.msix,
            };
            let info = manager.add(&spec).map_err(guest_failure)?;
            encode(serde_json::to_value(info))
        }
        "remove" => {
            let a: RemoveArgs = required(request)?;
            manager
                .remove(Path::new(&a.socket), a.force)
                .map_err(guest_failure)?;
            Ok(json!({}))
        }
        "stats" => {
            let a: StatsArgs = args(request)?;
            let report = manager.report();
            let guests: Vec<Value> = report
                .guests
                .iter()
                .filter(|g| a.socket.as_deref().is_none_or(|s| s == g.socket))
                .map(|g| json!({"socket": g.socket, "connected": g.connected, "traps": g.traps}))
                .collect();
            if let (Some(s), true) = (&a.socket, guests.is_empty()) {
                return Err((ErrorClass::NotFound, format!("no guest is served on {s}")));
            }
            Ok(json!({ "guests": guests }))
        }
        other => Err((
            ErrorClass::CommandNotFound,
            format!("unknown command `{other}` (commands: list, add, remove, stats)"),
        )),
    }
}

/// The arguments of a command that takes none.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}
