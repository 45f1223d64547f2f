//! A guest's DMA memory (a real sealed memfd holding a pattern, as QEMU's
//! `memory-backend-memfd` would) and the maps its connection should hold, with the errno
//! the server must answer to each map and unmap (VFIO type1 semantics, see
//! `gpu_backend::vfio_user::dma`).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use gpu_backend::vfio_user::protocol::dma_flags;

use crate::support::rng::{pattern, pattern_mismatch, Rng};

/// Size of each guest's DMA memfd.
pub const DMA_MEMORY: u64 = 256 << 10;
/// DMA page size.
pub const PAGE: u64 = 4096;
/// Lowest IOVA the maps use; they stay below `IOVA_BASE + IOVA_SPAN`.
const IOVA_BASE: u64 = 0x1_0000_0000;
const IOVA_SPAN: u64 = 128 * PAGE;

/// A `DMA_MAP` request.
#[derive(Debug, Clone)]
pub struct MapRequest {
    /// IOVA.
    pub iova: u64,
    /// Length.
    pub size: u64,
    /// Offset in the memfd.
    pub offset: u64,
    /// Flags (READ/WRITE, maybe garbage).
    pub flags: u32,
    /// Send the memfd with it.
    pub with_fd: bool,
}

/// A `DMA_UNMAP` request.
#[derive(Debug, Clone)]
pub struct UnmapRequest {
    /// Address.
    pub iova: u64,
    /// Length.
    pub size: u64,
    /// Flags (`UNMAP_ALL`, maybe garbage).
    pub flags: u32,
}

/// One guest's DMA memory and expected maps.
#[derive(Debug)]
pub struct GuestDma {
    memfd: OwnedFd,
    seed: u64,
    /// IOVA to size.
    maps: BTreeMap<u64, u64>,
}

impl GuestDma {
    /// A sealed memfd of [`DMA_MEMORY`] bytes holding the pattern of `seed`.
    pub fn new(seed: u64) -> Result<GuestDma, String> {
        let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
        // SAFETY: a valid NUL-terminated name; no other preconditions.
        let raw = unsafe {
            libc::memfd_create(
                c"churn-guest-ram".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `raw` was just returned by memfd_create and is owned by nobody else.
        let memfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut bytes = vec![0u8; DMA_MEMORY as usize];
        pattern(seed, 0, &mut bytes);
        // SAFETY: `bytes` is a valid buffer of its length; the fd is ours.
        let written =
            unsafe { libc::pwrite(memfd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if written != bytes.len() as isize {
            return Err(os("writing the DMA memory"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: F_ADD_SEALS with an int argument on our memfd.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(os("sealing the DMA memory"));
        }
        Ok(GuestDma {
            memfd,
            seed,
            maps: BTreeMap::new(),
        })
    }

    /// The memfd sent with maps.
    pub fn memfd(&self) -> &OwnedFd {
        &self.memfd
    }

    /// The connection went away: it holds no map.
    pub fn forget_all(&mut self) {
        self.maps.clear();
    }

    /// A map request: mostly valid, sometimes overlapping, empty, wrapping, past the file,
    /// misaligned or with unknown flags.
    pub fn random_map(&self, rng: &mut Rng) -> MapRequest {
        let pages = DMA_MEMORY / PAGE;
        let mut req = MapRequest {
            iova: IOVA_BASE + rng.below(IOVA_SPAN / PAGE) * PAGE,
            size: rng.range(1, 8) * PAGE,
            offset: rng.below(pages) * PAGE,
            flags: *rng.pick(&[
                dma_flags::MAP_READ | dma_flags::MAP_WRITE,
                dma_flags::MAP_READ | dma_flags::MAP_WRITE,
                dma_flags::MAP_READ,
                dma_flags::MAP_WRITE,
            ]),
            with_fd: !rng.chance(1, 10),
        };
        match rng.below(16) {
            0 => req.size = 0,
            1 => req.iova = u64::MAX - PAGE + 1,
            2 => req.offset += 1 + rng.below(PAGE - 1),
            3 => req.offset = DMA_MEMORY - PAGE,
            4 => req.flags |= 1 << rng.range(2, 31),
            5 => req.flags = 0,
            6 => req.size = rng.range(1, PAGE - 1),
            _ => {}
        }
        req
    }

    /// An unmap request: a range around the maps (wholly covering some, splitting some,
    /// covering none), `UNMAP_ALL`, or garbage.
    pub fn random_unmap(&self, rng: &mut Rng) -> UnmapRequest {
        let mut req = UnmapRequest {
            iova: IOVA_BASE + rng.below(IOVA_SPAN / PAGE) * PAGE,
            size: rng.range(1, 32) * PAGE,
            flags: 0,
        };
        if let (Some((&iova, &size)), true) = (
            self.maps.iter().nth(rng.below(8) as usize),
            rng.chance(1, 2),
        ) {
            req.iova = iova;
            req.size = size;
        }
        match rng.below(16) {
            0 => {
                req.flags = dma_flags::UNMAP_ALL;
                req.iova = 0;
                req.size = 0;
            }
            1 => req.flags = dma_flags::UNMAP_ALL,
            2 => req.size = 0,
            3 => req.iova = u64::MAX - PAGE + 1,
            4 => req.flags = 1 << rng.range(2, 31),
            5 => {
                req.iova = 0;
                req.size = u64::MAX;
            }
            _ => {}
        }
        req
    }

    /// What the server must answer to `req` (an errno), and the model updated on success.
    pub fn map(&mut self, req: &MapRequest) -> Result<(), i32> {
        if req.flags & !(dma_flags::MAP_READ | dma_flags::MAP_WRITE) != 0 || req.size == 0 {
            return Err(libc::EINVAL);
        }
        let end = req.iova.checked_add(req.size).ok_or(libc::EINVAL)?;
        let access = req.flags != 0;
        if req.with_fd && access {
            let fits = req
                .offset
                .checked_add(req.size)
                .is_some_and(|e| e <= DMA_MEMORY);
            if req.offset % PAGE != 0 || !fits {
                return Err(libc::EINVAL);
            }
        }
        if let Some((&base, &size)) = self.maps.range(..end).next_back() {
            if base + size > req.iova {
                return Err(libc::EEXIST);
            }
        }
        self.maps.insert(req.iova, req.size);
        Ok(())
    }

    /// What the server must answer to `req`, and the model updated on success.
    pub fn unmap(&mut self, req: &UnmapRequest) -> Result<(), i32> {
        if req.flags & dma_flags::UNMAP_GET_DIRTY_BITMAP != 0 {
            return Err(libc::ENOTSUP);
        }
        if req.flags & !dma_flags::UNMAP_ALL != 0 {
            return Err(libc::EINVAL);
        }
        if req.flags & dma_flags::UNMAP_ALL != 0 {
            if req.iova != 0 || req.size != 0 {
                return Err(libc::EINVAL);
            }
            self.maps.clear();
            return Ok(());
        }
        if req.size == 0 {
            return Err(libc::EINVAL);
        }
        let last = req.iova.checked_add(req.size - 1).ok_or(libc::EINVAL)?;
        if let Some((&base, &size)) = self.maps.range(..req.iova).next_back() {
            if base + size > req.iova {
                return Err(libc::EINVAL);
            }
        }
        let covered: Vec<u64> = self.maps.range(req.iova..=last).map(|(&b, _)| b).collect();
        if covered.iter().any(|b| b + (self.maps[b] - 1) > last) {
            return Err(libc::EINVAL);
        }
        for b in covered {
            self.maps.remove(&b);
        }
        Ok(())
    }

    /// The memfd still holds exactly its pattern: nothing of the backend wrote guest memory.
    pub fn check_memory(&self) -> Result<(), String> {
        let mut bytes = vec![0u8; DMA_MEMORY as usize];
        // SAFETY: `bytes` is a valid buffer of its length; the fd is ours.
        let read = unsafe {
            libc::pread(
                self.memfd.as_raw_fd(),
                bytes.as_mut_ptr().cast(),
                bytes.len(),
                0,
            )
        };
        if read != bytes.len() as isize {
            return Err(format!(
                "reading the DMA memory: {}",
                std::io::Error::last_os_error()
            ));
        }
        match pattern_mismatch(self.seed, 0, &bytes) {
            None => Ok(()),
            Some(at) => Err(format!("guest DMA memory changed at offset {at:#x}")),
        }
    }
}
