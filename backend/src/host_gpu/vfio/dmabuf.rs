//! Exporting exactly one range of a VRAM BAR as a dma-buf (`VFIO_DEVICE_FEATURE_DMA_BUF`,
//! Linux 6.19 and later), so QEMU can map a guest's VRAM without ever holding the VFIO
//! device fd, which reaches all of BAR0, config space and reset past every trap.
//!
//! The export is only used if the kernel has it *and* the dma-buf can be mmapped (it was
//! made for peer-to-peer DMA; mapping it from user space is a later addition): both are
//! tried once, on the real device. Where either is missing, the range is served through
//! the socket instead, and `inspect` and the log say so ([`DmaBufSupport`]).

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_BUF, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_PROBE,
};
use vmm_sys_util::ioctl::ioctl_with_mut_ptr;
use vmm_sys_util::ioctl_io_nr;

/// `VFIO_TYPE` (';') and `VFIO_BASE` of linux/vfio.h.
const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;
ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE, VFIO_BASE + 17);

/// Whether VRAM ranges can be handed to QEMU as mappable dma-bufs on this kernel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum DmaBufSupport {
    /// Exported and mmapped: QEMU maps each guest's range directly.
    Mappable,
    /// Not available; the reason (kernel without the feature, or dma-bufs that cannot be
    /// mmapped). VRAM is served through the socket.
    Unavailable(String),
}

/// `struct vfio_device_feature` followed by `struct vfio_device_feature_dma_buf` and one
/// `struct vfio_region_dma_range`, laid out as linux/vfio.h does.
#[repr(C)]
struct ExportRequest {
    argsz: u32,
    flags: u32,
    region_index: u32,
    open_flags: u32,
    dma_flags: u32,
    nr_ranges: u32,
    offset: u64,
    length: u64,
}

/// Asks the kernel whether `device` can export dma-bufs at all.
pub fn probe(device: BorrowedFd<'_>) -> Result<(), std::io::Error> {
    let mut request = ExportRequest {
        argsz: 8,
        flags: VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF,
        region_index: 0,
        open_flags: 0,
        dma_flags: 0,
        nr_ranges: 0,
        offset: 0,
        length: 0,
    };
    // SAFETY: VFIO_DEVICE_FEATURE with PROBE reads the 8-byte header (argsz says so) and
    // writes nothing back; `request` outlives the call.
    let ret = unsafe { ioctl_with_mut_ptr(&device, VFIO_DEVICE_FEATURE(), &mut request) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Exports `[offset, offset + length)` of region `region_index` as a dma-buf fd
/// (read-write, close-on-exec).
pub fn export(
    device: BorrowedFd<'_>,
    region_index: u32,
    offset: u64,
    length: u64,
) -> Result<OwnedFd, std::io::Error> {
    let mut request = ExportRequest {
        argsz: std::mem::size_of::<ExportRequest>() as u32,
        flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF,
        region_index,
        open_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
        dma_flags: 0,
        nr_ranges: 1,
        offset,
        length,
    };
    // SAFETY: the kernel reads `argsz` bytes of `request` (header, dma_buf struct, one
    // range) and returns a new fd or -1; nothing is written back.
    let ret = unsafe { ioctl_with_mut_ptr(&device, VFIO_DEVICE_FEATURE(), &mut request) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a successful export returns a fresh fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

/// Checks that `len` bytes of `fd` can be mapped shared read-write (and unmaps them).
pub fn check_mappable(fd: BorrowedFd<'_>, len: u64) -> Result<(), std::io::Error> {
    match super::mapped::MappedBar::map(fd, 0, len) {
        Ok(_mapping) => Ok(()),
        Err(super::mapped::MappedBarError::Map { source, .. }) => Err(source),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
}

/// Finds out once, on the device, whether mappable dma-bufs of `region_index` work: probes
/// the feature, exports the first `len` bytes and maps them.
pub fn detect(device: BorrowedFd<'_>, region_index: u32, len: u64) -> DmaBufSupport {
    if let Err(e) = probe(device) {
        return DmaBufSupport::Unavailable(format!(
            "the kernel cannot export VFIO dma-bufs (VFIO_DEVICE_FEATURE_DMA_BUF: {e}; Linux \
             6.19 or later)"
        ));
    }
    let fd = match export(device, region_index, 0, len) {
        Ok(fd) => fd,
        Err(e) => {
            return DmaBufSupport::Unavailable(format!(
                "exporting a VRAM range as a dma-buf failed: {e}"
            ))
        }
    };
    match check_mappable(std::os::fd::AsFd::as_fd(&fd), len) {
        Ok(()) => DmaBufSupport::Mappable,
        Err(e) => DmaBufSupport::Unavailable(format!(
            "this kernel's VFIO dma-bufs cannot be mmapped ({e})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn the_request_is_laid_out_like_the_uapi() {
        // vfio_device_feature (8) + vfio_device_feature_dma_buf (16) + one range (16).
        assert_eq!(std::mem::size_of::<ExportRequest>(), 40);
        assert_eq!(std::mem::offset_of!(ExportRequest, offset), 24);
    }

    #[test]
    fn a_file_that_is_not_a_vfio_device_has_no_dma_bufs() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(probe(file.as_fd()).is_err());
        match detect(file.as_fd(), 1, 0x1000) {
            DmaBufSupport::Unavailable(why) => assert!(why.contains("6.19"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
