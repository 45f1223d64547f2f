//! The GSP falcon registers the queue protocol uses (gpu-facts 3.3), and the doorbell that
//! wakes the emulated GSP.
//!
//! - `NV_PGSP_QUEUE_HEAD(0)` (BAR0 0x110C00): the CPU→GSP doorbell. A write stores the value
//!   (it reads back) and rings the doorbell; the CPU writes 0 after publishing the command
//!   queue's write pointer.
//! - `IRQSTAT` (0x110008): pending falcon interrupts; the GSP raises SWGEN0 (bit 6) after
//!   posting messages. Read-only.
//! - `IRQSCLR` (0x110004): write 1s to clear IRQSTAT bits. Reads 0.
//!
//! Register state is atomic. Ringing the doorbell takes the doorbell's own small lock (to
//! pair with the condition variable the GSP thread sleeps on); no other register does.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::regs::register;

/// Base of the GSP falcon register block in BAR0.
pub const GSP_FALCON_BASE: u64 = 0x11_0000;
/// `NV_PFALCON_FALCON_IRQSCLR` of the GSP falcon.
pub const GSP_IRQSCLR: u64 = GSP_FALCON_BASE + 0x004;
/// `NV_PFALCON_FALCON_IRQSTAT` of the GSP falcon.
pub const GSP_IRQSTAT: u64 = GSP_FALCON_BASE + 0x008;
/// `NV_PGSP_QUEUE_HEAD(0)`: the CPU→GSP doorbell.
pub const GSP_QUEUE_HEAD0: u64 = crate::regs::GSP_QUEUE_HEAD0;

register! {
    /// Falcon `IRQSTAT` / `IRQSCLR` bits (gpu-facts 3.3).
    pub struct FalconIrq {
        /// HALT: the falcon halted.
        4:4 => halt, with_halt;
        /// SWGEN0: software interrupt 0, the GSP's "messages posted" notification.
        6:6 => swgen0, with_swgen0;
    }
}

/// A counter the GSP thread can sleep on until it changes.
#[derive(Debug, Default)]
pub(crate) struct Doorbell {
    rings: Mutex<u64>,
    changed: Condvar,
}

impl Doorbell {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rings: bumps the counter and wakes every sleeper.
    pub(crate) fn ring(&self) {
        *self.lock() += 1;
        self.changed.notify_all();
    }

    /// The current count.
    pub(crate) fn count(&self) -> u64 {
        *self.lock()
    }

    /// Sleeps until the count differs from `seen` or `timeout` passes; returns the count.
    pub(crate) fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |count| *count == seen)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

/// The GSP falcon's register state.
#[derive(Debug, Default)]
pub struct GspFalcon {
    irqstat: AtomicU32,
    queue_head0: AtomicU32,
    doorbell_writes: AtomicU64,
    pub(crate) doorbell: Doorbell,
}

/// A decoded GSP falcon register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FalconReg {
    IrqSClr,
    IrqStat,
    QueueHead0,
}

impl FalconReg {
    /// The register at dword offset `offset`, if the model implements it.
    pub(crate) fn decode(offset: u64) -> Option<FalconReg> {
        match offset {
            GSP_IRQSCLR => Some(FalconReg::IrqSClr),
            GSP_IRQSTAT => Some(FalconReg::IrqStat),
            GSP_QUEUE_HEAD0 => Some(FalconReg::QueueHead0),
            _ => None,
        }
    }
}

impl GspFalcon {
    /// Reads a register.
    pub(crate) fn read(&self, reg: FalconReg) -> u32 {
        match reg {
            FalconReg::IrqSClr => 0,
            FalconReg::IrqStat => self.irqstat.load(Ordering::Acquire),
            FalconReg::QueueHead0 => self.queue_head0.load(Ordering::Acquire),
        }
    }

    /// Writes the bytes of `value` selected by `byte_mask`.
    pub(crate) fn write(&self, reg: FalconReg, byte_mask: u32, value: u32) {
        let value = value & byte_mask;
        match reg {
            FalconReg::IrqSClr => {
                self.irqstat.fetch_and(!value, Ordering::AcqRel);
            }
            FalconReg::IrqStat => {}
            FalconReg::QueueHead0 => {
                let merge = |old: u32| Some((old & !byte_mask) | value);
                // The closure always returns `Some`.
                let _ = self
                    .queue_head0
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, merge);
                self.doorbell_writes.fetch_add(1, Ordering::AcqRel);
                self.doorbell.ring();
            }
        }
    }

    /// Raises SWGEN0 in IRQSTAT (the GSP's "messages posted" interrupt).
    pub fn raise_swgen0(&self) {
        self.irqstat.fetch_or(
            FalconIrq::from_raw(0).with_swgen0(1).raw(),
            Ordering::AcqRel,
        );
    }

    /// The current IRQSTAT.
    pub fn irqstat(&self) -> FalconIrq {
        FalconIrq::from_raw(self.irqstat.load(Ordering::Acquire))
    }

    /// Number of doorbell writes since power-on.
    pub fn doorbell_writes(&self) -> u64 {
        self.doorbell_writes.load(Ordering::Acquire)
    }

    /// Power-on state (the doorbell counter keeps counting).
    pub(crate) fn reset(&self) {
        self.irqstat.store(0, Ordering::Release);
        self.queue_head0.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn irq_bits_and_clear() {
        let f = GspFalcon::default();
        assert_eq!(f.read(FalconReg::IrqStat), 0);
        f.raise_swgen0();
        assert_eq!(f.read(FalconReg::IrqStat), 0x40);
        assert_eq!(f.irqstat().swgen0(), 1);
        f.write(FalconReg::IrqStat, u32::MAX, 0); // read-only
        assert_eq!(f.read(FalconReg::IrqStat), 0x40);
        f.write(FalconReg::IrqSClr, u32::MAX, 0x10);
        assert_eq!(f.read(FalconReg::IrqStat), 0x40);
        f.write(FalconReg::IrqSClr, 0xFF, 0x40);
        assert_eq!(f.read(FalconReg::IrqStat), 0);
        assert_eq!(FalconReg::decode(0x110C00), Some(FalconReg::QueueHead0));
        assert_eq!(FalconReg::decode(0x110040), None);
    }

    #[test]
    fn doorbell_wakes_a_sleeper() {
        let f = Arc::new(GspFalcon::default());
        let seen = f.doorbell.count();
        let g = Arc::clone(&f);
        let t = std::thread::spawn(move || g.doorbell.wait(seen, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(10));
        f.write(FalconReg::QueueHead0, u32::MAX, 0);
        assert_eq!(t.join().unwrap(), seen + 1);
        assert_eq!(f.doorbell_writes(), 1);
        // Already changed: no sleep at all.
        assert_eq!(f.doorbell.wait(seen, Duration::from_secs(10)), seen + 1);
        // Unchanged: times out.
        assert_eq!(
            f.doorbell.wait(seen + 1, Duration::from_millis(1)),
            seen + 1
        );
    }
}
