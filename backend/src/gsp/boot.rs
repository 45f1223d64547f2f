//! The GSP boot handshake over the queues (gpu-facts 3.6/3.7, the part after the
//! firmware is running):
//!
//! 1. allocate and initialise the shared block ([`GspMem`]);
//! 2. queue GSP_SET_SYSTEM_INFO (72) and SET_REGISTRY (73), which the GSP reads when it
//!    starts (neither is answered);
//! 3. start the GSP with the block's location ([`HostGpu::gsp_start`]);
//! 4. wait for the GSP to initialise the message queue, then for GSP_INIT_DONE (0x1001),
//!    keeping the events that come before it;
//! 5. GET_GSP_STATIC_INFO (65): the framebuffer regions (usable VRAM and reserved ranges)
//!    and the internal handles, returned as [`StaticInfo`].

use std::time::{Duration, Instant};

use thiserror::Error;

use super::client::{ClientError, Event, GspClient, GspTimeouts};
use super::cmdq::Cmdq;
use super::rpc::{Function, PayloadError, Registry, StaticInfo, SystemInfo};
use super::session::GspSession;
use super::shmem::{GspMem, ShmemError};
use crate::host_gpu::{HostGpu, HostGpuError};

/// Errors of booting the GSP.
#[derive(Debug, Error)]
pub enum BootError {
    /// The shared block could not be set up.
    #[error(transparent)]
    Shared(#[from] ShmemError),
    /// The host could not start the GSP.
    #[error("starting the GSP failed: {0}")]
    Start(#[source] HostGpuError),
    /// A boot RPC failed or timed out.
    #[error("GSP boot: {0}")]
    Rpc(#[from] ClientError),
    /// A boot payload could not be built or the static info could not be decoded.
    #[error("GSP boot: {0}")]
    Payload(#[from] PayloadError),
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

/// Boots the GSP of `host` and returns the session (queues, static info, trace).
pub fn boot(host: &dyn HostGpu, timeouts: GspTimeouts) -> Result<GspSession<'_>, BootError> {
    let start = Instant::now();
    let mem = GspMem::allocate(host)?;
    let args = mem.init_args().map_err(|e| BootError::Shared(e.into()))?;
    let mut client = GspClient::new(Cmdq::new(host, mem), timeouts);

    let system_info = SystemInfo::for_chip(host.identity()).encode();
    client.send(Function::GSP_SET_SYSTEM_INFO, &system_info, false)?;
    client.send(
        Function::SET_REGISTRY,
        &Registry::nova_defaults().encode()?,
        false,
    )?;
    host.gsp_start(&args).map_err(BootError::Start)?;

    client.wait_msgq_ready()?;
    let init = client.wait_event(Function::GSP_INIT_DONE, timeouts.init_done)?;
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
    Ok(GspSession::new(client, info, trace))
}
