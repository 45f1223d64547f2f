//! The real part of a guest's VRAM BAR as a [`BarBacking`]: host memory directly for a GPU
//! given whole, or the guest's window of the host BAR1 for a sliced GPU.
//!
//! Through BAR1 every access is translated by the GPU MMU with the page tables the backend
//! built for the guest's window (see [`crate::slice::bar1`]), so a trapped VRAM-BAR access
//! (a partial last page, or anything QEMU did not map) can only reach the guest's slice.

use std::sync::Arc;

use crate::host_driver::addr::GpuVa;
use crate::host_gpu::{HostGpu, HostGpuError, HostMemory};
use crate::slice::SliceAccess;

use super::padded_bar::{BackingError, BarBacking};

fn backing_error(error: HostGpuError) -> BackingError {
    BackingError::from_errno(error.errno())
}

/// Where a guest VRAM BAR's real bytes come from.
pub enum GuestVramBacking {
    /// A memory BAR of the host, 1:1 (a GPU given whole to one guest).
    Host(Arc<dyn HostMemory>),
    /// `len` bytes of the host BAR1 from virtual address `va` (a sliced GPU).
    Bar1 {
        /// The GPU.
        host: Arc<dyn HostGpu>,
        /// BAR1 VA of the BAR's first byte.
        va: GpuVa,
        /// Real length.
        len: u64,
        /// The guest's access to its slice: once revoked (the guest was removed, and its
        /// BAR1 window may belong to another guest), reads return ~0 and writes are
        /// dropped without reaching BAR1.
        access: Arc<SliceAccess>,
    },
}

impl GuestVramBacking {
    /// The BAR1 VA of `offset..offset + len`, after a range check.
    fn bar1_offset(va: GpuVa, real: u64, offset: u64, len: usize) -> Result<u64, BackingError> {
        let inside = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= real);
        match va.offset(offset) {
            Some(at) if inside => Ok(at.raw()),
            _ => Err(BackingError::from_errno(libc::EINVAL)),
        }
    }
}

impl BarBacking for GuestVramBacking {
    fn len(&self) -> u64 {
        match self {
            GuestVramBacking::Host(memory) => memory.len(),
            GuestVramBacking::Bar1 { len, .. } => *len,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        match self {
            GuestVramBacking::Host(memory) => memory.read(offset, buf).map_err(backing_error),
            GuestVramBacking::Bar1 {
                host,
                va,
                len,
                access,
            } => {
                let at = Self::bar1_offset(*va, *len, offset, buf.len())?;
                match access.with_live(|| host.bar1_read(at, buf)) {
                    Some(result) => result.map_err(backing_error),
                    None => {
                        buf.fill(0xFF);
                        Ok(())
                    }
                }
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
        match self {
            GuestVramBacking::Host(memory) => memory.write(offset, data).map_err(backing_error),
            GuestVramBacking::Bar1 {
                host,
                va,
                len,
                access,
            } => {
                let at = Self::bar1_offset(*va, *len, offset, data.len())?;
                access
                    .with_live(|| host.bar1_write(at, data))
                    .unwrap_or(Ok(()))
                    .map_err(backing_error)
            }
        }
    }
}
