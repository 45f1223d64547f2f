//! [`GuestManager`]: the guests of a sliced GPU while the backend runs. Each guest is its
//! slice of VRAM, its vfio-user server and, if it has one, its display, all started and
//! stopped together under the [`Supervisor`]. Guests are added and removed at run time (the
//! control socket) as well as at start (`--guest`).
//!
//! - Adding a guest checks its paths first (unused by any guest, bindable), then takes the
//!   lowest free range of VRAM that fits (first fit; slices never move, since a guest's QEMU
//!   maps its VRAM, so free VRAM can be fragmented: `list` shows the free ranges), scrubs it,
//!   binds the sockets and starts serving. Any failure undoes what was done.
//! - Removing a guest is refused while its QEMU is connected, unless forced. Then the slice
//!   is revoked first (the old function reads ~0 and drops writes from that moment), the
//!   guest's servers are stopped (its QEMU is disconnected), the slice is scrubbed and
//!   returned to the free VRAM.
//! - A scrub (on hardware it runs through PRAMIN and takes minutes per GiB) holds no lock:
//!   the range being scrubbed is out of the free VRAM and a guest being added holds its
//!   paths, while other adds and removals go on. `list` and `stats` never wait: they read a
//!   copy of the table made after every change (a range being scrubbed shows as taken,
//!   with no guest on it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::gpu_device::GpuDevice;
use crate::host_driver::addr::VramAddr;
use crate::presentation::bar0::TrapStats;
use crate::presentation::{PresentationError, PresentationOptions, PresentedFunction};
use crate::serve::{guest_servers, GuestServers, ListenOptions};
use crate::slice::{GuestSlice, GuestSpec, SetupError, Slice, SlicedGpu};
use crate::state::{SavedGuest, SavedState, StateDir, StateError, STATE_VERSION};
use crate::supervisor::{JobId, Supervisor, SHUTDOWN_GRACE};
use crate::unix_socket::{check_bindable, BindError};
use crate::vfio_user::ServerError;
use crate::vhost_user::DisplayError;

/// Errors of adding or removing a guest. Nothing changed when one is returned, except for
/// [`GuestError::RemovedNotSaved`] (the guest is removed, the state file is stale).
#[derive(Debug, Error)]
pub enum GuestError {
    /// The path is already a guest's socket or display.
    #[error("{0} is already used by a guest")]
    PathInUse(PathBuf),
    /// The guest's socket and display are the same path.
    #[error("the socket and the display of a guest must differ ({0})")]
    SamePath(PathBuf),
    /// The guest on that socket is being added or removed right now.
    #[error("the guest on {0} is being added or removed; try again when that is done")]
    InProgress(PathBuf),
    /// A socket path inside the state directory (saving the table could replace it).
    #[error("{0} is inside the state directory; put sockets elsewhere")]
    InStateDir(PathBuf),
    /// A socket path cannot be bound (exists and is not a socket, a live socket, ...).
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The guest needs a socket.
    #[error("a guest needs a socket")]
    NoSocket,
    /// No such guest.
    #[error("no guest is served on {0}")]
    NotFound(PathBuf),
    /// The guest's QEMU is connected and removal was not forced.
    #[error("the guest on {0} is connected; remove it with force to disconnect it")]
    Connected(PathBuf),
    /// The slice cannot be set up (no room, sizes).
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The guest's function cannot be presented.
    #[error(transparent)]
    Presentation(#[from] PresentationError),
    /// The vfio-user server cannot be set up.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The display cannot be set up.
    #[error(transparent)]
    Display(#[from] DisplayError),
    /// The servers could not be started.
    #[error("cannot start the guest's servers: {0}")]
    Start(String),
    /// The backend is shutting down.
    #[error("the backend is shutting down")]
    ShuttingDown,
    /// The state file could not be written; the guest was not added.
    #[error("{0}")]
    State(#[from] StateError),
    /// The guest was removed, but the state file could not be written: a restart would
    /// serve it again (on a scrubbed slice).
    #[error("the guest on {socket} is removed, but the state file was not written: {source}")]
    RemovedNotSaved {
        /// The guest's socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: StateError,
    },
}

impl GuestError {
    /// Whether the error is the request's fault (bad sizes, paths in use), not the backend's.
    pub fn is_bad_request(&self) -> bool {
        match self {
            GuestError::Setup(e) => e.is_bad_request(),
            GuestError::Server(ServerError::Bind(_))
            | GuestError::Display(DisplayError::Bind(_)) => true,
            GuestError::PathInUse(_)
            | GuestError::SamePath(_)
            | GuestError::InStateDir(_)
            | GuestError::Bind(_)
            | GuestError::NoSocket
            | GuestError::NotFound(_)
            | GuestError::Connected(_) => true,
            _ => false,
        }
    }
}

/// One guest as `list` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Its vfio-user socket.
    pub socket: String,
    /// Its display socket, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// First byte of its slice of host VRAM.
    pub vram_start: u64,
    /// Size of its slice.
    pub vram_size: u64,
    /// Whether a client (its QEMU) is connected to the vfio-user socket or the display.
    pub connected: bool,
    /// Whether its function offers MSI-X (without it, QEMU can hot-unplug it). An answer
    /// without the field comes from a backend that always offered it.
    #[serde(default = "crate::control::protocol::offer_msix")]
    pub msix: bool,
    /// Its BAR0 traffic.
    pub traps: TrapStats,
}

/// A range of free VRAM.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FreeRange {
    /// First byte.
    pub start: u64,
    /// Length.
    pub size: u64,
}

/// The GPU and its guests, as `list` reports them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuReport {
    /// Chip name (profile name or PCI address).
    pub name: String,
    /// Description.
    pub description: String,
    /// Device memory.
    pub vram_size: u64,
    /// End of the area slices come from (the host-reserved region follows).
    pub guest_area_end: u64,
    /// Free VRAM of the guest area, in bytes.
    pub free_bytes: u64,
    /// Free ranges of the guest area, lowest first (fragmentation shows here).
    pub free_ranges: Vec<FreeRange>,
    /// The guests, by VRAM address.
    pub guests: Vec<GuestInfo>,
}

/// A guest being served.
struct Guest {
    socket: PathBuf,
    display: Option<PathBuf>,
    slice: GuestSlice,
    device: Arc<GpuDevice>,
    /// Set while QEMU is connected to the guest's display.
    display_connected: Option<Arc<std::sync::atomic::AtomicBool>>,
    jobs: Vec<JobId>,
}

impl Guest {
    /// Whether its function offers MSI-X.
    fn has_msix(&self) -> bool {
        self.device.function().msix().is_some()
    }

    /// Whether its QEMU is connected (to the GPU or the display).
    fn is_connected(&self) -> bool {
        self.device.is_connected()
            || self
                .display_connected
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Acquire))
    }

    fn info(&self) -> GuestInfo {
        GuestInfo {
            socket: self.socket.display().to_string(),
            display: self.display.as_ref().map(|d| d.display().to_string()),
            vram_start: self.slice.slice().start().raw(),
            vram_size: self.slice.slice().size(),
            connected: self.is_connected(),
            msix: self.has_msix(),
            traps: self.device.function().trap_stats(),
        }
    }
}

struct Table {
    gpu: SlicedGpu,
    guests: Vec<Arc<Guest>>,
    /// The socket and display paths of guests being added (their range being scrubbed).
    pending: Vec<PathBuf>,
}

/// What `list` and `stats` read: the guests and the VRAM the table had after its last
/// change.
struct Listing {
    guests: Vec<Arc<Guest>>,
    /// Slices out of the free VRAM (the guests', and any kept out of use), lowest first.
    assigned: Vec<Slice>,
    vram_size: u64,
    guest_area_end: u64,
    free_bytes: u64,
}

impl Listing {
    fn of(table: &Table) -> Listing {
        let partition = table.gpu.partition();
        Listing {
            guests: table.guests.clone(),
            assigned: partition.assigned().collect(),
            vram_size: partition.vram_size(),
            guest_area_end: partition.guest_area_end(),
            free_bytes: partition.free_bytes(),
        }
    }
}

/// The guests of one sliced GPU (see the module docs). Operations are serialized.
pub struct GuestManager {
    host: Arc<dyn crate::host_gpu::HostGpu>,
    table: Mutex<Table>,
    listing: RwLock<Listing>,
    supervisor: Supervisor,
    listen: ListenOptions,
    state: Option<StateDir>,
}

impl GuestManager {
    /// Manages guests of `gpu`, their servers run by `supervisor`, listening as `listen`
    /// says.
    pub fn new(gpu: SlicedGpu, supervisor: Supervisor, listen: ListenOptions) -> GuestManager {
        let table = Table {
            gpu,
            guests: Vec::new(),
            pending: Vec::new(),
        };
        GuestManager {
            host: Arc::clone(table.gpu.host()),
            listing: RwLock::new(Listing::of(&table)),
            table: Mutex::new(table),
            supervisor,
            listen,
            state: None,
        }
    }

    /// Keeps the guest table in `state` from now on (written after every change).
    pub fn with_state(mut self, state: StateDir) -> GuestManager {
        self.state = Some(state);
        self
    }

    /// Makes `table` what `list` and `stats` show.
    fn publish(&self, table: &Table) {
        *self.listing.write() = Listing::of(table);
    }

    /// Writes the guest table to the state directory, if there is one.
    fn save(&self, table: &Table) -> Result<(), StateError> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let identity = self.host.identity();
        let mut guests: Vec<SavedGuest> = table
            .guests
            .iter()
            .map(|g| SavedGuest {
                socket: g.socket.clone(),
                display: g.display.clone(),
                no_msix: !g.has_msix(),
                vram_start: g.slice.slice().start().raw(),
                vram_size: g.slice.slice().size(),
            })
            .collect();
        guests.sort_by_key(|g| g.vram_start);
        state.save(&SavedState {
            version: STATE_VERSION,
            gpu: identity.name.clone(),
            vram_size: identity.vram_size,
            guests,
        })
    }

    /// Serves a guest of an earlier run again, from the state file: its slice is given
    /// back where it was, **not scrubbed**.
    pub fn restore(&self, saved: &SavedGuest) -> Result<GuestInfo, GuestError> {
        let spec = GuestSpec {
            socket: Some(saved.socket.clone()),
            size: saved.vram_size,
            display: saved.display.clone(),
            without_msix: saved.no_msix,
        };
        self.add_with(&spec, Some(VramAddr::new(saved.vram_start)))
    }

    /// The GPU the guests share.
    pub fn host(&self) -> &Arc<dyn crate::host_gpu::HostGpu> {
        &self.host
    }

    /// Adds and starts serving a guest (see the module docs).
    pub fn add(&self, spec: &GuestSpec) -> Result<GuestInfo, GuestError> {
        self.add_with(spec, None)
    }

    /// Adds a guest: at `restore_at`, unscrubbed, or in the lowest free range, scrubbed. The
    /// range is scrubbed without the table lock (on hardware that takes minutes per GiB), so
    /// other adds and removals go on meanwhile; the guest's paths are held for it.
    fn add_with(
        &self,
        spec: &GuestSpec,
        restore_at: Option<VramAddr>,
    ) -> Result<GuestInfo, GuestError> {
        let socket = spec.socket.clone().ok_or(GuestError::NoSocket)?;
        let mut paths = vec![socket.clone()];
        if let Some(display) = &spec.display {
            if display == &socket {
                return Err(GuestError::SamePath(socket));
            }
            paths.push(display.clone());
        }
        let (reserved, vram, handout) = {
            let mut table = self.lock_unless_shutting_down()?;
            self.check_new_paths(&table, &paths)?;
            if let Some(start) = restore_at {
                let slice = table.gpu.restore_guest(start, spec.size)?;
                return self.start_added(&mut table, spec, &socket, slice, restore_at);
            }
            let reserved = table.gpu.reserve(spec.size)?;
            table.pending.extend(paths.iter().cloned());
            // `list` shows the range taken (no guest on it yet) while it is scrubbed.
            self.publish(&table);
            (reserved, Arc::clone(table.gpu.vram()), table.gpu.handout())
        };
        let scrubbed = SlicedGpu::scrub_reserved(&vram, reserved, handout);
        let mut table = self.table.lock();
        table.pending.retain(|p| !paths.contains(p));
        let handed = match scrubbed {
            Err(e) => Err(GuestError::from(e)),
            // Not started once shutdown began.
            Ok(()) if self.supervisor.shutdown().is_triggered() => Err(GuestError::ShuttingDown),
            Ok(()) => Ok(()),
        };
        if let Err(e) = handed {
            if let Err(undo) = table.gpu.release_range(reserved) {
                log::error!("giving back {reserved}: {undo}");
            }
            self.publish(&table);
            return Err(e);
        }
        let slice = match table.gpu.hand_out_reserved(reserved) {
            Ok(slice) => slice,
            Err(e) => {
                // The range is free again.
                self.publish(&table);
                return Err(e.into());
            }
        };
        self.start_added(&mut table, spec, &socket, slice, restore_at)
    }

    /// The table, unless the backend is shutting down (checked again under the lock: an add
    /// queued behind a long one must not outlive a shutdown).
    fn lock_unless_shutting_down(&self) -> Result<parking_lot::MutexGuard<'_, Table>, GuestError> {
        if self.supervisor.shutdown().is_triggered() {
            return Err(GuestError::ShuttingDown);
        }
        let table = self.table.lock();
        if self.supervisor.shutdown().is_triggered() {
            return Err(GuestError::ShuttingDown);
        }
        Ok(table)
    }

    /// Checks the paths of a new guest: outside the state directory, used by no guest (nor
    /// one being added), and bindable.
    fn check_new_paths(&self, table: &Table, paths: &[PathBuf]) -> Result<(), GuestError> {
        for path in paths {
            if self
                .state
                .as_ref()
                .is_some_and(|s| is_inside(path, s.path()))
            {
                return Err(GuestError::InStateDir(path.clone()));
            }
            let used = table.pending.contains(path)
                || table
                    .guests
                    .iter()
                    .any(|g| g.socket == *path || g.display.as_ref() == Some(path));
            if used {
                return Err(GuestError::PathInUse(path.clone()));
            }
            check_bindable(path)?;
        }
        Ok(())
    }

    /// Starts serving a guest just given `slice` and records it; on failure the slice is
    /// taken back.
    fn start_added(
        &self,
        table: &mut Table,
        spec: &GuestSpec,
        socket: &Path,
        slice: GuestSlice,
        restore_at: Option<VramAddr>,
    ) -> Result<GuestInfo, GuestError> {
        let presentation = PresentationOptions {
            without_msix: spec.without_msix,
            ..PresentationOptions::default()
        };
        match self.start(socket, spec.display.as_deref(), slice.clone(), presentation) {
            Ok(guest) => {
                let info = guest.info();
                log::info!(
                    "guest added: {} with VRAM [{:#x}, {:#x}){}",
                    socket.display(),
                    info.vram_start,
                    info.vram_start + info.vram_size,
                    spec.display
                        .as_ref()
                        .map(|d| format!(", display {}", d.display()))
                        .unwrap_or_default()
                );
                table.guests.push(Arc::new(guest));
                // A guest restored from the state file is in it already; saving after each
                // restore would leave a file that lacks the guests not restored yet.
                let saved = match restore_at {
                    Some(_) => Ok(()),
                    None => self.save(table),
                };
                if let Err(e) = saved {
                    // Not recorded, so not added: a restart would not know it. Its QEMU may
                    // have written already, so it is taken down like a removed guest.
                    if let Some(guest) = table.guests.pop() {
                        if let Err(undo) = self.take_down(table, &guest) {
                            log::error!("undoing the guest on {}: {undo}", socket.display());
                        }
                    }
                    self.publish(table);
                    return Err(e.into());
                }
                self.publish(table);
                Ok(info)
            }
            Err(e) => {
                if let Err(undo) = table.gpu.remove_guest(&slice) {
                    log::error!("undoing the guest on {}: {undo}", socket.display());
                }
                self.publish(table);
                Err(e)
            }
        }
    }

    /// Binds the guest's sockets and starts its servers.
    fn start(
        &self,
        socket: &Path,
        display: Option<&Path>,
        slice: GuestSlice,
        presentation: PresentationOptions,
    ) -> Result<Guest, GuestError> {
        let function = PresentedFunction::for_guest_with(slice.clone(), presentation)?;
        let servers: GuestServers =
            guest_servers::<GuestError>(socket, display, function, &self.listen)?;
        let mut jobs = Vec::with_capacity(servers.jobs.len());
        for job in servers.jobs {
            match self.supervisor.spawn(job) {
                Ok(id) => jobs.push(id),
                Err(e) => {
                    self.stop_jobs(&jobs);
                    return Err(GuestError::Start(e.to_string()));
                }
            }
        }
        let (device, display_connected) = (servers.device, servers.display_connected);
        Ok(Guest {
            socket: socket.to_path_buf(),
            display: display.map(Path::to_path_buf),
            slice,
            device,
            display_connected,
            jobs,
        })
    }

    /// Stops `jobs` and waits for them (bounded).
    fn stop_jobs(&self, jobs: &[JobId]) {
        for &id in jobs {
            self.supervisor.retire(id);
        }
        for &id in jobs {
            if !self
                .supervisor
                .wait_ended(id, SHUTDOWN_GRACE + Duration::from_secs(1))
            {
                self.supervisor.abandon(id);
            }
        }
    }

    /// Removes the guest served on `socket` (see the module docs). Its servers are stopped
    /// and its slice scrubbed without the table lock (on hardware that takes minutes per
    /// GiB); the range is free again once scrubbed.
    pub fn remove(&self, socket: &Path, force: bool) -> Result<(), GuestError> {
        let (guest, taken, saved) = {
            let mut table = self.table.lock();
            if table.pending.iter().any(|p| p == socket) {
                return Err(GuestError::InProgress(socket.to_path_buf()));
            }
            let index = table
                .guests
                .iter()
                .position(|g| g.socket == socket)
                .ok_or_else(|| GuestError::NotFound(socket.to_path_buf()))?;
            if table.guests[index].is_connected() && !force {
                return Err(GuestError::Connected(socket.to_path_buf()));
            }
            let guest = table.guests.remove(index);
            // Its paths stay taken until its servers have stopped.
            table.pending.push(guest.socket.clone());
            table.pending.extend(guest.display.clone());
            // First of all: from here the old function reads ~0 and drops writes, and its
            // QEMU's mapping of the slice no longer reaches it. The range (and its BAR1
            // window) stay out of use until the servers are stopped and it is scrubbed.
            let taken = table.gpu.take_back_guest(&guest.slice);
            // Whatever that said, the old function reaches nothing any more.
            guest.slice.access().revoke();
            self.publish(&table);
            let saved = self.save(&table);
            (guest, taken, saved)
        };
        self.stop_jobs(&guest.jobs);
        let slice = guest.slice.slice();
        if let Err(e) = guest.slice.vram().scrub(slice.start(), slice.size()) {
            // Released anyway: the next guest of the range is scrubbed when it gets it.
            log::error!("scrubbing the slice of {}: {e}", socket.display());
        }
        let mut table = self.table.lock();
        table
            .pending
            .retain(|p| *p != guest.socket && Some(p) != guest.display.as_ref());
        match taken.and_then(|taken| table.gpu.release_taken(taken)) {
            Ok(()) => log::info!(
                "guest removed: {} (VRAM {slice} scrubbed and free)",
                socket.display()
            ),
            // The guest is gone either way; its slice is kept out of use.
            Err(e) => log::error!(
                "guest removed: {}, but VRAM {slice} stays out of use: {e}",
                socket.display()
            ),
        }
        self.publish(&table);
        saved.map_err(|source| {
            log::error!("the guest on {} is removed, but {source}", socket.display());
            GuestError::RemovedNotSaved {
                socket: socket.to_path_buf(),
                source,
            }
        })
    }

    /// Takes `guest` (no longer in the table) down: first of all its function reads ~0 and
    /// drops writes from now on, and its QEMU's mapping of the slice no longer reaches it;
    /// then its servers are stopped and its slice scrubbed. The range is not handed out
    /// again before it is scrubbed: the table stays locked. An error means the slice could
    /// not be taken back and stays out of use.
    fn take_down(&self, table: &mut Table, guest: &Guest) -> Result<(), SetupError> {
        let removed = table.gpu.remove_guest(&guest.slice);
        // Whatever that said, the old function reaches nothing any more.
        guest.slice.access().revoke();
        self.stop_jobs(&guest.jobs);
        let slice = guest.slice.slice();
        if let Err(e) = guest.slice.vram().scrub(slice.start(), slice.size()) {
            // Released anyway: the next guest of the range is scrubbed when it gets it.
            log::error!("scrubbing the slice of {}: {e}", guest.socket.display());
        }
        removed
    }

    /// The GPU, its free VRAM and every guest, as of the last change (never waits for an
    /// add or a removal in progress).
    pub fn report(&self) -> GpuReport {
        let listing = self.listing.read();
        let identity = self.host.identity();
        let mut free_ranges = Vec::new();
        let mut cursor = 0u64;
        for slice in &listing.assigned {
            if slice.start().raw() > cursor {
                free_ranges.push(FreeRange {
                    start: cursor,
                    size: slice.start().raw() - cursor,
                });
            }
            cursor = slice.end();
        }
        if listing.guest_area_end > cursor {
            free_ranges.push(FreeRange {
                start: cursor,
                size: listing.guest_area_end - cursor,
            });
        }
        let mut guests: Vec<GuestInfo> = listing.guests.iter().map(|g| g.info()).collect();
        guests.sort_by_key(|g| g.vram_start);
        GpuReport {
            name: identity.name.clone(),
            description: identity.description.clone(),
            vram_size: listing.vram_size,
            guest_area_end: listing.guest_area_end,
            free_bytes: listing.free_bytes,
            free_ranges,
            guests,
        }
    }
}

/// Whether `path` names something in `dir` or below (by their real directories, where
/// they exist).
fn is_inside(path: &Path, dir: &Path) -> bool {
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => real(p),
        _ => real(Path::new(".")),
    };
    parent.starts_with(real(dir))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    use super::*;
    use crate::host_gpu::HostGpu;
    use crate::slice::tests::SlowHost;
    use crate::vfio_user::ShutdownSignal;

    /// A scrub takes this long here, as a PRAMIN scrub of a few MiB does on hardware.
    const SCRUB: Duration = Duration::from_millis(1000);
    /// Each guest's VRAM.
    const SIZE: u64 = 4 << 20;

    /// `list` answers at once while an add or a removal scrubs (which on hardware takes
    /// minutes per GiB): it shows the table as of the last change, the range being scrubbed
    /// taken. Scrubs hold no lock: two adds scrub side by side.
    #[test]
    fn scrubs_hold_up_neither_list_nor_other_adds() {
        let host = Arc::new(SlowHost::tu102());
        let gpu = SlicedGpu::new(Arc::clone(&host) as Arc<dyn HostGpu>).unwrap();
        host.scrub_ms
            .store(SCRUB.as_millis() as u64, Ordering::SeqCst);
        let supervisor = Supervisor::new(ShutdownSignal::new().unwrap()).unwrap();
        let manager = GuestManager::new(gpu, supervisor.clone(), ListenOptions::default());
        let dir = std::env::temp_dir().join(format!("gpu-backend-guests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("g0.sock");
        let spec = GuestSpec {
            socket: Some(socket.clone()),
            ..GuestSpec::unnamed(SIZE)
        };
        let quick = |what: &str| {
            let asked = Instant::now();
            let report = manager.report();
            let took = asked.elapsed();
            assert!(took < SCRUB / 3, "list during {what} took {took:?}");
            report
        };
        let before = manager.report();
        std::thread::scope(|s| {
            let adding = s.spawn(|| manager.add(&spec));
            std::thread::sleep(SCRUB / 5);
            assert!(!adding.is_finished(), "the add should still be scrubbing");
            let during = quick("an add");
            assert!(during.guests.is_empty(), "{:?}", during.guests);
            assert_eq!(during.free_bytes, before.free_bytes - SIZE, "range taken");
            // The same paths are held for the guest being added, which cannot be removed
            // before it is there.
            assert!(matches!(manager.add(&spec), Err(GuestError::PathInUse(_))));
            assert!(matches!(
                manager.remove(&socket, true),
                Err(GuestError::InProgress(_))
            ));
            let added = adding.join().unwrap().unwrap();
            let after = quick("nothing");
            assert_eq!(after.guests.len(), 1);
            assert_eq!(after.free_bytes, before.free_bytes - added.vram_size);

            let removing = s.spawn(|| manager.remove(&socket, false));
            std::thread::sleep(SCRUB / 5);
            assert!(
                !removing.is_finished(),
                "the removal should still be scrubbing"
            );
            let during = quick("a removal");
            assert!(during.guests.is_empty(), "listed while being removed");
            assert_eq!(
                during.free_bytes, after.free_bytes,
                "not free before it is scrubbed"
            );
            // Its paths stay taken until its servers have stopped.
            assert!(matches!(manager.add(&spec), Err(GuestError::PathInUse(_))));
            removing.join().unwrap().unwrap();
            assert_eq!(quick("nothing").free_bytes, before.free_bytes);
        });

        // Two adds scrub side by side: together they take about one scrub, not two.
        let started = Instant::now();
        let specs: Vec<GuestSpec> = ["g1.sock", "g2.sock"]
            .iter()
            .map(|name| GuestSpec {
                socket: Some(dir.join(name)),
                ..GuestSpec::unnamed(SIZE)
            })
            .collect();
        std::thread::scope(|s| {
            let adds: Vec<_> = specs.iter().map(|g| s.spawn(|| manager.add(g))).collect();
            for add in adds {
                add.join().unwrap().unwrap();
            }
        });
        let took = started.elapsed();
        assert!(took < SCRUB * 3 / 2, "two adds took {took:?}");
        assert_eq!(manager.report().guests.len(), 2);
        host.scrub_ms.store(0, Ordering::SeqCst);
        for g in &specs {
            manager.remove(g.socket.as_deref().unwrap(), false).unwrap();
        }
        supervisor.shutdown().trigger();
        let _ = std::fs::remove_dir_all(dir);
    }
}
