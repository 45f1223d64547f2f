//! BAR1 faults: why a (piece of a) BAR1 access could not reach memory, and their counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use thiserror::Error;

use super::entry::PteAperture;
use super::instance::InstanceError;
use super::walker::WalkFault;

/// Why a page-sized piece of a BAR1 access in virtual mode faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum Bar1Fault {
    /// The binding could not be resolved to page tables.
    #[error("BAR1 binding: {0}")]
    Instance(#[from] InstanceError),
    /// The VA is above the instance block's ADR_LIMIT.
    #[error("BAR1 VA {va:#x} is above the address limit {limit:#x}")]
    AboveAddressLimit {
        /// The VA.
        va: u64,
        /// The limit.
        limit: u64,
    },
    /// The page walk faulted.
    #[error("BAR1 VA {va:#x}: {fault}")]
    Walk {
        /// The VA.
        va: u64,
        /// The walk fault.
        fault: WalkFault,
    },
    /// The page is not in local video memory (the emulator has no peer or system memory).
    #[error("BAR1 VA {va:#x} maps to {aperture:?}, which the emulator does not have")]
    NotVideoMemory {
        /// The VA.
        va: u64,
        /// The page's aperture.
        aperture: PteAperture,
    },
    /// The physical address lies outside VRAM.
    #[error("BAR1 VA {va:#x} maps to {pa:#x}, outside VRAM")]
    OutsideVram {
        /// The VA.
        va: u64,
        /// The translated address.
        pa: u64,
    },
    /// A write to a read-only page.
    #[error("BAR1 write to read-only VA {va:#x}")]
    ReadOnly {
        /// The VA.
        va: u64,
    },
}

/// BAR1 access counters since power-on (a device reset keeps them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bar1Stats {
    /// Faulting page-sized pieces of reads (each read back as 0xFF bytes).
    pub read_faults: u64,
    /// Faulting page-sized pieces of writes (each dropped).
    pub write_faults: u64,
    /// Page-sized pieces that hit a sparse range (reads 0, writes dropped, no fault).
    pub sparse_accesses: u64,
    /// The most recent fault.
    pub last_fault: Option<Bar1Fault>,
}

/// Lock-free counters plus a mutex-guarded last fault (taken only on the fault path).
#[derive(Debug, Default)]
pub(crate) struct Bar1Counters {
    read_faults: AtomicU64,
    write_faults: AtomicU64,
    sparse: AtomicU64,
    last: Mutex<Option<Bar1Fault>>,
}

impl Bar1Counters {
    pub(crate) fn fault(&self, fault: Bar1Fault, write: bool) {
        let counter = if write {
            &self.write_faults
        } else {
            &self.read_faults
        };
        counter.fetch_add(1, Ordering::Relaxed);
        log::debug!("{fault}");
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(fault);
    }

    pub(crate) fn sparse(&self) {
        self.sparse.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> Bar1Stats {
        Bar1Stats {
            read_faults: self.read_faults.load(Ordering::Relaxed),
            write_faults: self.write_faults.load(Ordering::Relaxed),
            sparse_accesses: self.sparse.load(Ordering::Relaxed),
            last_fault: *self.last.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }
}
