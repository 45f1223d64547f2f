//! vfio-user server: presents a [`VfioUserDevice`] to a VMM (QEMU's `vfio-user-pci`) over a
//! unix socket, following QEMU's `docs/interop/vfio-user.rst`.
//!
//! - [`protocol`]: wire structures, command numbers, flags, capability JSON.
//! - [`socket`]: message framing, `SCM_RIGHTS`, bounded reads, serialized writes.
//! - [`connection`]: one client: command dispatch and validation.
//! - [`server`]: the listening socket, one client at a time, shutdown; [`admission`]: who
//!   may connect, and warnings a client can repeat logged once.
//! - [`client`]: [`ClientHandle`], the device's view of a client (interrupts and DMA).
//! - [`dma`], [`irq`]: a connection's DMA maps and interrupt lines; [`dma_map`]: one map
//!   as the device is handed it ([`ClientDmaMap`]).
//! - [`budget`]: what one connection, and the process, may make the server hold.
//! - [`device`]: the device trait and its description types.
//! - `test_client`, `bench` (feature `test-utils`, for tests, benches and the guest harness;
//!   not in a shipped build): a minimal protocol client and a REGION_READ latency benchmark.
//!
//! Server-to-client `DMA_READ`/`DMA_WRITE` use the spec's message layout, which QEMU 11.1
//! speaks (see [`protocol::DmaMessageLayout`]); twin-socket mode, migration (`DEVICE_FEATURE`,
//! `MIG_DATA_*`), dirty-page logging and I/O fds are not supported.

pub mod admission;
#[cfg(any(test, feature = "test-utils"))]
pub mod bench;
pub mod budget;
pub mod client;
pub mod config;
pub mod connection;
pub mod device;
pub mod dma;
pub mod dma_map;
pub mod irq;
pub mod protocol;
pub mod server;
pub mod shutdown;
pub mod socket;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_client;

#[cfg(test)]
mod tests;

pub use admission::{PeerCred, PeerPolicy};
#[cfg(any(test, feature = "test-utils"))]
pub use bench::{bench_posted_writes, bench_region_read, BenchMode, LatencyStats};
pub use client::ClientHandle;
pub use config::ServerConfig;
pub use connection::ConnectionStats;
pub use device::{
    ClientDmaMap, DeviceInfo, Errno, IrqInfo, RegionInfo, RegionMmap, SparseArea, VfioUserDevice,
};
pub use dma::DmaError;
pub use irq::IrqError;
pub use protocol::DmaMessageLayout;
pub use server::{
    adopt_connected_fd, serve_stream, Server, ServerError, SocketFile, DEFAULT_SOCKET_MODE,
    STOP_GRACE,
};
pub use shutdown::ShutdownSignal;
