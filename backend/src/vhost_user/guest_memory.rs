//! Whether the guest memory QEMU hands over with SET_MEM_TABLE is safe to touch.
//!
//! `vhost-user-backend` maps each region's fd shared. Touching a shared file mapping past the
//! end of its file faults with SIGBUS, which takes the whole backend (every guest) down; a
//! frontend can make that happen by claiming a region longer than its file, or by shrinking
//! the file after handing it over. So the display touches guest memory only if every region's
//! file is sealed against shrinking (`F_SEAL_SHRINK`, plus `F_SEAL_WRITE` on hugetlbfs, where
//! punching a hole is SIGBUS once the pool is empty) and, checked after the seals, holds the
//! whole region: the same rule as the vfio-user side's DMA maps, in one place
//! ([`crate::shared_memory`]). QEMU's `memory-backend-memfd` seals its memfd so by default
//! (`seal=on`); memory QEMU could shrink (`memory-backend-file`, `seal=off`) is refused with
//! an error saying so.
//!
//! [`MemoryCheck`] remembers the last memory found safe, so a queue checks the memory it is
//! about to use cheaply, and memory that was swapped in under it (a new SET_MEM_TABLE) is
//! checked before it is touched. It is recognised by its regions' addresses in this process;
//! the check holds the memory it found safe, so those mappings stay and their addresses
//! cannot be reused by another mapping meanwhile.

use std::os::fd::AsFd;

use crate::shared_memory::FdSafety;

use parking_lot::Mutex;
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Why guest memory is not touched.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GuestMemoryError {
    /// A region's file can shrink under the mapping.
    #[error(
        "guest memory region at {gpa:#x} is not sealed against shrinking (seals {seals:#x}); \
         use memory-backend-memfd with its default seal=on"
    )]
    NotSealed {
        /// Guest address of the region.
        gpa: u64,
        /// The file's seals.
        seals: i32,
    },
    /// A hugetlbfs region without the write seal (holes can still be punched).
    #[error("guest memory region at {gpa:#x} is on hugetlbfs without F_SEAL_WRITE")]
    HugetlbfsUnsealed {
        /// Guest address of the region.
        gpa: u64,
    },
    /// A region longer than its file (or not a regular file).
    #[error(
        "guest memory region at {gpa:#x} ({len:#x} bytes at file offset {offset:#x}) is not \
         backed by its file (file size {file_size:#x})"
    )]
    NotBacked {
        /// Guest address of the region.
        gpa: u64,
        /// Region length.
        len: u64,
        /// Offset in the file.
        offset: u64,
        /// The file's size (0 if it is not a regular file).
        file_size: u64,
    },
    /// The file could not be examined.
    #[error("guest memory region at {gpa:#x}: {reason}")]
    Unreadable {
        /// Guest address of the region.
        gpa: u64,
        /// `fstat`'s error.
        reason: String,
    },
}

/// The regions of `mem` as (host address, length): what identifies a mapping here.
fn regions(mem: &GuestMemoryMmap) -> Vec<(usize, u64)> {
    mem.iter().map(|r| (r.as_ptr() as usize, r.len())).collect()
}

/// Checks one region (see the module docs).
fn check_region(
    gpa: u64,
    len: u64,
    file: &std::fs::File,
    offset: u64,
) -> Result<(), GuestMemoryError> {
    let safety = FdSafety::of(file.as_fd()).map_err(|e| GuestMemoryError::Unreadable {
        gpa,
        reason: e.to_string(),
    })?;
    if safety.seals & libc::F_SEAL_SHRINK == 0 {
        return Err(GuestMemoryError::NotSealed {
            gpa,
            seals: safety.seals,
        });
    }
    if !safety.is_sealed() {
        return Err(GuestMemoryError::HugetlbfsUnsealed { gpa });
    }
    match safety.holds(offset, len) {
        Some(true) => Ok(()),
        _ => Err(GuestMemoryError::NotBacked {
            gpa,
            len,
            offset,
            file_size: safety.size.unwrap_or(0),
        }),
    }
}

/// The last guest memory found safe to touch.
#[derive(Default)]
pub struct MemoryCheck {
    safe: Mutex<Option<GuestMemoryMmap>>,
}

impl std::fmt::Debug for MemoryCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCheck").finish_non_exhaustive()
    }
}

impl MemoryCheck {
    /// Whether `mem` is safe to touch: at once if it is the memory found safe last, else
    /// each region is checked. Memory without a file behind it is this process's own.
    pub fn check(&self, mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
        if self
            .safe
            .lock()
            .as_ref()
            .is_some_and(|safe| regions(safe) == regions(mem))
        {
            return Ok(());
        }
        for region in mem.iter() {
            if let Some(file) = region.file_offset() {
                check_region(
                    region.start_addr().0,
                    region.len(),
                    file.file(),
                    file.start(),
                )?;
            }
        }
        *self.safe.lock() = Some(mem.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::FromRawFd;

    use vm_memory::{FileOffset, GuestAddress};

    use super::*;

    fn memfd(size: u64, seals: i32) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        if seals != 0 {
            // SAFETY: F_ADD_SEALS with an int argument on our memfd.
            assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) }, 0);
        }
        file
    }

    fn memory(file: File, offset: u64, len: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0x1000_0000),
            len,
            Some(FileOffset::new(file, offset)),
        )])
        .unwrap()
    }

    #[test]
    fn only_sealed_fully_backed_memory_is_safe() {
        let sealed = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        let check = MemoryCheck::default();
        assert_eq!(
            check.check(&memory(memfd(0x4000, sealed), 0, 0x4000)),
            Ok(())
        );
        // Shrink-sealed alone is enough.
        let mem = memory(memfd(0x4000, libc::F_SEAL_SHRINK), 0x1000, 0x3000);
        assert_eq!(check.check(&mem), Ok(()));
        assert!(matches!(
            check.check(&memory(memfd(0x4000, 0), 0, 0x4000)),
            Err(GuestMemoryError::NotSealed {
                gpa: 0x1000_0000,
                seals: 0
            })
        ));
        assert!(matches!(
            check.check(&memory(
                memfd(0x4000, libc::F_SEAL_GROW | libc::F_SEAL_SEAL),
                0,
                0x4000
            )),
            Err(GuestMemoryError::NotSealed { .. })
        ));
        // A region past the end of its (sealed) file.
        assert!(matches!(
            check.check(&memory(memfd(0x4000, sealed), 0x1000, 0x4000)),
            Err(GuestMemoryError::NotBacked {
                file_size: 0x4000,
                ..
            })
        ));
        // Memory without a file is the process's own.
        let anon = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        assert_eq!(check.check(&anon), Ok(()));
    }

    #[test]
    fn memory_found_safe_is_not_checked_again_but_new_memory_is() {
        let check = MemoryCheck::default();
        let file = memfd(0x4000, libc::F_SEAL_SHRINK);
        let mem = memory(file.try_clone().unwrap(), 0, 0x4000);
        assert_eq!(check.check(&mem), Ok(()));
        assert_eq!(check.check(&mem), Ok(()));
        let other = memory(memfd(0x4000, 0), 0, 0x4000);
        assert!(check.check(&other).is_err());
        // The safe one stays safe.
        assert_eq!(check.check(&mem), Ok(()));
    }
}
