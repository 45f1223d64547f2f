//! The display side channel to QEMU (`VHOST_USER_GPU_SET_SOCKET`, spoken with
//! [`vhost::vhost_user::GpuBackend`]): what a guest's virtio-gpu shows goes to QEMU as
//! SCANOUT and UPDATE messages (pixels inside the message), cursor messages, and QEMU is
//! asked for its outputs (GET_DISPLAY_INFO) and their EDIDs.
//!
//! QEMU owns the display state: a resize on its side sets the config-change event itself
//! (`events_read` of the virtio-gpu config space is managed by QEMU for vhost-user-gpu), and
//! the guest's next GET_DISPLAY_INFO, answered from here, reports the new size.

use std::io;

use thiserror::Error;
use vhost::vhost_user::gpu_message::{
    VhostUserGpuCursorPos, VhostUserGpuCursorUpdate, VhostUserGpuEdidRequest, VhostUserGpuScanout,
    VhostUserGpuUpdate,
};
use vhost::vhost_user::message::VhostUserU64;
use vhost::vhost_user::GpuBackend;

use super::gpu::device::{DisplayEvent, CURSOR_SIZE};
use super::gpu::resources::Format;
use super::gpu::wire::{CursorPos, DisplayOne, Rect, ScanoutId, EDID_SIZE, MAX_SCANOUTS};
use super::pixels;

/// The vhost-user-gpu protocol feature bit of GET_EDID (`VHOST_USER_GPU_PROTOCOL_F_EDID`,
/// a bit number in QEMU's `docs/interop/vhost-user-gpu.rst`).
const PROTOCOL_F_EDID: u64 = 1 << 0;

/// Errors of the display channel.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// A message could not be sent or its reply not received.
    #[error("display channel to QEMU failed: {0}")]
    Io(#[from] io::Error),
    /// An UPDATE whose pixels do not match its rectangle (a model bug, not sent).
    #[error("update of {len} bytes does not cover {rect:?}")]
    BadUpdate {
        /// The rectangle.
        rect: Rect,
        /// Bytes given.
        len: usize,
    },
}

/// One QEMU display connection, as given by `VHOST_USER_GPU_SET_SOCKET`.
pub struct DisplayChannel {
    gpu: GpuBackend,
    /// Protocol features exchanged (done lazily, off QEMU's request thread).
    negotiated: bool,
    /// QEMU answers GET_EDID.
    edid: bool,
    /// The format of what each scanout shows (updates are converted from it).
    formats: [Option<Format>; MAX_SCANOUTS],
}

impl DisplayChannel {
    /// The channel over `gpu`.
    pub fn new(gpu: GpuBackend) -> DisplayChannel {
        DisplayChannel {
            gpu,
            negotiated: false,
            edid: false,
            formats: [None; MAX_SCANOUTS],
        }
    }

    /// Exchanges protocol features once: EDID if QEMU offers it (DMABUF scanouts need a GL
    /// console and are not used).
    fn negotiate(&mut self) -> Result<(), ChannelError> {
        if self.negotiated {
            return Ok(());
        }
        let offered = self.gpu.get_protocol_features()?.value;
        let wanted = offered & PROTOCOL_F_EDID;
        self.gpu.set_protocol_features(&VhostUserU64::new(wanted))?;
        self.edid = wanted & PROTOCOL_F_EDID != 0;
        self.negotiated = true;
        log::debug!(
            "display channel: QEMU offers protocol features {offered:#x}, using {wanted:#x}"
        );
        Ok(())
    }

    /// QEMU's outputs now (index = scanout id).
    pub fn display_info(&mut self) -> Result<Vec<DisplayOne>, ChannelError> {
        self.negotiate()?;
        let info = self.gpu.get_display_info()?;
        Ok(info
            .pmodes
            .iter()
            .map(|m| DisplayOne {
                rect: Rect::new(m.r.x, m.r.y, m.r.width, m.r.height),
                enabled: m.enabled != 0,
                flags: m.flags,
            })
            .collect())
    }

    /// QEMU's EDID of `scanout`, `None` when QEMU does not do EDIDs or gave an empty one.
    pub fn edid(&mut self, scanout: ScanoutId) -> Result<Option<Vec<u8>>, ChannelError> {
        self.negotiate()?;
        if !self.edid {
            return Ok(None);
        }
        let resp = self.gpu.get_edid(&VhostUserGpuEdidRequest {
            scanout_id: scanout.0,
        })?;
        let len = (resp.size as usize).min(EDID_SIZE);
        Ok((len > 0).then(|| resp.edid[..len].to_vec()))
    }

    /// Sends what `event` asks the display to do. Update pixels are converted in place to
    /// the B, G, R, X bytes QEMU shows.
    pub fn send(&mut self, event: &mut DisplayEvent) -> Result<(), ChannelError> {
        match event {
            DisplayEvent::Scanout {
                scanout,
                width,
                height,
                format,
            } => {
                if let Some(slot) = self.formats.get_mut(scanout.0 as usize) {
                    *slot = *format;
                }
                self.gpu.set_scanout(&VhostUserGpuScanout {
                    scanout_id: scanout.0,
                    width: *width,
                    height: *height,
                })?;
            }
            DisplayEvent::Update {
                scanout,
                rect,
                pixels,
            } => {
                let want = u64::from(rect.width) * u64::from(rect.height) * 4;
                if want != pixels.len() as u64 {
                    return Err(ChannelError::BadUpdate {
                        rect: *rect,
                        len: pixels.len(),
                    });
                }
                let format = self
                    .formats
                    .get(scanout.0 as usize)
                    .copied()
                    .flatten()
                    .unwrap_or(Format::B8G8R8X8);
                pixels::to_bgra(format, pixels);
                self.gpu.update_scanout(
                    &VhostUserGpuUpdate {
                        scanout_id: scanout.0,
                        x: rect.x,
                        y: rect.y,
                        width: rect.width,
                        height: rect.height,
                    },
                    pixels,
                )?;
            }
            DisplayEvent::CursorUpdate {
                pos,
                hot_x,
                hot_y,
                format,
                pixels,
            } => {
                let mut image = [0u8; 4 * (CURSOR_SIZE * CURSOR_SIZE) as usize];
                let n = image.len().min(pixels.len());
                image[..n].copy_from_slice(&pixels[..n]);
                pixels::to_bgra(*format, &mut image);
                self.gpu.cursor_update(
                    &VhostUserGpuCursorUpdate {
                        pos: cursor_pos(pos),
                        hot_x: *hot_x,
                        hot_y: *hot_y,
                    },
                    &image,
                )?;
            }
            DisplayEvent::CursorMove(pos) => self.gpu.cursor_pos(&cursor_pos(pos))?,
            DisplayEvent::CursorHide(pos) => self.gpu.cursor_pos_hide(&cursor_pos(pos))?,
        }
        Ok(())
    }
}

fn cursor_pos(pos: &CursorPos) -> VhostUserGpuCursorPos {
    VhostUserGpuCursorPos {
        scanout_id: pos.scanout.0,
        x: pos.x,
        y: pos.y,
    }
}
