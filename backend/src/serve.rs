//! `gpu-backend serve`: present the GPU over vfio-user until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use thiserror::Error;

use crate::gpu_device::GpuDevice;
use crate::host_gpu::HostGpu;
use crate::presentation::{FunctionLayout, PresentationError, PresentedFunction};
use crate::vfio_user::shutdown::ShutdownError;
use crate::vfio_user::{Server, ServerError, ShutdownSignal};

/// Errors of serving.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The GPU cannot be presented.
    #[error("cannot present the GPU: {0}")]
    Presentation(#[from] PresentationError),
    /// The socket could not be set up or the server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The shutdown signal could not be created.
    #[error(transparent)]
    Shutdown(#[from] ShutdownError),
    /// Signal handlers could not be installed.
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// What to serve and where.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Socket path QEMU connects to.
    pub socket: PathBuf,
    /// File mode of the socket (0o600 unless widened).
    pub socket_mode: u32,
}

/// Serves `host` on `options.socket` until SIGTERM or SIGINT; the socket file is removed on
/// the way out.
pub fn serve(host: Arc<dyn HostGpu>, options: &ServeOptions) -> Result<(), ServeError> {
    let function = PresentedFunction::new(host)?;
    log_layout(&FunctionLayout::of(&function));
    let device = Arc::new(GpuDevice::new(function));

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

    let server = Server::bind(&options.socket, options.socket_mode)?;
    log::info!(
        "serving {} on {} (mode {:o})",
        device.function().identity().name,
        options.socket.display(),
        options.socket_mode
    );
    let result = server.serve(device, shutdown.clone());
    drop(server); // removes the socket file
    shutdown.trigger();
    signal_handle.close();
    let _ = signal_thread.join();
    log::info!("stopped");
    Ok(result?)
}

fn log_layout(layout: &FunctionLayout) {
    log::info!(
        "{} ({}): {:04x}:{:04x}",
        layout.chip.name,
        layout.chip.description,
        layout.pci.vendor_id,
        layout.pci.device_id
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
