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
//! - [`boot`]: the boot handshake (SET_SYSTEM_INFO, SET_REGISTRY, GSP_INIT_DONE,
//!   GET_GSP_STATIC_INFO); [`session`]: the booted GSP and object requests.
//! - [`report`]: [`boot_and_report`] for `gpu-backend inspect`; [`bench`](mod@bench):
//!   round-trip and throughput measurements.
//!
//! The GSP itself is reached only through [`HostGpu`](crate::host_gpu::HostGpu): BAR0 for
//! the doorbell and interrupt registers, a DMA buffer for the queues, and
//! [`HostGpu::gsp_start`](crate::host_gpu::HostGpu::gsp_start) to start it.

pub mod bench;
pub mod boot;
pub mod client;
pub mod cmdq;
pub mod element;
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
