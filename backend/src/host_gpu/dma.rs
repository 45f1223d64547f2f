//! Host memory the GPU reaches by DMA ([`DmaBuffer`]), and guest memory lent to the
//! emulated GPU ([`GuestDmaTarget`]).
//!
//! On hardware a DMA buffer is host memory mapped into the device's IOMMU domain through
//! VFIO (`VFIO_IOMMU_MAP_DMA`); its pages have bus addresses the GPU uses. For the
//! emulated GPU it is a memfd the backend creates and maps, whose fd it hands to the
//! emulated GPU, which maps it a second time into its emulated IOMMU
//! ([`EmulatedDmaBuffer`]). Either way the memory is shared with a device that writes it
//! concurrently: accessors copy in and out (volatile) and the 32-bit queue pointers are
//! atomic; no reference to the shared bytes is ever handed out.

use std::fmt;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use gpu_emulation::gsp::{DmaError, DmaTarget, SharedMemory, SharedMemoryError};
use gpu_emulation::EmulatedGpu;

use super::guest_dma::GuestDmaMemory;
use super::HostGpuError;

/// Size of a DMA page.
pub const DMA_PAGE: u64 = 0x1000;

/// Host memory the GPU can reach by DMA. Offsets are bytes from the buffer's start; every
/// access is bounds-checked.
pub trait DmaBuffer: Send + Sync + fmt::Debug {
    /// Length in bytes (a multiple of [`DMA_PAGE`]).
    fn len(&self) -> u64;
    /// Whether the buffer is empty (never for an allocated buffer).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf.len()` bytes at `offset` out of the buffer.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError>;
    /// Copies `data` into the buffer at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError>;
    /// Loads the little-endian `u32` at `offset` (4-byte aligned) atomically, with acquire
    /// ordering.
    fn load_u32(&self, offset: u64) -> Result<u32, HostGpuError>;
    /// Stores `value` at `offset` (4-byte aligned) atomically, with release ordering:
    /// everything written before is visible to the device once it sees the value.
    fn store_u32(&self, offset: u64, value: u32) -> Result<(), HostGpuError>;
    /// The bus (DMA) address of 4 KiB page `page` of the buffer.
    fn dma_addr(&self, page: u64) -> Result<u64, HostGpuError>;
}

/// A DMA buffer of the emulated GPU: the backend's mapping of a memfd that the GPU has
/// mapped too. Dropping it unmaps it from the GPU's emulated IOMMU.
pub struct EmulatedDmaBuffer {
    memory: SharedMemory,
    dma_base: u64,
    gpu: Arc<EmulatedGpu>,
}

fn shm_error(e: SharedMemoryError) -> HostGpuError {
    match e {
        SharedMemoryError::OutOfBounds { offset, len, size } => {
            HostGpuError::MemoryOutOfRange { offset, len, size }
        }
        other => HostGpuError::Io(std::io::Error::other(other.to_string())),
    }
}

impl EmulatedDmaBuffer {
    /// Creates a zero-filled memfd of `len` bytes, maps it, and maps it into `gpu`.
    pub fn new(gpu: Arc<EmulatedGpu>, len: u64) -> Result<EmulatedDmaBuffer, HostGpuError> {
        let memory = SharedMemory::create(c"gpu-backend-dma", len).map_err(shm_error)?;
        let dma_base = gpu
            .dma()
            .map(memory.as_fd(), len)
            .map_err(|e| HostGpuError::Io(std::io::Error::other(e.to_string())))?;
        Ok(EmulatedDmaBuffer {
            memory,
            dma_base,
            gpu,
        })
    }
}

impl fmt::Debug for EmulatedDmaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatedDmaBuffer")
            .field("len", &format_args!("{:#x}", self.memory.len()))
            .field("dma_base", &format_args!("{:#x}", self.dma_base))
            .finish()
    }
}

impl DmaBuffer for EmulatedDmaBuffer {
    fn len(&self) -> u64 {
        self.memory.len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
        self.memory.read(offset, buf).map_err(shm_error)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
        self.memory.write(offset, data).map_err(shm_error)
    }

    fn load_u32(&self, offset: u64) -> Result<u32, HostGpuError> {
        self.memory.load_u32(offset).map_err(shm_error)
    }

    fn store_u32(&self, offset: u64, value: u32) -> Result<(), HostGpuError> {
        self.memory.store_u32(offset, value).map_err(shm_error)
    }

    fn dma_addr(&self, page: u64) -> Result<u64, HostGpuError> {
        let size = self.memory.len();
        match page.checked_mul(DMA_PAGE) {
            Some(off) if off < size => Ok(self.dma_base + off),
            _ => Err(HostGpuError::MemoryOutOfRange {
                offset: page.saturating_mul(DMA_PAGE),
                len: DMA_PAGE,
                size,
            }),
        }
    }
}

impl Drop for EmulatedDmaBuffer {
    fn drop(&mut self) {
        if let Err(e) = self.gpu.dma().unmap(self.dma_base) {
            log::warn!("unmapping emulated DMA buffer: {e}");
        }
    }
}

/// Guest memory lent to the emulated GPU ([`HostGpu::map_guest_dma`](super::HostGpu)), as
/// a target of its emulated IOMMU. Device reads of memory the guest did not make readable,
/// and writes of memory it did not make writable, fail with
/// [`DmaError::NotReadable`] / [`DmaError::NotWritable`]; failures of the memory itself
/// (e.g. its connection is gone) are [`DmaError::Target`].
///
/// `load_u32`/`store_u32` are 4-byte reads and writes of the guest memory with a fence
/// after the load (acquire) and before the store (release), so the queue data around a
/// pointer is ordered the way the GSP protocol needs; memory reached over the socket is
/// ordered by the socket anyway.
#[derive(Debug)]
pub struct GuestDmaTarget {
    memory: Arc<dyn GuestDmaMemory>,
}

impl GuestDmaTarget {
    /// Wraps `memory`.
    pub fn new(memory: Arc<dyn GuestDmaMemory>) -> GuestDmaTarget {
        GuestDmaTarget { memory }
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), DmaError> {
        let size = self.memory.len();
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(DmaError::OutOfBounds {
                offset,
                len: len as u64,
                size,
            }),
        }
    }

    fn readable(&self, offset: u64, len: usize) -> Result<(), DmaError> {
        self.check(offset, len)?;
        if self.memory.readable() {
            Ok(())
        } else {
            Err(DmaError::NotReadable)
        }
    }

    fn writable(&self, offset: u64, len: usize) -> Result<(), DmaError> {
        self.check(offset, len)?;
        if self.memory.writable() {
            Ok(())
        } else {
            Err(DmaError::NotWritable)
        }
    }
}

fn target_error(e: HostGpuError) -> DmaError {
    DmaError::Target(Box::new(e))
}

fn aligned(offset: u64) -> Result<(), DmaError> {
    if offset % 4 == 0 {
        Ok(())
    } else {
        Err(DmaError::Misaligned(offset))
    }
}

impl DmaTarget for GuestDmaTarget {
    fn len(&self) -> u64 {
        self.memory.len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.readable(offset, buf.len())?;
        self.memory.read(offset, buf).map_err(target_error)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        self.writable(offset, data.len())?;
        self.memory.write(offset, data).map_err(target_error)
    }

    fn load_u32(&self, offset: u64) -> Result<u32, DmaError> {
        aligned(offset)?;
        let mut b = [0u8; 4];
        self.read(offset, &mut b)?;
        fence(Ordering::Acquire);
        Ok(u32::from_le_bytes(b))
    }

    fn store_u32(&self, offset: u64, value: u32) -> Result<(), DmaError> {
        aligned(offset)?;
        fence(Ordering::Release);
        self.write(offset, &value.to_le_bytes())
    }
}

/// Test helpers: guest memory backed by a vector, and a host-side [`DmaBuffer`] view of a
/// range of it (what a guest driver that owns the whole GPU would use).
#[cfg(test)]
pub(crate) mod test_memory {
    use std::ptr::NonNull;
    use std::sync::{Arc, Mutex};

    use super::{DmaBuffer, DMA_PAGE};
    use crate::host_gpu::guest_dma::GuestDmaMemory;
    use crate::host_gpu::HostGpuError;

    /// Guest memory in a locked vector, with the guest's permissions.
    #[derive(Debug)]
    pub(crate) struct VecGuestMemory {
        bytes: Mutex<Vec<u8>>,
        readable: bool,
        writable: bool,
    }

    impl VecGuestMemory {
        /// `len` zero bytes the device may read and/or write.
        pub(crate) fn new(len: u64, readable: bool, writable: bool) -> VecGuestMemory {
            VecGuestMemory {
                bytes: Mutex::new(vec![0; len as usize]),
                readable,
                writable,
            }
        }

        fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, HostGpuError> {
            let size = self.len();
            match offset.checked_add(len as u64) {
                Some(end) if end <= size => Ok(offset as usize..end as usize),
                _ => Err(HostGpuError::MemoryOutOfRange {
                    offset,
                    len: len as u64,
                    size,
                }),
            }
        }
    }

    impl GuestDmaMemory for VecGuestMemory {
        fn len(&self) -> u64 {
            self.bytes.lock().unwrap().len() as u64
        }
        fn readable(&self) -> bool {
            self.readable
        }
        fn writable(&self) -> bool {
            self.writable
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
            let r = self.range(offset, buf.len())?;
            buf.copy_from_slice(&self.bytes.lock().unwrap()[r]);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
            let r = self.range(offset, data.len())?;
            self.bytes.lock().unwrap()[r].copy_from_slice(data);
            Ok(())
        }
        fn host_mapping(&self) -> Option<NonNull<u8>> {
            None
        }
    }

    /// `len` bytes at `offset` of guest memory mapped at bus address `iova`, as the
    /// driver owning it sees them.
    #[derive(Debug)]
    pub(crate) struct GuestView {
        pub(crate) memory: Arc<VecGuestMemory>,
        pub(crate) iova: u64,
        pub(crate) offset: u64,
        pub(crate) len: u64,
    }

    impl GuestView {
        fn at(&self, offset: u64, len: usize) -> Result<u64, HostGpuError> {
            match offset.checked_add(len as u64) {
                Some(end) if end <= self.len => Ok(self.offset + offset),
                _ => Err(HostGpuError::MemoryOutOfRange {
                    offset,
                    len: len as u64,
                    size: self.len,
                }),
            }
        }
    }

    impl DmaBuffer for GuestView {
        fn len(&self) -> u64 {
            self.len
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
            self.memory.read(self.at(offset, buf.len())?, buf)
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
            self.memory.write(self.at(offset, data.len())?, data)
        }
        fn load_u32(&self, offset: u64) -> Result<u32, HostGpuError> {
            let mut b = [0u8; 4];
            self.read(offset, &mut b)?;
            Ok(u32::from_le_bytes(b))
        }
        fn store_u32(&self, offset: u64, value: u32) -> Result<(), HostGpuError> {
            self.write(offset, &value.to_le_bytes())
        }
        fn dma_addr(&self, page: u64) -> Result<u64, HostGpuError> {
            let off = page.saturating_mul(DMA_PAGE);
            self.at(off, DMA_PAGE as usize)?;
            Ok(self.iova + self.offset + off)
        }
    }
}
