//! The emulated GSP-RM's object table (client, device, subdevice, memory, address spaces)
//! and its allocator of usable VRAM for memory objects.

use std::collections::BTreeMap;

use super::fb::{FbRegion, FbRegionKind};
use super::rm::{class, status};

/// Handle of the internal client the firmware creates at boot (project-chosen value).
pub const INTERNAL_CLIENT: u32 = 0xC1D0_0001;
/// Handle of the internal device object.
pub const INTERNAL_DEVICE: u32 = 0xC1D0_0002;
/// Handle of the internal subdevice object.
pub const INTERNAL_SUBDEVICE: u32 = 0xC1D0_0003;

/// Allocation granularity of memory objects.
const PAGE: u64 = 0x1000;

/// What an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// The internal client.
    Client,
    /// The device.
    Device,
    /// The subdevice.
    Subdevice,
    /// VRAM owned by the object.
    Memory {
        /// VRAM address.
        addr: u64,
        /// Bytes.
        size: u64,
    },
    /// A GPU virtual address space.
    VaSpace {
        /// First VA.
        va_base: u64,
        /// Bytes of VA.
        va_size: u64,
        /// Big page size.
        big_page_size: u32,
        /// Bound page directory: VRAM address, aperture.
        page_directory: Option<(u64, u32)>,
    },
}

/// One object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Object {
    /// Its handle.
    pub handle: u32,
    /// Parent handle (the client's parent is itself).
    pub parent: u32,
    /// Class number.
    pub class: u32,
    /// Kind and state.
    pub kind: ObjectKind,
}

/// First-fit allocator over the usable framebuffer regions.
#[derive(Debug)]
struct VramHeap {
    /// Free extents `[start, end)`, sorted, non-adjacent.
    free: Vec<(u64, u64)>,
}

impl VramHeap {
    fn new(regions: &[FbRegion]) -> VramHeap {
        VramHeap {
            free: regions
                .iter()
                .filter(|r| r.kind == FbRegionKind::Usable)
                .map(|r| (r.base, r.limit + 1))
                .collect(),
        }
    }

    fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        for i in 0..self.free.len() {
            let (start, end) = self.free[i];
            let at = start.checked_next_multiple_of(align)?;
            if at.checked_add(size).is_some_and(|e| e <= end) {
                let mut pieces = Vec::new();
                if at > start {
                    pieces.push((start, at));
                }
                if at + size < end {
                    pieces.push((at + size, end));
                }
                self.free.splice(i..=i, pieces);
                return Some(at);
            }
        }
        None
    }

    fn release(&mut self, addr: u64, size: u64) {
        let i = self.free.partition_point(|&(s, _)| s < addr);
        self.free.insert(i, (addr, addr + size));
        // Merge with the neighbours.
        if i + 1 < self.free.len() && self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 = self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 = self.free[i].1;
            self.free.remove(i);
        }
    }

    fn free_bytes(&self) -> u64 {
        self.free.iter().map(|(s, e)| e - s).sum()
    }
}

/// The object table.
#[derive(Debug)]
pub(crate) struct Objects {
    objects: BTreeMap<u32, Object>,
    heap: VramHeap,
    regions: Vec<FbRegion>,
}

impl Objects {
    /// The table at boot: the internal client, device and subdevice.
    pub(crate) fn new(regions: &[FbRegion]) -> Objects {
        let mut objects = BTreeMap::new();
        for (handle, parent, class, kind) in [
            (
                INTERNAL_CLIENT,
                INTERNAL_CLIENT,
                class::NV01_ROOT,
                ObjectKind::Client,
            ),
            (
                INTERNAL_DEVICE,
                INTERNAL_CLIENT,
                class::NV01_DEVICE_0,
                ObjectKind::Device,
            ),
            (
                INTERNAL_SUBDEVICE,
                INTERNAL_DEVICE,
                class::NV20_SUBDEVICE_0,
                ObjectKind::Subdevice,
            ),
        ] {
            objects.insert(
                handle,
                Object {
                    handle,
                    parent,
                    class,
                    kind,
                },
            );
        }
        Objects {
            objects,
            heap: VramHeap::new(regions),
            regions: regions.to_vec(),
        }
    }

    fn check_new(&self, client: u32, parent: u32, handle: u32) -> Result<(), u32> {
        if client != INTERNAL_CLIENT {
            return Err(status::INVALID_OBJECT_HANDLE);
        }
        match self.objects.get(&parent) {
            Some(p) if p.kind == ObjectKind::Device => {}
            Some(_) => return Err(status::INVALID_OBJECT_HANDLE),
            None => return Err(status::OBJECT_NOT_FOUND),
        }
        if handle == 0 || self.objects.contains_key(&handle) {
            return Err(status::INSERT_DUPLICATE_NAME);
        }
        Ok(())
    }

    /// Allocates `size` bytes of VRAM aligned to `align` as object `handle` under `parent`;
    /// returns `(address, rounded size)`.
    pub(crate) fn alloc_memory(
        &mut self,
        client: u32,
        parent: u32,
        handle: u32,
        size: u64,
        align: u64,
    ) -> Result<(u64, u64), u32> {
        self.check_new(client, parent, handle)?;
        if size == 0 || !(align == 0 || align.is_power_of_two()) {
            return Err(status::INVALID_ARGUMENT);
        }
        let align = align.max(PAGE);
        let size = size
            .checked_next_multiple_of(PAGE)
            .ok_or(status::NO_MEMORY)?;
        let addr = self.heap.alloc(size, align).ok_or(status::NO_MEMORY)?;
        self.objects.insert(
            handle,
            Object {
                handle,
                parent,
                class: class::NV01_MEMORY_LOCAL_USER,
                kind: ObjectKind::Memory { addr, size },
            },
        );
        Ok((addr, size))
    }

    /// Creates an address space `handle` under `parent`.
    pub(crate) fn alloc_vaspace(
        &mut self,
        client: u32,
        parent: u32,
        handle: u32,
        va_base: u64,
        va_size: u64,
        big_page_size: u32,
    ) -> Result<(), u32> {
        self.check_new(client, parent, handle)?;
        let big_ok = matches!(big_page_size, 0x1_0000 | 0x2_0000);
        if va_size == 0 || va_base.checked_add(va_size).is_none() || !big_ok {
            return Err(status::INVALID_ARGUMENT);
        }
        self.objects.insert(
            handle,
            Object {
                handle,
                parent,
                class: class::FERMI_VASPACE_A,
                kind: ObjectKind::VaSpace {
                    va_base,
                    va_size,
                    big_page_size,
                    page_directory: None,
                },
            },
        );
        Ok(())
    }

    /// Binds the page directory at VRAM `pdb` (aperture `aperture`) to address space
    /// `handle`.
    pub(crate) fn bind_page_directory(
        &mut self,
        client: u32,
        handle: u32,
        pdb: u64,
        aperture: u32,
    ) -> Result<(), u32> {
        if client != INTERNAL_CLIENT {
            return Err(status::INVALID_OBJECT_HANDLE);
        }
        let in_usable = self.regions.iter().any(|r| {
            r.kind == FbRegionKind::Usable
                && pdb >= r.base
                && pdb.checked_add(PAGE - 1).is_some_and(|e| e <= r.limit)
        });
        let obj = self
            .objects
            .get_mut(&handle)
            .ok_or(status::OBJECT_NOT_FOUND)?;
        let ObjectKind::VaSpace { page_directory, .. } = &mut obj.kind else {
            return Err(status::INVALID_OBJECT_HANDLE);
        };
        // Aperture 0 = video memory; the emulated GSP takes no other.
        if aperture != 0 || pdb % PAGE != 0 || !in_usable {
            return Err(status::INVALID_ARGUMENT);
        }
        *page_directory = Some((pdb, aperture));
        Ok(())
    }

    /// Frees object `handle` (child of `parent`). Internal objects cannot be freed.
    pub(crate) fn free(&mut self, client: u32, parent: u32, handle: u32) -> Result<(), u32> {
        if client != INTERNAL_CLIENT {
            return Err(status::INVALID_OBJECT_HANDLE);
        }
        let obj = *self.objects.get(&handle).ok_or(status::OBJECT_NOT_FOUND)?;
        if obj.parent != parent
            || matches!(
                obj.kind,
                ObjectKind::Client | ObjectKind::Device | ObjectKind::Subdevice
            )
        {
            return Err(status::INVALID_OBJECT_HANDLE);
        }
        if let ObjectKind::Memory { addr, size } = obj.kind {
            self.heap.release(addr, size);
        }
        self.objects.remove(&handle);
        Ok(())
    }

    /// Every object, by handle.
    pub(crate) fn list(&self) -> Vec<Object> {
        self.objects.values().copied().collect()
    }

    /// Usable VRAM not held by memory objects.
    pub(crate) fn free_vram(&self) -> u64 {
        self.heap.free_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gsp::fb::fb_regions;
    use crate::profile::ChipProfile;

    fn table() -> Objects {
        Objects::new(&fb_regions(ChipProfile::by_name("tu102-24g").unwrap()))
    }

    #[test]
    fn memory_objects_allocate_align_and_free() {
        let mut o = table();
        let total = o.free_vram();
        let (c, d) = (INTERNAL_CLIENT, INTERNAL_DEVICE);
        let (a, s) = o.alloc_memory(c, d, 0x100, 0x1800, 0).unwrap();
        assert_eq!((a, s), (0, 0x2000));
        let (b, _) = o.alloc_memory(c, d, 0x101, 0x1000, 0x10_0000).unwrap();
        assert_eq!(b, 0x10_0000);
        assert_eq!(
            o.alloc_memory(c, d, 0x101, 0x1000, 0),
            Err(status::INSERT_DUPLICATE_NAME)
        );
        assert_eq!(
            o.alloc_memory(c, 0x999, 0x102, 0x1000, 0),
            Err(status::OBJECT_NOT_FOUND)
        );
        assert_eq!(
            o.alloc_memory(c, INTERNAL_SUBDEVICE, 0x102, 0x1000, 0),
            Err(status::INVALID_OBJECT_HANDLE)
        );
        assert_eq!(
            o.alloc_memory(c, d, 0x102, total, 0),
            Err(status::NO_MEMORY)
        );
        assert_eq!(
            o.alloc_memory(c, d, 0x102, 0x1000, 3),
            Err(status::INVALID_ARGUMENT)
        );
        // The gap below 1 MiB is reused.
        let (g, _) = o.alloc_memory(c, d, 0x102, 0x1000, 0).unwrap();
        assert_eq!(g, 0x2000);
        assert_eq!(o.free(c, d, 0x100), Ok(()));
        assert_eq!(o.free(c, d, 0x100), Err(status::OBJECT_NOT_FOUND));
        assert_eq!(
            o.free(c, d, INTERNAL_DEVICE),
            Err(status::INVALID_OBJECT_HANDLE)
        );
        assert_eq!(
            o.free(c, INTERNAL_CLIENT, 0x101),
            Err(status::INVALID_OBJECT_HANDLE)
        );
        o.free(c, d, 0x101).unwrap();
        o.free(c, d, 0x102).unwrap();
        assert_eq!(o.free_vram(), total);
    }

    #[test]
    fn address_spaces_bind_page_directories() {
        let mut o = table();
        let (c, d) = (INTERNAL_CLIENT, INTERNAL_DEVICE);
        o.alloc_vaspace(c, d, 0x200, 0, 1 << 40, 0x1_0000).unwrap();
        assert_eq!(
            o.alloc_vaspace(c, d, 0x201, 0, 1 << 40, 4096),
            Err(status::INVALID_ARGUMENT)
        );
        assert_eq!(o.bind_page_directory(c, 0x200, 0x4000, 0), Ok(()));
        assert_eq!(
            o.bind_page_directory(c, 0x200, 0x4001, 0),
            Err(status::INVALID_ARGUMENT)
        );
        assert_eq!(
            o.bind_page_directory(c, 0x200, 0x4000, 2),
            Err(status::INVALID_ARGUMENT)
        );
        assert_eq!(
            o.bind_page_directory(c, INTERNAL_DEVICE, 0x4000, 0),
            Err(status::INVALID_OBJECT_HANDLE)
        );
        assert_eq!(
            o.bind_page_directory(c, 0x777, 0x4000, 0),
            Err(status::OBJECT_NOT_FOUND)
        );
        let vas = o.list().into_iter().find(|x| x.handle == 0x200).unwrap();
        assert!(matches!(
            vas.kind,
            ObjectKind::VaSpace {
                page_directory: Some((0x4000, 0)),
                ..
            }
        ));
    }
}
