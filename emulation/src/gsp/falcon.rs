//! The GSP falcon registers the host driver uses (gpu-facts 3.3), and the doorbell that
//! wakes the emulated GSP.
//!
//! | register | BAR0 | behaviour |
//! |---|---|---|
//! | `IRQSCLR` | 0x110004 | write 1s to clear IRQSTAT bits; reads 0 |
//! | `IRQSTAT` | 0x110008 | pending interrupts; the GSP raises SWGEN0 (bit 6) after posting messages; read-only |
//! | `MAILBOX0` | 0x110040 | read/write; the low half of the LibOS argument address at STARTCPU, then the start status (0 = started, else a `gsp::START_*` code) |
//! | `MAILBOX1` | 0x110044 | read/write; the high half of the LibOS argument address |
//! | `CPUCTL` | 0x110100 | a write with STARTCPU (bit 1) starts the GSP (ignored while ENGINE holds it in reset or while it runs); reads HALTED (bit 4) = 1 unless the GSP runs |
//! | `CPUCTL_ALIAS` | 0x110130 | the same as `CPUCTL` |
//! | `ENGINE` | 0x1103C0 | bit 0 RESET: writing 1 halts the GSP and puts the other falcon registers back to power-on; reads back; writing 0 releases |
//! | `NV_PGSP_QUEUE_HEAD(0)` | 0x110C00 | the CPU→GSP doorbell: a write stores the value (it reads back) and rings the doorbell |
//! | `RISCV_CPUCTL` | 0x111388 | read-only: HALTED (bit 0) and ACTIVE (bit 7) of the GSP's RISC-V core |
//!
//! What STARTCPU and RESET do to the GSP is the GSP's business ([`super::EmulatedGsp`]):
//! a write returns the [`FalconAction`] it asks for and the device applies it before the
//! BAR0 write returns.
//!
//! Register state is atomic. Ringing the doorbell takes the doorbell's own small lock (to
//! pair with the condition variable the GSP thread sleeps on); no other register does.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::regs::register;

/// Base of the GSP falcon register block in BAR0.
pub const GSP_FALCON_BASE: u64 = 0x11_0000;
/// Base of the GSP's RISC-V ("falcon2") register block in BAR0.
pub const GSP_RISCV_BASE: u64 = 0x11_1000;
/// `NV_PFALCON_FALCON_IRQSCLR` of the GSP falcon.
pub const GSP_IRQSCLR: u64 = GSP_FALCON_BASE + 0x004;
/// `NV_PFALCON_FALCON_IRQSTAT` of the GSP falcon.
pub const GSP_IRQSTAT: u64 = GSP_FALCON_BASE + 0x008;
/// `NV_PFALCON_FALCON_MAILBOX0` of the GSP falcon.
pub const GSP_MAILBOX0: u64 = GSP_FALCON_BASE + 0x040;
/// `NV_PFALCON_FALCON_MAILBOX1` of the GSP falcon.
pub const GSP_MAILBOX1: u64 = GSP_FALCON_BASE + 0x044;
/// `NV_PFALCON_FALCON_CPUCTL` of the GSP falcon.
pub const GSP_CPUCTL: u64 = GSP_FALCON_BASE + 0x100;
/// `NV_PFALCON_FALCON_CPUCTL_ALIAS` of the GSP falcon.
pub const GSP_CPUCTL_ALIAS: u64 = GSP_FALCON_BASE + 0x130;
/// `NV_PFALCON_FALCON_ENGINE` of the GSP falcon (reset control).
pub const GSP_ENGINE: u64 = GSP_FALCON_BASE + 0x3C0;
/// `NV_PGSP_QUEUE_HEAD(0)`: the CPU→GSP doorbell.
pub const GSP_QUEUE_HEAD0: u64 = crate::regs::GSP_QUEUE_HEAD0;
/// `NV_PRISCV_RISCV_CPUCTL` of the GSP's RISC-V core.
pub const GSP_RISCV_CPUCTL: u64 = GSP_RISCV_BASE + 0x388;

register! {
    /// Falcon `IRQSTAT` / `IRQSCLR` bits (gpu-facts 3.3).
    pub struct FalconIrq {
        /// HALT: the falcon halted.
        4:4 => halt, with_halt;
        /// SWGEN0: software interrupt 0, the GSP's "messages posted" notification.
        6:6 => swgen0, with_swgen0;
    }
}

register! {
    /// Falcon `CPUCTL` / `CPUCTL_ALIAS` (gpu-facts 3.3).
    pub struct FalconCpuCtl {
        /// STARTCPU: write 1 to start the CPU (never reads back).
        1:1 => startcpu, with_startcpu;
        /// HALTED: 1 while the CPU is not running.
        4:4 => halted, with_halted;
        /// ALIAS_EN (not modelled: reads 0, writes ignored).
        6:6 => alias_en, with_alias_en;
    }
}

register! {
    /// Falcon `ENGINE` (gpu-facts 3.3): reset control.
    pub struct FalconEngine {
        /// RESET: 1 holds the falcon in reset.
        0:0 => reset, with_reset;
    }
}

register! {
    /// RISC-V `CPUCTL` (falcon2 + 0x388, gpu-facts 3.3). Read-only in the model.
    pub struct RiscvCpuCtl {
        /// HALTED: the core is halted.
        0:0 => halted, with_halted;
        /// ACTIVE_STAT: the core is running.
        7:7 => active, with_active;
    }
}

/// What a falcon register write asks of the GSP behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FalconAction {
    /// CPUCTL.STARTCPU was written while the falcon was out of reset: start the GSP on the
    /// LibOS arguments named by MAILBOX1:MAILBOX0.
    StartCpu,
    /// ENGINE.RESET was written 1: halt the GSP and reset the falcon registers.
    Reset,
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
    mailbox0: AtomicU32,
    mailbox1: AtomicU32,
    /// ENGINE.RESET as last written.
    in_reset: AtomicBool,
    /// Whether the GSP runs (maintained by the GSP: set before its thread starts, cleared
    /// when the thread ends); CPUCTL.HALTED is its negation.
    running: AtomicBool,
    doorbell_writes: AtomicU64,
    pub(crate) doorbell: Doorbell,
}

/// A decoded GSP falcon register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FalconReg {
    IrqSClr,
    IrqStat,
    Mailbox0,
    Mailbox1,
    CpuCtl,
    Engine,
    QueueHead0,
    RiscvCpuCtl,
}

impl FalconReg {
    /// The register at dword offset `offset`, if the model implements it.
    pub(crate) fn decode(offset: u64) -> Option<FalconReg> {
        match offset {
            GSP_IRQSCLR => Some(FalconReg::IrqSClr),
            GSP_IRQSTAT => Some(FalconReg::IrqStat),
            GSP_MAILBOX0 => Some(FalconReg::Mailbox0),
            GSP_MAILBOX1 => Some(FalconReg::Mailbox1),
            GSP_CPUCTL | GSP_CPUCTL_ALIAS => Some(FalconReg::CpuCtl),
            GSP_ENGINE => Some(FalconReg::Engine),
            GSP_QUEUE_HEAD0 => Some(FalconReg::QueueHead0),
            GSP_RISCV_CPUCTL => Some(FalconReg::RiscvCpuCtl),
            _ => None,
        }
    }
}

/// Merges the bytes of `value` selected by `byte_mask` into `cell`; returns the new value.
fn merge(cell: &AtomicU32, byte_mask: u32, value: u32) -> u32 {
    let new = |old: u32| (old & !byte_mask) | (value & byte_mask);
    // The closure always returns `Some`, so this is always `Ok(previous value)`.
    match cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| Some(new(old))) {
        Ok(old) | Err(old) => new(old),
    }
}

impl GspFalcon {
    /// Reads a register.
    pub(crate) fn read(&self, reg: FalconReg) -> u32 {
        let running = self.is_running();
        match reg {
            FalconReg::IrqSClr => 0,
            FalconReg::IrqStat => self.irqstat.load(Ordering::Acquire),
            FalconReg::Mailbox0 => self.mailbox0.load(Ordering::Acquire),
            FalconReg::Mailbox1 => self.mailbox1.load(Ordering::Acquire),
            FalconReg::CpuCtl => FalconCpuCtl::default()
                .with_halted(u32::from(!running))
                .raw(),
            FalconReg::Engine => FalconEngine::default()
                .with_reset(u32::from(self.in_reset.load(Ordering::Acquire)))
                .raw(),
            FalconReg::QueueHead0 => self.queue_head0.load(Ordering::Acquire),
            FalconReg::RiscvCpuCtl => RiscvCpuCtl::default()
                .with_halted(u32::from(!running))
                .with_active(u32::from(running))
                .raw(),
        }
    }

    /// Writes the bytes of `value` selected by `byte_mask`; returns what the write asks of
    /// the GSP, for the device to apply.
    pub(crate) fn write(&self, reg: FalconReg, byte_mask: u32, value: u32) -> Option<FalconAction> {
        let value = value & byte_mask;
        match reg {
            FalconReg::IrqSClr => {
                self.irqstat.fetch_and(!value, Ordering::AcqRel);
            }
            FalconReg::IrqStat | FalconReg::RiscvCpuCtl => {}
            FalconReg::Mailbox0 => {
                merge(&self.mailbox0, byte_mask, value);
            }
            FalconReg::Mailbox1 => {
                merge(&self.mailbox1, byte_mask, value);
            }
            FalconReg::CpuCtl => {
                if FalconCpuCtl::from_raw(value).startcpu() == 1 {
                    if self.in_reset.load(Ordering::Acquire) {
                        log::debug!("GSP falcon: STARTCPU ignored while ENGINE holds it in reset");
                        return None;
                    }
                    return Some(FalconAction::StartCpu);
                }
            }
            FalconReg::Engine => {
                let reset_bit = FalconEngine::default().with_reset(1).raw();
                if byte_mask & reset_bit == 0 {
                    return None;
                }
                let reset = FalconEngine::from_raw(value).reset() == 1;
                self.in_reset.store(reset, Ordering::Release);
                return reset.then_some(FalconAction::Reset);
            }
            FalconReg::QueueHead0 => {
                merge(&self.queue_head0, byte_mask, value);
                self.doorbell_writes.fetch_add(1, Ordering::AcqRel);
                self.doorbell.ring();
            }
        }
        None
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

    /// Whether the GSP runs (CPUCTL.HALTED reads 0).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Records whether the GSP runs.
    pub(crate) fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::Release);
    }

    /// The LibOS argument address the host left in MAILBOX1:MAILBOX0.
    pub(crate) fn mailbox_address(&self) -> u64 {
        let lo = self.mailbox0.load(Ordering::Acquire);
        let hi = self.mailbox1.load(Ordering::Acquire);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Sets MAILBOX0 (the GSP's start status).
    pub(crate) fn set_mailbox0(&self, value: u32) {
        self.mailbox0.store(value, Ordering::Release);
    }

    /// What ENGINE.RESET does to the registers: all but ENGINE (and the running state,
    /// which the GSP keeps) back to power-on. The doorbell counter keeps counting.
    pub(crate) fn reset_registers(&self) {
        for cell in [
            &self.irqstat,
            &self.queue_head0,
            &self.mailbox0,
            &self.mailbox1,
        ] {
            cell.store(0, Ordering::Release);
        }
    }

    /// Power-on state, ENGINE included (the doorbell counter keeps counting).
    pub(crate) fn reset(&self) {
        self.reset_registers();
        self.in_reset.store(false, Ordering::Release);
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
        assert_eq!(FalconReg::decode(0x110048), None);
    }

    #[test]
    fn register_decoding() {
        for (offset, reg) in [
            (0x110040, FalconReg::Mailbox0),
            (0x110044, FalconReg::Mailbox1),
            (0x110100, FalconReg::CpuCtl),
            (0x110130, FalconReg::CpuCtl),
            (0x1103C0, FalconReg::Engine),
            (0x111388, FalconReg::RiscvCpuCtl),
        ] {
            assert_eq!(FalconReg::decode(offset), Some(reg), "{offset:#x}");
        }
        assert_eq!(FalconCpuCtl::default().with_startcpu(1).raw(), 0x2);
        assert_eq!(FalconCpuCtl::default().with_halted(1).raw(), 0x10);
        assert_eq!(RiscvCpuCtl::default().with_active(1).raw(), 0x80);
    }

    #[test]
    fn mailboxes_read_back_byte_by_byte() {
        let f = GspFalcon::default();
        f.write(FalconReg::Mailbox0, u32::MAX, 0x1234_5678);
        f.write(FalconReg::Mailbox1, u32::MAX, 0x9);
        assert_eq!(f.read(FalconReg::Mailbox0), 0x1234_5678);
        assert_eq!(f.mailbox_address(), 0x9_1234_5678);
        f.write(FalconReg::Mailbox0, 0xFF00, 0xAB00);
        assert_eq!(f.read(FalconReg::Mailbox0), 0x1234_AB78);
        f.reset_registers();
        assert_eq!(f.mailbox_address(), 0);
    }

    #[test]
    fn cpuctl_reports_halted_and_startcpu_asks_for_a_start() {
        let f = GspFalcon::default();
        assert_eq!(f.read(FalconReg::CpuCtl), 0x10);
        assert_eq!(f.read(FalconReg::RiscvCpuCtl), 0x01);
        // Writes without STARTCPU ask nothing; STARTCPU does (and does not stick).
        assert_eq!(f.write(FalconReg::CpuCtl, u32::MAX, 0x10), None);
        assert_eq!(
            f.write(FalconReg::CpuCtl, u32::MAX, 0x2),
            Some(FalconAction::StartCpu)
        );
        // A byte write missing bit 1 does not start.
        assert_eq!(f.write(FalconReg::CpuCtl, 0xFF00, 0x0202), None);
        f.set_running(true);
        assert_eq!(f.read(FalconReg::CpuCtl), 0);
        assert_eq!(f.read(FalconReg::RiscvCpuCtl), 0x80);
        f.set_running(false);
        assert_eq!(f.read(FalconReg::CpuCtl), 0x10);
    }

    #[test]
    fn engine_reset_holds_the_falcon_and_blocks_startcpu() {
        let f = GspFalcon::default();
        assert_eq!(f.read(FalconReg::Engine), 0);
        assert_eq!(
            f.write(FalconReg::Engine, u32::MAX, 1),
            Some(FalconAction::Reset)
        );
        assert_eq!(f.read(FalconReg::Engine), 1);
        assert_eq!(f.write(FalconReg::CpuCtl, u32::MAX, 0x2), None);
        // A write of another byte leaves RESET alone.
        assert_eq!(f.write(FalconReg::Engine, 0xFF00, 0), None);
        assert_eq!(f.read(FalconReg::Engine), 1);
        assert_eq!(f.write(FalconReg::Engine, u32::MAX, 0), None);
        assert_eq!(f.read(FalconReg::Engine), 0);
        assert_eq!(
            f.write(FalconReg::CpuCtl, u32::MAX, 0x2),
            Some(FalconAction::StartCpu)
        );
        f.write(FalconReg::Engine, u32::MAX, 1);
        f.reset();
        assert_eq!(f.read(FalconReg::Engine), 0);
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
