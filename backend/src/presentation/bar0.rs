//! The presented BAR0 ([`TrappedBar0`]): every access is decided by the register table.
//!
//! An access of any offset and length is split into pieces: the part inside the PRAMIN
//! aperture goes to the guest's [`GuestAperture`] as one byte range; everything else is
//! split into naturally aligned 8/4/2/1-byte register accesses (8-byte ones as two dwords,
//! low first), each treated as [`RegisterMap`] says for its dword:
//! - passed: reads come from the host register; writes reach it only for a guest given the
//!   whole GPU ([`RegisterMode::WholeGpu`]), and are dropped for a sliced guest;
//! - emulated: the guest's window register ([`GuestWindow`]) or the MSI-X table/PBA;
//! - hidden (the sliced default): reads 0, writes dropped.
//!
//! Dropped writes and hidden reads are counted ([`TrapStats`]), and so are passed writes.
//! Only a guest given the whole GPU writes host registers. A window-register write is
//! applied before the call returns, so a posted write followed by an aperture access on the
//! same connection is ordered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::host_gpu::{AccessWidth, HostGpu, HostGpuError};
use crate::slice::{GuestSlice, HostVramError};

use super::aperture::{GuestAperture, APERTURE_END, APERTURE_START};
use super::config_space::MsixDecl;
use super::msix::MsixRegion;
use super::padded_bar::{BackingError, BarBacking};
use super::registers::{Emulated, RegisterMap, RegisterMode, Treatment};
use super::window::GuestWindow;

/// How many distinct hidden dword offsets [`TrapStats::hidden_offsets`] records.
pub const HIDDEN_OFFSETS_RECORDED: usize = 32;

/// Counters of a guest's BAR0 traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrapStats {
    /// Register reads passed to the host.
    pub passed_reads: u64,
    /// Register writes passed to the host (a guest given the whole GPU only).
    pub passed_writes: u64,
    /// Reads of hidden registers (answered 0).
    pub hidden_reads: u64,
    /// Writes dropped: to hidden registers and to read-only passed ones.
    pub dropped_writes: u64,
    /// Writes to the guest's window register.
    pub window_writes: u64,
    /// Aperture bytes read from the guest's VRAM.
    pub aperture_bytes_read: u64,
    /// Aperture bytes written to the guest's VRAM.
    pub aperture_bytes_written: u64,
    /// Aperture bytes refused (past the guest's VRAM, or a non-VRAM target).
    pub aperture_bytes_refused: u64,
    /// The first distinct dword offsets of hidden accesses (reads and writes).
    pub hidden_offsets: Vec<u32>,
}

#[derive(Debug, Default)]
struct Counters {
    passed_reads: AtomicU64,
    passed_writes: AtomicU64,
    hidden_reads: AtomicU64,
    dropped_writes: AtomicU64,
    window_writes: AtomicU64,
    aperture_read: AtomicU64,
    aperture_written: AtomicU64,
    aperture_refused: AtomicU64,
    hidden_offsets: Mutex<Vec<u32>>,
}

impl Counters {
    fn hidden(&self, dword: u64, write: bool) {
        let counter = if write {
            &self.dropped_writes
        } else {
            &self.hidden_reads
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut seen = self
            .hidden_offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let dword = dword as u32; // BAR0 offsets are below 16 MiB
        if seen.len() < HIDDEN_OFFSETS_RECORDED && !seen.contains(&dword) {
            seen.push(dword);
            // Logged once per offset (of the first recorded ones), not per access.
            let what = if write { "write dropped" } else { "read as 0" };
            log::debug!("guest access to hidden BAR0 register {dword:#x}: {what}");
        }
    }

    fn snapshot(&self) -> TrapStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TrapStats {
            passed_reads: get(&self.passed_reads),
            passed_writes: get(&self.passed_writes),
            hidden_reads: get(&self.hidden_reads),
            dropped_writes: get(&self.dropped_writes),
            window_writes: get(&self.window_writes),
            aperture_bytes_read: get(&self.aperture_read),
            aperture_bytes_written: get(&self.aperture_written),
            aperture_bytes_refused: get(&self.aperture_refused),
            hidden_offsets: self
                .hidden_offsets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

fn host_error(error: &HostGpuError) -> BackingError {
    BackingError::from_errno(error.errno())
}

fn vram_error(error: &HostVramError) -> BackingError {
    log::warn!("PRAMIN access for a guest failed: {error}");
    BackingError::io()
}

/// The widest naturally aligned access at `offset` that fits in `remaining` bytes.
pub(crate) fn access_width(offset: u64, remaining: usize) -> AccessWidth {
    for (bytes, width) in [
        (8, AccessWidth::Qword),
        (4, AccessWidth::Dword),
        (2, AccessWidth::Word),
    ] {
        if offset % bytes == 0 && remaining as u64 >= bytes {
            return width;
        }
    }
    AccessWidth::Byte
}

/// A guest's BAR0.
pub struct TrappedBar0 {
    host: Arc<dyn HostGpu>,
    len: u64,
    map: RegisterMap,
    window: GuestWindow,
    aperture: GuestAperture,
    msix: Option<MsixRegion>,
    counters: Counters,
}

impl std::fmt::Debug for TrappedBar0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrappedBar0")
            .field("len", &self.len)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl TrappedBar0 {
    /// BAR0 of `len` bytes for `guest`, with MSI-X storage as `msix` declares it (none:
    /// its offsets are hidden registers): the whole-GPU register mode for a guest given
    /// the whole GPU, the sliced one otherwise.
    pub fn new(guest: &GuestSlice, len: u64, msix: Option<&MsixDecl>) -> TrappedBar0 {
        let host = Arc::clone(guest.host());
        let generation = host.identity().generation;
        let mode = if guest.is_whole_gpu() {
            RegisterMode::WholeGpu
        } else {
            RegisterMode::Sliced
        };
        TrappedBar0 {
            host,
            len,
            map: RegisterMap::new(generation, mode),
            window: GuestWindow::new(generation),
            aperture: GuestAperture::new(guest.clone()),
            msix: msix.map(MsixRegion::new),
            counters: Counters::default(),
        }
    }

    /// The register table of the guest's generation and mode.
    pub fn register_map(&self) -> &RegisterMap {
        &self.map
    }

    /// The guest's window register.
    pub fn window(&self) -> &GuestWindow {
        &self.window
    }

    /// Counters so far.
    pub fn stats(&self) -> TrapStats {
        self.counters.snapshot()
    }

    /// Function-level reset of the emulated state: window register 0, MSI-X vectors
    /// masked. The host GPU is not touched.
    pub fn reset(&self) {
        self.window.reset();
        if let Some(msix) = &self.msix {
            msix.reset();
        }
    }

    /// The MSI-X storage, if the function has MSI-X and `at..at+n` lies in its table or PBA.
    fn msix_covering(&self, at: u64, n: usize) -> Option<&MsixRegion> {
        self.msix.as_ref().filter(|msix| msix.covers(at, n))
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), BackingError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(BackingError::from_errno(libc::EINVAL)),
        }
    }

    /// Length of the piece starting at `at` (of `left` bytes) that stays on one side of
    /// the aperture boundaries, and whether it lies in the aperture.
    fn piece(at: u64, left: usize) -> (usize, bool) {
        let clip = |limit: u64| usize::try_from(limit).map_or(left, |l| l.min(left));
        if (APERTURE_START..APERTURE_END).contains(&at) {
            (clip(APERTURE_END - at), true)
        } else if at < APERTURE_START {
            (clip(APERTURE_START - at), false)
        } else {
            (left, false)
        }
    }

    fn read_aperture(&self, at: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        let out = self
            .aperture
            .read(self.window.target(), at - APERTURE_START, buf)
            .map_err(|e| vram_error(&e))?;
        self.counters
            .aperture_read
            .fetch_add(out.served as u64, Ordering::Relaxed);
        self.counters
            .aperture_refused
            .fetch_add(out.refused as u64, Ordering::Relaxed);
        Ok(())
    }

    fn write_aperture(&self, at: u64, data: &[u8]) -> Result<(), BackingError> {
        let out = self
            .aperture
            .write(self.window.target(), at - APERTURE_START, data)
            .map_err(|e| vram_error(&e))?;
        self.counters
            .aperture_written
            .fetch_add(out.served as u64, Ordering::Relaxed);
        self.counters
            .aperture_refused
            .fetch_add(out.refused as u64, Ordering::Relaxed);
        Ok(())
    }

    /// One register read of at most 4 bytes inside one dword.
    fn read_register(&self, at: u64, width: AccessWidth) -> Result<u64, BackingError> {
        let dword = at & !3;
        let n = width.bytes() as usize;
        Ok(match self.map.treatment(dword) {
            Treatment::Pass | Treatment::PassRead => {
                self.counters.passed_reads.fetch_add(1, Ordering::Relaxed);
                self.host.bar0_read(at, width).map_err(|e| host_error(&e))?
            }
            Treatment::Emulated(Emulated::WindowRegister) => self.window.read(at - dword, width),
            Treatment::Emulated(Emulated::MsixTable | Emulated::MsixPba)
                if let Some(msix) = self.msix_covering(at, n) =>
            {
                let mut bytes = [0u8; 8];
                msix.read(at, &mut bytes[..n]);
                u64::from_le_bytes(bytes)
            }
            Treatment::Emulated(Emulated::PraminAperture) => {
                let mut bytes = [0u8; 8];
                self.read_aperture(at, &mut bytes[..n])?;
                u64::from_le_bytes(bytes)
            }
            Treatment::Emulated(_) | Treatment::Hidden => {
                self.counters.hidden(dword, false);
                0
            }
        })
    }

    /// One register write of at most 4 bytes inside one dword.
    fn write_register(&self, at: u64, width: AccessWidth, value: u64) -> Result<(), BackingError> {
        let dword = at & !3;
        let n = width.bytes() as usize;
        match self.map.treatment(dword) {
            Treatment::Emulated(Emulated::WindowRegister) => {
                self.counters.window_writes.fetch_add(1, Ordering::Relaxed);
                self.window.write(at - dword, width, value);
            }
            Treatment::Emulated(Emulated::MsixTable | Emulated::MsixPba)
                if let Some(msix) = self.msix_covering(at, n) =>
            {
                msix.write(at, &value.to_le_bytes()[..n]);
            }
            Treatment::Emulated(Emulated::PraminAperture) => {
                self.write_aperture(at, &value.to_le_bytes()[..n])?;
            }
            // Only the whole-GPU mode passes writes to the host.
            Treatment::Pass => {
                self.counters.passed_writes.fetch_add(1, Ordering::Relaxed);
                self.host
                    .bar0_write(at, width, value)
                    .map_err(|e| host_error(&e))?;
            }
            Treatment::PassRead | Treatment::Emulated(_) | Treatment::Hidden => {
                self.counters.hidden(dword, true);
            }
        }
        Ok(())
    }

    /// Register space `[at, at + buf.len())` (outside the aperture), register by register.
    fn read_registers(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let width = access_width(at, buf.len() - done);
            let n = width.bytes() as usize;
            let value = if width == AccessWidth::Qword {
                let lo = self.read_register(at, AccessWidth::Dword)?;
                let hi = self.read_register(at + 4, AccessWidth::Dword)?;
                lo | hi << 32
            } else {
                self.read_register(at, width)?
            };
            buf[done..done + n].copy_from_slice(&value.to_le_bytes()[..n]);
            done += n;
        }
        Ok(())
    }

    fn write_registers(&self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let width = access_width(at, data.len() - done);
            let n = width.bytes() as usize;
            let mut bytes = [0u8; 8];
            bytes[..n].copy_from_slice(&data[done..done + n]);
            let value = u64::from_le_bytes(bytes);
            if width == AccessWidth::Qword {
                self.write_register(at, AccessWidth::Dword, value & 0xFFFF_FFFF)?;
                self.write_register(at + 4, AccessWidth::Dword, value >> 32)?;
            } else {
                self.write_register(at, width, value)?;
            }
            done += n;
        }
        Ok(())
    }
}

impl BarBacking for TrappedBar0 {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        self.check(offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (n, in_aperture) = Self::piece(at, buf.len() - done);
            let part = &mut buf[done..done + n];
            if in_aperture {
                self.read_aperture(at, part)?;
            } else {
                self.read_registers(at, part)?;
            }
            done += n;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
        self.check(offset, data.len())?;
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let (n, in_aperture) = Self::piece(at, data.len() - done);
            let part = &data[done..done + n];
            if in_aperture {
                self.write_aperture(at, part)?;
            } else {
                self.write_registers(at, part)?;
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_width_is_the_widest_aligned_fit() {
        assert_eq!(access_width(0, 8), AccessWidth::Qword);
        assert_eq!(access_width(4, 8), AccessWidth::Dword);
        assert_eq!(access_width(2, 8), AccessWidth::Word);
        assert_eq!(access_width(1, 8), AccessWidth::Byte);
        assert_eq!(access_width(0, 3), AccessWidth::Word);
        assert_eq!(access_width(0, 1), AccessWidth::Byte);
    }

    #[test]
    fn pieces_stop_at_the_aperture_edges() {
        assert_eq!(TrappedBar0::piece(APERTURE_START - 2, 8), (2, false));
        assert_eq!(TrappedBar0::piece(APERTURE_START, 8), (8, true));
        assert_eq!(TrappedBar0::piece(APERTURE_END - 3, 8), (3, true));
        assert_eq!(TrappedBar0::piece(APERTURE_END, 8), (8, false));
    }
}
