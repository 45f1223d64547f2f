//! The host side of the GSP (GPU System Processor) protocol: the shared command and
//! message queues, RPCs over them, the boot handshake and the RM object requests the
//! backend makes (gpu-facts section 3).
//!
//! Layers, bottom up:
//! - [`queue`]: queue geometry, slot arithmetic, the typed tx header.
//! - [`element`]: queue elements (message header, RPC header, payload) and the checksum.
//! - [`shmem`]: the 129-page shared block in DMA memory the backend owns
//!   ([`HostGpu::dma_alloc`](crate::host_gpu::HostGpu::dma_alloc)), its page-table array
//!   and the command queue header.
//! - [`cmdq`]: sending commands (wait for room, copy, publish, doorbell) and receiving
//!   messages (copy out, verify, then release), with resynchronisation after bad ones.
//! - [`rpc`]: the function/event number table (r570) and typed payloads.
//! - [`client`]: RPCs — replies matched by function and sequence, events, timeouts.
//! - [`libos`]: the LibOS argument array and GSP_ARGUMENTS_CACHED (the host's encoder).
//! - [`falcon`]: the GSP falcon registers: reset, start, status, and stopping the GSP
//!   before its DMA memory is freed.
//! - [`boot`](mod@boot): the boot (reset, LibOS arguments, STARTCPU) and handshake (SET_SYSTEM_INFO,
//!   SET_REGISTRY, GSP_INIT_DONE, GET_GSP_STATIC_INFO); [`session`]: the booted GSP and
//!   object requests.
//! - [`report`]: [`boot_and_report`] for `gpu-backend inspect`; `bench` (feature
//!   `test-utils`): round-trip and throughput measurements.
//!
//! The GSP itself is reached only through [`HostGpu`](crate::host_gpu::HostGpu): BAR0 for
//! the falcon registers (start, reset, doorbell, interrupt) and DMA buffers for the queues
//! and the boot arguments, so the same code boots the emulated GSP and a real one behind
//! VFIO (as far as the emulated boot goes: the SEC2/FSP chain of trust is not done).

#[cfg(any(test, feature = "test-utils"))]
pub mod bench;
pub mod boot;
pub mod client;
pub mod cmdq;
pub mod element;
pub mod falcon;
pub mod libos;
pub mod queue;
pub mod report;
pub mod rpc;
pub mod session;
pub mod shmem;

#[cfg(test)]
mod tests;

pub use boot::{boot, BootError, BootTrace};
pub use client::{GspClient, GspTimeouts};
pub use report::{boot_and_report, GspReport};
pub use session::GspSession;
