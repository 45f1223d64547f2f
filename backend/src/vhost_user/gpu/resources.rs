//! The resource table: 2D resources (per the virtio 1.2 spec, section 5.7.6.8,
//! "VIRTIO_GPU_CMD_RESOURCE_CREATE_2D" and "VIRTIO_GPU_CMD_RESOURCE_UNREF"), their formats,
//! and where their pixels live in the guest's slice.
//!
//! Creating a resource allocates `width * height * 4` bytes from the slice; a slice that is
//! full gives `ERR_OUT_OF_MEMORY`. Unreferencing scrubs the bytes before they return to the
//! allocator. A per-guest cap bounds the number of resources.

use std::collections::BTreeMap;

use thiserror::Error;

use super::backing::Backing;
use super::store::{SliceAllocator, SliceStore, StoreError};
use super::wire::{ResourceId, RespType};

/// The 2D formats (`enum virtio_gpu_formats`), all 4 bytes per pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Format {
    /// `VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM`.
    B8G8R8A8 = 1,
    /// `VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM`.
    B8G8R8X8 = 2,
    /// `VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM`.
    A8R8G8B8 = 3,
    /// `VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM`.
    X8R8G8B8 = 4,
    /// `VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM`.
    R8G8B8A8 = 67,
    /// `VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM`.
    X8B8G8R8 = 68,
    /// `VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM`.
    A8B8G8R8 = 121,
    /// `VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM`.
    R8G8B8X8 = 134,
}

impl Format {
    /// Bytes per pixel.
    pub const BYTES_PER_PIXEL: u32 = 4;

    /// The format of a spec value, `None` for values this device does not support.
    pub fn from_raw(raw: u32) -> Option<Format> {
        use Format::*;
        [
            B8G8R8A8, B8G8R8X8, A8R8G8B8, X8R8G8B8, R8G8B8A8, X8B8G8R8, A8B8G8R8, R8G8B8X8,
        ]
        .into_iter()
        .find(|f| *f as u32 == raw)
    }
}

/// Errors of the resource table, each with its response type ([`ResourceError::response`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResourceError {
    /// Id 0, unknown, or (on create) already in use.
    #[error("invalid resource id {}", .0 .0)]
    InvalidId(ResourceId),
    /// Unsupported format or zero size.
    #[error("invalid resource parameters: {0}")]
    InvalidParameter(&'static str),
    /// The slice cannot hold the resource, or the count cap is reached.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(StoreError),
}

impl ResourceError {
    /// The response the guest gets.
    pub fn response(&self) -> RespType {
        match self {
            ResourceError::InvalidId(_) => RespType::ErrInvalidResourceId,
            ResourceError::InvalidParameter(_) => RespType::ErrInvalidParameter,
            ResourceError::OutOfMemory(_) => RespType::ErrOutOfMemory,
            ResourceError::Store(_) => RespType::ErrUnspec,
        }
    }
}

/// One 2D resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Pixel format.
    pub format: Format,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Offset of the pixels in the slice.
    pub offset: u64,
    /// Bytes of pixels (`width * height * 4`); rows are `width * 4` bytes apart.
    pub len: u64,
    /// Guest memory backing, once attached.
    pub backing: Option<Backing>,
}

impl Resource {
    /// Row pitch in bytes.
    pub fn stride(&self) -> u64 {
        u64::from(self.width) * u64::from(Format::BYTES_PER_PIXEL)
    }
}

/// The resources of one guest.
#[derive(Debug)]
pub struct ResourceTable {
    alloc: SliceAllocator,
    resources: BTreeMap<ResourceId, Resource>,
    max_resources: usize,
}

impl ResourceTable {
    /// A table allocating from a slice of `slice_size` bytes, holding at most `max_resources`.
    pub fn new(slice_size: u64, max_resources: usize) -> ResourceTable {
        ResourceTable {
            alloc: SliceAllocator::new(slice_size),
            resources: BTreeMap::new(),
            max_resources,
        }
    }

    /// Creates a resource; its bytes are allocated in the slice (contents undefined until a
    /// transfer, per the spec; in practice zero or scrubbed).
    pub fn create(
        &mut self,
        id: ResourceId,
        format: u32,
        width: u32,
        height: u32,
    ) -> Result<&Resource, ResourceError> {
        if id.is_null() || self.resources.contains_key(&id) {
            return Err(ResourceError::InvalidId(id));
        }
        let format = Format::from_raw(format)
            .ok_or(ResourceError::InvalidParameter("unsupported format"))?;
        if width == 0 || height == 0 {
            return Err(ResourceError::InvalidParameter("zero-sized resource"));
        }
        if self.resources.len() >= self.max_resources {
            return Err(ResourceError::OutOfMemory(format!(
                "resource cap of {} reached",
                self.max_resources
            )));
        }
        // width * height fits u64, times 4 may not.
        let len = (u64::from(width) * u64::from(height))
            .checked_mul(u64::from(Format::BYTES_PER_PIXEL))
            .ok_or_else(|| ResourceError::OutOfMemory(format!("{width}x{height} overflows")))?;
        let offset = self
            .alloc
            .alloc(len)
            .map_err(|e| ResourceError::OutOfMemory(e.to_string()))?;
        let res = Resource {
            format,
            width,
            height,
            offset,
            len,
            backing: None,
        };
        Ok(self.resources.entry(id).or_insert(res))
    }

    /// Destroys a resource: its bytes are scrubbed, then returned to the allocator.
    pub fn unref(
        &mut self,
        id: ResourceId,
        store: &mut dyn SliceStore,
    ) -> Result<(), ResourceError> {
        let res = self
            .resources
            .get(&id)
            .ok_or(ResourceError::InvalidId(id))?;
        store
            .scrub(res.offset, res.len)
            .map_err(ResourceError::Store)?;
        let offset = res.offset;
        self.resources.remove(&id);
        self.alloc.free(offset).map_err(ResourceError::Store)?;
        Ok(())
    }

    /// Destroys every resource (device reset), scrubbing each.
    pub fn clear(&mut self, store: &mut dyn SliceStore) -> Result<(), ResourceError> {
        let ids: Vec<ResourceId> = self.resources.keys().copied().collect();
        ids.into_iter().try_for_each(|id| self.unref(id, store))
    }

    /// The resource `id`.
    pub fn get(&self, id: ResourceId) -> Result<&Resource, ResourceError> {
        if id.is_null() {
            return Err(ResourceError::InvalidId(id));
        }
        self.resources.get(&id).ok_or(ResourceError::InvalidId(id))
    }

    /// The resource `id`, mutably.
    pub fn get_mut(&mut self, id: ResourceId) -> Result<&mut Resource, ResourceError> {
        self.resources
            .get_mut(&id)
            .ok_or(ResourceError::InvalidId(id))
    }

    /// All resources, by id.
    pub fn iter(&self) -> impl Iterator<Item = (ResourceId, &Resource)> {
        self.resources.iter().map(|(id, r)| (*id, r))
    }

    /// Bytes of the slice in use (rounded to the allocation alignment).
    pub fn allocated_bytes(&self) -> u64 {
        self.alloc.allocated()
    }
}

#[cfg(test)]
mod tests {
    use super::super::store::VecStore;
    use super::*;

    #[test]
    fn create_checks_ids_formats_and_space() {
        let mut t = ResourceTable::new(64 * 1024, 3);
        assert_eq!(
            t.create(ResourceId(0), 1, 4, 4).unwrap_err().response(),
            RespType::ErrInvalidResourceId
        );
        assert_eq!(
            t.create(ResourceId(1), 5, 4, 4).unwrap_err().response(),
            RespType::ErrInvalidParameter
        );
        assert_eq!(
            t.create(ResourceId(1), 1, 0, 4).unwrap_err().response(),
            RespType::ErrInvalidParameter
        );
        assert_eq!(t.create(ResourceId(1), 134, 64, 64).unwrap().len, 16384);
        assert_eq!(
            t.create(ResourceId(1), 1, 4, 4).unwrap_err().response(),
            RespType::ErrInvalidResourceId
        );
        assert_eq!(
            t.create(ResourceId(2), 1, u32::MAX, u32::MAX)
                .unwrap_err()
                .response(),
            RespType::ErrOutOfMemory
        );
        assert_eq!(
            t.create(ResourceId(2), 1, 128, 128).unwrap_err().response(),
            RespType::ErrOutOfMemory
        );
        t.create(ResourceId(2), 1, 1, 1).unwrap();
        t.create(ResourceId(3), 1, 1, 1).unwrap();
        assert_eq!(
            t.create(ResourceId(4), 1, 1, 1).unwrap_err().response(),
            RespType::ErrOutOfMemory,
            "count cap"
        );
    }

    #[test]
    fn unref_scrubs_before_reuse() {
        let mut store = VecStore::new(8192, 0xa5);
        let mut t = ResourceTable::new(8192, 8);
        let off = t.create(ResourceId(7), 2, 2, 2).unwrap().offset;
        store.write(off, &[0xee; 16]).unwrap();
        assert!(t.unref(ResourceId(8), &mut store).is_err());
        t.unref(ResourceId(7), &mut store).unwrap();
        assert_eq!(&store.bytes()[off as usize..off as usize + 16], &[0u8; 16]);
        assert_eq!(store.bytes()[16], 0xa5, "only the resource is scrubbed");
        assert_eq!(t.allocated_bytes(), 0);
        assert!(t.get(ResourceId(7)).is_err());
        assert_eq!(t.create(ResourceId(7), 2, 2, 2).unwrap().offset, off);
    }
}
