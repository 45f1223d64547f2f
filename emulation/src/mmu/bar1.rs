//! BAR1 accesses in physical and virtual mode.
//!
//! - Physical mode (the reset state): BAR1 offset `o` is VRAM address
//!   `vram_offset + o` of the VRAM BAR. Bytes past the end of VRAM read 0xFF and drop
//!   writes.
//! - Virtual mode (MODE = 1 in the generation's BAR1 block register): BAR1 offset `o` is
//!   VA `o`. The instance block named by the block register is read (page-directory base,
//!   address limit; see [`super::instance`]), and each 4 KiB piece of the access is
//!   translated through the TLB ([`super::tlb`]) with the chip's page-table format. A piece
//!   that faults reads as 0xFF bytes and drops writes; it is counted as a BAR1 fault
//!   ([`super::Bar1Stats`]) with its reason ([`super::Bar1Fault`]). Faulting reasons: an
//!   unresolvable binding, a VA above ADR_LIMIT, a walk fault, a page outside local video
//!   memory, a write to a read-only page, a PA outside VRAM. A sparse range reads 0 and
//!   drops writes without a fault. PRIVILEGE is not checked (BAR1 accesses are taken to be
//!   privileged), nor KIND.
//!
//! Accesses must lie inside the BAR (its real size); otherwise they are a [`Bar1Error`].

use thiserror::Error;

use super::fault::Bar1Fault;
use super::instance::{read_instance_block, BarBinding, InstanceBlock};
use super::walker::WalkFault;
use super::{Mmu, PteAperture};
use crate::chip::MmuVersion;
use crate::regs::BarMode;
use crate::vram::{Vram, VramAddr};

const PAGE: u64 = 1 << 12;

/// Errors of BAR1 accesses (faults are not errors: see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Bar1Error {
    /// The chip profile has no VRAM BAR starting at VRAM address 0.
    #[error("the chip profile has no VRAM BAR (BAR1) at VRAM offset 0")]
    NoVramBar,
    /// The access does not lie inside the BAR.
    #[error("BAR1 access of {len:#x} bytes at {offset:#x} is outside the {size:#x}-byte BAR")]
    OutOfRange {
        /// BAR offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the BAR.
        size: u64,
    },
}

/// The buffer of one BAR1 access.
pub(crate) enum Bar1Buf<'b> {
    /// Read into this buffer.
    Read(&'b mut [u8]),
    /// Write these bytes.
    Write(&'b [u8]),
}

impl Bar1Buf<'_> {
    fn len(&self) -> u64 {
        match self {
            Bar1Buf::Read(b) => b.len() as u64,
            Bar1Buf::Write(b) => b.len() as u64,
        }
    }

    fn is_write(&self) -> bool {
        matches!(self, Bar1Buf::Write(_))
    }

    /// Reads/writes bytes `range` of the buffer at VRAM `addr`, clipped at the end of VRAM
    /// (reads of missing bytes give 0xFF).
    fn vram(&mut self, vram: &Vram, addr: u64, start: usize, end: usize) {
        let in_range = vram.size().saturating_sub(addr).min((end - start) as u64) as usize;
        let addr = VramAddr::new(addr);
        // The in-range part is bounds-checked above, so these accesses cannot fail.
        match self {
            Bar1Buf::Read(b) => {
                let _ = vram.read(addr, &mut b[start..start + in_range]);
                b[start + in_range..end].fill(0xFF);
            }
            Bar1Buf::Write(b) => {
                let _ = vram.write(addr, &b[start..start + in_range]);
            }
        }
    }

    /// Fills bytes `range` of a read with `byte`; a write is dropped.
    fn fill(&mut self, start: usize, end: usize, byte: u8) {
        if let Bar1Buf::Read(b) = self {
            b[start..end].fill(byte);
        }
    }
}

/// Everything a BAR1 access needs.
pub(crate) struct Bar1<'a> {
    pub vram: &'a Vram,
    pub mmu: &'a Mmu,
    pub format: MmuVersion,
    pub binding: BarBinding,
    /// VRAM address of BAR offset 0 (physical mode).
    pub vram_offset: u64,
    /// Size of the BAR.
    pub size: u64,
}

impl Bar1<'_> {
    /// Performs one access at BAR `offset`.
    pub(crate) fn access(&self, offset: u64, mut buf: Bar1Buf<'_>) -> Result<(), Bar1Error> {
        let len = buf.len();
        match offset.checked_add(len) {
            Some(end) if end <= self.size => {}
            _ => {
                return Err(Bar1Error::OutOfRange {
                    offset,
                    len,
                    size: self.size,
                })
            }
        }
        if self.binding.mode == BarMode::Physical {
            // vram_offset + offset < vram_offset + size ≤ VRAM size: no overflow.
            buf.vram(self.vram, self.vram_offset + offset, 0, len as usize);
            return Ok(());
        }
        let root = read_instance_block(self.vram, &self.binding).map_err(Bar1Fault::from);
        let write = buf.is_write();
        let mut done = 0u64;
        while done < len {
            let va = offset + done;
            let n = (len - done).min(PAGE - va % PAGE);
            let (start, end) = (done as usize, (done + n) as usize);
            match self.resolve(&root, va, n, write) {
                Ok(Some(pa)) => buf.vram(self.vram, pa, start, end),
                Ok(None) => {
                    self.mmu.bar1.sparse();
                    buf.fill(start, end, 0);
                }
                Err(fault) => {
                    self.mmu.bar1.fault(fault, write);
                    buf.fill(start, end, 0xFF);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The VRAM address of the `n`-byte piece at `va` (inside one 4 KiB page), `None` for
    /// a sparse range.
    fn resolve(
        &self,
        root: &Result<InstanceBlock, Bar1Fault>,
        va: u64,
        n: u64,
        write: bool,
    ) -> Result<Option<u64>, Bar1Fault> {
        let block = root.as_ref().map_err(|f| *f)?;
        block.check_limit(va)?;
        let t = match self
            .mmu
            .tlb
            .translate(self.vram, block.pdb, self.format, va)
        {
            Ok(t) => t,
            Err(WalkFault::Sparse { .. }) => return Ok(None),
            Err(fault) => return Err(Bar1Fault::Walk { va, fault }),
        };
        if t.aperture != PteAperture::VideoMemory {
            return Err(Bar1Fault::NotVideoMemory {
                va,
                aperture: t.aperture,
            });
        }
        if write && t.read_only {
            return Err(Bar1Fault::ReadOnly { va });
        }
        match t.pa.checked_add(n) {
            Some(end) if end <= self.vram.size() => Ok(Some(t.pa)),
            _ => Err(Bar1Fault::OutsideVram { va, pa: t.pa }),
        }
    }
}
