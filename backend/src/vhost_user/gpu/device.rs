//! [`GpuCommandHandler`]: executes the virtio-gpu 2D commands of one guest (per the virtio
//! 1.2 spec, section 5.7.6 "Device Operation") and reports what the display must show.
//!
//! The transport hands it the device-readable bytes of one descriptor chain and writes the
//! returned response bytes into the chain's device-writable part; each [`DisplayEvent`] becomes
//! a vhost-user GPU display message (SCANOUT, UPDATE, cursor messages).

use log::debug;
use vm_memory::GuestMemory;

use super::backing::{Backing, BackingError};
use super::edid;
use super::resources::{Format, ResourceError, ResourceTable};
use super::store::{SliceStore, StoreError};
use super::wire::{
    self, Command, CursorCmd, CursorPos, DisplayOne, Rect, Request, ResourceId, RespType, Response,
    ScanoutId, MAX_SCANOUTS,
};

/// Largest buffer a transfer copies through at once.
const COPY_CHUNK: u64 = 1 << 20;

/// Most pixel bytes one UPDATE carries: a 1280x800 frame (4,096,000 bytes) fits in one; a
/// larger flush is sent in tiles, so a guest cannot make the backend hold more than this for
/// one update whatever size its scanout.
pub const MAX_UPDATE_BYTES: u64 = 4 << 20;

/// Side of the square cursor image the display protocol carries (64x64 pixels).
pub const CURSOR_SIZE: u32 = 64;

/// Configuration of one guest's GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuConfig {
    /// Scanouts offered, 1 to [`MAX_SCANOUTS`] (clamped).
    pub max_scanouts: u32,
    /// Outputs reported by GET_DISPLAY_INFO (index = scanout id).
    pub outputs: Vec<DisplayOne>,
    /// EDID blob of each scanout, if known (index = scanout id); without one, GET_EDID
    /// answers an EDID generated from the output's size ([`edid::generate`]).
    pub edids: Vec<Option<Vec<u8>>>,
    /// Most resources the guest may hold at once.
    pub max_resources: usize,
}

impl Default for GpuConfig {
    /// One enabled 1280x800 output, QEMU's default, and up to 1024 resources.
    fn default() -> GpuConfig {
        GpuConfig {
            max_scanouts: 1,
            outputs: vec![DisplayOne {
                rect: Rect::new(0, 0, 1280, 800),
                enabled: true,
                flags: 0,
            }],
            edids: Vec::new(),
            max_resources: 1024,
        }
    }
}

/// What the display must do after a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisplayEvent {
    /// Show a `width` x `height` scanout (both 0: the scanout is disabled).
    Scanout {
        /// Output.
        scanout: ScanoutId,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// Pixel format of the updates that follow (`None` when disabled).
        format: Option<Format>,
    },
    /// New pixels for `rect` (scanout coordinates), rows of `rect.width * 4` bytes.
    Update {
        /// Output.
        scanout: ScanoutId,
        /// Updated area.
        rect: Rect,
        /// Pixels, row after row.
        pixels: Vec<u8>,
    },
    /// A new cursor image (64x64, 4 bytes per pixel) at a position.
    CursorUpdate {
        /// Position.
        pos: CursorPos,
        /// Hot spot.
        hot_x: u32,
        /// Hot spot.
        hot_y: u32,
        /// The cursor resource's format.
        format: Format,
        /// Pixels.
        pixels: Vec<u8>,
    },
    /// The cursor moved.
    CursorMove(CursorPos),
    /// The cursor is hidden on a scanout.
    CursorHide(CursorPos),
}

/// What a scanout shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ScanoutState {
    resource: ResourceId,
    rect: Rect,
}

/// The device model of one guest's virtio-gpu, over the store of its slice.
pub struct GpuCommandHandler<S: SliceStore> {
    config: GpuConfig,
    table: ResourceTable,
    store: S,
    scanouts: Vec<Option<ScanoutState>>,
}

/// A failed command: the response type it gets.
type CmdResult<T> = Result<T, RespType>;

impl From<ResourceError> for RespType {
    fn from(e: ResourceError) -> RespType {
        e.response()
    }
}

fn store_err(e: StoreError) -> RespType {
    debug!("virtio-gpu store access failed: {e}");
    RespType::ErrUnspec
}

fn backing_err(e: BackingError) -> RespType {
    debug!("virtio-gpu backing refused: {e}");
    match e {
        BackingError::OutOfRange { .. } => RespType::ErrInvalidParameter,
        _ => RespType::ErrUnspec,
    }
}

impl<S: SliceStore> GpuCommandHandler<S> {
    /// A device with no resources, allocating resource bytes from `store`.
    pub fn new(mut config: GpuConfig, store: S) -> GpuCommandHandler<S> {
        config.max_scanouts = config.max_scanouts.clamp(1, MAX_SCANOUTS as u32);
        let table = ResourceTable::new(store.size(), config.max_resources);
        GpuCommandHandler {
            scanouts: vec![None; config.max_scanouts as usize],
            config,
            table,
            store,
        }
    }

    /// The configuration (outputs as last set).
    pub fn config(&self) -> &GpuConfig {
        &self.config
    }

    /// The resource table.
    pub fn resources(&self) -> &ResourceTable {
        &self.table
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Replaces the outputs GET_DISPLAY_INFO reports (a resize from the display side); the
    /// transport then raises the config-change event.
    pub fn set_outputs(&mut self, outputs: Vec<DisplayOne>) {
        self.config.outputs = outputs;
    }

    /// Sets the EDID GET_EDID answers for `scanout` (the display side's own), or forgets it
    /// (`None`: an EDID generated from the output's size is answered). Ignored for scanouts
    /// past the device's.
    pub fn set_edid(&mut self, scanout: ScanoutId, blob: Option<Vec<u8>>) {
        let i = scanout.0 as usize;
        if i >= self.scanouts.len() {
            return;
        }
        if self.config.edids.len() <= i {
            self.config.edids.resize(i + 1, None);
        }
        self.config.edids[i] = blob;
    }

    /// Device reset: every resource destroyed (and scrubbed), every scanout disabled.
    pub fn reset(&mut self) -> Result<(), StoreError> {
        self.scanouts.iter_mut().for_each(|s| *s = None);
        self.table.clear(&mut self.store).map_err(|e| match e {
            ResourceError::Store(s) => s,
            other => StoreError::Backend(other.to_string()),
        })
    }

    /// Executes one control-queue request; returns the response bytes and display events.
    pub fn handle_control<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        bytes: &[u8],
    ) -> (Vec<u8>, Vec<DisplayEvent>) {
        let mut events = Vec::new();
        let response = self.handle_control_with(mem, bytes, &mut |e| events.push(e));
        (response, events)
    }

    /// Executes one control-queue request, handing each display event to `sink` as soon as
    /// it is made (a flush of a large scanout is several [`MAX_UPDATE_BYTES`] updates, and
    /// only one of them is held at a time); returns the response bytes.
    pub fn handle_control_with<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        bytes: &[u8],
        sink: &mut dyn FnMut(DisplayEvent),
    ) -> Vec<u8> {
        let Request { hdr, cmd } = match wire::decode(bytes) {
            Ok(req) => req,
            Err((hdr, e)) => {
                debug!("virtio-gpu: undecodable control request: {e}");
                return wire::encode_response(hdr.as_ref(), &Response::Err(e.response()));
            }
        };
        let resp = self.execute(mem, cmd, sink).unwrap_or_else(Response::Err);
        wire::encode_response(Some(&hdr), &resp)
    }

    /// Executes one cursor-queue request. The cursor queue carries no responses (the driver
    /// posts no writable buffer); undecodable or misplaced requests are dropped.
    pub fn handle_cursor(&mut self, bytes: &[u8]) -> Vec<DisplayEvent> {
        let cmd = match wire::decode(bytes) {
            Ok(req) => req.cmd,
            Err((_, e)) => {
                debug!("virtio-gpu: undecodable cursor request: {e}");
                return Vec::new();
            }
        };
        let result = match cmd {
            Command::UpdateCursor(c) => self.update_cursor(c),
            Command::MoveCursor(c) => self
                .check_scanout(c.pos.scanout)
                .map(|_| c.pos)
                .map(|pos| vec![DisplayEvent::CursorMove(pos)]),
            other => {
                debug!("virtio-gpu: {other:?} on the cursor queue ignored");
                Ok(Vec::new())
            }
        };
        result.unwrap_or_else(|e| {
            debug!("virtio-gpu: cursor request failed: {e:?}");
            Vec::new()
        })
    }

    fn check_scanout(&self, scanout: ScanoutId) -> CmdResult<usize> {
        let i = scanout.0 as usize;
        if i < self.scanouts.len() {
            Ok(i)
        } else {
            Err(RespType::ErrInvalidScanoutId)
        }
    }

    fn execute<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        cmd: Command,
        events: &mut dyn FnMut(DisplayEvent),
    ) -> CmdResult<Response> {
        match cmd {
            Command::GetDisplayInfo => {
                let n = self.scanouts.len();
                Ok(Response::DisplayInfo(
                    self.config.outputs.iter().take(n).copied().collect(),
                ))
            }
            Command::GetEdid { scanout } => {
                let i = self.check_scanout(scanout)?;
                if let Some(Some(blob)) = self.config.edids.get(i) {
                    return Ok(Response::Edid(blob.clone()));
                }
                let out = self.config.outputs.get(i).ok_or(RespType::ErrUnspec)?;
                edid::generate(out.rect.width, out.rect.height)
                    .map(Response::Edid)
                    .ok_or(RespType::ErrUnspec)
            }
            Command::ResourceCreate2d {
                resource,
                format,
                width,
                height,
            } => {
                self.table.create(resource, format, width, height)?;
                Ok(Response::NoData)
            }
            Command::ResourceUnref { resource } => {
                self.table.get(resource)?;
                for (i, s) in self.scanouts.iter_mut().enumerate() {
                    if s.is_some_and(|s| s.resource == resource) {
                        *s = None;
                        events(disabled(i));
                    }
                }
                self.table.unref(resource, &mut self.store)?;
                Ok(Response::NoData)
            }
            Command::SetScanout {
                rect,
                scanout,
                resource,
            } => {
                let i = self.check_scanout(scanout)?;
                if resource.is_null() {
                    self.scanouts[i] = None;
                    events(disabled(i));
                    return Ok(Response::NoData);
                }
                let res = self.table.get(resource)?;
                if rect.is_empty() || !rect.fits_in(res.width, res.height) {
                    return Err(RespType::ErrInvalidParameter);
                }
                self.scanouts[i] = Some(ScanoutState { resource, rect });
                events(DisplayEvent::Scanout {
                    scanout,
                    width: rect.width,
                    height: rect.height,
                    format: Some(res.format),
                });
                Ok(Response::NoData)
            }
            Command::ResourceFlush { rect, resource } => {
                self.flush(rect, resource, events)?;
                Ok(Response::NoData)
            }
            Command::TransferToHost2d {
                rect,
                offset,
                resource,
            } => {
                self.transfer(mem, rect, offset, resource)?;
                Ok(Response::NoData)
            }
            Command::AttachBacking { resource, entries } => {
                let res = self.table.get_mut(resource)?;
                if res.backing.is_some() {
                    return Err(RespType::ErrUnspec);
                }
                res.backing = Some(Backing::new(mem, entries).map_err(backing_err)?);
                Ok(Response::NoData)
            }
            Command::DetachBacking { resource } => {
                let res = self.table.get_mut(resource)?;
                res.backing.take().ok_or(RespType::ErrUnspec)?;
                Ok(Response::NoData)
            }
            Command::UpdateCursor(_) | Command::MoveCursor(_) => Err(RespType::ErrUnspec),
        }
    }

    /// RESOURCE_FLUSH: the flushed area of each scanout showing the resource, as updates of
    /// at most [`MAX_UPDATE_BYTES`] each (tiles of whole rows where a row fits).
    fn flush(
        &self,
        rect: Rect,
        resource: ResourceId,
        events: &mut dyn FnMut(DisplayEvent),
    ) -> CmdResult<()> {
        let res = self.table.get(resource)?;
        if !rect.fits_in(res.width, res.height) {
            return Err(RespType::ErrInvalidParameter);
        }
        let bpp = u64::from(Format::BYTES_PER_PIXEL);
        let max_pixels = (MAX_UPDATE_BYTES / bpp) as u32;
        for (i, s) in self.scanouts.iter().enumerate() {
            let Some(s) = s.filter(|s| s.resource == resource) else {
                continue;
            };
            let Some(area) = rect.intersect(&s.rect) else {
                continue;
            };
            let tile_w = area.width.min(max_pixels);
            let tile_h = (max_pixels / tile_w).clamp(1, area.height);
            for ty in (0..area.height).step_by(tile_h as usize) {
                for tx in (0..area.width).step_by(tile_w as usize) {
                    // Inside `area`, which lies inside the resource: no overflow.
                    let tile = Rect::new(
                        area.x + tx,
                        area.y + ty,
                        tile_w.min(area.width - tx),
                        tile_h.min(area.height - ty),
                    );
                    let row = u64::from(tile.width) * bpp;
                    let mut pixels = vec![0u8; (row * u64::from(tile.height)) as usize];
                    for (h, chunk) in pixels.chunks_exact_mut(row as usize).enumerate() {
                        let at = res.offset
                            + (u64::from(tile.y) + h as u64) * res.stride()
                            + u64::from(tile.x) * bpp;
                        self.store.read(at, chunk).map_err(store_err)?;
                    }
                    events(DisplayEvent::Update {
                        scanout: ScanoutId(i as u32),
                        rect: Rect::new(
                            tile.x - s.rect.x,
                            tile.y - s.rect.y,
                            tile.width,
                            tile.height,
                        ),
                        pixels,
                    });
                }
            }
        }
        Ok(())
    }

    /// TRANSFER_TO_HOST_2D: row `h` of `rect` comes from backing offset `offset + h * stride`
    /// (stride = the resource's row pitch), as QEMU and the Linux driver lay it out. The last
    /// byte read, `offset + (height - 1) * stride + width * 4`, must lie inside the backing.
    fn transfer<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        rect: Rect,
        offset: u64,
        resource: ResourceId,
    ) -> CmdResult<()> {
        let res = self.table.get(resource)?;
        if !rect.fits_in(res.width, res.height) {
            return Err(RespType::ErrInvalidParameter);
        }
        let backing = res.backing.as_ref().ok_or(RespType::ErrUnspec)?;
        if rect.is_empty() {
            return Ok(());
        }
        let bpp = u64::from(Format::BYTES_PER_PIXEL);
        let stride = res.stride();
        let row = u64::from(rect.width) * bpp;
        let end = stride
            .checked_mul(u64::from(rect.height - 1))
            .and_then(|v| v.checked_add(row))
            .and_then(|v| v.checked_add(offset))
            .ok_or(RespType::ErrInvalidParameter)?;
        if end > backing.len() {
            return Err(RespType::ErrInvalidParameter);
        }
        // Rows inside the resource: (y + h) * stride + x * 4 + row <= len, as rect fits.
        // Full-width rows are contiguous on both sides: one span. Spans are copied through a
        // buffer of at most COPY_CHUNK bytes, whatever size the guest made the resource.
        let full_rows = rect.x == 0 && rect.width == res.width;
        let (rows, span) = if full_rows {
            (1, row * u64::from(rect.height))
        } else {
            (rect.height, row)
        };
        let mut buf = vec![0u8; span.min(COPY_CHUNK) as usize];
        for h in 0..u64::from(rows) {
            let src = offset + h * stride;
            let dst = res.offset + (u64::from(rect.y) + h) * stride + u64::from(rect.x) * bpp;
            let mut done = 0;
            while done < span {
                let n = (span - done).min(COPY_CHUNK) as usize;
                backing
                    .read(mem, src + done, &mut buf[..n])
                    .map_err(backing_err)?;
                self.store.write(dst + done, &buf[..n]).map_err(store_err)?;
                done += n as u64;
            }
        }
        Ok(())
    }

    fn update_cursor(&self, c: CursorCmd) -> CmdResult<Vec<DisplayEvent>> {
        self.check_scanout(c.pos.scanout)?;
        if c.resource.is_null() {
            return Ok(vec![DisplayEvent::CursorHide(c.pos)]);
        }
        let res = self.table.get(c.resource)?;
        if res.width != CURSOR_SIZE || res.height != CURSOR_SIZE {
            return Err(RespType::ErrInvalidParameter);
        }
        let mut pixels = vec![0u8; res.len as usize];
        self.store
            .read(res.offset, &mut pixels)
            .map_err(store_err)?;
        Ok(vec![DisplayEvent::CursorUpdate {
            pos: c.pos,
            hot_x: c.hot_x,
            hot_y: c.hot_y,
            format: res.format,
            pixels,
        }])
    }
}

fn disabled(i: usize) -> DisplayEvent {
    DisplayEvent::Scanout {
        scanout: ScanoutId(i as u32),
        width: 0,
        height: 0,
        format: None,
    }
}
