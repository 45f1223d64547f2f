//! The presented GPU function as a vfio-user device: region and interrupt tables for the
//! server, accesses forwarded to the [`PresentedFunction`].
//!
//! A guest given the whole GPU lends its DMA maps to the GPU: each map the client adds is
//! handed to [`HostGpu::map_guest_dma`](crate::host_gpu::HostGpu::map_guest_dma) at its IOVA
//! ([`lent_dma::LentDmaMap`]), and taken back with `unmap_guest_dma` before the client's
//! unmap is answered (and before the map's memory goes away). A map the GPU refuses fails
//! the client's `DMA_MAP` with the GPU's errno, except `ENOTSUP` (a host that cannot lend
//! memory at all), which is logged once and leaves the map with the connection. A sliced
//! guest lends nothing: the GPU is the host's, so its maps are not even mmapped
//! ([`VfioUserDevice::maps_dma`]).

pub mod lent_dma;

#[cfg(test)]
mod lending_tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::host_gpu::guest_dma::GuestDmaMemory;
use crate::presentation::function::REGION_COUNT;
use crate::presentation::PresentedFunction;
use crate::vfio_user::device::{
    ClientDmaMap, ClientHandle, DeviceInfo, Errno, IrqInfo, RegionInfo, RegionMmap, SparseArea,
    VfioUserDevice,
};

use lent_dma::LentDmaMap;

/// VFIO interrupt indices of a PCI function.
pub mod irq_index {
    /// Legacy INTx.
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
    /// Error reporting.
    pub const ERR: u32 = 3;
    /// Device request (the host wants the device back).
    pub const REQ: u32 = 4;
    /// Number of interrupt types.
    pub const COUNT: u32 = 5;
}

/// A [`PresentedFunction`] served over vfio-user.
pub struct GpuDevice {
    function: PresentedFunction,
    client: Mutex<Option<ClientHandle>>,
    /// The client's DMA maps lent to the GPU: IOVA to size (a guest given the whole GPU).
    lent: Mutex<BTreeMap<u64, u64>>,
    /// The "host cannot lend guest memory" warning was logged.
    lend_unsupported_logged: AtomicBool,
}

impl GpuDevice {
    /// Whether a client is connected (between `client_connected` and
    /// `client_disconnected`).
    pub fn is_connected(&self) -> bool {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Serves `function`.
    pub fn new(function: PresentedFunction) -> Self {
        GpuDevice {
            function,
            client: Mutex::new(None),
            lent: Mutex::new(BTreeMap::new()),
            lend_unsupported_logged: AtomicBool::new(false),
        }
    }

    /// The client's DMA maps currently lent to the GPU, as (IOVA, size).
    pub fn lent_dma_maps(&self) -> Vec<(u64, u64)> {
        self.lent_maps()
            .iter()
            .map(|(&iova, &size)| (iova, size))
            .collect()
    }

    fn lent_maps(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u64>> {
        self.lent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the map at `iova` back from the GPU, if it was lent.
    fn take_back(&self, iova: u64) {
        if self.lent_maps().remove(&iova).is_some() {
            self.function.host().unmap_guest_dma(iova);
            log::debug!("DMA map at {iova:#x} taken back from the GPU");
        }
    }

    /// The function being served.
    pub fn function(&self) -> &PresentedFunction {
        &self.function
    }

    /// The connected client, if any: raise interrupts and reach guest memory through it.
    pub fn client(&self) -> Option<ClientHandle> {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl VfioUserDevice for GpuDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            num_regions: REGION_COUNT,
            num_irqs: irq_index::COUNT,
            resettable: true,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        if index >= REGION_COUNT {
            return None;
        }
        let size = self.function.region_size(index);
        let present = size != 0;
        let mmap = self.function.bar(index).and_then(|bar| {
            let (area, source) = bar.mappable()?;
            Some(RegionMmap {
                fd: Arc::clone(&source.fd),
                file_offset: source.file_offset,
                sparse_areas: vec![SparseArea {
                    offset: area.offset,
                    size: area.size,
                }],
            })
        });
        Some(RegionInfo {
            size,
            readable: present,
            writable: present,
            mmap,
        })
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let msix_vectors = self
            .function
            .msix()
            .map_or(0, |msix| u32::from(msix.vectors));
        let (count, maskable, automasked, noresize) = match index {
            irq_index::INTX => (1, true, true, false),
            irq_index::MSI => (1, false, false, true),
            irq_index::MSIX => (msix_vectors, true, false, false),
            irq_index::ERR | irq_index::REQ => (1, false, false, false),
            _ => return None,
        };
        Some(IrqInfo {
            count,
            eventfd: true,
            maskable,
            automasked,
            noresize,
        })
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        self.function
            .region_read(index, offset, buf)
            .map_err(|e| Errno(e.errno()))
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        self.function
            .region_write(index, offset, data)
            .map_err(|e| Errno(e.errno()))
    }

    fn reset(&self) -> Result<(), Errno> {
        self.function.reset().map_err(|e| Errno(e.errno()))
    }

    fn client_connected(&self, client: ClientHandle) {
        log::info!("client connected to {}", self.function.identity().name);
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
    }

    fn client_disconnected(&self) {
        let guest = self.function.guest();
        let what = if guest.access().is_revoked() {
            "the guest was removed, its slice is being scrubbed"
        } else {
            "device state and VRAM kept"
        };
        log::info!(
            "client disconnected from {} slice {}; {what}",
            self.function.identity().name,
            guest.slice()
        );
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // Every map was taken back as it was removed; make sure nothing outlives the client.
        let left: Vec<u64> = self.lent_maps().keys().copied().collect();
        for iova in left {
            self.take_back(iova);
        }
    }

    /// Only a guest given the whole GPU lends its memory to the GPU; a sliced guest's maps
    /// are recorded without being mapped (nothing here reaches its memory).
    fn maps_dma(&self) -> bool {
        self.function.guest().is_whole_gpu()
    }

    fn dma_mapped(&self, map: ClientDmaMap) -> Result<(), Errno> {
        if !self.function.guest().is_whole_gpu() {
            return Ok(());
        }
        let (iova, size) = (map.iova(), map.size());
        let memory: Arc<dyn GuestDmaMemory> = Arc::new(LentDmaMap::new(map));
        match self.function.host().map_guest_dma(iova, memory) {
            Ok(()) => {
                self.lent_maps().insert(iova, size);
                log::debug!("DMA map [{iova:#x}, +{size:#x}) lent to the GPU");
                Ok(())
            }
            Err(e) if e.errno() == libc::ENOTSUP => {
                if !self.lend_unsupported_logged.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "{} cannot lend guest memory to the GPU ({e}): the guest's DMA maps \
                         stay with the connection and the GPU cannot reach them",
                        self.function.identity().name
                    );
                }
                Ok(())
            }
            Err(e) => {
                log::warn!("the GPU refused DMA map [{iova:#x}, +{size:#x}): {e}");
                Err(Errno(e.errno()))
            }
        }
    }

    fn dma_unmapped(&self, iova: u64, _size: u64) {
        self.take_back(iova);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::host_driver::addr::MIB;
    use crate::host_gpu::emulated::EmulatedHostGpu;
    use crate::host_gpu::HostGpu;
    use crate::presentation::function::CONFIG_REGION_INDEX;
    use crate::slice::SlicedGpu;
    use crate::vfio_user::test_client::TestClient;
    use crate::vfio_user::{serve_stream, Server, ServerConfig, ShutdownSignal};

    const WINDOW: u64 = 0x1700;
    const APERTURE: u64 = 0x70_0000;

    /// Two guests on an emulated TU102; the device of the second (8 MiB at 4 MiB).
    fn sliced_device() -> (Arc<EmulatedHostGpu>, SlicedGpu, Arc<GpuDevice>) {
        let gpu = Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap());
        let host: Arc<dyn HostGpu> = gpu.clone();
        let mut sliced = SlicedGpu::new(host).unwrap();
        sliced.add_guest(4 * MIB).unwrap();
        let guest = sliced.add_guest(8 * MIB).unwrap();
        let device = Arc::new(GpuDevice::new(PresentedFunction::for_guest(guest).unwrap()));
        (gpu, sliced, device)
    }

    fn vram(gpu: &EmulatedHostGpu, addr: u64) -> u32 {
        gpu.emulated()
            .vram()
            .read_u32(gpu_emulation::VramAddr::new(addr))
            .unwrap()
    }

    #[test]
    fn posted_window_moves_are_ordered_before_aperture_accesses() {
        let (gpu, _sliced, device) = sliced_device();
        let (a, b) = UnixStream::pair().unwrap();
        let dev: Arc<dyn VfioUserDevice> = device.clone();
        let server =
            std::thread::spawn(move || serve_stream(b, dev, ServerConfig::default(), None));
        let mut client = TestClient::new(a);
        client.version().unwrap();
        // QEMU posts BAR writes: each window move is followed at once by a posted aperture
        // write that must land under the new window.
        for i in 0..128u32 {
            client
                .region_write(0, WINDOW, &i.to_le_bytes(), true)
                .unwrap();
            client
                .region_write(
                    0,
                    APERTURE + 4 * u64::from(i),
                    &(0xC0DE_0000 | i).to_le_bytes(),
                    true,
                )
                .unwrap();
        }
        // Posted move, then a read under the new window (in reverse order of the writes).
        for i in (0..128u32).rev() {
            client
                .region_write(0, WINDOW, &i.to_le_bytes(), true)
                .unwrap();
            let back = client
                .region_read(0, APERTURE + 4 * u64::from(i), 4)
                .unwrap();
            assert_eq!(back, (0xC0DE_0000 | i).to_le_bytes(), "window {i}");
        }
        // WRITE_MULTI: move and write in one posted message, applied in order.
        client
            .region_write_multi(
                &[
                    (0, WINDOW, &5u32.to_le_bytes()),
                    (0, APERTURE + 0x10, &0xFEED_0005u32.to_le_bytes()),
                    (0, WINDOW, &6u32.to_le_bytes()),
                    (0, APERTURE + 0x10, &0xFEED_0006u32.to_le_bytes()),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            client.region_read(0, WINDOW, 4).unwrap(),
            6u32.to_le_bytes()
        );
        drop(client);
        server.join().unwrap().unwrap();
        // Host VRAM: guest address i * 64 KiB + 4i lives at 4 MiB + that.
        for i in 0..128u64 {
            assert_eq!(
                vram(&gpu, 4 * MIB + (i << 16) + 4 * i),
                0xC0DE_0000 | i as u32
            );
        }
        assert_eq!(vram(&gpu, 4 * MIB + (5 << 16) + 0x10), 0xFEED_0005);
        assert_eq!(vram(&gpu, 4 * MIB + (6 << 16) + 0x10), 0xFEED_0006);
        assert_eq!(device.function().trap_stats().aperture_bytes_refused, 0);
    }

    #[test]
    fn the_same_guest_reconnecting_keeps_its_vram() {
        let (gpu, _sliced, device) = sliced_device();
        let dir = std::env::temp_dir().join(format!("gpu-device-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("reconnect.sock");
        let server = Server::bind(&path, 0o600).unwrap();
        let shutdown = ShutdownSignal::new().unwrap();
        let stop = shutdown.clone();
        let dev: Arc<dyn VfioUserDevice> = device.clone();
        let thread = std::thread::spawn(move || server.serve(dev, stop));

        let connect = || {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let mut client = TestClient::connect(&path).unwrap();
                client.set_reply_timeout(Duration::from_secs(2));
                match client.version() {
                    Ok(_) => return client,
                    // Refused while the previous connection is still being torn down.
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => panic!("cannot reconnect: {e}"),
                }
            }
        };
        let pattern: Vec<u8> = (0..64u8).collect();
        let mut first = connect();
        first.region_write(1, 0x2000, &pattern, false).unwrap();
        first
            .region_write(0, WINDOW, &1u32.to_le_bytes(), true)
            .unwrap();
        first
            .region_write(0, APERTURE + 8, &0xABCD_0123u32.to_le_bytes(), false)
            .unwrap();
        drop(first);
        let mut second = connect();
        assert_eq!(second.region_read(1, 0x2000, 64).unwrap(), pattern);
        second
            .region_write(0, WINDOW, &1u32.to_le_bytes(), true)
            .unwrap();
        assert_eq!(
            second.region_read(0, APERTURE + 8, 4).unwrap(),
            0xABCD_0123u32.to_le_bytes()
        );
        drop(second);
        shutdown.trigger();
        thread.join().unwrap().unwrap();
        assert_eq!(vram(&gpu, 4 * MIB + 0x2000), 0x0302_0100);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Guest A's VRAM BAR fd holds A's slice and nothing else: a compromised QEMU of A
    /// that maps all of it (at any offset it can) reaches neither B nor the host VRAM.
    #[test]
    fn a_sliced_guests_vram_fd_holds_only_its_slice() {
        use std::os::fd::AsRawFd;
        let gpu = Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap());
        let host: Arc<dyn HostGpu> = gpu.clone();
        let mut sliced = SlicedGpu::new(host).unwrap();
        let a = sliced.add_guest(4 * MIB).unwrap();
        let b = sliced.add_guest(8 * MIB).unwrap();
        let (a_start, b_start) = (a.slice().start().raw(), b.slice().start().raw());
        assert_eq!((a_start, b_start), (0, 4 * MIB));
        let device_a = Arc::new(GpuDevice::new(PresentedFunction::for_guest(a).unwrap()));
        let device_b = Arc::new(GpuDevice::new(PresentedFunction::for_guest(b).unwrap()));
        let emu = gpu.emulated().vram();
        emu.write_u32(gpu_emulation::VramAddr::new(b_start + 0x100), 0xB0B0_B0B0)
            .unwrap();

        let (s, t) = UnixStream::pair().unwrap();
        let dev: Arc<dyn VfioUserDevice> = device_a.clone();
        let server =
            std::thread::spawn(move || serve_stream(t, dev, ServerConfig::default(), None));
        let mut client = TestClient::new(s);
        client.version().unwrap();
        let (small, _, _) = client.region_info(1, 32).unwrap();
        let (info, _, fd) = client.region_info(1, small.argsz).unwrap();
        let fd = fd.expect("VRAM fd of guest A");
        assert_eq!(info.offset, 0, "file offset of A's VRAM BAR");
        let file = std::fs::File::from(fd.try_clone().unwrap());
        assert_eq!(
            file.metadata().unwrap().len(),
            4 * MIB,
            "fd size = A's slice"
        );
        // The fd is not the whole-VRAM memfd.
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert!(
            link.to_string_lossy().contains("gpu-emulation-vram-slice"),
            "{link:?}"
        );
        // Mapping past the slice fails; mapping all of it reaches A's VRAM only.
        let map = |offset: u64, len: u64| {
            // SAFETY: a fresh shared mapping of an fd we hold; only accessed by raw pointer
            // within `len` and unmapped below.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    offset as libc::off_t,
                )
            }
        };
        let whole = map(0, 4 * MIB);
        assert_ne!(whole, libc::MAP_FAILED);
        let beyond = map(4 * MIB, 0x1000);
        if beyond != libc::MAP_FAILED {
            // Mapping past the end of a file may succeed; touching it must not reach B
            // (SIGBUS), so only check there is no data to see via the file size above.
            // SAFETY: unmapping what was just mapped.
            unsafe { libc::munmap(beyond, 0x1000) };
        }
        let p = whole.cast::<u32>();
        // SAFETY: within the 4 MiB mapping above.
        unsafe {
            std::ptr::write_volatile(p.add(0x40), 0xA0A0_0001);
            std::ptr::write_volatile(p.add((4 * MIB / 4 - 1) as usize), 0xA0A0_0002);
            // Nothing of B is visible anywhere in the mapping.
            let all = std::slice::from_raw_parts(p.cast::<u8>(), (4 * MIB) as usize);
            assert!(!all.windows(4).any(|w| w == 0xB0B0_B0B0u32.to_le_bytes()));
        }
        // Host VRAM: the writes landed in A's slice, at the slice offsets.
        assert_eq!(vram(&gpu, a_start + 0x100), 0xA0A0_0001);
        assert_eq!(vram(&gpu, a_start + 4 * MIB - 4), 0xA0A0_0002);
        assert_eq!(vram(&gpu, b_start + 0x100), 0xB0B0_B0B0);
        assert_eq!(vram(&gpu, b_start), 0, "B untouched");
        // Guest A reads them back over the socket; B sees none of it.
        assert_eq!(
            client.region_read(1, 0x100, 4).unwrap(),
            0xA0A0_0001u32.to_le_bytes()
        );
        assert_eq!(
            client.region_read(1, 4 * MIB - 4, 4).unwrap(),
            0xA0A0_0002u32.to_le_bytes()
        );
        let mut buf = [0u8; 4];
        device_b.function().region_read(1, 0x100, &mut buf).unwrap();
        assert_eq!(buf, 0xB0B0_B0B0u32.to_le_bytes());
        device_b
            .function()
            .region_read(1, 4 * MIB - 4, &mut buf)
            .unwrap();
        assert_eq!(buf, [0; 4]);
        // B's own fd is another one, of B's size; asking again gives the same fd.
        let b_info = device_b.region_info(1).unwrap().mmap.unwrap();
        assert_eq!(b_info.file_offset, 0);
        let b_file = std::fs::File::from(b_info.fd.try_clone().unwrap());
        assert_eq!(b_file.metadata().unwrap().len(), 8 * MIB);
        let again = device_b.region_info(1).unwrap().mmap.unwrap();
        assert!(Arc::ptr_eq(&b_info.fd, &again.fd));
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(whole, (4 * MIB) as usize) };
        drop(client);
        server.join().unwrap().unwrap();
    }

    fn device(profile: &str) -> GpuDevice {
        let host = Arc::new(EmulatedHostGpu::by_name(profile).unwrap());
        GpuDevice::new(PresentedFunction::new(host).unwrap())
    }

    #[test]
    fn tables_satisfy_qemu_minimums() {
        let dev = device("gh200-96g");
        let info = dev.device_info();
        assert!(info.num_regions > CONFIG_REGION_INDEX && info.num_irqs > irq_index::MSIX);
        assert_eq!(dev.region_info(CONFIG_REGION_INDEX).unwrap().size, 4096);
        assert!(dev.region_info(REGION_COUNT).is_none());
        assert_eq!(dev.irq_info(irq_index::MSIX).unwrap().count, 16);
        assert!(dev.irq_info(irq_index::COUNT).is_none());
    }

    #[test]
    fn vram_region_offers_only_its_real_part_for_mmap() {
        let dev = device("gh200-96g");
        let info = dev.region_info(4).unwrap();
        assert_eq!(info.size, 128 << 30);
        let mmap = info.mmap.unwrap();
        assert_eq!(
            mmap.sparse_areas,
            vec![SparseArea {
                offset: 0,
                size: 95 << 30
            }]
        );
        // BAR0 is all registers: nothing to map. Absent slots are empty.
        assert!(dev.region_info(0).unwrap().mmap.is_none());
        assert_eq!(dev.region_info(1).unwrap().size, 0);
        assert_eq!(dev.region_info(6).unwrap().size, 0);
    }
}
