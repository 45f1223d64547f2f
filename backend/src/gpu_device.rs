//! The presented GPU function as a vfio-user device: region and interrupt tables for the
//! server, accesses forwarded to the [`PresentedFunction`].

use std::sync::{Arc, Mutex};

use crate::presentation::function::REGION_COUNT;
use crate::presentation::PresentedFunction;
use crate::vfio_user::device::{
    ClientHandle, DeviceInfo, Errno, IrqInfo, RegionInfo, RegionMmap, SparseArea, VfioUserDevice,
};

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
}

impl GpuDevice {
    /// Serves `function`.
    pub fn new(function: PresentedFunction) -> Self {
        GpuDevice {
            function,
            client: Mutex::new(None),
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
        let msix_vectors = u32::from(self.function.msix().vectors);
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
        log::info!(
            "client disconnected from {}; device state and VRAM kept",
            self.function.identity().name
        );
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_gpu::emulated::EmulatedHostGpu;
    use crate::presentation::function::CONFIG_REGION_INDEX;

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
