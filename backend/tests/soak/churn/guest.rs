//! One guest of the churn soak as QEMU would hold it: its presented function served over an
//! in-process vfio-user connection, its mapping of the VRAM BAR's memfd, its DMA memory, and
//! the model of what it should see. A removed guest keeps all of it (a QEMU that was not
//! told, or ignores it) until the soak drops it.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use gpu_backend::gpu_device::GpuDevice;
use gpu_backend::host_gpu::HostBarRole;
use gpu_backend::presentation::function::CONFIG_REGION_INDEX;
use gpu_backend::presentation::PresentedFunction;
use gpu_backend::slice::GuestSlice;
use gpu_backend::vfio_user::test_client::{ClientError, TestClient};
use gpu_backend::vfio_user::{serve_stream, ServerConfig, VfioUserDevice};

use crate::support::mapping::Mapping;

use super::dma::GuestDma;
use super::model::{GuestModel, WindowLayout};

/// An in-process vfio-user connection to a guest's device: the client end and the thread
/// serving the other end.
pub struct Connection {
    /// The client (QEMU's side).
    pub client: TestClient,
    server: JoinHandle<Result<(), String>>,
}

impl Connection {
    /// Connects to `device` and negotiates the version.
    pub fn open(device: &Arc<GpuDevice>) -> Result<Connection, String> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
        let dev: Arc<dyn VfioUserDevice> = device.clone();
        let server = std::thread::Builder::new()
            .name("churn-server".into())
            .spawn(move || {
                serve_stream(theirs, dev, ServerConfig::default(), None)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| e.to_string())?;
        let mut client = TestClient::new(ours);
        client.version().map_err(|e| format!("VERSION: {e}"))?;
        Ok(Connection { client, server })
    }

    /// Hangs up and waits for the server side to end cleanly.
    pub fn close(self) -> Result<(), String> {
        drop(self.client);
        self.server
            .join()
            .map_err(|_| "the connection thread panicked".to_string())?
            .map_err(|e| format!("the connection ended with {e}"))
    }
}

/// The errno of a client error, if the server answered with one.
pub fn errno_of(error: &ClientError) -> Option<i32> {
    match error {
        ClientError::Errno(e) => Some(e.0),
        _ => None,
    }
}

/// The inode of `fd`.
pub fn inode(fd: &OwnedFd) -> Result<u64, String> {
    let file = std::fs::File::from(fd.as_fd().try_clone_to_owned().map_err(|e| e.to_string())?);
    Ok(file.metadata().map_err(|e| e.to_string())?.ino())
}

/// One guest: what the backend gave it and what QEMU holds.
pub struct Guest {
    /// Incarnation number (counts every guest added in this run).
    pub number: u64,
    /// The byte this guest writes among its data, and nobody else does.
    pub marker: u8,
    /// The guest's slice handle (revoked once removed).
    pub slice: GuestSlice,
    /// The device served over `connection`.
    pub device: Arc<GpuDevice>,
    /// QEMU's connection.
    pub connection: Option<Connection>,
    /// Region index of the VRAM BAR.
    pub vram_bar: u32,
    /// Presented size of the VRAM BAR.
    pub presented: u64,
    /// QEMU's mapping of the VRAM BAR's memfd.
    pub mapping: Mapping,
    /// Inode of the memfd behind `mapping`.
    pub memfd_inode: u64,
    /// DMA memory and expected maps.
    pub dma: GuestDma,
    /// What the guest should see.
    pub model: GuestModel,
    /// Posted messages were sent since the last answered one.
    unsynced: bool,
}

impl Guest {
    /// Presents `slice`, connects to it and maps its VRAM BAR.
    pub fn new(number: u64, marker: u8, slice: GuestSlice, seed: u64) -> Result<Guest, String> {
        let size = slice.slice().size();
        let function =
            PresentedFunction::for_guest(slice.clone()).map_err(|e| format!("present: {e}"))?;
        let layout = WindowLayout::of(function.identity().generation);
        let bar = function
            .bars()
            .iter()
            .find(|b| b.role() == HostBarRole::Vram { vram_offset: 0 })
            .ok_or("no VRAM BAR")?;
        let (vram_bar, presented) = (u32::from(bar.index()), bar.presented_size());
        if bar.real_size() != size {
            return Err(format!(
                "VRAM BAR of {:#x} real bytes for a {size:#x}-byte slice",
                bar.real_size()
            ));
        }
        let (area, source) = bar.mappable().ok_or("the VRAM BAR is not mappable")?;
        if (area.offset, area.size) != (0, size) {
            return Err(format!("mappable area {area:?} for a {size:#x}-byte slice"));
        }
        let mapping = Mapping::new(&source.fd, source.file_offset, size)?;
        let memfd_inode = inode(&source.fd)?;
        let device = Arc::new(GpuDevice::new(function));
        let connection = Connection::open(&device)?;
        Ok(Guest {
            number,
            marker,
            slice,
            device,
            connection: Some(connection),
            vram_bar,
            presented,
            mapping,
            memfd_inode,
            dma: GuestDma::new(seed)?,
            model: GuestModel::new(size, layout),
            unsynced: false,
        })
    }

    /// The presented function.
    pub fn function(&self) -> &PresentedFunction {
        self.device.function()
    }

    /// The client end of the connection.
    pub fn client(&mut self) -> Result<&mut TestClient, String> {
        self.connection
            .as_mut()
            .map(|c| &mut c.client)
            .ok_or_else(|| "the guest has no connection".to_string())
    }

    /// Notes that a posted message went out: its effect is certain only once a later
    /// message on the connection was answered.
    pub fn posted(&mut self) {
        self.unsynced = true;
    }

    /// Waits until every posted message was handled (one answered request), before an
    /// access that does not go through the connection, or a look at host VRAM.
    pub fn sync(&mut self) -> Result<(), String> {
        if self.unsynced {
            self.client()?
                .region_read(CONFIG_REGION_INDEX, 0, 4)
                .map_err(|e| format!("sync after posted writes: {e}"))?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Hangs up and connects again: the guest keeps its VRAM and its memfd, and the new
    /// connection holds no DMA map.
    pub fn reconnect(&mut self) -> Result<(), String> {
        self.sync()?;
        if let Some(c) = self.connection.take() {
            c.close()?;
        }
        self.dma.forget_all();
        self.connection = Some(Connection::open(&self.device)?);
        if self.model.live {
            let bar = self
                .function()
                .bar(self.vram_bar)
                .ok_or("the VRAM BAR went away")?;
            let (_, source) = bar.mappable().ok_or("the VRAM BAR is no longer mappable")?;
            let now = inode(&source.fd)?;
            if now != self.memfd_inode {
                return Err(format!(
                    "the same guest got another memfd on reconnecting (inode {} -> {now})",
                    self.memfd_inode
                ));
            }
        }
        Ok(())
    }

    /// Hangs up for good.
    pub fn close(mut self) -> Result<(), String> {
        match self.connection.take() {
            Some(c) => c.close(),
            None => Ok(()),
        }
    }
}
