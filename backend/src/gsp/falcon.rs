//! The GSP falcon as the host driver drives it, through BAR0 only (gpu-facts 3.3): reset,
//! start on LibOS arguments, status, and [`RunningGsp`], which stops the GSP before the
//! DMA memory it uses is freed.
//!
//! - **Reset**: ENGINE.RESET = 1, wait (bounded) until CPUCTL.HALTED reads 1, ENGINE.RESET
//!   = 0. It is also how the host stops a running GSP.
//! - **Start**: MAILBOX0 = low half, MAILBOX1 = high half of the LibOS argument array's
//!   DMA address ([`super::libos`]), then CPUCTL.STARTCPU. The GSP reports a failed start
//!   by staying halted with a non-zero MAILBOX0 (for the emulated GPU the codes are
//!   `gpu_emulation::gsp::START_*`).
//!
//! This is the part of nova-core's sequence the emulated GSP models; the SEC2 booter /
//! FSP chain of trust and the WPR metadata a real GPU needs in between are not done here.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::host_driver::regs::{
    poll_until, read_reg, write_reg, GspCpuCtl, GspEngine, GspMailbox0, GspMailbox1, RegError,
};
use crate::host_gpu::dma::DmaBuffer;
use crate::host_gpu::HostGpu;

/// How long the host waits for CPUCTL.HALTED after an ENGINE reset.
pub const HALT_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors of driving the GSP falcon.
#[derive(Debug, Error)]
pub enum FalconError {
    /// A register access failed.
    #[error(transparent)]
    Register(#[from] RegError),
    /// CPUCTL.HALTED did not read 1 in time after ENGINE.RESET.
    #[error("the GSP did not halt within {0:?} of an ENGINE reset")]
    HaltTimeout(Duration),
}

/// What the falcon registers say about the GSP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FalconStatus {
    /// CPUCTL.HALTED.
    pub halted: bool,
    /// MAILBOX0 (after a start: 0 = started, else the GSP's error code).
    pub mailbox0: u32,
}

impl fmt::Display for FalconStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.halted { "halted" } else { "running" };
        write!(f, "CPUCTL {state}, MAILBOX0 {:#010x}", self.mailbox0)
    }
}

/// Reads CPUCTL and MAILBOX0.
pub fn status(host: &dyn HostGpu) -> Result<FalconStatus, RegError> {
    let cpuctl: GspCpuCtl = read_reg(host)?;
    let mailbox0: GspMailbox0 = read_reg(host)?;
    Ok(FalconStatus {
        halted: cpuctl.halted() == 1,
        mailbox0: mailbox0.value(),
    })
}

/// Resets the GSP falcon: ENGINE.RESET = 1, waits up to `timeout` for CPUCTL.HALTED, then
/// releases the reset. On timeout the reset stays asserted.
pub fn reset(host: &dyn HostGpu, timeout: Duration) -> Result<(), FalconError> {
    write_reg(host, GspEngine::from_raw(0).with_reset(1))?;
    let halted = poll_until(timeout, || {
        let cpuctl: GspCpuCtl = read_reg(host)?;
        Ok::<_, RegError>((cpuctl.halted() == 1).then_some(()))
    })?;
    if halted.is_none() {
        return Err(FalconError::HaltTimeout(timeout));
    }
    write_reg(host, GspEngine::from_raw(0).with_reset(0))?;
    Ok(())
}

/// Starts the GSP on the LibOS argument array at DMA address `libos_array`.
pub fn start(host: &dyn HostGpu, libos_array: u64) -> Result<(), RegError> {
    write_reg(
        host,
        GspMailbox0::from_raw(0).with_value(libos_array as u32),
    )?;
    write_reg(
        host,
        GspMailbox1::from_raw(0).with_value((libos_array >> 32) as u32),
    )?;
    write_reg(host, GspCpuCtl::from_raw(0).with_startcpu(1))
}

/// A GSP that may be running on (reading and writing by DMA) the buffers held here.
///
/// Dropping it stops the GSP through the registers ([`reset`], waiting up to
/// [`HALT_TIMEOUT`]) and only then lets go of the buffers, so the device never writes
/// memory that was freed. If the GSP does not halt, the buffers are leaked on purpose
/// (an error is logged): memory the device may still write must never return to the
/// allocator.
pub struct RunningGsp<'a> {
    host: &'a dyn HostGpu,
    buffers: Vec<Arc<dyn DmaBuffer>>,
}

impl fmt::Debug for RunningGsp<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningGsp")
            .field("gpu", &self.host.identity().name)
            .field("buffers", &self.buffers)
            .finish()
    }
}

impl<'a> RunningGsp<'a> {
    /// Takes charge of the GSP of `host` and of the DMA `buffers` it may use.
    pub fn new(host: &'a dyn HostGpu, buffers: Vec<Arc<dyn DmaBuffer>>) -> RunningGsp<'a> {
        RunningGsp { host, buffers }
    }
}

impl Drop for RunningGsp<'_> {
    fn drop(&mut self) {
        if let Err(e) = reset(self.host, HALT_TIMEOUT) {
            log::error!(
                "stopping the GSP of {} failed ({e}); leaking its {} DMA buffer(s), which \
                 the device may still write",
                self.host.identity().name,
                self.buffers.len()
            );
            for buffer in self.buffers.drain(..) {
                std::mem::forget(buffer);
            }
        }
    }
}
