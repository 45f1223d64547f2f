//! `gpu-backend`: a VMM-side device backend that presents a GPU to a QEMU guest over vfio-user.
//!
//! Layers, bottom up (see `docs/architecture.md`):
//! - [`host_gpu`]: the one boundary to the GPU being driven (the emulated GPU by default).
//! - [`gsp`]: the GSP's command/message queues, RPCs, boot handshake and object requests.
//! - [`slice`](mod@slice): guests' ranges of host VRAM, the shared host PRAMIN window, BAR1 windows.
//! - [`presentation`]: what a guest sees: power-of-two BARs, the trapped BAR0, PCI config
//!   space.
//! - [`vfio_user`]: the vfio-user server QEMU's `vfio-user-pci` connects to.
//! - [`vhost_user`]: a display per guest: a virtio-gpu 2D device served to QEMU's
//!   `vhost-user-gpu-pci` over vhost-user, its resources in the guest's VRAM slice.
//! - [`unix_socket`]: binding the transports' listening sockets; [`shared_memory`]: when a
//!   peer's memory may be mapped.
//! - [`cli`]: the command line behind the `gpu-backend` binary ([`inspect`], [`measure`]);
//!   [`limits`] raises the fd limit before serving.

pub mod cli;
pub mod control;
pub mod ctl;
pub mod gpu_device;
pub mod gsp;
pub mod guests;
pub mod host_driver;
pub mod host_gpu;
pub mod inspect;
pub mod limits;
pub mod measure;
pub mod presentation;
pub mod serve;
pub mod shared_memory;
pub mod slice;
pub mod state;
pub mod supervisor;
pub mod units;
pub mod unix_socket;
pub mod vfio_user;
pub mod vhost_user;
