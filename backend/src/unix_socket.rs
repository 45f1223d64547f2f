//! Listening unix sockets shared by the transports (`vfio_user`, `vhost_user`): binding a
//! socket file with its mode set from the start, replacing a stale one, and removing it again.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Errors of binding a listening socket.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
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
}

/// The socket file a server created; removed on drop if it is still the same file (a
/// server started on the same path since keeps its own).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
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

/// Checks `path` could be bound: short enough for a socket address, and absent or a stale
/// socket (its server is gone: `connect()` is refused). A live socket or anything that is
/// not a socket is an error; nothing is changed.
pub fn check_bindable(path: &Path) -> Result<(), BindError> {
    if !fits_socket_address(path) {
        return Err(BindError::Bind {
            path: path.to_path_buf(),
            source: io::Error::from_raw_os_error(libc::ENAMETOOLONG),
        });
    }
    stale_or_absent(path).map(|_| ())
}

/// Whether `path` fits a `sockaddr_un` (non-empty, no NUL, shorter than `sun_path`).
fn fits_socket_address(path: &Path) -> bool {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    !bytes.is_empty() && bytes.len() < addr.sun_path.len() && !bytes.contains(&0)
}

/// `Ok(true)`: a stale socket is at `path`; `Ok(false)`: nothing is.
fn stale_or_absent(path: &Path) -> Result<bool, BindError> {
    let bind_err = |source| BindError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(bind_err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket(path.to_path_buf()));
    }
    match probe(path) {
        Ok(true) => Err(BindError::InUse(path.to_path_buf())),
        Ok(false) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(bind_err(e)),
    }
}

/// Whether a server listens at the socket `path` (`false`: the connection was refused, the
/// socket is stale). The connect does not block: a listener whose backlog is full answers
/// EAGAIN at once, and counts as live.
fn probe(path: &Path) -> io::Result<bool> {
    if !fits_socket_address(path) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: a valid socket and a pointer to a sockaddr_un of `len` bytes on our stack.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EINPROGRESS) => Ok(true),
        Some(libc::ECONNREFUSED) => Ok(false),
        _ => Err(e),
    }
}

/// Binds a listening socket at `path` with file mode `mode`, replacing a stale socket file
/// (see [`check_bindable`]). The socket file is created with `mode` already (the umask is
/// narrowed around `bind()`), so no peer the mode shuts out can connect between `bind()`
/// and the `chmod`.
pub fn bind_listener(path: &Path, mode: u32) -> Result<(UnixListener, SocketFile), BindError> {
    let bind_err = |source| BindError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if stale_or_absent(path)? {
        log::info!("replacing stale socket {}", path.display());
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(bind_err(e)),
            _ => {}
        }
    }
    // SAFETY: umask(2) only swaps the process's file mode mask; it cannot fail.
    let old_mask = unsafe { libc::umask(!mode & 0o777) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old_mask) };
    let listener = bound.map_err(bind_err)?;
    let meta = fs::symlink_metadata(path).map_err(bind_err)?;
    let socket_file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
        BindError::Mode {
            path: path.to_path_buf(),
            mode,
            source,
        }
    })?;
    Ok((listener, socket_file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn temp(name: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("gpu-backend-unix-{name}-{}", std::process::id()));
        let _ = fs::remove_file(&p);
        p
    }

    #[test]
    fn absent_stale_live_and_foreign_paths() {
        let path = temp("kinds");
        assert!(check_bindable(&path).is_ok(), "absent");
        let live = UnixListener::bind(&path).unwrap();
        assert!(matches!(check_bindable(&path), Err(BindError::InUse(_))));
        drop(live);
        assert!(check_bindable(&path).is_ok(), "stale");
        let (listener, file) = bind_listener(&path, 0o600).unwrap();
        assert!(matches!(check_bindable(&path), Err(BindError::InUse(_))));
        drop((listener, file));
        assert!(!path.exists(), "removed with its SocketFile");
        fs::write(&path, b"x").unwrap();
        assert!(matches!(
            check_bindable(&path),
            Err(BindError::NotASocket(_))
        ));
        let _ = fs::remove_file(&path);
        // Too long for a socket address: refused before anything is done (an add would
        // otherwise scrub the slice first and fail only at bind).
        let long = std::env::temp_dir().join("s".repeat(120));
        match check_bindable(&long) {
            Err(BindError::Bind { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENAMETOOLONG))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_listener_with_a_full_backlog_is_live_and_the_probe_does_not_block() {
        let path = temp("backlog");
        let _listener = UnixListener::bind(&path).unwrap();
        // Fill the backlog with connections nobody accepts.
        let mut held = Vec::new();
        for _ in 0..4096 {
            // SAFETY: plain socket(2); checked.
            let raw =
                unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
            assert!(raw >= 0);
            // SAFETY: fresh fd, owned here.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
            let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (d, &s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
                *d = s as libc::c_char;
            }
            // SAFETY: valid socket and address.
            let rc = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                break; // EAGAIN: the backlog is full
            }
            held.push(fd);
        }
        let started = Instant::now();
        assert!(matches!(check_bindable(&path), Err(BindError::InUse(_))));
        assert!(started.elapsed() < Duration::from_secs(1));
        let _ = fs::remove_file(&path);
    }
}
