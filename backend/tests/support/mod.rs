//! Helpers shared by the hostile-client soak (`tests/soak/`) and the figures bench
//! (`benches/hostile_figures.rs`), which include this directory with `#[path]`: a
//! `gpu-backend serve` child process, what `/proc` says about it, the fds a client sends, a
//! shared mapping of a VRAM BAR's memfd, and a seeded random number generator.

pub mod fds;
pub mod mapping;
pub mod proc_stats;
pub mod rng;
pub mod serve_process;
