//! `gpu-backend serve`: present the GPU over vfio-user until SIGTERM or SIGINT, whole to
//! one guest ([`serve`]) or sliced between several guests, each on its own socket and
//! thread ([`present_guests`] + [`serve_functions`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use thiserror::Error;

use crate::gpu_device::GpuDevice;
use crate::host_gpu::HostGpu;
use crate::presentation::{
    FunctionLayout, PresentationError, PresentationOptions, PresentedFunction,
};
use crate::slice::{GuestSpec, HandOut, SetupError, SlicedGpu};
use crate::vfio_user::shutdown::ShutdownError;
use crate::vfio_user::{Server, ServerConfig, ServerError, ShutdownSignal};

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
    /// A guest has no socket to be served on.
    #[error("guest {0} has no socket")]
    NoSocket(usize),
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
}

impl ServeError {
    /// Whether the error is the command line's fault (bad sizes, duplicate sockets).
    pub fn is_bad_request(&self) -> bool {
        match self {
            ServeError::Setup(e) => e.is_bad_request(),
            ServeError::DuplicateSocket(_) | ServeError::NoSocket(_) => true,
            _ => false,
        }
    }
}

/// What to serve and where.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Socket path QEMU connects to.
    pub socket: PathBuf,
    /// File mode of the socket (0o600 unless widened).
    pub socket_mode: u32,
    /// Limits and tuning of the vfio-user connections.
    pub server_config: ServerConfig,
    /// Offer no VRAM BAR for mmap: every VRAM access is trapped, so a guest that switches
    /// BAR1 to virtual mode gets its accesses translated (see
    /// [`PresentationOptions::trap_vram`]).
    pub trap_vram: bool,
}

/// Serves `host` whole to one guest on `options.socket` until SIGTERM or SIGINT; the socket
/// file is removed on the way out.
pub fn serve(host: Arc<dyn HostGpu>, options: &ServeOptions) -> Result<(), ServeError> {
    let presentation = PresentationOptions {
        trap_vram: options.trap_vram,
        handout: HandOut::Scrubbed,
    };
    let function = PresentedFunction::new_with(host, presentation)?;
    serve_functions(
        vec![(options.socket.clone(), function)],
        options.socket_mode,
        options.server_config,
    )
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
        functions.push(PresentedFunction::for_guest(guest)?);
    }
    Ok((gpu, functions))
}

/// Serves each function on its socket, each server on its own thread, until SIGTERM or
/// SIGINT (or until a server fails, which stops them all). Every socket is bound before
/// any is served, so a bad path fails the whole command; socket files are removed on the
/// way out.
pub fn serve_functions(
    functions: Vec<(PathBuf, PresentedFunction)>,
    socket_mode: u32,
    server_config: ServerConfig,
) -> Result<(), ServeError> {
    for (i, (socket, _)) in functions.iter().enumerate() {
        if functions[..i].iter().any(|(other, _)| other == socket) {
            return Err(ServeError::DuplicateSocket(socket.clone()));
        }
    }
    let mut servers = Vec::with_capacity(functions.len());
    for (socket, function) in functions {
        log_layout(&FunctionLayout::of(&function));
        let server = Server::bind(&socket, socket_mode)?.with_config(server_config);
        log::info!(
            "serving {} slice {} on {} (mode {:o})",
            function.identity().name,
            function.guest().slice(),
            socket.display(),
            socket_mode
        );
        servers.push((server, Arc::new(GpuDevice::new(function))));
    }

    let shutdown = ShutdownSignal::new()?;
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(ServeError::Signals)?;
    let signal_handle = signals.handle();
    let on_signal = shutdown.clone();
    let signal_thread = thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                log::info!("signal {signal} received: shutting down");
                on_signal.trigger();
            }
        })
        .map_err(ServeError::Signals)?;

    let hosts: Vec<Arc<dyn HostGpu>> = servers
        .iter()
        .map(|(_, device)| Arc::clone(device.function().host()))
        .collect();
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = spawn_watchdog(hosts, shutdown.clone(), Arc::clone(&lost))?;

    let mut threads = Vec::with_capacity(servers.len());
    let mut result = Ok(());
    for (i, (server, device)) in servers.into_iter().enumerate() {
        let stop = shutdown.clone();
        let spawned = thread::Builder::new()
            .name(format!("vfio-user-{i}"))
            .spawn(move || {
                let result = server.serve(device, stop.clone());
                drop(server); // removes the socket file
                if result.is_err() {
                    stop.trigger();
                }
                result
            });
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                shutdown.trigger();
                result = Err(ServeError::Thread(e));
                break;
            }
        }
    }
    for handle in threads {
        let served = handle.join().unwrap_or_else(|_| {
            Err(ServerError::Listener(std::io::Error::other(
                "server thread panicked",
            )))
        });
        if let (true, Err(e)) = (result.is_ok(), served) {
            result = Err(e.into());
        }
    }
    shutdown.trigger();
    signal_handle.close();
    let _ = signal_thread.join();
    let _ = watchdog.join();
    log::info!("stopped");
    if result.is_ok() && lost.load(std::sync::atomic::Ordering::Acquire) {
        return Err(ServeError::DeviceLost);
    }
    result
}

/// How often the watchdog asks the GPU whether it still answers.
const WATCHDOG_PERIOD: std::time::Duration = std::time::Duration::from_millis(200);

/// Watches the GPU behind the served functions: once one is lost (it stopped answering;
/// every access of its guests already fails at once with ENODEV), it stops serving every
/// guest and sets `lost`. Ends when `shutdown` is triggered.
fn spawn_watchdog(
    hosts: Vec<Arc<dyn HostGpu>>,
    shutdown: ShutdownSignal,
    lost: Arc<std::sync::atomic::AtomicBool>,
) -> Result<thread::JoinHandle<()>, ServeError> {
    thread::Builder::new()
        .name("gpu-watchdog".into())
        .spawn(move || {
            while !shutdown.is_triggered() {
                if let Some(host) = hosts.iter().find(|h| h.is_lost()) {
                    log::error!(
                        "GPU {} stopped answering: no longer serving it (its guests are \
                         disconnected)",
                        host.identity().name
                    );
                    lost.store(true, std::sync::atomic::Ordering::Release);
                    shutdown.trigger();
                    return;
                }
                thread::sleep(WATCHDOG_PERIOD);
            }
        })
        .map_err(ServeError::Thread)
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
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use crate::host_driver::addr::VramAddr;
    use crate::host_gpu::emulated::EmulatedHostGpu;
    use crate::host_gpu::{AccessWidth, ChipIdentity, HostGpuError, HostMemory, MmapSource};

    /// The emulated GPU, with a switch that makes it "stop answering".
    struct Unplugged {
        inner: EmulatedHostGpu,
        lost: AtomicBool,
    }

    impl HostGpu for Unplugged {
        fn identity(&self) -> &ChipIdentity {
            self.inner.identity()
        }
        fn is_lost(&self) -> bool {
            self.lost.load(Ordering::Acquire)
        }
        fn bar0_read(&self, offset: u64, width: AccessWidth) -> Result<u64, HostGpuError> {
            self.inner.bar0_read(offset, width)
        }
        fn bar0_write(
            &self,
            offset: u64,
            width: AccessWidth,
            value: u64,
        ) -> Result<(), HostGpuError> {
            self.inner.bar0_write(offset, width, value)
        }
        fn memory_bar(&self, index: u8) -> Option<Arc<dyn HostMemory>> {
            self.inner.memory_bar(index)
        }
        fn reset(&self) -> Result<(), HostGpuError> {
            self.inner.reset()
        }
        fn scrub_vram(&self, addr: VramAddr, len: u64) -> Result<(), HostGpuError> {
            self.inner.scrub_vram(addr, len)
        }
        fn bar1_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
            self.inner.bar1_read(offset, buf)
        }
        fn bar1_write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
            self.inner.bar1_write(offset, data)
        }
        fn vram_mmap_source(&self, addr: VramAddr, len: u64) -> Option<MmapSource> {
            self.inner.vram_mmap_source(addr, len)
        }
    }

    #[test]
    fn a_gpu_that_stops_answering_stops_being_served() {
        let host = Arc::new(Unplugged {
            inner: EmulatedHostGpu::by_name("tu102-24g").unwrap(),
            lost: AtomicBool::new(false),
        });
        let function = PresentedFunction::new(Arc::clone(&host) as Arc<dyn HostGpu>).unwrap();
        let socket = std::env::temp_dir().join(format!("watchdog-{}.sock", std::process::id()));
        let served = {
            let socket = socket.clone();
            thread::spawn(move || {
                serve_functions(vec![(socket, function)], 0o600, ServerConfig::default())
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "socket never appeared");
            thread::sleep(Duration::from_millis(10));
        }
        let unplugged = Instant::now();
        host.lost.store(true, Ordering::Release);
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
