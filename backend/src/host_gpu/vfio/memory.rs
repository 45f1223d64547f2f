//! [`VfioBarMemory`]: the real part of a memory BAR of a GPU behind VFIO, read and written
//! with `pread`/`pwrite` on the device fd at the region's offset (every failure is an error
//! the caller sees, unlike `vfio-ioctls`' `region_read`, which only logs).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::host_gpu::{HostGpuError, HostMemory, MmapSource};

/// One memory BAR: `len` real bytes at `region_offset` of the device fd.
pub struct VfioBarMemory {
    device: Arc<File>,
    region_offset: u64,
    len: u64,
    /// What QEMU may map for this BAR: never the device fd itself (it reaches BAR0, config
    /// space and reset past every trap), only an export of exactly this BAR's real part.
    mmap: Option<MmapSource>,
}

impl VfioBarMemory {
    /// The BAR whose region starts at `region_offset` of `device`, `len` real bytes, with
    /// an optional exported fd QEMU may map.
    pub fn new(
        device: Arc<File>,
        region_offset: u64,
        len: u64,
        mmap: Option<MmapSource>,
    ) -> VfioBarMemory {
        VfioBarMemory {
            device,
            region_offset,
            len,
            mmap,
        }
    }

    fn check(&self, offset: u64, len: usize) -> Result<u64, HostGpuError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(self.region_offset + offset),
            _ => Err(HostGpuError::MemoryOutOfRange {
                offset,
                len: len as u64,
                size: self.len,
            }),
        }
    }
}

impl HostMemory for VfioBarMemory {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
        let at = self.check(offset, buf.len())?;
        Ok(self.device.read_exact_at(buf, at)?)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
        let at = self.check(offset, data.len())?;
        Ok(self.device.write_all_at(data, at)?)
    }

    fn mmap_source(&self) -> Option<MmapSource> {
        self.mmap.clone()
    }
}
