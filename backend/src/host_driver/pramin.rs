//! The PRAMIN window: BAR0 `0x700000..0x800000` shows 1 MiB of VRAM starting at a 64 KiB-
//! aligned base chosen by the generation's window register (gpu-facts 2.4).
//!
//! [`Pramin`] owns that register and hands out a [`PraminWindow`] at a chosen base — the
//! simplest abstraction of the mechanism. Random access that repositions the window
//! automatically lives one layer up, in [`PraminCursor`](super::cursor::PraminCursor).
//!
//! # Locking
//! [`Pramin::window`] takes `&mut self`, and the window it returns borrows the `Pramin`
//! mutably for as long as it lives. There is no internal lock, deliberately:
//! - the window register is one piece of global device state; whoever uses PRAMIN needs
//!   it *exclusively* for a whole sequence of accesses (a page-table update writes
//!   thousands of entries), which a per-call internal lock would not give — two users
//!   interleaving would thrash the window on every access or, worse, write through a
//!   window the other one moved;
//! - with `&mut`, the borrow checker proves within one owner that no access goes through
//!   a stale window, and an owner that shares the device wraps the `Pramin` in a
//!   `Mutex` it can see and hold across the batch (the lock is visible at the layer that
//!   decides about concurrency rather than buried here);
//! - it costs nothing for the single-threaded builder and tests.
//!
//! The backend must be the only user of the window register on the host (true for a GPU
//! bound to vfio-pci); the cached base is re-read only at construction.
//!
//! # Access widths
//! PRAMIN is documented as byte/16/32-bit accessible, so 64-bit values go out as two
//! 32-bit accesses. [`PraminWindow::write_u64`] writes the high dword first, then the
//! low dword: page-table entries keep VALID and the aperture in the low dword, so an
//! entry that is being made valid never becomes visible half-written. To invalidate an
//! entry, write its low dword first (e.g. [`PraminWindow::write_bytes`] with zeroes,
//! which goes in ascending order).

use std::sync::Arc;

use thiserror::Error;

use super::addr::{VramAddr, KIB, MIB};
use super::regs::{self, MemTarget, PbusBar0Window, RegError, XalBar0Window};
use crate::host_gpu::{AccessWidth, Generation, HostGpu, HostGpuError};

/// BAR0 offset of the PRAMIN aperture.
pub const PRAMIN_APERTURE: u64 = 0x70_0000;
/// Size of the PRAMIN aperture (and of a window).
pub const PRAMIN_WINDOW_SIZE: u64 = MIB;
/// Granularity of the window base.
pub const WINDOW_BASE_ALIGN: u64 = 64 * KIB;
/// Shift between a VRAM address and the window register's BASE field.
const BASE_SHIFT: u32 = 16;

/// Errors of the PRAMIN window.
#[derive(Debug, Error)]
pub enum PraminError {
    /// The window base is not 64 KiB aligned.
    #[error("PRAMIN window base {0} is not 64 KiB aligned")]
    MisalignedBase(VramAddr),
    /// The window base lies outside VRAM or beyond what the register can hold.
    #[error("PRAMIN window base {base} is out of range (VRAM {vram_size:#x} bytes, register reaches {reach:#x})")]
    BaseOutOfRange {
        /// Requested base.
        base: VramAddr,
        /// VRAM size.
        vram_size: u64,
        /// First address the BASE field cannot express.
        reach: u64,
    },
    /// An access does not fit the window (or runs past the end of VRAM).
    #[error("PRAMIN access of {len} bytes at window offset {offset:#x} does not fit the {window_len:#x}-byte window at {base}")]
    OutOfWindow {
        /// Window base.
        base: VramAddr,
        /// Offset in the window.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Usable window length.
        window_len: u64,
    },
    /// A 16/32/64-bit access at an offset that is not a multiple of its width.
    #[error(
        "PRAMIN access of {width} bytes at window offset {offset:#x} is not naturally aligned"
    )]
    Misaligned {
        /// Offset in the window.
        offset: u64,
        /// Width in bytes.
        width: u64,
    },
    /// The window register could not be accessed.
    #[error(transparent)]
    Register(#[from] RegError),
    /// A PRAMIN access failed on the device.
    #[error("PRAMIN access at BAR0 {bar0_offset:#x} failed: {source}")]
    Access {
        /// BAR0 offset of the access.
        bar0_offset: u64,
        /// What the host GPU reported.
        #[source]
        source: HostGpuError,
    },
}

/// Which window register a generation has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WindowLayout {
    /// `NV_PBUS_BAR0_WINDOW` at 0x1700 with TARGET (Turing–Ada).
    Pbus,
    /// `NV_XAL_EP_ZB_BAR0_WINDOW` at 0x10FD40, BASE only, `base_bits` wide.
    Xal { base_bits: u32 },
}

impl WindowLayout {
    fn of(generation: Generation) -> WindowLayout {
        match generation {
            Generation::Turing | Generation::Ampere | Generation::Ada => WindowLayout::Pbus,
            // GH100: BASE 21:0 (38-bit addresses).
            Generation::Hopper => WindowLayout::Xal { base_bits: 22 },
            // GB10x: 22:0; GB20x is not in the published header and is treated alike
            // (unconfirmed).
            Generation::Blackwell => WindowLayout::Xal { base_bits: 23 },
        }
    }

    fn base_bits(self) -> u32 {
        match self {
            WindowLayout::Pbus => PbusBar0Window::BASE.width(),
            WindowLayout::Xal { base_bits } => base_bits,
        }
    }
}

/// Owner of the generation's BAR0 window register.
pub struct Pramin {
    gpu: Arc<dyn HostGpu>,
    layout: WindowLayout,
    vram_size: u64,
    /// The base the register points at with a VRAM target, if known.
    current: Option<VramAddr>,
    moves: u64,
}

impl std::fmt::Debug for Pramin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pramin")
            .field("layout", &self.layout)
            .field("vram_size", &format_args!("{:#x}", self.vram_size))
            .field("current", &self.current)
            .field("moves", &self.moves)
            .finish()
    }
}

impl Pramin {
    /// Takes ownership of the window register of `gpu` (generation and VRAM size from its
    /// identity). Reads the register once to learn where the window points, so a first
    /// request for that base costs no register write.
    pub fn new(gpu: Arc<dyn HostGpu>) -> Result<Pramin, PraminError> {
        let identity = gpu.identity();
        let layout = WindowLayout::of(identity.generation);
        let vram_size = identity.vram_size;
        let current = match layout {
            WindowLayout::Pbus => {
                let r: PbusBar0Window = regs::read_reg(&*gpu)?;
                (MemTarget::from_raw(r.target()) == Some(MemTarget::Vram))
                    .then(|| VramAddr::new(u64::from(r.base()) << BASE_SHIFT))
            }
            WindowLayout::Xal { base_bits } => {
                let r: XalBar0Window = regs::read_reg(&*gpu)?;
                let base = u64::from(r.base()) & ((1 << base_bits) - 1);
                Some(VramAddr::new(base << BASE_SHIFT))
            }
        };
        Ok(Pramin {
            gpu,
            layout,
            vram_size,
            current,
            moves: 0,
        })
    }

    /// The GPU this window belongs to.
    pub fn gpu(&self) -> &Arc<dyn HostGpu> {
        &self.gpu
    }

    /// VRAM size in bytes (from the GPU's identity).
    pub fn vram_size(&self) -> u64 {
        self.vram_size
    }

    /// The base the window points at, if known.
    pub fn current_base(&self) -> Option<VramAddr> {
        self.current
    }

    /// Number of window register writes made by this owner (window moves).
    pub fn window_moves(&self) -> u64 {
        self.moves
    }

    /// First VRAM address the BASE field cannot express.
    pub fn register_reach(&self) -> u64 {
        1u64 << (self.layout.base_bits() + BASE_SHIFT)
    }

    /// A window of (up to) 1 MiB at `base`, which must be 64 KiB aligned and inside VRAM.
    /// The window is shorter than 1 MiB when VRAM ends before. Writes the window register
    /// only if it does not already point at `base`.
    pub fn window(&mut self, base: VramAddr) -> Result<PraminWindow<'_>, PraminError> {
        if !base.is_aligned(WINDOW_BASE_ALIGN) {
            return Err(PraminError::MisalignedBase(base));
        }
        let reach = self.register_reach();
        if base.raw() >= self.vram_size || base.raw() >= reach {
            return Err(PraminError::BaseOutOfRange {
                base,
                vram_size: self.vram_size,
                reach,
            });
        }
        if self.current != Some(base) {
            // Forget the cached base first: if the write fails we no longer know it.
            self.current = None;
            let field = base.raw() >> BASE_SHIFT; // < 2^base_bits, checked above
            match self.layout {
                WindowLayout::Pbus => regs::write_reg(
                    &*self.gpu,
                    PbusBar0Window::from_raw(0)
                        .with_base(field as u32)
                        .with_target(MemTarget::Vram.raw()),
                )?,
                WindowLayout::Xal { .. } => regs::write_reg(
                    &*self.gpu,
                    XalBar0Window::from_raw(0).with_base(field as u32),
                )?,
            }
            self.current = Some(base);
            self.moves += 1;
        }
        let len = (self.vram_size - base.raw()).min(PRAMIN_WINDOW_SIZE);
        Ok(PraminWindow {
            gpu: &*self.gpu,
            base,
            len,
        })
    }
}

/// A view of `len` (≤ 1 MiB) bytes of VRAM at `base` through the PRAMIN aperture.
/// Offsets are relative to `base`; every access is range-checked.
pub struct PraminWindow<'a> {
    gpu: &'a dyn HostGpu,
    base: VramAddr,
    len: u64,
}

impl std::fmt::Debug for PraminWindow<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PraminWindow")
            .field("base", &self.base)
            .field("len", &format_args!("{:#x}", self.len))
            .finish()
    }
}

impl PraminWindow<'_> {
    /// VRAM address of offset 0.
    pub fn base(&self) -> VramAddr {
        self.base
    }

    /// Usable length in bytes (1 MiB unless VRAM ends first).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty (never: a window lies inside VRAM).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The window offset of `addr`, if the window shows it.
    pub fn offset_of(&self, addr: VramAddr) -> Option<u64> {
        addr.offset_from(self.base).filter(|&o| o < self.len)
    }

    fn check(&self, offset: u64, len: u64, align: u64) -> Result<u64, PraminError> {
        let fits = offset.checked_add(len).is_some_and(|end| end <= self.len);
        if !fits {
            return Err(PraminError::OutOfWindow {
                base: self.base,
                offset,
                len,
                window_len: self.len,
            });
        }
        if offset % align != 0 {
            return Err(PraminError::Misaligned {
                offset,
                width: align,
            });
        }
        Ok(PRAMIN_APERTURE + offset)
    }

    fn raw_read(&self, bar0_offset: u64, width: AccessWidth) -> Result<u64, PraminError> {
        self.gpu
            .bar0_read(bar0_offset, width)
            .map_err(|source| PraminError::Access {
                bar0_offset,
                source,
            })
    }

    fn raw_write(&self, bar0_offset: u64, width: AccessWidth, v: u64) -> Result<(), PraminError> {
        self.gpu
            .bar0_write(bar0_offset, width, v)
            .map_err(|source| PraminError::Access {
                bar0_offset,
                source,
            })
    }

    /// The 64-bit value at aperture offset `at` as two 32-bit reads, low dword first.
    fn raw_read_u64(&self, at: u64) -> Result<u64, PraminError> {
        let lo = self.raw_read(at, AccessWidth::Dword)?;
        let hi = self.raw_read(at + 4, AccessWidth::Dword)?;
        Ok(lo | (hi << 32))
    }

    /// Writes `value` at aperture offset `at` as two 32-bit writes, **high dword first**
    /// (see the module documentation).
    fn raw_write_u64(&self, at: u64, value: u64) -> Result<(), PraminError> {
        self.raw_write(at + 4, AccessWidth::Dword, value >> 32)?;
        self.raw_write(at, AccessWidth::Dword, value & 0xFFFF_FFFF)
    }

    /// Reads the byte at `offset`.
    pub fn read_u8(&self, offset: u64) -> Result<u8, PraminError> {
        let at = self.check(offset, 1, 1)?;
        Ok(self.raw_read(at, AccessWidth::Byte)? as u8)
    }

    /// Reads the 16-bit value at `offset` (2-byte aligned).
    pub fn read_u16(&self, offset: u64) -> Result<u16, PraminError> {
        let at = self.check(offset, 2, 2)?;
        Ok(self.raw_read(at, AccessWidth::Word)? as u16)
    }

    /// Reads the 32-bit value at `offset` (4-byte aligned).
    pub fn read_u32(&self, offset: u64) -> Result<u32, PraminError> {
        let at = self.check(offset, 4, 4)?;
        Ok(self.raw_read(at, AccessWidth::Dword)? as u32)
    }

    /// Reads the 64-bit value at `offset` (8-byte aligned) as two 32-bit reads, low first.
    pub fn read_u64(&self, offset: u64) -> Result<u64, PraminError> {
        let at = self.check(offset, 8, 8)?;
        self.raw_read_u64(at)
    }

    /// Writes the byte at `offset`.
    pub fn write_u8(&self, offset: u64, value: u8) -> Result<(), PraminError> {
        let at = self.check(offset, 1, 1)?;
        self.raw_write(at, AccessWidth::Byte, u64::from(value))
    }

    /// Writes the 16-bit value at `offset` (2-byte aligned).
    pub fn write_u16(&self, offset: u64, value: u16) -> Result<(), PraminError> {
        let at = self.check(offset, 2, 2)?;
        self.raw_write(at, AccessWidth::Word, u64::from(value))
    }

    /// Writes the 32-bit value at `offset` (4-byte aligned).
    pub fn write_u32(&self, offset: u64, value: u32) -> Result<(), PraminError> {
        let at = self.check(offset, 4, 4)?;
        self.raw_write(at, AccessWidth::Dword, u64::from(value))
    }

    /// Writes the 64-bit value at `offset` (8-byte aligned) as two 32-bit writes, **high
    /// dword first** (see the module documentation).
    pub fn write_u64(&self, offset: u64, value: u64) -> Result<(), PraminError> {
        let at = self.check(offset, 8, 8)?;
        self.raw_write_u64(at, value)
    }

    /// Writes consecutive 64-bit values from `offset` (8-byte aligned), each as
    /// [`write_u64`](Self::write_u64) does. The whole range is checked first.
    pub fn write_u64s(&self, offset: u64, values: &[u64]) -> Result<(), PraminError> {
        let len = (values.len() as u64).saturating_mul(8);
        let at = self.check(offset, len, 8)?;
        for (i, &v) in values.iter().enumerate() {
            self.raw_write_u64(at + 8 * i as u64, v)?;
        }
        Ok(())
    }

    /// Reads consecutive 64-bit values from `offset` (8-byte aligned).
    pub fn read_u64s(&self, offset: u64, out: &mut [u64]) -> Result<(), PraminError> {
        let len = (out.len() as u64).saturating_mul(8);
        let at = self.check(offset, len, 8)?;
        for (i, v) in out.iter_mut().enumerate() {
            *v = self.raw_read_u64(at + 8 * i as u64)?;
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` into `buf` (any alignment; 32-bit accesses
    /// where aligned).
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), PraminError> {
        let mut at = self.check(offset, buf.len() as u64, 1)?;
        let mut rest = buf;
        while !rest.is_empty() {
            let width = chunk_width(at, rest.len());
            let n = width.bytes() as usize;
            let v = self.raw_read(at, width)?;
            rest[..n].copy_from_slice(&v.to_le_bytes()[..n]);
            rest = &mut rest[n..];
            at += n as u64;
        }
        Ok(())
    }

    /// Copies `data` to `offset` (any alignment; 32-bit accesses where aligned), in
    /// ascending address order.
    pub fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<(), PraminError> {
        let mut at = self.check(offset, data.len() as u64, 1)?;
        let mut rest = data;
        while !rest.is_empty() {
            let width = chunk_width(at, rest.len());
            let n = width.bytes() as usize;
            let mut bytes = [0u8; 8];
            bytes[..n].copy_from_slice(&rest[..n]);
            self.raw_write(at, width, u64::from_le_bytes(bytes))?;
            rest = &rest[n..];
            at += n as u64;
        }
        Ok(())
    }

    /// Writes `len` zero bytes at `offset`, in ascending address order.
    pub fn fill_zero(&self, offset: u64, len: u64) -> Result<(), PraminError> {
        let mut at = self.check(offset, len, 1)?;
        let end = at + len;
        while at < end {
            let width = chunk_width(at, (end - at).min(8) as usize);
            self.raw_write(at, width, 0)?;
            at += width.bytes();
        }
        Ok(())
    }
}

/// The widest access (≤ 32 bits) that is aligned at `at` and fits `remaining` bytes.
fn chunk_width(at: u64, remaining: usize) -> AccessWidth {
    if at % 4 == 0 && remaining >= 4 {
        AccessWidth::Dword
    } else if at % 2 == 0 && remaining >= 2 {
        AccessWidth::Word
    } else {
        AccessWidth::Byte
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_gpu::emulated::EmulatedHostGpu;

    fn pramin(name: &str) -> (Arc<EmulatedHostGpu>, Pramin) {
        let gpu = Arc::new(EmulatedHostGpu::by_name(name).unwrap());
        let p = Pramin::new(gpu.clone()).unwrap();
        (gpu, p)
    }

    fn vram_read(gpu: &EmulatedHostGpu, addr: u64, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        gpu.emulated()
            .vram()
            .read(gpu_emulation::VramAddr::new(addr), &mut buf)
            .unwrap();
        buf
    }

    #[test]
    fn window_writes_land_in_vram_on_both_register_layouts() {
        for name in ["tu102-24g", "gh100-80g"] {
            let (gpu, mut p) = pramin(name);
            let base = VramAddr::new(0x1234_0000);
            let w = p.window(base).unwrap();
            assert_eq!(w.len(), MIB);
            w.write_u32(0x10, 0xDEAD_BEEF).unwrap();
            w.write_u64(0x18, 0x0123_4567_89AB_CDEF).unwrap();
            w.write_u16(0x22, 0xA55A).unwrap();
            w.write_u8(0x25, 0x7E).unwrap();
            w.write_bytes(0x27, &[1, 2, 3, 4, 5, 6, 7]).unwrap();
            assert_eq!(w.read_u32(0x10).unwrap(), 0xDEAD_BEEF);
            assert_eq!(w.read_u64(0x18).unwrap(), 0x0123_4567_89AB_CDEF);
            assert_eq!(w.read_u16(0x22).unwrap(), 0xA55A);
            assert_eq!(w.read_u8(0x25).unwrap(), 0x7E);
            let mut back = [0u8; 7];
            w.read_bytes(0x27, &mut back).unwrap();
            assert_eq!(back, [1, 2, 3, 4, 5, 6, 7]);
            assert_eq!(
                vram_read(&gpu, 0x1234_0010, 4),
                0xDEAD_BEEFu32.to_le_bytes(),
                "{name}"
            );
            assert_eq!(vram_read(&gpu, 0x1234_0027, 7), [1, 2, 3, 4, 5, 6, 7]);
            let snap = gpu.emulated().registers();
            assert_eq!(snap.window_base.raw(), 0x1234_0000, "{name}");
            assert_eq!(p.window_moves(), 1);
            // Same base again: no register write.
            p.window(base).unwrap().fill_zero(0x10, 4).unwrap();
            assert_eq!(p.window_moves(), 1);
            assert_eq!(vram_read(&gpu, 0x1234_0010, 4), [0; 4]);
        }
    }

    #[test]
    fn turing_window_register_gets_vid_mem_target() {
        let (gpu, _) = pramin("tu102-24g");
        // Point the window at system memory behind the owner's back at construction time.
        gpu.bar0_write(0x1700, AccessWidth::Dword, 0x0200_0010)
            .unwrap();
        let mut p2 = Pramin::new(gpu.clone()).unwrap();
        assert_eq!(
            p2.current_base(),
            None,
            "SYS target is not a usable VRAM window"
        );
        p2.window(VramAddr::new(0x10_0000)).unwrap();
        assert_eq!(p2.window_moves(), 1);
        let raw = gpu.bar0_read(0x1700, AccessWidth::Dword).unwrap();
        assert_eq!(raw, 0x10, "BASE 0x10, TARGET VID_MEM");
    }

    #[test]
    fn range_and_alignment_checks() {
        let (gpu, mut p) = pramin("tu102-24g");
        let vram = gpu.identity().vram_size;
        assert!(matches!(
            p.window(VramAddr::new(0x1000)),
            Err(PraminError::MisalignedBase(_))
        ));
        assert!(matches!(
            p.window(VramAddr::new(vram)),
            Err(PraminError::BaseOutOfRange { .. })
        ));
        assert!(matches!(
            p.window(VramAddr::new(1 << 40)),
            Err(PraminError::BaseOutOfRange { .. })
        ));
        // The last window is clipped at the end of VRAM.
        let last = VramAddr::new(vram - 64 * KIB);
        let w = p.window(last).unwrap();
        assert_eq!(w.len(), 64 * KIB);
        w.write_u32(64 * KIB - 4, 7).unwrap();
        assert!(matches!(
            w.write_u32(64 * KIB, 7),
            Err(PraminError::OutOfWindow { .. })
        ));
        assert!(matches!(
            w.read_u64(64 * KIB - 4),
            Err(PraminError::OutOfWindow { .. })
        ));
        assert!(matches!(w.read_u32(2), Err(PraminError::Misaligned { .. })));
        assert!(matches!(
            w.write_bytes(u64::MAX, &[1]),
            Err(PraminError::OutOfWindow { .. })
        ));
        let w = p.window(VramAddr::ZERO).unwrap();
        assert!(w.write_u64s(MIB - 8, &[1, 2]).is_err());
        w.write_u64s(MIB - 16, &[1, 2]).unwrap();
        let mut out = [0u64; 2];
        w.read_u64s(MIB - 16, &mut out).unwrap();
        assert_eq!(out, [1, 2]);
    }

    #[test]
    fn hopper_base_field_width() {
        let (_gpu, p) = pramin("gh100-80g");
        assert_eq!(p.register_reach(), 1 << 38);
        let (_gpu, p) = pramin("gb202-32g");
        assert_eq!(p.register_reach(), 1 << 39);
        let (_gpu, p) = pramin("ga100-80g");
        assert_eq!(p.register_reach(), 1 << 40);
    }
}
