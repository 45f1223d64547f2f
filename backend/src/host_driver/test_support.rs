//! Test helpers: a [`HostGpu`] over the emulated GPU with faults switched on: bits of one
//! register stuck on or off, or the whole device "unplugged" (it reports itself lost).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::host_driver::addr::VramAddr;
use crate::host_gpu::dma::DmaBuffer;
use crate::host_gpu::emulated::EmulatedHostGpu;
use crate::host_gpu::{AccessWidth, ChipIdentity, HostGpu, HostGpuError, HostMemory, MmapSource};

/// The emulated GPU, except that reads of the dword at `offset` have `set` bits forced on
/// (e.g. a TRIGGER or PENDING bit that never clears) and `clear` bits forced off (e.g. a
/// HALTED bit that never comes), while the fault is switched on.
pub struct StuckRegister {
    inner: EmulatedHostGpu,
    offset: u64,
    set: u64,
    clear: u64,
    stuck: AtomicBool,
    lost: AtomicBool,
}

impl StuckRegister {
    /// The profile `name` with `bits` stuck on at `offset`.
    pub fn new(name: &str, offset: u64, bits: u32) -> StuckRegister {
        StuckRegister::with(name, offset, bits.into(), 0)
    }

    /// The profile `name` with `bits` stuck off at `offset` once [`StuckRegister::set_stuck`]
    /// switches the fault on (it starts off).
    pub fn stuck_off_later(name: &str, offset: u64, bits: u32) -> StuckRegister {
        let host = StuckRegister::with(name, offset, 0, bits.into());
        host.set_stuck(false);
        host
    }

    /// The profile `name` with nothing stuck (until [`StuckRegister::unplug`]).
    pub fn healthy(name: &str) -> StuckRegister {
        StuckRegister::new(name, 0, 0)
    }

    fn with(name: &str, offset: u64, set: u64, clear: u64) -> StuckRegister {
        StuckRegister {
            inner: EmulatedHostGpu::by_name(name).unwrap(),
            offset,
            set,
            clear,
            stuck: AtomicBool::new(true),
            lost: AtomicBool::new(false),
        }
    }

    /// Switches the stuck bits on or off.
    pub fn set_stuck(&self, stuck: bool) {
        self.stuck.store(stuck, Ordering::Release);
    }

    /// The emulated GPU behind the faults.
    pub fn inner(&self) -> &EmulatedHostGpu {
        &self.inner
    }

    /// From now on the device reports itself lost ([`HostGpu::is_lost`]).
    pub fn unplug(&self) {
        self.lost.store(true, Ordering::Release);
    }
}

impl HostGpu for StuckRegister {
    fn identity(&self) -> &ChipIdentity {
        self.inner.identity()
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    fn bar0_read(&self, offset: u64, width: AccessWidth) -> Result<u64, HostGpuError> {
        let v = self.inner.bar0_read(offset, width)?;
        Ok(
            if offset == self.offset && self.stuck.load(Ordering::Acquire) {
                (v | self.set) & !self.clear
            } else {
                v
            },
        )
    }

    fn bar0_write(&self, offset: u64, width: AccessWidth, value: u64) -> Result<(), HostGpuError> {
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

    fn release_vram_mmap_source(&self, addr: VramAddr, len: u64) -> Result<(), HostGpuError> {
        self.inner.release_vram_mmap_source(addr, len)
    }

    fn dma_alloc(&self, len: u64) -> Result<Arc<dyn DmaBuffer>, HostGpuError> {
        self.inner.dma_alloc(len)
    }
}
