//! A guest's own copy of the BAR0 window register (gpu-facts 2.4).
//!
//! The guest writes a window base **relative to its own VRAM** (its address 0 is its slice's
//! first byte); reads return what it wrote, restricted to the register's defined fields,
//! exactly like the hardware register latches (Open RM's two read-modify-write field updates
//! rely on that). Sub-dword writes change only the bytes written. The host's register is
//! never touched by the guest: the backend moves the host window itself when it serves the
//! guest's aperture accesses.
//!
//! | generation | offset | fields |
//! |---|---|---|
//! | Turing–Ada | `0x1700` (`NV_PBUS_BAR0_WINDOW`) | BASE 23:0, TARGET 25:24 (0 VID_MEM, 2/3 system memory) |
//! | Hopper | `0x10FD40` (`NV_XAL_EP_ZB_BAR0_WINDOW`) | BASE 21:0, always VID_MEM |
//! | Blackwell | `0x10FD40` | BASE 22:0 (GB20x width unconfirmed), always VID_MEM |

use std::sync::atomic::{AtomicU32, Ordering};

use crate::host_driver::regs::{PbusBar0Window, Register32, XalBar0Window};
use crate::host_gpu::{AccessWidth, Generation};

/// Shift between the BASE field and a VRAM address (64 KiB units).
pub const WINDOW_BASE_SHIFT: u32 = 16;

/// The layout of a generation's window register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRegister {
    offset: u64,
    defined: u32,
    base_mask: u32,
    has_target: bool,
}

/// Where a window value points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowTarget {
    /// Guest VRAM: aperture offset 0 is guest VRAM address `base`.
    Vram {
        /// Guest VRAM address of the aperture's first byte.
        base: u64,
    },
    /// A TARGET other than VID_MEM (system memory or the unused value 1): the aperture
    /// reaches nothing (reads ~0, writes dropped); the backend never exposes host memory.
    NotVram {
        /// The TARGET field.
        target: u32,
    },
}

impl WindowRegister {
    /// The window register of `generation`.
    pub fn for_generation(generation: Generation) -> WindowRegister {
        match generation {
            Generation::Turing | Generation::Ampere | Generation::Ada => WindowRegister {
                offset: PbusBar0Window::OFFSET,
                defined: PbusBar0Window::DEFINED_MASK,
                base_mask: PbusBar0Window::BASE.max() as u32,
                has_target: true,
            },
            Generation::Hopper | Generation::Blackwell => {
                let base_mask = (1u32 << generation.window_base_bits()) - 1;
                debug_assert_eq!(base_mask & !XalBar0Window::DEFINED_MASK, 0);
                WindowRegister {
                    offset: XalBar0Window::OFFSET,
                    defined: base_mask,
                    base_mask,
                    has_target: false,
                }
            }
        }
    }

    /// BAR0 offset.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The bits that latch (BASE, and TARGET where it exists).
    pub fn defined_mask(&self) -> u32 {
        self.defined
    }

    /// Where `raw` points.
    pub fn decode(&self, raw: u32) -> WindowTarget {
        if self.has_target {
            let target = PbusBar0Window::from_raw(raw).target();
            if target != 0 {
                return WindowTarget::NotVram { target };
            }
        }
        WindowTarget::Vram {
            base: u64::from(raw & self.base_mask) << WINDOW_BASE_SHIFT,
        }
    }
}

/// A guest's window register value.
#[derive(Debug)]
pub struct GuestWindow {
    register: WindowRegister,
    value: AtomicU32,
}

impl GuestWindow {
    /// The register of `generation`, at its reset value 0 (base 0, VID_MEM).
    pub fn new(generation: Generation) -> GuestWindow {
        GuestWindow {
            register: WindowRegister::for_generation(generation),
            value: AtomicU32::new(0),
        }
    }

    /// The layout.
    pub fn register(&self) -> &WindowRegister {
        &self.register
    }

    /// The current value (defined fields only).
    pub fn value(&self) -> u32 {
        self.value.load(Ordering::SeqCst)
    }

    /// Where the window points now.
    pub fn target(&self) -> WindowTarget {
        self.register.decode(self.value())
    }

    /// Reads `width` bytes at `byte` (0..4, naturally aligned) of the register.
    pub fn read(&self, byte: u64, width: AccessWidth) -> u64 {
        (u64::from(self.value()) >> (8 * byte)) & width.value_mask()
    }

    /// Writes the low `width` bytes of `value` at `byte` (0..4, naturally aligned) of the
    /// register: only those bytes change, then undefined bits are cleared. Takes effect
    /// before the call returns, so the next aperture access uses the new window.
    pub fn write(&self, byte: u64, width: AccessWidth, value: u64) {
        let shift = 8 * byte;
        let mask = (width.value_mask() << shift) as u32;
        let bits = ((value & width.value_mask()) << shift) as u32;
        let defined = self.register.defined;
        // The connection thread is the only writer; fetch_update keeps it correct anyway.
        let _ = self
            .value
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |old| {
                Some(((old & !mask) | bits) & defined)
            });
    }

    /// Back to the reset value 0.
    pub fn reset(&self) {
        self.value.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turing_fields_latch_and_decode() {
        let w = GuestWindow::new(Generation::Turing);
        assert_eq!(w.register().offset(), 0x1700);
        w.write(0, AccessWidth::Dword, 0xFFFF_FFFF);
        assert_eq!(w.value(), 0x03FF_FFFF);
        assert_eq!(w.target(), WindowTarget::NotVram { target: 3 });
        // Two field updates as Open RM does them: BASE, then TARGET.
        w.write(0, AccessWidth::Dword, 0x0000_0012);
        assert_eq!(w.target(), WindowTarget::Vram { base: 0x12 << 16 });
        w.write(3, AccessWidth::Byte, 0x02);
        assert_eq!(w.value(), 0x0200_0012);
        assert_eq!(w.read(2, AccessWidth::Word), 0x0200);
        assert_eq!(w.read(0, AccessWidth::Byte), 0x12);
        w.write(3, AccessWidth::Byte, 0x00);
        w.write(2, AccessWidth::Word, 0x00FF);
        assert_eq!(
            w.target(),
            WindowTarget::Vram {
                base: 0xFF_0012 << 16
            }
        );
        w.reset();
        assert_eq!(w.target(), WindowTarget::Vram { base: 0 });
    }

    #[test]
    fn hopper_and_blackwell_base_widths() {
        let h = GuestWindow::new(Generation::Hopper);
        assert_eq!(h.register().offset(), 0x10_FD40);
        h.write(0, AccessWidth::Dword, 0xFFFF_FFFF);
        assert_eq!(h.value(), 0x3F_FFFF);
        assert_eq!(
            h.target(),
            WindowTarget::Vram {
                base: 0x3F_FFFF << 16
            }
        );
        let b = GuestWindow::new(Generation::Blackwell);
        b.write(0, AccessWidth::Dword, 0xFFFF_FFFF);
        assert_eq!(b.value(), 0x7F_FFFF);
    }
}
