//! [`BarBacking`] adapters over the host GPU: its memory BARs, and BAR0's registers.

use std::sync::Arc;

use crate::host_gpu::{AccessWidth, HostGpu, HostGpuError, HostMemory};

use super::padded_bar::{BackingError, BarBacking};

fn backing_error(error: HostGpuError) -> BackingError {
    BackingError::from_errno(error.errno())
}

/// A memory BAR's real part: the host GPU's memory behind it.
pub struct HostMemoryBacking(pub Arc<dyn HostMemory>);

impl BarBacking for HostMemoryBacking {
    fn len(&self) -> u64 {
        self.0.len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        self.0.read(offset, buf).map_err(backing_error)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
        self.0.write(offset, data).map_err(backing_error)
    }
}

/// BAR0 seen as bytes: an access of any length is split into naturally aligned register
/// accesses of 8, 4, 2 or 1 bytes, lowest address first.
pub struct RegisterBacking {
    host: Arc<dyn HostGpu>,
    len: u64,
}

impl RegisterBacking {
    /// BAR0 of `host`, `len` bytes long.
    pub fn new(host: Arc<dyn HostGpu>, len: u64) -> Self {
        RegisterBacking { host, len }
    }
}

/// The widest naturally aligned access at `offset` that fits in `remaining` bytes.
fn access_width(offset: u64, remaining: usize) -> AccessWidth {
    for (bytes, width) in [
        (8, AccessWidth::Qword),
        (4, AccessWidth::Dword),
        (2, AccessWidth::Word),
    ] {
        if offset % bytes == 0 && remaining as u64 >= bytes {
            return width;
        }
    }
    AccessWidth::Byte
}

impl BarBacking for RegisterBacking {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let width = access_width(at, buf.len() - done);
            let n = width.bytes() as usize;
            let value = self.host.bar0_read(at, width).map_err(backing_error)?;
            buf[done..done + n].copy_from_slice(&value.to_le_bytes()[..n]);
            done += n;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let width = access_width(at, data.len() - done);
            let n = width.bytes() as usize;
            let mut bytes = [0u8; 8];
            bytes[..n].copy_from_slice(&data[done..done + n]);
            self.host
                .bar0_write(at, width, u64::from_le_bytes(bytes))
                .map_err(backing_error)?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_width_is_the_widest_aligned_fit() {
        assert_eq!(access_width(0, 8), AccessWidth::Qword);
        assert_eq!(access_width(4, 8), AccessWidth::Dword);
        assert_eq!(access_width(2, 8), AccessWidth::Word);
        assert_eq!(access_width(1, 8), AccessWidth::Byte);
        assert_eq!(access_width(0, 3), AccessWidth::Word);
        assert_eq!(access_width(0, 1), AccessWidth::Byte);
    }
}
