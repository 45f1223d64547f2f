//! gpu-emulation
