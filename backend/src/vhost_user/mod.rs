//! The vhost-user side: a display for each guest, through QEMU's `vhost-user-gpu-pci` (a
//! virtio-gpu whose device model lives here), built on `vhost-user-backend`.
//!
//! - [`gpu`]: the virtio-gpu 2D device model (commands, resources in the guest's VRAM slice).
//! - [`chain`]: a descriptor chain's request bytes in, response bytes out.
//! - [`device`]: [`VhostGpuDevice`], the `VhostUserBackend` of one QEMU connection: features,
//!   config space, the control and cursor queues.
//! - [`guest_memory`]: whether the guest memory QEMU hands over is safe to touch (sealed
//!   against shrinking, backed by its file).
//! - [`channel`]: the display channel to QEMU (SCANOUT, UPDATE, cursor, display info, EDID).
//! - [`pixels`]: format conversion to the bytes QEMU shows.
//! - [`server`]: [`DisplayServer`], one guest's display socket, connection after connection.
//! - `test_frontend` (feature `test-utils`, for tests and benches; not in a shipped build): a
//!   vhost-user frontend that plays QEMU against a display socket.

pub mod chain;
pub mod channel;
pub mod device;
pub mod gpu;
pub mod guest_memory;
pub mod pixels;
pub mod server;
#[cfg(feature = "test-utils")]
pub mod test_frontend;

pub use device::{DisplayStats, GpuModel, VhostGpuDevice};
pub use server::{DisplayError, DisplayServer};
