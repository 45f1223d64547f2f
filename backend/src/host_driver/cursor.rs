//! [`PraminCursor`]: random access to VRAM by [`VramAddr`] on top of [`Pramin`], moving
//! the window only when an access falls outside it.
//!
//! When an access starts outside the current window, the window moves to the 64 KiB
//! boundary at or below the access, so the access and up to 960 KiB after it are visible:
//! ascending streams of writes (page tables written one after another) move the window
//! once per MiB. An access that straddles the window's end is split: the part inside is
//! done through the current window, the rest after moving it. 32/64-bit accesses never
//! straddle: at most 8 bytes from an aligned address always fit after a move.

use thiserror::Error;

use super::addr::{VramAddr, KIB};
use super::pramin::{Pramin, PraminError, PraminWindow, WINDOW_BASE_ALIGN};

/// Errors of cursor accesses.
#[derive(Debug, Error)]
pub enum CursorError {
    /// The access runs past the end of VRAM (or overflows).
    #[error("VRAM access of {len} bytes at {addr} is outside VRAM ({vram_size:#x} bytes)")]
    OutOfRange {
        /// Start of the access.
        addr: VramAddr,
        /// Length of the access.
        len: u64,
        /// VRAM size.
        vram_size: u64,
    },
    /// A 32/64-bit access at an address that is not a multiple of its width.
    #[error("VRAM access of {width} bytes at {addr} is not naturally aligned")]
    Misaligned {
        /// Address of the access.
        addr: VramAddr,
        /// Width in bytes.
        width: u64,
    },
    /// The PRAMIN window failed.
    #[error(transparent)]
    Pramin(#[from] PraminError),
}

/// Random VRAM access through an exclusively borrowed [`Pramin`].
#[derive(Debug)]
pub struct PraminCursor<'a> {
    pramin: &'a mut Pramin,
}

/// Size of the zero buffer used by [`PraminCursor::fill_zero`] chunks.
const ZERO_CHUNK: u64 = 64 * KIB;

impl<'a> PraminCursor<'a> {
    /// A cursor over `pramin`'s window.
    pub fn new(pramin: &'a mut Pramin) -> PraminCursor<'a> {
        PraminCursor { pramin }
    }

    /// VRAM size in bytes.
    pub fn vram_size(&self) -> u64 {
        self.pramin.vram_size()
    }

    /// Window moves made by the underlying [`Pramin`] so far (not only by this cursor).
    pub fn window_moves(&self) -> u64 {
        self.pramin.window_moves()
    }

    /// The `Pramin` underneath.
    pub fn pramin(&mut self) -> &mut Pramin {
        self.pramin
    }

    fn check(&self, addr: VramAddr, len: u64, align: u64) -> Result<(), CursorError> {
        let vram_size = self.vram_size();
        let fits = matches!(addr.raw().checked_add(len), Some(end) if end <= vram_size);
        if !fits {
            return Err(CursorError::OutOfRange {
                addr,
                len,
                vram_size,
            });
        }
        if !addr.is_aligned(align) {
            return Err(CursorError::Misaligned { addr, width: align });
        }
        Ok(())
    }

    /// The base of a window that shows `[addr, addr + len)`: the current one if it does,
    /// else the 64 KiB boundary at or below `addr`.
    fn base_for(&self, addr: VramAddr, len: u64) -> VramAddr {
        if let Some(base) = self.pramin.current_base() {
            let shown = window_len(base, self.vram_size());
            if addr
                .offset_from(base)
                .and_then(|o| o.checked_add(len))
                .is_some_and(|end| end <= shown)
            {
                return base;
            }
        }
        addr.align_down(WINDOW_BASE_ALIGN)
    }

    /// The window showing `addr` (moved there if needed), the offset of `addr` in it and
    /// the number of bytes from `addr` to the window end. `addr` must be inside VRAM.
    fn window_at(&mut self, addr: VramAddr) -> Result<(PraminWindow<'_>, u64, u64), CursorError> {
        let base = self.base_for(addr, 1);
        let window = self.pramin.window(base)?;
        let offset = addr.offset_from(base).unwrap_or(0);
        let avail = window.len().saturating_sub(offset);
        Ok((window, offset, avail))
    }

    /// The window showing all of a small access of `len` bytes at `addr` and its offset
    /// there. After a move the access starts less than 64 KiB into the window, so up to
    /// 8 bytes inside VRAM always fit.
    fn window_for_small(
        &mut self,
        addr: VramAddr,
        len: u64,
    ) -> Result<(PraminWindow<'_>, u64), CursorError> {
        let base = self.base_for(addr, len);
        let window = self.pramin.window(base)?;
        let offset = addr.offset_from(base).unwrap_or(0);
        Ok((window, offset))
    }

    /// Reads the 32-bit value at `addr` (4-byte aligned).
    pub fn read_u32(&mut self, addr: VramAddr) -> Result<u32, CursorError> {
        self.check(addr, 4, 4)?;
        let (w, o) = self.window_for_small(addr, 4)?;
        Ok(w.read_u32(o)?)
    }

    /// Writes the 32-bit value at `addr` (4-byte aligned).
    pub fn write_u32(&mut self, addr: VramAddr, value: u32) -> Result<(), CursorError> {
        self.check(addr, 4, 4)?;
        let (w, o) = self.window_for_small(addr, 4)?;
        Ok(w.write_u32(o, value)?)
    }

    /// Reads the 64-bit value at `addr` (8-byte aligned).
    pub fn read_u64(&mut self, addr: VramAddr) -> Result<u64, CursorError> {
        self.check(addr, 8, 8)?;
        let (w, o) = self.window_for_small(addr, 8)?;
        Ok(w.read_u64(o)?)
    }

    /// Writes the 64-bit value at `addr` (8-byte aligned), high dword first.
    pub fn write_u64(&mut self, addr: VramAddr, value: u64) -> Result<(), CursorError> {
        self.check(addr, 8, 8)?;
        let (w, o) = self.window_for_small(addr, 8)?;
        Ok(w.write_u64(o, value)?)
    }

    /// Writes consecutive 64-bit values (table entries) from `addr` (8-byte aligned), each
    /// high dword first, moving the window only at window ends.
    pub fn write_u64s(&mut self, addr: VramAddr, values: &[u64]) -> Result<(), CursorError> {
        let len = (values.len() as u64).saturating_mul(8);
        self.check(addr, len, 8)?;
        self.for_each_chunk(addr, len, 8, u64::MAX, |w, o, done, n| {
            w.write_u64s(o, &values[done / 8..(done + n) / 8])
        })
    }

    /// Reads consecutive 64-bit values from `addr` (8-byte aligned).
    pub fn read_u64s(&mut self, addr: VramAddr, out: &mut [u64]) -> Result<(), CursorError> {
        let len = (out.len() as u64).saturating_mul(8);
        self.check(addr, len, 8)?;
        self.for_each_chunk(addr, len, 8, u64::MAX, |w, o, done, n| {
            w.read_u64s(o, &mut out[done / 8..(done + n) / 8])
        })
    }

    /// Copies `buf.len()` bytes at `addr` into `buf` (any alignment).
    pub fn read_bytes(&mut self, addr: VramAddr, buf: &mut [u8]) -> Result<(), CursorError> {
        let len = buf.len() as u64;
        self.check(addr, len, 1)?;
        self.for_each_chunk(addr, len, 1, u64::MAX, |w, o, done, n| {
            w.read_bytes(o, &mut buf[done..done + n])
        })
    }

    /// Copies `data` to `addr` (any alignment), in ascending address order.
    pub fn write_bytes(&mut self, addr: VramAddr, data: &[u8]) -> Result<(), CursorError> {
        let len = data.len() as u64;
        self.check(addr, len, 1)?;
        self.for_each_chunk(addr, len, 1, u64::MAX, |w, o, done, n| {
            w.write_bytes(o, &data[done..done + n])
        })
    }

    /// Writes `len` zero bytes at `addr`, in ascending address order.
    pub fn fill_zero(&mut self, addr: VramAddr, len: u64) -> Result<(), CursorError> {
        self.check(addr, len, 1)?;
        self.for_each_chunk(addr, len, 1, ZERO_CHUNK, |w, o, _, n| {
            w.fill_zero(o, n as u64)
        })
    }

    /// Walks `[addr, addr + len)` (already checked) in ascending order, moving the window
    /// only at window ends: `f(window, offset, done, n)` handles the `n` bytes that lie
    /// `done` bytes into the range, at `offset` in `window`. `n` is a multiple of `unit`
    /// and at most `max_chunk`.
    fn for_each_chunk(
        &mut self,
        addr: VramAddr,
        len: u64,
        unit: u64,
        max_chunk: u64,
        mut f: impl FnMut(&PraminWindow<'_>, u64, usize, usize) -> Result<(), PraminError>,
    ) -> Result<(), CursorError> {
        let mut done = 0;
        while done < len {
            let (w, o, avail) = self.window_at(VramAddr::new(addr.raw() + done))?;
            let n = (len - done).min(avail / unit * unit).min(max_chunk);
            f(&w, o, done as usize, n as usize)?;
            done += n;
        }
        Ok(())
    }
}

/// Usable length of a window at `base` (1 MiB unless VRAM ends first).
fn window_len(base: VramAddr, vram_size: u64) -> u64 {
    vram_size
        .saturating_sub(base.raw())
        .min(super::pramin::PRAMIN_WINDOW_SIZE)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::host_driver::addr::MIB;
    use crate::host_gpu::emulated::EmulatedHostGpu;
    use crate::host_gpu::HostGpu;

    fn setup(name: &str) -> (Arc<EmulatedHostGpu>, Pramin) {
        let gpu = Arc::new(EmulatedHostGpu::by_name(name).unwrap());
        let p = Pramin::new(gpu.clone()).unwrap();
        (gpu, p)
    }

    #[test]
    fn window_written_data_reads_back_through_the_cursor() {
        for name in ["tu102-24g", "gh100-80g"] {
            let (_gpu, mut p) = setup(name);
            let base = VramAddr::new(3 * MIB);
            {
                let w = p.window(base).unwrap();
                for i in 0..64u64 {
                    w.write_u64(i * 8, 0x1111_0000_0000_0000 | i).unwrap();
                }
            }
            let moves = p.window_moves();
            let mut c = PraminCursor::new(&mut p);
            for i in 0..64u64 {
                let a = VramAddr::new(3 * MIB + i * 8);
                assert_eq!(c.read_u64(a).unwrap(), 0x1111_0000_0000_0000 | i, "{name}");
            }
            assert_eq!(c.window_moves(), moves, "inside the window: no move");
        }
    }

    #[test]
    fn moves_only_when_needed() {
        let (_gpu, mut p) = setup("gh100-80g");
        let mut c = PraminCursor::new(&mut p);
        let start = c.window_moves();
        // 4 MiB of ascending dword writes: one move per MiB.
        for i in 0..(4 * MIB / 4) {
            c.write_u32(VramAddr::new(16 * MIB + 4 * i), i as u32)
                .unwrap();
        }
        assert_eq!(c.window_moves() - start, 4);
        // Going back to the start of the last window: no move; to the first: one move.
        c.read_u32(VramAddr::new(19 * MIB)).unwrap();
        assert_eq!(c.window_moves() - start, 4);
        assert_eq!(c.read_u32(VramAddr::new(16 * MIB)).unwrap(), 0);
        assert_eq!(c.window_moves() - start, 5);
        // A slice spanning 3 MiB from the middle of a window: 3 further moves.
        let data: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8).collect();
        c.write_bytes(VramAddr::new(16 * MIB + 0x123), &data)
            .unwrap();
        let mut back = vec![0u8; data.len()];
        c.read_bytes(VramAddr::new(16 * MIB + 0x123), &mut back)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn straddling_accesses() {
        let (gpu, mut p) = setup("tu102-24g");
        p.window(VramAddr::ZERO).unwrap();
        let mut c = PraminCursor::new(&mut p);
        let m0 = c.window_moves();
        // A u64 at 1 MiB - 8 is the last one the window at 0 shows: no move. A slice over
        // the edge is split (one move).
        c.write_u64(VramAddr::new(MIB - 8), u64::MAX).unwrap();
        assert_eq!(c.window_moves(), m0);
        c.write_u64s(VramAddr::new(MIB - 16), &[1, 2, 3, 4])
            .unwrap();
        let mut out = [0u64; 4];
        assert_eq!(c.window_moves(), m0 + 1);
        c.read_u64s(VramAddr::new(MIB - 16), &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4]);
        c.write_bytes(VramAddr::new(2 * MIB - 3), &[9; 7]).unwrap();
        let mut raw = [0u8; 7];
        gpu.emulated()
            .vram()
            .read(gpu_emulation::VramAddr::new(2 * MIB - 3), &mut raw)
            .unwrap();
        assert_eq!(raw, [9; 7]);
        c.fill_zero(VramAddr::new(MIB - 16), 32).unwrap();
        c.read_u64s(VramAddr::new(MIB - 16), &mut out).unwrap();
        assert_eq!(out, [0; 4]);
    }

    #[test]
    fn out_of_range_and_misaligned() {
        let (gpu, mut p) = setup("tu102-24g");
        let vram = gpu.identity().vram_size;
        let mut c = PraminCursor::new(&mut p);
        c.write_u32(VramAddr::new(vram - 4), 5).unwrap();
        assert_eq!(c.read_u32(VramAddr::new(vram - 4)).unwrap(), 5);
        assert!(matches!(
            c.read_u32(VramAddr::new(vram)),
            Err(CursorError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.write_u64(VramAddr::new(vram - 4), 0),
            Err(CursorError::Misaligned { .. }) | Err(CursorError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.write_bytes(VramAddr::new(u64::MAX), &[1]),
            Err(CursorError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.read_u32(VramAddr::new(2)),
            Err(CursorError::Misaligned { .. })
        ));
    }
}
