//! Server limits and timeouts.

use std::time::Duration;

use super::budget::Resources;
use super::protocol::{DmaMessageLayout, HEADER_SIZE};

/// The spec's default `max_data_xfer_size` (also QEMU's): 1 MiB.
pub const DEFAULT_MAX_DATA_XFER_SIZE: u32 = 1 << 20;
/// QEMU refuses a peer `max_data_xfer_size` above 64 MiB.
pub const MAX_MAX_DATA_XFER_SIZE: u32 = 64 << 20;
/// The spec's default `max_dma_maps` (QEMU refuses a larger value).
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// QEMU refuses a peer `max_msg_fds` above 16.
pub const DEFAULT_MAX_MSG_FDS: u32 = 16;
/// Spare room in a message beyond its data (header and fixed parts).
pub const MESSAGE_SLACK: usize = 4096;

/// Limits of a server and its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest `count` of one REGION_READ/WRITE or DMA_READ/WRITE (announced in VERSION;
    /// the connection uses the minimum of this and the client's value). Clamped to
    /// 4 KiB..=64 MiB.
    pub max_data_xfer_size: u32,
    /// Most fds accepted in one message (announced as `max_msg_fds`). Clamped to 1..=16.
    pub max_msg_fds: u32,
    /// Most simultaneous DMA maps (announced; the minimum with the client's value and
    /// `connection_budget.dma_maps` applies). Clamped to 1..=65535.
    pub max_dma_maps: u32,
    /// How long the rest of a started message, a blocked send, or the client's reply to a
    /// server-to-client DMA request may take.
    pub msg_timeout: Duration,
    /// Wire layout of server-to-client DMA_READ/DMA_WRITE (the spec's, as QEMU 11.1 speaks it).
    pub dma_layout: DmaMessageLayout,
    /// After each message, busy-poll the socket this long before sleeping: lowers the wake-up
    /// latency of a trapped access that follows closely, at the cost of CPU. Zero (the
    /// default) never spins; capped at 1 ms.
    pub poll_spin: Duration,
    /// What one connection may make the server hold (DMA maps, mapped DMA memory, client
    /// fds); a client at its budget gets `ENOSPC`/`ENOMEM` (see [`super::budget`]). Default
    /// [`Resources::CONNECTION`].
    pub connection_budget: Resources,
    /// What all connections of the process together may make it hold (checked against the
    /// total of every connection in the process, whatever server it belongs to). Default
    /// [`Resources::process_default`].
    pub process_budget: Resources,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            max_msg_fds: DEFAULT_MAX_MSG_FDS,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            msg_timeout: Duration::from_secs(5),
            dma_layout: DmaMessageLayout::Spec,
            poll_spin: Duration::ZERO,
            connection_budget: Resources::CONNECTION,
            process_budget: Resources::process_default(),
        }
    }
}

impl ServerConfig {
    /// The same configuration with every limit clamped to its valid range.
    pub fn sanitized(&self) -> ServerConfig {
        ServerConfig {
            max_data_xfer_size: self.max_data_xfer_size.clamp(4096, MAX_MAX_DATA_XFER_SIZE),
            max_msg_fds: self.max_msg_fds.clamp(1, DEFAULT_MAX_MSG_FDS),
            max_dma_maps: self.max_dma_maps.clamp(1, DEFAULT_MAX_DMA_MAPS),
            msg_timeout: self.msg_timeout.max(Duration::from_millis(1)),
            dma_layout: self.dma_layout,
            poll_spin: self.poll_spin.min(Duration::from_millis(1)),
            connection_budget: self.connection_budget,
            process_budget: self.process_budget,
        }
    }

    /// Largest message a connection accepts whole (and its receive buffer size).
    pub fn max_message_size(&self) -> usize {
        HEADER_SIZE + self.max_data_xfer_size as usize + MESSAGE_SLACK
    }
}
