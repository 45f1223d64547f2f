//! vhost-user devices the backend will offer QEMU beside its vfio-user GPU.
//!
//! So far only the device model of a 2D virtio-gpu ([`gpu`]), with no transport: the
//! vhost-user daemon that drives it from QEMU's `vhost-user-gpu-pci` (virtqueues, the
//! `GpuBackend` display channel, the command line) is not written yet.

pub mod gpu;
