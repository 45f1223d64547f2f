//! The two ways a guest reaches its VRAM: the BAR0 window register + PRAMIN aperture
//! ([`Bar0Window`], every access trapped by the backend) and the VRAM BARs' `resourceN` mmaps
//! ([`VramView`], mapped straight from the backend's VRAM).

use std::fs::File;
use std::io;

use crate::mem::Window;
use crate::params::Params;
use crate::pci::PciDevice;

/// BAR0 offset of the PRAMIN aperture.
pub const APERTURE: u64 = 0x70_0000;
/// Length of the PRAMIN aperture.
pub const APERTURE_LEN: u64 = 1 << 20;
/// Shift between the window register's BASE field and a VRAM address (64 KiB units).
pub const BASE_SHIFT: u32 = 16;
/// Shift of the TARGET field (Turing–Ada; 0 = VID_MEM).
pub const TARGET_SHIFT: u32 = 24;

/// The window register and the aperture, through the register BAR's `resourceN` mmap.
pub struct Bar0Window {
    reg: u64,
    reg_page: Window,
    aperture: Window,
}

impl Bar0Window {
    /// Map the page holding the window register at BAR0 offset `reg` and the 1 MiB aperture
    /// of the device's BAR `bar`.
    pub fn open(dev: &PciDevice, bar: usize, reg: u64) -> io::Result<Bar0Window> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(dev.resource_path(bar))?;
        Ok(Bar0Window {
            reg,
            reg_page: Window::map(&file, reg, 4)?,
            aperture: Window::map(&file, APERTURE, APERTURE_LEN)?,
        })
    }

    /// Write the whole window register.
    pub fn set(&self, value: u32) -> io::Result<()> {
        self.reg_page.write32(self.reg, value)
    }

    /// Point the window at VRAM byte address `base` (VID_MEM; `base` in whole 64 KiB units).
    pub fn set_base(&self, base: u64) -> io::Result<()> {
        let units = u32::try_from(base >> BASE_SHIFT)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "window base too large"))?;
        self.set(units)
    }

    /// Write `width` bytes at byte `byte` of the window register (a sub-dword write).
    pub fn set_part(&self, byte: u64, width: usize, value: u64) -> io::Result<()> {
        self.reg_page.write_width(self.reg + byte, width, value)
    }

    /// Read the window register.
    pub fn get(&self) -> io::Result<u32> {
        self.reg_page.read32(self.reg)
    }

    /// One `width`-byte load at aperture offset `offset`.
    pub fn read(&self, offset: u64, width: usize) -> io::Result<u64> {
        self.aperture.read_width(APERTURE + offset, width)
    }

    /// One `width`-byte store at aperture offset `offset`.
    pub fn write(&self, offset: u64, width: usize, value: u64) -> io::Result<()> {
        self.aperture.write_width(APERTURE + offset, width, value)
    }

    /// Pointer to aperture offset `offset` with `len` bytes of the aperture behind it (for
    /// the benchmark's unchecked loops).
    pub fn region(&self, offset: u64, len: usize) -> io::Result<*mut u8> {
        self.aperture.region(APERTURE + offset, len)
    }
}

/// Guest VRAM through the VRAM BARs: which BAR shows which guest VRAM range.
pub struct VramView {
    /// (guest VRAM offset, length, the BAR's resource file).
    ranges: Vec<(u64, u64, File)>,
}

/// A mapped range of guest VRAM.
pub struct VramChunk {
    window: Window,
    /// Guest VRAM address of the first byte.
    guest: u64,
    /// Its offset in the BAR.
    bar_offset: u64,
    len: u64,
}

impl VramView {
    /// Open the BARs of `map` (BAR index, guest VRAM offset, length); with an empty map, the
    /// `vram_bar` parameter shows guest VRAM from 0 (its `vram_real` bytes).
    pub fn open(dev: &PciDevice, params: &Params, bar_size: u64) -> io::Result<VramView> {
        let mut map = params.vram_map.clone();
        if map.is_empty() {
            let bar = params.vram_bar.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "neither gpuprobe.vram_map nor gpuprobe.vram_bar given",
                )
            })?;
            map.push((bar, 0, params.vram_real.unwrap_or(bar_size)));
        }
        let ranges = map
            .into_iter()
            .map(|(bar, off, len)| {
                let file = File::options()
                    .read(true)
                    .write(true)
                    .open(dev.resource_path(bar))?;
                Ok((off, len, file))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(VramView { ranges })
    }

    /// Map guest VRAM `[guest, guest + len)` (inside one BAR).
    pub fn chunk(&self, guest: u64, len: u64) -> io::Result<VramChunk> {
        let (off, _, file) = self
            .ranges
            .iter()
            .find(|(off, size, _)| {
                guest >= *off && guest.checked_add(len).is_some_and(|end| end <= off + size)
            })
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("guest VRAM [{guest:#x}, +{len:#x}) is in no mapped VRAM BAR"),
                )
            })?;
        let bar_offset = guest - off;
        Ok(VramChunk {
            window: Window::map(file, bar_offset, len)?,
            guest,
            bar_offset,
            len,
        })
    }

    /// One 4-byte read of guest VRAM `guest` (maps and unmaps a page).
    pub fn read32(&self, guest: u64) -> io::Result<u32> {
        self.chunk(guest, 4)?.read32(guest)
    }
}

impl VramChunk {
    fn offset(&self, guest: u64) -> io::Result<u64> {
        guest
            .checked_sub(self.guest)
            .filter(|rel| rel + 4 <= self.len)
            .map(|rel| self.bar_offset + rel)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "outside the chunk"))
    }

    /// 4-byte read at guest VRAM address `guest`.
    pub fn read32(&self, guest: u64) -> io::Result<u32> {
        self.window.read32(self.offset(guest)?)
    }

    /// 4-byte write at guest VRAM address `guest`.
    pub fn write32(&self, guest: u64, value: u32) -> io::Result<()> {
        self.window.write32(self.offset(guest)?, value)
    }

    /// Pointer to the chunk's first byte, `len` bytes behind it (for unchecked loops).
    pub fn ptr(&self) -> io::Result<*mut u8> {
        self.window.region(self.bar_offset, self.len as usize)
    }
}
