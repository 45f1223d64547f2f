//! The MSI-X table and pending-bit array inside BAR0.
//!
//! QEMU's vfio-user client emulates the MSI-X table itself (from the capability in config
//! space) and forwards only PBA reads to the server; the table is still kept here so a
//! client that does forward table accesses reads back what it wrote. Pending bits are not
//! tracked by the presentation (the interrupt layer owns masking), so the PBA reads 0.

use std::ops::Range;
use std::sync::Mutex;

use super::config_space::MsixDecl;

/// Bytes per MSI-X table entry (address low, address high, data, vector control).
const ENTRY_SIZE: usize = 16;
/// Vector-control value at reset: masked.
const VECTOR_MASKED: u32 = 1;

/// MSI-X table storage and PBA.
pub struct MsixRegion {
    table: Range<u64>,
    pba: Range<u64>,
    entries: Mutex<Vec<u8>>,
}

impl MsixRegion {
    /// Storage for the table and PBA `decl` places in its BAR.
    pub fn new(decl: &MsixDecl) -> Self {
        let mut entries = vec![0u8; usize::from(decl.vectors) * ENTRY_SIZE];
        reset_entries(&mut entries);
        MsixRegion {
            table: decl.table_range(),
            pba: decl.pba_range(),
            entries: Mutex::new(entries),
        }
    }

    /// Whether `offset..offset+len` lies entirely in the table or the PBA.
    pub fn covers(&self, offset: u64, len: usize) -> bool {
        let Some(end) = offset.checked_add(len as u64) else {
            return false;
        };
        let inside = |r: &Range<u64>| offset >= r.start && end <= r.end;
        inside(&self.table) || inside(&self.pba)
    }

    /// Reads from the table or PBA (the caller checked [`covers`](Self::covers)).
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        if self.table.contains(&offset) {
            let start = (offset - self.table.start) as usize;
            let entries = self.lock();
            buf.copy_from_slice(&entries[start..start + buf.len()]);
        } else {
            buf.fill(0);
        }
    }

    /// Writes to the table; writes to the PBA are ignored (it is read-only).
    pub fn write(&self, offset: u64, data: &[u8]) {
        if self.table.contains(&offset) {
            let start = (offset - self.table.start) as usize;
            self.lock()[start..start + data.len()].copy_from_slice(data);
        }
    }

    /// Back to reset: every vector masked, addresses and data zero.
    pub fn reset(&self) {
        reset_entries(&mut self.lock());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn reset_entries(entries: &mut [u8]) {
    for entry in entries.chunks_exact_mut(ENTRY_SIZE) {
        entry.fill(0);
        entry[12..16].copy_from_slice(&VECTOR_MASKED.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl() -> MsixDecl {
        MsixDecl {
            vectors: 4,
            table_bar: 0,
            table_offset: 0x1000,
            pba_bar: 0,
            pba_offset: 0x2000,
        }
    }

    #[test]
    fn table_keeps_writes_and_pba_reads_zero() {
        let msix = MsixRegion::new(&decl());
        assert!(msix.covers(0x1000, 4) && msix.covers(0x1030, 16) && msix.covers(0x2000, 8));
        assert!(!msix.covers(0x1040, 4) && !msix.covers(0x0FFC, 8) && !msix.covers(u64::MAX, 2));
        let mut ctrl = [0u8; 4];
        msix.read(0x100C, &mut ctrl);
        assert_eq!(u32::from_le_bytes(ctrl), VECTOR_MASKED);
        msix.write(0x1010, &0xFEE0_0000u32.to_le_bytes());
        let mut addr = [0u8; 4];
        msix.read(0x1010, &mut addr);
        assert_eq!(u32::from_le_bytes(addr), 0xFEE0_0000);
        msix.write(0x2000, &[0xFF; 8]);
        let mut pba = [0xAAu8; 8];
        msix.read(0x2000, &mut pba);
        assert_eq!(pba, [0; 8]);
        msix.reset();
        msix.read(0x1010, &mut addr);
        assert_eq!(addr, [0; 4]);
    }
}
