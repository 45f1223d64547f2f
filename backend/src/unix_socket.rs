//! Listening unix sockets shared by the transports (`vfio_user`, `vhost_user`): binding a
//! socket file with its mode set from the start, replacing a stale one, and removing it again.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
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

/// Checks `path` could be bound: absent, or a stale socket (its server is gone: `connect()`
/// is refused). A live socket or anything that is not a socket is an error; nothing is
/// changed.
pub fn check_bindable(path: &Path) -> Result<(), BindError> {
    stale_or_absent(path).map(|_| ())
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
    match UnixStream::connect(path) {
        Ok(_) => Err(BindError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(bind_err(e)),
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
