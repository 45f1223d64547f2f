//! [`ClientDmaMap`]: one DMA map of the client, as the device is handed it with
//! [`VfioUserDevice::dma_mapped`](super::VfioUserDevice::dma_mapped).
//!
//! The handle reaches exactly that map, from any thread, until the map is removed
//! (`DMA_UNMAP`, `UNMAP_ALL`, a failed `DMA_MAP` being undone, or the client leaving); from
//! then on every access fails with [`DmaError::Unmapped`]. An fd-backed map that the server
//! mmapped is copied through the mapping, and removing the map waits for those copies. Any
//! other map is reached with server-to-client `DMA_READ`/`DMA_WRITE` messages, which must
//! not be sent from the connection thread ([`DmaError::WouldDeadlock`]); removing the map
//! fails such a request in flight instead of waiting for its reply, since only the
//! connection thread (busy removing the map) could read it.

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::{Bytes, MemoryRegionAddress};

use super::client::ClientShared;
use super::device::Errno;
use super::dma::{DmaError, GateMemory, MapEntry, MapGate};

/// One DMA map of the client (see the [module docs](self)).
#[derive(Clone)]
pub struct ClientDmaMap {
    iova: u64,
    size: u64,
    readable: bool,
    writable: bool,
    gate: Arc<MapGate>,
    shared: Arc<ClientShared>,
}

impl fmt::Debug for ClientDmaMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientDmaMap")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("size", &format_args!("{:#x}", self.size))
            .field("readable", &self.readable)
            .field("writable", &self.writable)
            .field("live", &self.is_live())
            .finish()
    }
}

impl ClientDmaMap {
    pub(crate) fn new(entry: &MapEntry, shared: Arc<ClientShared>) -> ClientDmaMap {
        ClientDmaMap {
            iova: entry.iova,
            size: entry.size,
            readable: entry.readable,
            writable: entry.writable,
            gate: Arc::clone(&entry.gate),
            shared,
        }
    }

    /// DMA address of the map's first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the client allows the device to read it.
    pub fn readable(&self) -> bool {
        self.readable
    }

    /// Whether the client allows the device to write it.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Whether the map is still the client's (not removed yet).
    pub fn is_live(&self) -> bool {
        !self.gate.is_revoked()
    }

    /// The map's first byte in this process, if the server mmapped it (an fd sealed against
    /// shrinking); `None` for a map reached over the socket, or once removed. The mapping
    /// stays valid until [`VfioUserDevice::dma_unmapped`](super::VfioUserDevice::dma_unmapped)
    /// for this map has returned, and not a moment longer.
    pub fn host_address(&self) -> Option<NonNull<u8>> {
        self.gate
            .with_live(|memory| match memory {
                GateMemory::Mapped(mapping) => Some(mapping.host_address()),
                GateMemory::Socket => None,
            })
            .flatten()
    }

    /// The IOVA of `[offset, offset + len)`, checked against the map and the permission.
    fn at(
        &self,
        offset: u64,
        len: usize,
        allowed: bool,
        access: &'static str,
    ) -> Result<u64, DmaError> {
        let iova = self.iova.saturating_add(offset);
        let end = offset
            .checked_add(len as u64)
            .ok_or(DmaError::Overflow { iova, len })?;
        if end > self.size {
            // The first byte past the map is not this map's.
            return Err(DmaError::Unmapped {
                iova: self.iova + self.size,
            });
        }
        if !allowed {
            return Err(DmaError::Permission { iova, access });
        }
        Ok(iova)
    }

    /// A failure of a socket request: `Unmapped` if the map was removed meanwhile.
    fn socket_error(&self, iova: u64, error: DmaError) -> DmaError {
        if self.gate.is_revoked() {
            DmaError::Unmapped { iova }
        } else {
            error
        }
    }

    /// Copies `buf.len()` bytes at `offset` of the map into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let iova = self.at(offset, buf.len(), self.readable, "read")?;
        let copied = self.gate.with_live(|memory| match memory {
            GateMemory::Mapped(mapping) => Some(
                mapping
                    .region()
                    .read_slice(buf, MemoryRegionAddress(offset))
                    .map_err(|_| DmaError::Io(Errno::EFAULT)),
            ),
            GateMemory::Socket => None,
        });
        match copied {
            None => Err(DmaError::Unmapped { iova }),
            Some(Some(result)) => result,
            Some(None) => self
                .shared
                .socket_read(iova, buf, Some(&self.gate))
                .map_err(|e| self.socket_error(iova, e)),
        }
    }

    /// Copies `data` to `offset` of the map.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        let iova = self.at(offset, data.len(), self.writable, "write")?;
        let copied = self.gate.with_live(|memory| match memory {
            GateMemory::Mapped(mapping) => Some(
                mapping
                    .region()
                    .write_slice(data, MemoryRegionAddress(offset))
                    .map_err(|_| DmaError::Io(Errno::EFAULT)),
            ),
            GateMemory::Socket => None,
        });
        match copied {
            None => Err(DmaError::Unmapped { iova }),
            Some(Some(result)) => result,
            Some(None) => self
                .shared
                .socket_write(iova, data, Some(&self.gate))
                .map_err(|e| self.socket_error(iova, e)),
        }
    }
}
