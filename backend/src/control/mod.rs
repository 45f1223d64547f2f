//! The control socket: add, remove and list guests of a running backend.
//!
//! - [`protocol`]: one JSON object per line, in the spirit of QMP.
//! - [`server`]: [`ControlServer`], the socket `serve --control PATH` opens.
//! - [`client`]: [`ControlClient`], behind `gpu-backend ctl`.

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{ClientError, ControlClient};
pub use server::{ControlError, ControlServer};
