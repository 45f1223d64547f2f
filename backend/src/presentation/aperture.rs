//! A guest's PRAMIN aperture: BAR0 `0x700000..0x800000` shows the guest's VRAM at
//! `(window base) + offset`, served through the host's PRAMIN window.
//!
//! The guest address `g = base + o` is checked against the guest's VRAM size; the part of
//! an access inside it goes to host VRAM `slice.start + g` (the shared [`HostVram`] moves
//! the host window there under its lock), and the rest reads ~0 (0xFF bytes) and drops
//! writes. A window whose TARGET is not video memory reaches nothing, and neither does any
//! access once the guest was removed (its [`SliceAccess`] is revoked). So no window value,
//! offset or width reaches VRAM outside the guest's slice, and never host system memory.
//!
//! [`HostVram`]: crate::slice::HostVram
//! [`SliceAccess`]: crate::slice::SliceAccess

use crate::host_driver::addr::MIB;
use crate::host_driver::pramin::PRAMIN_APERTURE;
use crate::slice::{GuestSlice, HostVramError};

use super::window::WindowTarget;

/// BAR0 offset of the aperture.
pub const APERTURE_START: u64 = PRAMIN_APERTURE;
/// Size of the aperture.
pub const APERTURE_SIZE: u64 = MIB;
/// One past the aperture.
pub const APERTURE_END: u64 = APERTURE_START + APERTURE_SIZE;

/// How many bytes of an access reached the guest's VRAM and how many were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApertureOutcome {
    /// Bytes read from / written to the guest's VRAM.
    pub served: usize,
    /// Bytes past the guest's VRAM, under a non-VRAM target or of a removed guest (read ~0,
    /// writes dropped).
    pub refused: usize,
}

/// The aperture of one guest.
#[derive(Debug, Clone)]
pub struct GuestAperture {
    guest: GuestSlice,
}

impl GuestAperture {
    /// The aperture of `guest`.
    pub fn new(guest: GuestSlice) -> GuestAperture {
        GuestAperture { guest }
    }

    /// The host VRAM address and length of the part of `[o, o + len)` (aperture offsets)
    /// that lies in the guest's VRAM under `window`.
    fn inside(&self, window: WindowTarget, o: u64, len: usize) -> Option<(u64, usize)> {
        let WindowTarget::Vram { base } = window else {
            return None;
        };
        let size = self.guest.slice().size();
        let guest = base.checked_add(o).filter(|&g| g < size)?;
        let n = usize::try_from(size - guest).map_or(len, |left| left.min(len));
        Some((guest, n))
    }

    /// Reads `buf.len()` bytes at aperture offset `o` (`o + buf.len() <= 1 MiB`).
    pub fn read(
        &self,
        window: WindowTarget,
        o: u64,
        buf: &mut [u8],
    ) -> Result<ApertureOutcome, HostVramError> {
        let served = match self.inside(window, o, buf.len()) {
            Some((guest, n)) => {
                let slice = self.guest.slice();
                // `inside` proved `guest + n <= slice.size()`.
                let vram = self.guest.vram();
                let read = slice.host_addr(guest, n as u64).and_then(|addr| {
                    self.guest
                        .access()
                        .with_live(|| vram.read(addr, &mut buf[..n]))
                });
                match read {
                    Some(result) => {
                        result?;
                        n
                    }
                    None => 0,
                }
            }
            None => 0,
        };
        buf[served..].fill(0xFF);
        Ok(ApertureOutcome {
            served,
            refused: buf.len() - served,
        })
    }

    /// Writes `data` at aperture offset `o`; the part outside the guest's VRAM is dropped.
    pub fn write(
        &self,
        window: WindowTarget,
        o: u64,
        data: &[u8],
    ) -> Result<ApertureOutcome, HostVramError> {
        let served = match self.inside(window, o, data.len()) {
            Some((guest, n)) => {
                let slice = self.guest.slice();
                let vram = self.guest.vram();
                let written = slice.host_addr(guest, n as u64).and_then(|addr| {
                    self.guest
                        .access()
                        .with_live(|| vram.write(addr, &data[..n]))
                });
                match written {
                    Some(result) => {
                        result?;
                        n
                    }
                    None => 0,
                }
            }
            None => 0,
        };
        Ok(ApertureOutcome {
            served,
            refused: data.len() - served,
        })
    }
}
