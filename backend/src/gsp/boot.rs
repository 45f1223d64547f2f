//! The GSP boot, through registers and DMA memory only (gpu-facts 3.3, 3.6, 3.7; the part
//! of nova-core's sequence the emulated GSP models):
//!
//! 1. allocate and initialise the shared block ([`GspMem`]) and the LibOS arguments that
//!    say where it is ([`LibosArgs`]: the RMARGS entry and GSP_ARGUMENTS_CACHED), both
//!    from [`HostGpu::dma_alloc`];
//! 2. reset the GSP falcon (ENGINE reset, wait for CPUCTL.HALTED; [`falcon::reset`]), so
//!    a GSP left running is stopped first;
//! 3. queue GSP_SET_SYSTEM_INFO (72) and SET_REGISTRY (73), which the GSP reads when it
//!    starts (neither is answered);
//! 4. start the GSP: the arguments' address in MAILBOX0/1, then CPUCTL.STARTCPU
//!    ([`falcon::start`]);
//! 5. wait for the GSP to initialise the message queue, then for GSP_INIT_DONE (0x1001),
//!    keeping the events that come before it; if either does not come, the error carries
//!    what CPUCTL and MAILBOX0 say ([`BootError::NoAnswer`]: a GSP that refused to start
//!    is halted with a non-zero MAILBOX0);
//! 6. GET_GSP_STATIC_INFO (65): the framebuffer regions (usable VRAM and reserved ranges)
//!    and the internal handles, returned as [`StaticInfo`].
//!
//! The session returned owns the DMA buffers and stops the GSP before they are freed
//! ([`RunningGsp`]); every failure after step 2 does the same.

use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::client::{ClientError, Event, GspClient, GspTimeouts};
use super::cmdq::Cmdq;
use super::falcon::{self, FalconError, FalconStatus, RunningGsp, HALT_TIMEOUT};
use super::libos::{LibosArgs, LibosError};
use super::rpc::{Function, PayloadError, Registry, StaticInfo, SystemInfo};
use super::session::GspSession;
use super::shmem::{GspMem, ShmemError};
use crate::host_driver::regs::RegError;
use crate::host_gpu::HostGpu;

/// Errors of booting the GSP.
#[derive(Debug, Error)]
pub enum BootError {
    /// The shared block could not be set up.
    #[error(transparent)]
    Shared(#[from] ShmemError),
    /// The LibOS arguments could not be set up.
    #[error(transparent)]
    Libos(#[from] LibosError),
    /// The GSP falcon could not be reset or started.
    #[error("GSP falcon: {0}")]
    Falcon(#[from] FalconError),
    /// The GSP did not set up its message queue or post GSP_INIT_DONE in time.
    #[error("the GSP did not come up ({status}): {source}")]
    NoAnswer {
        /// CPUCTL and MAILBOX0 after the wait.
        status: FalconStatus,
        /// What the wait ran into.
        #[source]
        source: ClientError,
    },
    /// A boot RPC failed or timed out.
    #[error("GSP boot: {0}")]
    Rpc(#[from] ClientError),
    /// A boot payload could not be built or the static info could not be decoded.
    #[error("GSP boot: {0}")]
    Payload(#[from] PayloadError),
}

impl From<RegError> for BootError {
    fn from(e: RegError) -> BootError {
        BootError::Falcon(FalconError::Register(e))
    }
}

/// What happened during boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootTrace {
    /// Events that arrived before GSP_INIT_DONE, in order (GSP_INIT_DONE itself last).
    pub events: Vec<Event>,
    /// From start to GSP_INIT_DONE.
    pub init_time: Duration,
    /// From start to the static info.
    pub total_time: Duration,
}

/// Boots the GSP of `host` on DMA memory from [`HostGpu::dma_alloc`] and returns the
/// session (queues, static info, trace). Dropping the session stops the GSP.
pub fn boot(host: &dyn HostGpu, timeouts: GspTimeouts) -> Result<GspSession<'_>, BootError> {
    let mem = GspMem::allocate(host)?;
    let queues = mem.init_args().map_err(|e| BootError::Shared(e.into()))?;
    let libos = LibosArgs::allocate(host, queues)?;
    boot_on(host, mem, libos, timeouts)
}

/// Boots the GSP of `host` on the shared block `mem` and the arguments `libos` (which
/// must describe `mem`), wherever their memory lives: DMA buffers of the host, or memory
/// a guest lent the GPU.
pub(crate) fn boot_on(
    host: &dyn HostGpu,
    mem: GspMem,
    libos: LibosArgs,
    timeouts: GspTimeouts,
) -> Result<GspSession<'_>, BootError> {
    let start = Instant::now();
    // Before the GSP is given the new buffers: a failure here frees them unused.
    falcon::reset(host, HALT_TIMEOUT)?;
    let array = libos.array_addr().map_err(LibosError::Access)?;
    // From here on the GSP may use both buffers: this stops it before they are freed,
    // whether the boot succeeds (the session keeps it) or fails (dropped on return).
    let running = RunningGsp::new(host, vec![mem.shared_buffer(), Arc::clone(libos.buffer())]);
    let mut client = GspClient::new(Cmdq::new(host, mem), timeouts);

    let system_info = SystemInfo::for_chip(host.identity()).encode();
    client.send(Function::GSP_SET_SYSTEM_INFO, &system_info, false)?;
    client.send(
        Function::SET_REGISTRY,
        &Registry::nova_defaults().encode()?,
        false,
    )?;
    falcon::start(host, array)?;

    let init = client
        .wait_msgq_ready()
        .and_then(|()| client.wait_event(Function::GSP_INIT_DONE, timeouts.init_done))
        .map_err(|source| no_answer(host, source))?;
    let init_time = start.elapsed();
    let mut events = client.take_events();
    events.push(init);

    let reply = client.call(Function::GET_GSP_STATIC_INFO, &[])?;
    let info = StaticInfo::decode(&reply.payload)?;
    let trace = BootTrace {
        events,
        init_time,
        total_time: start.elapsed(),
    };
    Ok(GspSession::new(client, info, trace, running))
}

/// The error for a GSP that did not come up: [`BootError::NoAnswer`] with the falcon's
/// status, or the wait's own error if the status cannot be read.
fn no_answer(host: &dyn HostGpu, source: ClientError) -> BootError {
    match falcon::status(host) {
        Ok(status) => BootError::NoAnswer { status, source },
        Err(e) => {
            log::warn!("reading the GSP falcon status after a failed boot: {e}");
            BootError::Rpc(source)
        }
    }
}
