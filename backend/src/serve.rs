//! `gpu-backend serve`: present the GPU over vfio-user until SIGTERM or SIGINT, whole to
//! one guest ([`serve`], or [`serve_connected`] on a socket the launcher connected) or
//! sliced between several guests, each on its own socket and thread ([`present_guests`] +
//! [`serve_functions`]).
//!
//! # One guest's failure stays that guest's
//!
//! Every guest's server runs on its own thread, watched by the calling thread. When one ends
//! with an error (its listening socket failed, or its thread panicked), that is logged once
//! with the reason, its socket file is removed and the other guests go on. The process
//! ends:
//! - on SIGTERM or SIGINT: `Ok` if every guest was still served, else
//!   [`ServeError::GuestsFailed`] (exit status 1, so a supervisor learns that the backend ran
//!   degraded);
//! - when no guest is left ([`ServeError::NoGuestLeft`]), or the GPU stopped answering
//!   ([`ServeError::DeviceLost`]; every guest is on it);
//! - with `--fd`, when the one client leaves (`Ok`).
//!
//! # Bounded shutdown
//!
//! Once shutdown starts, the servers get [`SHUTDOWN_GRACE`] to stop; a thread still running
//! then (stuck in a syscall, say) is left behind, the socket files are removed and the call
//! returns, so the process exits within that bound whatever a connection thread is doing.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use thiserror::Error;

use crate::control::{ControlError, ControlServer};
use crate::gpu_device::GpuDevice;
use crate::guests::{GuestError, GuestManager};
use crate::host_gpu::HostGpu;
use crate::presentation::{
    FunctionLayout, PresentationError, PresentationOptions, PresentedFunction,
};
use crate::slice::{GuestSpec, HandOut, SetupError, SlicedGpu};
use crate::state::{StateDir, StateError};
use crate::supervisor::{Job, Supervisor};
use crate::unix_socket::{check_bindable, BindError};
use crate::vfio_user::shutdown::ShutdownError;
use crate::vfio_user::{
    serve_stream, PeerCred, PeerPolicy, Server, ServerConfig, ServerError, ShutdownSignal,
    DEFAULT_SOCKET_MODE,
};
use crate::vhost_user::gpu::store::SliceVramStore;
use crate::vhost_user::gpu::{GpuCommandHandler, GpuConfig};
use crate::vhost_user::{DisplayError, DisplayServer};

pub use crate::supervisor::SHUTDOWN_GRACE;

/// Errors of serving.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The GPU cannot be presented.
    #[error("cannot present the GPU: {0}")]
    Presentation(#[from] PresentationError),
    /// The guests' VRAM cannot be set up (sizes, BAR1 tables).
    #[error("cannot slice the GPU: {0}")]
    Setup(#[from] SetupError),
    /// Two guests name the same socket.
    #[error("socket {0} is given to more than one guest")]
    DuplicateSocket(PathBuf),
    /// A display socket is given twice, or is also a vfio-user socket.
    #[error(
        "display socket {0} is given to more than one guest or is also a guest's vfio-user socket"
    )]
    DisplayTaken(PathBuf),
    /// A display could not be set up or its server failed.
    #[error(transparent)]
    Display(#[from] DisplayError),
    /// A guest could not be added.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The state directory or file is unusable.
    #[error(transparent)]
    State(#[from] StateError),
    /// A `--guest` names a socket the state file has with another size, display or MSI-X.
    #[error("--guest {0} differs from the guest the state file has on that socket (remove it through the control socket first)")]
    StateConflict(PathBuf),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A guest has no socket to be served on.
    #[error("guest {0} has no socket")]
    NoSocket(usize),
    /// An `--allow-uid`/`--allow-gid` names a socket no guest is served on.
    #[error("--allow-uid/--allow-gid name {0}, which is no guest's socket")]
    UnknownAllowSocket(PathBuf),
    /// The socket could not be set up or the server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The shutdown signal could not be created.
    #[error(transparent)]
    Shutdown(#[from] ShutdownError),
    /// Signal handlers could not be installed.
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// The GPU stopped answering; nothing is served from it any more.
    #[error("the GPU stopped answering; it is no longer served")]
    DeviceLost,
    /// A server thread could not be started.
    #[error("cannot start a server thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Every guest's server ended with an error (each logged): nothing is served any more.
    #[error("no guest is served any more (each guest's server failed; see the log)")]
    NoGuestLeft,
    /// Stopped on a signal after some guests' servers had ended with errors (each logged).
    #[error("{0} guest(s) had stopped being served after an error (see the log)")]
    GuestsFailed(usize),
    /// The peer of the `--fd` socket is not one the allow lists admit.
    #[error("the peer of the given socket (uid {}, gid {}) is not allowed: only {policy} may connect", .peer.uid, .peer.gid)]
    PeerRefused {
        /// The peer.
        peer: PeerCred,
        /// Who may connect.
        policy: PeerPolicy,
    },
}

impl ServeError {
    /// Whether the error is the command line's fault (bad sizes, duplicate sockets).
    pub fn is_bad_request(&self) -> bool {
        match self {
            ServeError::Setup(e) => e.is_bad_request(),
            ServeError::Guest(e) => e.is_bad_request(),
            ServeError::State(_) | ServeError::StateConflict(_) => true,
            ServeError::Control(ControlError::Bind(
                BindError::NotASocket(_) | BindError::InUse(_),
            )) => true,
            ServeError::DuplicateSocket(_)
            | ServeError::DisplayTaken(_)
            | ServeError::NoSocket(_)
            | ServeError::UnknownAllowSocket(_)
            | ServeError::Server(ServerError::NotConnectedSocket { .. })
            | ServeError::Server(ServerError::Bind(
                BindError::NotASocket(_) | BindError::InUse(_),
            ))
            | ServeError::Display(DisplayError::Bind(
                BindError::NotASocket(_) | BindError::InUse(_),
            )) => true,
            _ => false,
        }
    }
}

/// One `--allow-uid`/`--allow-gid` value: `[SOCKET=]ID[,ID..]`, ids for every socket or for
/// the guest served on `SOCKET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowIds {
    /// The socket the ids apply to (`None`: every socket).
    pub socket: Option<PathBuf>,
    /// Numeric user or group ids.
    pub ids: Vec<u32>,
}

/// Errors of parsing an [`AllowIds`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("`{0}` is not [SOCKET=]ID[,ID..] with numeric ids (e.g. 107,108 or /run/g0.sock=107)")]
pub struct AllowIdsError(String);

impl FromStr for AllowIds {
    type Err = AllowIdsError;

    /// The ids follow the last `=`, so socket paths may contain `=`.
    fn from_str(text: &str) -> Result<AllowIds, AllowIdsError> {
        let bad = || AllowIdsError(text.to_owned());
        let (socket, ids) = match text.rsplit_once('=') {
            Some(("", _)) => return Err(bad()),
            Some((socket, ids)) => (Some(PathBuf::from(socket)), ids),
            None => (None, text),
        };
        let ids = ids
            .split(',')
            .map(|id| id.trim().parse::<u32>().map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowIds { socket, ids })
    }
}

/// Who may connect to which socket: the ids given for every socket, united with those
/// given for that socket. No ids at all: anyone the socket's file mode lets in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerRules {
    every: PeerPolicy,
    per_socket: Vec<(PathBuf, PeerPolicy)>,
}

impl PeerRules {
    /// The rules of the `--allow-uid` and `--allow-gid` values.
    pub fn from_flags(uids: &[AllowIds], gids: &[AllowIds]) -> PeerRules {
        let mut rules = PeerRules::default();
        for (allow, is_uid) in uids
            .iter()
            .map(|a| (a, true))
            .chain(gids.iter().map(|a| (a, false)))
        {
            let policy = match &allow.socket {
                None => &mut rules.every,
                Some(socket) => {
                    let at = match rules.per_socket.iter().position(|(s, _)| s == socket) {
                        Some(at) => at,
                        None => {
                            rules
                                .per_socket
                                .push((socket.clone(), PeerPolicy::anyone()));
                            rules.per_socket.len() - 1
                        }
                    };
                    &mut rules.per_socket[at].1
                }
            };
            let ids = allow.ids.iter().copied();
            *policy = if is_uid {
                std::mem::take(policy).allow_uids(ids)
            } else {
                std::mem::take(policy).allow_gids(ids)
            };
        }
        rules
    }

    /// Who may connect to `socket`.
    pub fn for_socket(&self, socket: &Path) -> PeerPolicy {
        self.per_socket
            .iter()
            .filter(|(s, _)| s == socket)
            .fold(self.every.clone(), |p, (_, q)| p.union(q))
    }

    /// Who may be the peer of a socket the launcher connected (the ids given for every
    /// socket).
    pub fn for_any_socket(&self) -> &PeerPolicy {
        &self.every
    }

    /// Refuses rules naming a socket that is not in `served` (a typo would leave that
    /// guest open to anyone the global ids admit, or to anyone at all).
    pub fn check_sockets(&self, served: &[&Path]) -> Result<(), ServeError> {
        match self
            .per_socket
            .iter()
            .find(|(s, _)| !served.contains(&s.as_path()))
        {
            Some((socket, _)) => Err(ServeError::UnknownAllowSocket(socket.clone())),
            None => Ok(()),
        }
    }
}

/// How the sockets are set up.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// File mode of the socket(s) (0o600 unless widened).
    pub socket_mode: u32,
    /// Limits and tuning of the vfio-user connections.
    pub server_config: ServerConfig,
    /// Who may connect to which socket.
    pub peers: PeerRules,
}

impl Default for ListenOptions {
    /// Mode 0600, the default limits, anyone the mode lets in.
    fn default() -> Self {
        ListenOptions {
            socket_mode: DEFAULT_SOCKET_MODE,
            server_config: ServerConfig::default(),
            peers: PeerRules::default(),
        }
    }
}

/// What to serve and where.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Socket path QEMU connects to.
    pub socket: PathBuf,
    /// The vhost-user socket of the guest's display, if it has one.
    pub display: Option<PathBuf>,
    /// Socket mode, connection limits, who may connect.
    pub listen: ListenOptions,
    /// How the GPU is presented: VRAM trapped or mapped, MSI-X or not (the VRAM is always
    /// scrubbed first: [`HandOut::Scrubbed`]).
    pub presentation: PresentationOptions,
}

/// Serves `host` whole to one guest on `options.socket` until SIGTERM or SIGINT; the socket
/// file is removed on the way out.
pub fn serve(host: Arc<dyn HostGpu>, options: &ServeOptions) -> Result<(), ServeError> {
    let presentation = PresentationOptions {
        handout: HandOut::Scrubbed,
        ..options.presentation
    };
    let function = PresentedFunction::new_with(host, presentation)?;
    serve_functions(
        vec![ServedGuest {
            socket: options.socket.clone(),
            display: options.display.clone(),
            function,
        }],
        &options.listen,
    )
}

/// Serves `host` whole to the one client at the other end of `stream`, a socket the
/// launcher connected (`serve --fd N`), until it leaves or SIGTERM/SIGINT. The peer must be
/// one `peers` admits.
pub fn serve_connected(
    host: Arc<dyn HostGpu>,
    stream: std::os::unix::net::UnixStream,
    server_config: ServerConfig,
    peers: &PeerPolicy,
    presentation: PresentationOptions,
) -> Result<(), ServeError> {
    if !peers.is_open() {
        let peer = PeerCred::of(&stream).map_err(ServerError::Connection)?;
        if !peers.admits(&peer) {
            return Err(ServeError::PeerRefused {
                peer,
                policy: peers.clone(),
            });
        }
    }
    let presentation = PresentationOptions {
        handout: HandOut::Scrubbed,
        ..presentation
    };
    let function = PresentedFunction::new_with(host, presentation)?;
    log_layout(&FunctionLayout::of(&function));
    log::info!(
        "serving {} on the connected socket given by the launcher",
        function.identity().name
    );
    let device = Arc::new(GpuDevice::new(function));
    let host = Arc::clone(device.function().host());
    let job = Job {
        label: "the connected socket".to_owned(),
        socket_file: None,
        host,
        run: Box::new(move |stop| {
            let stats = serve_stream(stream, device, server_config, Some(stop))?;
            log::info!("the client left: {}", stats.end);
            Ok(())
        }),
    };
    supervise(vec![job], ShutdownSignal::new()?)
}

/// Slices `host` between `guests` in order (consecutive scrubbed slices, one BAR1 window
/// each) and presents each guest's function. Sockets must be distinct.
pub fn present_guests(
    host: Arc<dyn HostGpu>,
    guests: &[GuestSpec],
) -> Result<(SlicedGpu, Vec<PresentedFunction>), ServeError> {
    present_guests_with(host, guests, HandOut::Scrubbed)
}

/// [`present_guests`], scrubbing the slices as `handout` says (`inspect` describes the
/// layout without scrubbing).
pub fn present_guests_with(
    host: Arc<dyn HostGpu>,
    guests: &[GuestSpec],
    handout: HandOut,
) -> Result<(SlicedGpu, Vec<PresentedFunction>), ServeError> {
    for (i, g) in guests.iter().enumerate() {
        if let Some(socket) = &g.socket {
            if guests[..i]
                .iter()
                .any(|o| o.socket.as_ref() == Some(socket))
            {
                return Err(ServeError::DuplicateSocket(socket.clone()));
            }
        }
    }
    let mut gpu = SlicedGpu::new(host)?;
    gpu.set_handout(handout);
    let mut functions = Vec::with_capacity(guests.len());
    for g in guests {
        let guest = gpu.add_guest(g.size)?;
        let presentation = PresentationOptions {
            without_msix: g.without_msix,
            ..PresentationOptions::default()
        };
        functions.push(PresentedFunction::for_guest_with(guest, presentation)?);
    }
    Ok((gpu, functions))
}

/// One guest to serve: its function on its vfio-user socket, and its display.
pub struct ServedGuest {
    /// The vfio-user socket.
    pub socket: PathBuf,
    /// The vhost-user socket of its display (`vhost-user-gpu-pci`), if it has one.
    pub display: Option<PathBuf>,
    /// What the guest sees.
    pub function: PresentedFunction,
}

/// Checks no path of `(socket, display)` pairs is given twice.
fn check_distinct(planned: &[(PathBuf, Option<PathBuf>)]) -> Result<(), ServeError> {
    let mut sockets = std::collections::HashSet::with_capacity(planned.len());
    for (socket, _) in planned {
        if !sockets.insert(socket) {
            return Err(ServeError::DuplicateSocket(socket.clone()));
        }
    }
    let mut displays = std::collections::HashSet::new();
    for display in planned.iter().filter_map(|(_, d)| d.as_ref()) {
        if sockets.contains(display) || !displays.insert(display) {
            return Err(ServeError::DisplayTaken(display.clone()));
        }
    }
    Ok(())
}

/// Checks `(socket, display)` paths before any socket is created, so a bad one starts
/// nothing: none given twice, the per-socket allow rules name only these sockets (unless
/// `rules_may_name_others`: guests added later through the control socket), each bindable.
fn check_paths(
    planned: &[(PathBuf, Option<PathBuf>)],
    peers: &PeerRules,
    rules_may_name_others: bool,
) -> Result<(), ServeError> {
    check_distinct(planned)?;
    if !rules_may_name_others {
        let sockets: Vec<&Path> = planned.iter().map(|(s, _)| s.as_path()).collect();
        peers.check_sockets(&sockets)?;
    }
    for (socket, display) in planned {
        check_bindable(socket).map_err(ServerError::Bind)?;
        if let Some(display) = display {
            check_bindable(display).map_err(DisplayError::Bind)?;
        }
    }
    Ok(())
}

/// A guest's servers, bound and ready to run: its vfio-user server and, if it has one, its
/// display (a virtio-gpu whose resources live in its VRAM slice).
pub(crate) struct GuestServers {
    /// The device the vfio-user server serves.
    pub device: Arc<GpuDevice>,
    /// Set while QEMU is connected to the display.
    pub display_connected: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The vfio-user server's job, then the display's.
    pub jobs: Vec<Job>,
}

/// Binds `function`'s socket and its display (if `display`), as `options` says.
pub(crate) fn guest_servers<E: From<ServerError> + From<DisplayError>>(
    socket: &Path,
    display: Option<&Path>,
    function: PresentedFunction,
    options: &ListenOptions,
) -> Result<GuestServers, E> {
    let peers = options.peers.for_socket(socket);
    let mut server = Server::bind(socket, options.socket_mode)?
        .with_config(options.server_config)
        .with_peers(peers.clone());
    log::info!(
        "serving {} slice {} on {} (mode {:o}; {})",
        function.identity().name,
        function.guest().slice(),
        socket.display(),
        options.socket_mode,
        peers
    );
    let mut jobs = Vec::with_capacity(2);
    let mut display_connected = None;
    if let Some(path) = display {
        let store = SliceVramStore::for_guest(function.guest());
        let model = GpuCommandHandler::new(GpuConfig::default(), Box::new(store) as Box<_>);
        let mut display = DisplayServer::bind(path, options.socket_mode, model)?;
        log::info!(
            "display of {} on {} (mode {:o}): resources in its slice {}",
            socket.display(),
            path.display(),
            options.socket_mode,
            function.guest().slice()
        );
        display_connected = Some(display.connected());
        jobs.push(Job {
            label: format!("display {}", path.display()),
            socket_file: display.take_socket_file(),
            host: Arc::clone(function.host()),
            run: Box::new(move |stop| display.serve(stop).map_err(Into::into)),
        });
    }
    let device = Arc::new(GpuDevice::new(function));
    let served = Arc::clone(&device);
    jobs.insert(
        0,
        Job {
            label: socket.display().to_string(),
            socket_file: server.take_socket_file(),
            host: Arc::clone(device.function().host()),
            run: Box::new(move |stop| server.serve(served, stop).map_err(Into::into)),
        },
    );
    Ok(GuestServers {
        device,
        display_connected,
        jobs,
    })
}

/// Serves each guest's function on its socket, and its display if it has one, each server
/// on its own thread, until SIGTERM or SIGINT, until no server is left, or until the GPU
/// stops answering (see the module docs). Every socket is bound before any is served, so a
/// bad path fails the whole command; socket files are removed on the way out.
pub fn serve_functions(
    guests: Vec<ServedGuest>,
    options: &ListenOptions,
) -> Result<(), ServeError> {
    let planned: Vec<(PathBuf, Option<PathBuf>)> = guests
        .iter()
        .map(|g| (g.socket.clone(), g.display.clone()))
        .collect();
    check_paths(&planned, &options.peers, false)?;
    let mut jobs = Vec::with_capacity(2 * guests.len());
    for ServedGuest {
        socket,
        display,
        function,
    } in guests
    {
        log_layout(&FunctionLayout::of(&function));
        let servers: GuestServers =
            guest_servers::<ServeError>(&socket, display.as_deref(), function, options)?;
        jobs.extend(servers.jobs);
    }
    supervise(jobs, ShutdownSignal::new()?)
}

/// Slices `host` between `guests` (in order; each checked before anything is created, so a
/// bad one starts nothing) and serves them, each with its display if it has one, until
/// SIGTERM or SIGINT; with `control`, also opens the control socket there, through which
/// guests are added and removed while the backend runs.
pub fn serve_sliced(
    host: Arc<dyn HostGpu>,
    guests: &[GuestSpec],
    control: Option<&Path>,
    state: Option<StateDir>,
    listen: &ListenOptions,
) -> Result<(), ServeError> {
    let identity = host.identity().clone();
    let original = match &state {
        Some(dir) => dir.load(&identity.name, identity.vram_size)?,
        None => None,
    };
    let saved = original
        .as_ref()
        .map(|s| s.guests.clone())
        .unwrap_or_default();
    let state_dir = state.clone();
    // A `--guest` the state file already has (same socket, size, display and MSI-X) is
    // served from the state; one that differs from it is refused.
    let mut fresh = Vec::new();
    for g in guests {
        match saved.iter().find(|s| g.socket.as_ref() == Some(&s.socket)) {
            Some(s)
                if s.vram_size == g.size
                    && s.display == g.display
                    && s.no_msix == g.without_msix => {}
            Some(s) => return Err(ServeError::StateConflict(s.socket.clone())),
            None => fresh.push(g.clone()),
        }
    }
    let mut planned = Vec::with_capacity(saved.len() + fresh.len());
    planned.extend(saved.iter().map(|s| (s.socket.clone(), s.display.clone())));
    for (i, g) in fresh.iter().enumerate() {
        let socket = g.socket.clone().ok_or(ServeError::NoSocket(i))?;
        planned.push((socket, g.display.clone()));
    }
    // With a control socket, rules may name guests added later.
    check_paths(&planned, &listen.peers, control.is_some())?;
    if let Some(control) = control {
        if planned
            .iter()
            .any(|(s, d)| s == control || d.as_deref() == Some(control))
        {
            return Err(ServeError::DisplayTaken(control.to_path_buf()));
        }
        check_bindable(control).map_err(|e| ServeError::Control(e.into()))?;
    }
    let gpu = SlicedGpu::new(host)?;
    let supervisor = Supervisor::new(ShutdownSignal::new()?)?;
    let mut manager = GuestManager::new(gpu, supervisor.clone(), listen.clone());
    if let Some(dir) = state {
        log::info!(
            "guest table in {} ({} guest(s) to serve again)",
            dir.file().display(),
            saved.len()
        );
        manager = manager.with_state(dir);
    }
    let manager = Arc::new(manager);
    let started = (|| {
        for s in &saved {
            manager.restore(s)?;
        }
        for g in &fresh {
            manager.add(g)?;
        }
        if let Some(path) = control {
            let mut server = ControlServer::bind(path, Arc::clone(&manager))?;
            log::info!("control socket on {} (mode 600)", path.display());
            let host = Arc::clone(manager.host());
            supervisor.spawn(Job {
                label: format!("control {}", path.display()),
                socket_file: server.take_socket_file(),
                host,
                run: Box::new(move |stop| server.serve(stop).map_err(Into::into)),
            })?;
        }
        Ok::<(), ServeError>(())
    })();
    if let Err(e) = started {
        supervisor.shutdown().trigger();
        let _ = supervisor.run();
        // A start that failed changes nothing: the table is put back as it was.
        if let Some(dir) = &state_dir {
            if let Err(undo) = dir.put_back(original.as_ref()) {
                log::error!("putting the state file back: {undo}");
            }
        }
        return Err(e);
    }
    supervisor.run()
}

/// Runs `jobs` under a new [`Supervisor`] until it returns.
fn supervise(jobs: Vec<Job>, shutdown: ShutdownSignal) -> Result<(), ServeError> {
    let supervisor = Supervisor::new(shutdown)?;
    for job in jobs {
        if let Err(e) = supervisor.spawn(job) {
            supervisor.shutdown().trigger();
            let _ = supervisor.run();
            return Err(e);
        }
    }
    supervisor.run()
}

fn log_layout(layout: &FunctionLayout) {
    log::info!(
        "{} ({}): {:04x}:{:04x}, guest VRAM = host [{:#x}, {:#x})",
        layout.chip.name,
        layout.chip.description,
        layout.pci.vendor_id,
        layout.pci.device_id,
        layout.slice.start,
        layout.slice.start + layout.slice.size
    );
    for bar in &layout.bars {
        log::info!(
            "BAR{} {}: real {:#x}, presented {:#x}, mappable {:?}",
            bar.index,
            bar.role,
            bar.real_size,
            bar.presented_size,
            bar.mappable.first().map(|a| (a.offset, a.size))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::{Duration, Instant};

    use crate::unix_socket::SocketFile;

    use crate::host_driver::test_support::StuckRegister;
    use crate::host_gpu::emulated::EmulatedHostGpu;

    fn emulated() -> Arc<dyn HostGpu> {
        Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap())
    }

    /// A socket file for a job (bound, then taken from its server).
    fn socket_file(name: &str) -> SocketFile {
        let path = std::env::temp_dir().join(format!("{name}-{}.sock", std::process::id()));
        Server::bind(&path, 0o600)
            .unwrap()
            .take_socket_file()
            .unwrap()
    }

    /// A job that serves until shutdown, as a healthy server does.
    fn healthy(file: SocketFile) -> Job {
        Job {
            label: file.path().display().to_string(),
            socket_file: Some(file),
            host: emulated(),
            run: Box::new(|stop| {
                crate::vfio_user::socket::wait_readable(stop.fd(), None, None)
                    .map_err(ServerError::Listener)?;
                Ok(())
            }),
        }
    }

    /// A job whose thread blocks in `read(2)` for ever, deaf to the shutdown.
    fn stuck(file: SocketFile) -> Job {
        Job {
            label: file.path().display().to_string(),
            socket_file: Some(file),
            host: emulated(),
            run: Box::new(|_| {
                let (mut reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
                let mut byte = [0u8; 1];
                let _ = std::io::Read::read(&mut reader, &mut byte);
                drop(writer);
                Ok(())
            }),
        }
    }

    fn failing(file: SocketFile, after: Duration) -> Job {
        Job {
            label: file.path().display().to_string(),
            socket_file: Some(file),
            host: emulated(),
            run: Box::new(move |_| {
                thread::sleep(after);
                Err(ServerError::Listener(std::io::Error::other(
                    "the listening socket was shut down",
                ))
                .into())
            }),
        }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: timed out");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn shutdown_does_not_wait_for_a_stuck_server_thread() {
        let (a, b) = (socket_file("stuck-a"), socket_file("stuck-b"));
        let (pa, pb) = (a.path().to_owned(), b.path().to_owned());
        let shutdown = ShutdownSignal::new().unwrap();
        let stop = shutdown.clone();
        let supervised = thread::spawn(move || supervise(vec![stuck(a), healthy(b)], stop));
        thread::sleep(Duration::from_millis(200));
        let triggered = Instant::now();
        shutdown.trigger();
        let result = supervised.join().unwrap();
        let took = triggered.elapsed();
        assert!(result.is_ok(), "{result:?}");
        assert!(
            took >= SHUTDOWN_GRACE && took < SHUTDOWN_GRACE + Duration::from_secs(1),
            "{took:?}"
        );
        assert!(!pa.exists() && !pb.exists(), "socket files left behind");
    }

    #[test]
    fn a_failing_server_ends_alone_and_the_last_one_ends_the_process() {
        let (a, b) = (socket_file("fail-a"), socket_file("fail-b"));
        let (pa, pb) = (a.path().to_owned(), b.path().to_owned());
        let shutdown = ShutdownSignal::new().unwrap();
        let stop = shutdown.clone();
        let supervised =
            thread::spawn(move || supervise(vec![failing(a, Duration::ZERO), healthy(b)], stop));
        // The failed guest's socket goes; the other one stays served.
        wait_for("the failed guest's socket removed", || !pa.exists());
        thread::sleep(Duration::from_millis(300));
        assert!(pb.exists() && !supervised.is_finished());
        shutdown.trigger();
        let result = supervised.join().unwrap();
        assert!(
            matches!(result, Err(ServeError::GuestsFailed(1))),
            "{result:?}"
        );
        assert!(!pb.exists());

        // When the last guest's server fails, nothing is served: the call ends at once.
        let (a, b) = (socket_file("fail-c"), socket_file("fail-d"));
        let started = Instant::now();
        let result = supervise(
            vec![
                failing(a, Duration::ZERO),
                failing(b, Duration::from_millis(200)),
            ],
            ShutdownSignal::new().unwrap(),
        );
        assert!(matches!(result, Err(ServeError::NoGuestLeft)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn allow_flags_parse_and_apply_per_socket() {
        let every: AllowIds = "107,108".parse().unwrap();
        assert_eq!(every.socket, None);
        assert_eq!(every.ids, vec![107, 108]);
        let one: AllowIds = "/run/a=b.sock=0".parse().unwrap();
        assert_eq!(one.socket.as_deref(), Some(Path::new("/run/a=b.sock")));
        assert_eq!(one.ids, vec![0]);
        for bad in ["", "x", "=5", "/s=", "1,,2", "-1", "4294967296"] {
            assert!(bad.parse::<AllowIds>().is_err(), "{bad}");
        }
        let rules = PeerRules::from_flags(
            &[every, "/g1.sock=1000".parse().unwrap()],
            &["/g0.sock=36".parse().unwrap()],
        );
        let cred = |uid, gid| PeerCred { pid: 1, uid, gid };
        let g0 = rules.for_socket(Path::new("/g0.sock"));
        let g1 = rules.for_socket(Path::new("/g1.sock"));
        assert!(g0.admits(&cred(107, 1)) && g0.admits(&cred(5, 36)));
        assert!(!g0.admits(&cred(1000, 1)));
        assert!(g1.admits(&cred(1000, 1)) && !g1.admits(&cred(5, 36)));
        assert!(rules
            .check_sockets(&[Path::new("/g0.sock"), Path::new("/g1.sock")])
            .is_ok());
        let err = rules.check_sockets(&[Path::new("/g0.sock")]).unwrap_err();
        assert!(err.is_bad_request(), "{err}");
        assert!(PeerRules::default().for_socket(Path::new("/x")).is_open());
    }

    #[test]
    fn a_gpu_that_stops_answering_stops_being_served() {
        let host = Arc::new(StuckRegister::healthy("tu102-24g"));
        let function = PresentedFunction::new(Arc::clone(&host) as Arc<dyn HostGpu>).unwrap();
        let socket = std::env::temp_dir().join(format!("watchdog-{}.sock", std::process::id()));
        let served = {
            let socket = socket.clone();
            thread::spawn(move || {
                serve_functions(
                    vec![ServedGuest {
                        socket,
                        display: None,
                        function,
                    }],
                    &ListenOptions {
                        socket_mode: 0o600,
                        ..ListenOptions::default()
                    },
                )
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "socket never appeared");
            thread::sleep(Duration::from_millis(10));
        }
        let unplugged = Instant::now();
        host.unplug();
        let result = served.join().unwrap();
        assert!(matches!(result, Err(ServeError::DeviceLost)), "{result:?}");
        assert!(
            unplugged.elapsed() < Duration::from_secs(3),
            "{:?}",
            unplugged.elapsed()
        );
        assert!(!socket.exists(), "the socket file is removed");
    }
}
