//! The virtio-gpu 2D wire format, per the virtio 1.2 spec, section 5.7.6 "Device Operation"
//! (5.7.6.7 "Device Operation: Request header" and 5.7.6.8 "Device Operation: controlq").
//!
//! Every structure is little-endian and packed as the spec lays it out. Decoding never trusts
//! the guest: a request that is short, longer than its command, or of an unknown type gives a
//! [`WireError`], which maps to the error response the spec asks for
//! ([`WireError::response`]).

use thiserror::Error;

/// `VIRTIO_GPU_FLAG_FENCE`: the driver wants the response to carry its fence back.
pub const FLAG_FENCE: u32 = 1 << 0;
/// `VIRTIO_GPU_FLAG_INFO_RING_IDX`: `ring_idx` is meaningful (echoed with the fence).
pub const FLAG_INFO_RING_IDX: u32 = 1 << 1;
/// Size of `struct virtio_gpu_ctrl_hdr`.
pub const HDR_SIZE: usize = 24;
/// `VIRTIO_GPU_MAX_SCANOUTS`.
pub const MAX_SCANOUTS: usize = 16;
/// Size of the EDID blob in `struct virtio_gpu_resp_edid`.
pub const EDID_SIZE: usize = 1024;
/// Most `virtio_gpu_mem_entry`s one RESOURCE_ATTACH_BACKING may carry (a 128 MiB resource
/// in 4 KiB pages). Not a spec limit: a cap so a request cannot make the device allocate
/// without bound.
pub const MAX_BACKING_ENTRIES: u32 = 32 * 1024;
/// Size of `struct virtio_gpu_mem_entry`.
pub const MEM_ENTRY_SIZE: usize = 16;

/// Request types of the 2D command set (`enum virtio_gpu_ctrl_type`).
pub mod ctrl {
    /// `VIRTIO_GPU_CMD_GET_DISPLAY_INFO`.
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    /// `VIRTIO_GPU_CMD_RESOURCE_CREATE_2D`.
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    /// `VIRTIO_GPU_CMD_RESOURCE_UNREF`.
    pub const RESOURCE_UNREF: u32 = 0x0102;
    /// `VIRTIO_GPU_CMD_SET_SCANOUT`.
    pub const SET_SCANOUT: u32 = 0x0103;
    /// `VIRTIO_GPU_CMD_RESOURCE_FLUSH`.
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    /// `VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D`.
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    /// `VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING`.
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    /// `VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING`.
    pub const RESOURCE_DETACH_BACKING: u32 = 0x0107;
    /// `VIRTIO_GPU_CMD_GET_EDID`.
    pub const GET_EDID: u32 = 0x010a;
    /// `VIRTIO_GPU_CMD_UPDATE_CURSOR` (cursor queue).
    pub const UPDATE_CURSOR: u32 = 0x0300;
    /// `VIRTIO_GPU_CMD_MOVE_CURSOR` (cursor queue).
    pub const MOVE_CURSOR: u32 = 0x0301;
}

/// Response types (`enum virtio_gpu_ctrl_type`, 0x1100 and 0x1200 ranges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RespType {
    /// `VIRTIO_GPU_RESP_OK_NODATA`.
    OkNoData = 0x1100,
    /// `VIRTIO_GPU_RESP_OK_DISPLAY_INFO`.
    OkDisplayInfo = 0x1101,
    /// `VIRTIO_GPU_RESP_OK_EDID`.
    OkEdid = 0x1104,
    /// `VIRTIO_GPU_RESP_ERR_UNSPEC`.
    ErrUnspec = 0x1200,
    /// `VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY`.
    ErrOutOfMemory = 0x1201,
    /// `VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID`.
    ErrInvalidScanoutId = 0x1202,
    /// `VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID`.
    ErrInvalidResourceId = 0x1203,
    /// `VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID`.
    ErrInvalidContextId = 0x1204,
    /// `VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER`.
    ErrInvalidParameter = 0x1205,
}

/// A resource id chosen by the driver; 0 means "no resource" where the spec allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId(pub u32);

impl ResourceId {
    /// Whether this is the null id 0.
    pub fn is_null(self) -> bool {
        self.0 == 0
    }
}

/// A scanout (display output) index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScanoutId(pub u32);

/// `struct virtio_gpu_rect`: a rectangle in pixels. Edges are computed with checked
/// arithmetic; a rectangle whose right or bottom edge overflows `u32` lies nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rect {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Rect {
    /// A rectangle.
    pub fn new(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    /// Right edge (exclusive), if it does not overflow.
    pub fn right(&self) -> Option<u32> {
        self.x.checked_add(self.width)
    }

    /// Bottom edge (exclusive), if it does not overflow.
    pub fn bottom(&self) -> Option<u32> {
        self.y.checked_add(self.height)
    }

    /// Whether the rectangle has no pixels.
    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// Whether the rectangle lies inside a `width` x `height` surface.
    pub fn fits_in(&self, width: u32, height: u32) -> bool {
        matches!((self.right(), self.bottom()), (Some(r), Some(b)) if r <= width && b <= height)
    }

    /// The overlap of two rectangles, `None` if they do not overlap or an edge overflows.
    pub fn intersect(&self, other: &Rect) -> Option<Rect> {
        let x = self.x.max(other.x);
        let y = self.y.max(other.y);
        let right = self.right()?.min(other.right()?);
        let bottom = self.bottom()?.min(other.bottom()?);
        (right > x && bottom > y).then(|| Rect::new(x, y, right - x, bottom - y))
    }
}

/// `struct virtio_gpu_ctrl_hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtrlHdr {
    /// Request or response type.
    pub ctrl_type: u32,
    /// `FLAG_FENCE`, `FLAG_INFO_RING_IDX`.
    pub flags: u32,
    /// Fence id, echoed when `FLAG_FENCE` is set.
    pub fence_id: u64,
    /// 3D context id (unused in 2D; echoed).
    pub ctx_id: u32,
    /// Context ring index, meaningful with `FLAG_INFO_RING_IDX`.
    pub ring_idx: u8,
}

impl CtrlHdr {
    /// Decodes the header at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<CtrlHdr, WireError> {
        let r = Reader::new(bytes, HDR_SIZE)?;
        Ok(CtrlHdr {
            ctrl_type: r.u32(0),
            flags: r.u32(4),
            fence_id: r.u64(8),
            ctx_id: r.u32(16),
            ring_idx: r.bytes[20],
        })
    }

    /// The header of the response to this request: the response type, and per 5.7.6.7 the
    /// fence (with `ring_idx` when `FLAG_INFO_RING_IDX` is set) copied when `FLAG_FENCE` is set.
    pub fn response(&self, resp: RespType) -> CtrlHdr {
        let fenced = self.flags & FLAG_FENCE != 0;
        let flags = if fenced {
            self.flags & (FLAG_FENCE | FLAG_INFO_RING_IDX)
        } else {
            0
        };
        CtrlHdr {
            ctrl_type: resp as u32,
            flags,
            fence_id: if fenced { self.fence_id } else { 0 },
            ctx_id: self.ctx_id,
            ring_idx: if flags & FLAG_INFO_RING_IDX != 0 {
                self.ring_idx
            } else {
                0
            },
        }
    }

    /// Appends the 24 header bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ctrl_type.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.fence_id.to_le_bytes());
        out.extend_from_slice(&self.ctx_id.to_le_bytes());
        out.extend_from_slice(&[self.ring_idx, 0, 0, 0]);
    }
}

/// `struct virtio_gpu_mem_entry`: one guest-physical range of a resource's backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemEntry {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub length: u32,
}

/// `struct virtio_gpu_cursor_pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorPos {
    /// Scanout the cursor is on.
    pub scanout: ScanoutId,
    /// Position in pixels.
    pub x: u32,
    /// Position in pixels.
    pub y: u32,
}

/// `struct virtio_gpu_update_cursor` (both UPDATE_CURSOR and MOVE_CURSOR use it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorCmd {
    /// Where the cursor is.
    pub pos: CursorPos,
    /// Cursor image resource (0 hides the cursor); ignored by MOVE_CURSOR.
    pub resource: ResourceId,
    /// Hot spot.
    pub hot_x: u32,
    /// Hot spot.
    pub hot_y: u32,
}

/// A decoded request (header fields other than the type are kept in [`Request::hdr`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// GET_DISPLAY_INFO.
    GetDisplayInfo,
    /// GET_EDID (`struct virtio_gpu_cmd_get_edid`).
    GetEdid {
        /// Scanout asked about.
        scanout: ScanoutId,
    },
    /// RESOURCE_CREATE_2D (`struct virtio_gpu_resource_create_2d`).
    ResourceCreate2d {
        /// New id.
        resource: ResourceId,
        /// `enum virtio_gpu_formats` value, validated by the resource table.
        format: u32,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// RESOURCE_UNREF (`struct virtio_gpu_resource_unref`).
    ResourceUnref {
        /// Resource to destroy.
        resource: ResourceId,
    },
    /// SET_SCANOUT (`struct virtio_gpu_set_scanout`).
    SetScanout {
        /// Part of the resource shown.
        rect: Rect,
        /// Output.
        scanout: ScanoutId,
        /// Resource shown; 0 disables the scanout.
        resource: ResourceId,
    },
    /// RESOURCE_FLUSH (`struct virtio_gpu_resource_flush`).
    ResourceFlush {
        /// Damaged area of the resource.
        rect: Rect,
        /// Resource flushed.
        resource: ResourceId,
    },
    /// TRANSFER_TO_HOST_2D (`struct virtio_gpu_transfer_to_host_2d`).
    TransferToHost2d {
        /// Area of the resource written.
        rect: Rect,
        /// Byte offset of the rectangle's first pixel in the backing.
        offset: u64,
        /// Destination resource.
        resource: ResourceId,
    },
    /// RESOURCE_ATTACH_BACKING (`struct virtio_gpu_resource_attach_backing` + entries).
    AttachBacking {
        /// Resource.
        resource: ResourceId,
        /// Guest-physical ranges, in order.
        entries: Vec<MemEntry>,
    },
    /// RESOURCE_DETACH_BACKING (`struct virtio_gpu_resource_detach_backing`).
    DetachBacking {
        /// Resource.
        resource: ResourceId,
    },
    /// UPDATE_CURSOR (cursor queue).
    UpdateCursor(CursorCmd),
    /// MOVE_CURSOR (cursor queue).
    MoveCursor(CursorCmd),
}

/// A decoded request: its header and command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request header.
    pub hdr: CtrlHdr,
    /// The command.
    pub cmd: Command,
}

/// Why a request could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// Fewer bytes than the command's structure.
    #[error("request of {got} bytes is shorter than its {need}-byte structure")]
    Short {
        /// Bytes the structure needs.
        need: usize,
        /// Bytes received.
        got: usize,
    },
    /// More bytes than the command's structure (and entries).
    #[error("request of {got} bytes is longer than its {expected}-byte structure")]
    Oversized {
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// A request type this device does not know or does not implement (3D, blob, capsets).
    #[error("unsupported request type {0:#x}")]
    Unsupported(u32),
    /// RESOURCE_ATTACH_BACKING with more entries than [`MAX_BACKING_ENTRIES`].
    #[error("{0} backing entries exceed the cap of {MAX_BACKING_ENTRIES}")]
    TooManyEntries(u32),
}

impl WireError {
    /// The response type the spec asks for: unknown commands get `ERR_UNSPEC`, malformed
    /// ones `ERR_INVALID_PARAMETER`.
    pub fn response(&self) -> RespType {
        match self {
            WireError::Unsupported(_) => RespType::ErrUnspec,
            WireError::Short { .. }
            | WireError::Oversized { .. }
            | WireError::TooManyEntries(_) => RespType::ErrInvalidParameter,
        }
    }
}

/// Little-endian field reads from a buffer whose length was checked once up front.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `bytes`, which must hold at least `need` bytes.
    fn new(bytes: &'a [u8], need: usize) -> Result<Reader<'a>, WireError> {
        if bytes.len() < need {
            return Err(WireError::Short {
                need,
                got: bytes.len(),
            });
        }
        Ok(Reader {
            bytes: &bytes[..need],
        })
    }

    fn array<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut a = [0u8; N];
        // `new` checked the length and every caller reads inside its structure; a short
        // slice here would be a bug, answered with zeros rather than a panic.
        if let Some(src) = self.bytes.get(at..at + N) {
            a.copy_from_slice(src);
        }
        a
    }

    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.array(at))
    }

    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.array(at))
    }

    fn rect(&self, at: usize) -> Rect {
        Rect::new(
            self.u32(at),
            self.u32(at + 4),
            self.u32(at + 8),
            self.u32(at + 12),
        )
    }

    fn cursor(&self) -> CursorCmd {
        CursorCmd {
            pos: CursorPos {
                scanout: ScanoutId(self.u32(HDR_SIZE)),
                x: self.u32(HDR_SIZE + 4),
                y: self.u32(HDR_SIZE + 8),
            },
            resource: ResourceId(self.u32(HDR_SIZE + 16)),
            hot_x: self.u32(HDR_SIZE + 20),
            hot_y: self.u32(HDR_SIZE + 24),
        }
    }
}

/// Size of the fixed structure of each request type, `None` for types not implemented.
fn fixed_size(ctrl_type: u32) -> Option<usize> {
    Some(match ctrl_type {
        ctrl::GET_DISPLAY_INFO => HDR_SIZE,
        ctrl::GET_EDID => HDR_SIZE + 8,
        ctrl::RESOURCE_CREATE_2D => HDR_SIZE + 16,
        ctrl::RESOURCE_UNREF | ctrl::RESOURCE_DETACH_BACKING => HDR_SIZE + 8,
        ctrl::SET_SCANOUT | ctrl::RESOURCE_FLUSH => HDR_SIZE + 24,
        ctrl::TRANSFER_TO_HOST_2D => HDR_SIZE + 32,
        ctrl::RESOURCE_ATTACH_BACKING => HDR_SIZE + 8,
        ctrl::UPDATE_CURSOR | ctrl::MOVE_CURSOR => HDR_SIZE + 32,
        _ => return None,
    })
}

/// Decodes one request: the bytes the driver placed in the device-readable descriptors of a
/// chain, concatenated. The header must decode for anything else to; the error of a request
/// whose header decoded still carries that header through [`decode`]'s caller.
pub fn decode(bytes: &[u8]) -> Result<Request, (Option<CtrlHdr>, WireError)> {
    let hdr = CtrlHdr::decode(bytes).map_err(|e| (None, e))?;
    decode_body(&hdr, bytes)
        .map(|cmd| Request { hdr, cmd })
        .map_err(|e| (Some(hdr), e))
}

fn decode_body(hdr: &CtrlHdr, bytes: &[u8]) -> Result<Command, WireError> {
    let size = fixed_size(hdr.ctrl_type).ok_or(WireError::Unsupported(hdr.ctrl_type))?;
    let r = Reader::new(bytes, size)?;
    let mut expected = size;
    let cmd = match hdr.ctrl_type {
        ctrl::GET_DISPLAY_INFO => Command::GetDisplayInfo,
        ctrl::GET_EDID => Command::GetEdid {
            scanout: ScanoutId(r.u32(HDR_SIZE)),
        },
        ctrl::RESOURCE_CREATE_2D => Command::ResourceCreate2d {
            resource: ResourceId(r.u32(HDR_SIZE)),
            format: r.u32(HDR_SIZE + 4),
            width: r.u32(HDR_SIZE + 8),
            height: r.u32(HDR_SIZE + 12),
        },
        ctrl::RESOURCE_UNREF => Command::ResourceUnref {
            resource: ResourceId(r.u32(HDR_SIZE)),
        },
        ctrl::RESOURCE_DETACH_BACKING => Command::DetachBacking {
            resource: ResourceId(r.u32(HDR_SIZE)),
        },
        ctrl::SET_SCANOUT => Command::SetScanout {
            rect: r.rect(HDR_SIZE),
            scanout: ScanoutId(r.u32(HDR_SIZE + 16)),
            resource: ResourceId(r.u32(HDR_SIZE + 20)),
        },
        ctrl::RESOURCE_FLUSH => Command::ResourceFlush {
            rect: r.rect(HDR_SIZE),
            resource: ResourceId(r.u32(HDR_SIZE + 16)),
        },
        ctrl::TRANSFER_TO_HOST_2D => Command::TransferToHost2d {
            rect: r.rect(HDR_SIZE),
            offset: r.u64(HDR_SIZE + 16),
            resource: ResourceId(r.u32(HDR_SIZE + 24)),
        },
        ctrl::RESOURCE_ATTACH_BACKING => {
            let nr = r.u32(HDR_SIZE + 4);
            if nr > MAX_BACKING_ENTRIES {
                return Err(WireError::TooManyEntries(nr));
            }
            // nr <= MAX_BACKING_ENTRIES keeps this far from overflow.
            expected = size + nr as usize * MEM_ENTRY_SIZE;
            let all = Reader::new(bytes, expected)?;
            let entries = (0..nr as usize)
                .map(|i| {
                    let at = size + i * MEM_ENTRY_SIZE;
                    MemEntry {
                        addr: all.u64(at),
                        length: all.u32(at + 8),
                    }
                })
                .collect();
            Command::AttachBacking {
                resource: ResourceId(r.u32(HDR_SIZE)),
                entries,
            }
        }
        ctrl::UPDATE_CURSOR => Command::UpdateCursor(r.cursor()),
        ctrl::MOVE_CURSOR => Command::MoveCursor(r.cursor()),
        other => return Err(WireError::Unsupported(other)),
    };
    if bytes.len() > expected {
        return Err(WireError::Oversized {
            expected,
            got: bytes.len(),
        });
    }
    Ok(cmd)
}

/// One output of `struct virtio_gpu_resp_display_info` (`struct virtio_gpu_display_one`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DisplayOne {
    /// Preferred position and size.
    pub rect: Rect,
    /// Whether the output is connected.
    pub enabled: bool,
    /// Flags (none defined).
    pub flags: u32,
}

/// A response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `OK_NODATA`.
    NoData,
    /// `OK_DISPLAY_INFO` with up to [`MAX_SCANOUTS`] outputs (the rest reported disabled).
    DisplayInfo(Vec<DisplayOne>),
    /// `OK_EDID` with a blob of at most [`EDID_SIZE`] bytes (longer ones are truncated).
    Edid(Vec<u8>),
    /// An error response (`ERR_*`), header only.
    Err(RespType),
}

impl Response {
    /// The response type carried in the header.
    pub fn resp_type(&self) -> RespType {
        match self {
            Response::NoData => RespType::OkNoData,
            Response::DisplayInfo(_) => RespType::OkDisplayInfo,
            Response::Edid(_) => RespType::OkEdid,
            Response::Err(t) => *t,
        }
    }
}

/// Encodes the response to a request with header `req` (`None` when even the header could
/// not be decoded: then nothing is echoed).
pub fn encode_response(req: Option<&CtrlHdr>, resp: &Response) -> Vec<u8> {
    let hdr = req.copied().unwrap_or_default().response(resp.resp_type());
    let mut out = Vec::with_capacity(HDR_SIZE);
    hdr.encode(&mut out);
    match resp {
        Response::NoData | Response::Err(_) => {}
        Response::DisplayInfo(outputs) => {
            for i in 0..MAX_SCANOUTS {
                let one = outputs.get(i).copied().unwrap_or_default();
                for v in [one.rect.x, one.rect.y, one.rect.width, one.rect.height] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&u32::from(one.enabled).to_le_bytes());
                out.extend_from_slice(&one.flags.to_le_bytes());
            }
        }
        Response::Edid(blob) => {
            let len = blob.len().min(EDID_SIZE);
            out.extend_from_slice(&(len as u32).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&blob[..len]);
            out.resize(HDR_SIZE + 8 + EDID_SIZE, 0);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod test_encode {
    //! Request encoders for tests (the driver's side of the wire).
    use super::*;

    /// A header of type `t` with a fence.
    pub fn hdr(t: u32, fence: u64) -> Vec<u8> {
        let mut v = Vec::new();
        CtrlHdr {
            ctrl_type: t,
            flags: FLAG_FENCE,
            fence_id: fence,
            ctx_id: 0,
            ring_idx: 0,
        }
        .encode(&mut v);
        v
    }

    /// A request of type `t` with the given little-endian u32 fields after the header.
    pub fn req(t: u32, fields: &[u32]) -> Vec<u8> {
        let mut v = hdr(t, 7);
        for f in fields {
            v.extend_from_slice(&f.to_le_bytes());
        }
        v
    }

    /// TRANSFER_TO_HOST_2D.
    pub fn transfer(rect: Rect, offset: u64, res: u32) -> Vec<u8> {
        let mut v = req(
            ctrl::TRANSFER_TO_HOST_2D,
            &[rect.x, rect.y, rect.width, rect.height],
        );
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&res.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v
    }

    /// RESOURCE_ATTACH_BACKING with entries.
    pub fn attach(res: u32, entries: &[(u64, u32)]) -> Vec<u8> {
        let mut v = req(ctrl::RESOURCE_ATTACH_BACKING, &[res, entries.len() as u32]);
        for (a, l) in entries {
            v.extend_from_slice(&a.to_le_bytes());
            v.extend_from_slice(&l.to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::test_encode::*;
    use super::*;

    #[test]
    fn header_layout_and_fence_echo() {
        let mut bytes = hdr(ctrl::GET_DISPLAY_INFO, 0x1122_3344_5566_7788);
        bytes[16..20].copy_from_slice(&9u32.to_le_bytes());
        bytes[20] = 3;
        bytes[4] |= FLAG_INFO_RING_IDX as u8;
        let h = CtrlHdr::decode(&bytes).unwrap();
        assert_eq!(h.ctrl_type, 0x0100);
        assert_eq!(h.fence_id, 0x1122_3344_5566_7788);
        assert_eq!((h.ctx_id, h.ring_idx), (9, 3));
        let out = encode_response(Some(&h), &Response::NoData);
        assert_eq!(out.len(), HDR_SIZE);
        assert_eq!(&out[0..4], &0x1100u32.to_le_bytes());
        assert_eq!(&out[4..8], &(FLAG_FENCE | FLAG_INFO_RING_IDX).to_le_bytes());
        assert_eq!(&out[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(out[20], 3);
        // Without FLAG_FENCE nothing is echoed.
        let plain = CtrlHdr { flags: 0, ..h };
        let out = encode_response(Some(&plain), &Response::Err(RespType::ErrUnspec));
        assert_eq!(&out[0..4], &0x1200u32.to_le_bytes());
        assert_eq!(&out[4..16], &[0u8; 12]);
    }

    #[test]
    fn decodes_every_command() {
        let d = |b: Vec<u8>| decode(&b).unwrap().cmd;
        assert_eq!(d(req(ctrl::GET_DISPLAY_INFO, &[])), Command::GetDisplayInfo);
        assert_eq!(
            d(req(ctrl::GET_EDID, &[2, 0])),
            Command::GetEdid {
                scanout: ScanoutId(2)
            }
        );
        assert_eq!(
            d(req(ctrl::RESOURCE_CREATE_2D, &[5, 1, 640, 480])),
            Command::ResourceCreate2d {
                resource: ResourceId(5),
                format: 1,
                width: 640,
                height: 480
            }
        );
        assert_eq!(
            d(req(ctrl::SET_SCANOUT, &[1, 2, 3, 4, 0, 5])),
            Command::SetScanout {
                rect: Rect::new(1, 2, 3, 4),
                scanout: ScanoutId(0),
                resource: ResourceId(5)
            }
        );
        assert_eq!(
            d(transfer(Rect::new(1, 2, 3, 4), 1 << 40, 6)),
            Command::TransferToHost2d {
                rect: Rect::new(1, 2, 3, 4),
                offset: 1 << 40,
                resource: ResourceId(6)
            }
        );
        assert_eq!(
            d(attach(3, &[(0x1000, 4096), (0x3000, 8)])),
            Command::AttachBacking {
                resource: ResourceId(3),
                entries: vec![
                    MemEntry {
                        addr: 0x1000,
                        length: 4096
                    },
                    MemEntry {
                        addr: 0x3000,
                        length: 8
                    }
                ]
            }
        );
        let c = d(req(ctrl::MOVE_CURSOR, &[1, 10, 20, 0, 4, 2, 3, 0]));
        assert_eq!(
            c,
            Command::MoveCursor(CursorCmd {
                pos: CursorPos {
                    scanout: ScanoutId(1),
                    x: 10,
                    y: 20
                },
                resource: ResourceId(4),
                hot_x: 2,
                hot_y: 3
            })
        );
    }

    #[test]
    fn malformed_requests_map_to_error_types() {
        let e = |b: &[u8]| decode(b).unwrap_err();
        assert_eq!(e(&[0u8; 10]).0, None);
        assert_eq!(e(&[0u8; 10]).1.response(), RespType::ErrInvalidParameter);
        let unknown = e(&req(0x0200, &[]));
        assert_eq!(unknown.1, WireError::Unsupported(0x0200));
        assert_eq!(unknown.1.response(), RespType::ErrUnspec);
        assert_eq!(unknown.0.unwrap().fence_id, 7);
        let short = req(ctrl::RESOURCE_CREATE_2D, &[5, 1, 640]);
        assert!(matches!(
            e(&short).1,
            WireError::Short { need: 40, got: 36 }
        ));
        let long = req(ctrl::RESOURCE_UNREF, &[5, 0, 0]);
        assert!(matches!(e(&long).1, WireError::Oversized { .. }));
        let many = req(ctrl::RESOURCE_ATTACH_BACKING, &[1, u32::MAX]);
        assert_eq!(e(&many).1, WireError::TooManyEntries(u32::MAX));
        let missing = req(ctrl::RESOURCE_ATTACH_BACKING, &[1, 2]);
        assert!(matches!(e(&missing).1, WireError::Short { need: 64, .. }));
    }

    #[test]
    fn rect_arithmetic_is_checked() {
        assert!(Rect::new(0, 0, 10, 10).fits_in(10, 10));
        assert!(!Rect::new(1, 0, 10, 10).fits_in(10, 10));
        assert!(!Rect::new(u32::MAX, 0, 2, 1).fits_in(u32::MAX, 1));
        assert_eq!(Rect::new(u32::MAX, 0, 2, 1).right(), None);
        assert_eq!(
            Rect::new(0, 0, 10, 10).intersect(&Rect::new(5, 5, 10, 10)),
            Some(Rect::new(5, 5, 5, 5))
        );
        assert_eq!(
            Rect::new(0, 0, 5, 5).intersect(&Rect::new(5, 0, 1, 1)),
            None
        );
    }

    #[test]
    fn display_info_and_edid_sizes() {
        let h = CtrlHdr::decode(&hdr(ctrl::GET_DISPLAY_INFO, 1)).unwrap();
        let one = DisplayOne {
            rect: Rect::new(0, 0, 1280, 800),
            enabled: true,
            flags: 0,
        };
        let out = encode_response(Some(&h), &Response::DisplayInfo(vec![one]));
        assert_eq!(out.len(), HDR_SIZE + 16 * 24);
        assert_eq!(&out[32..36], &1280u32.to_le_bytes());
        assert_eq!(&out[40..44], &1u32.to_le_bytes());
        assert_eq!(&out[64..68], &0u32.to_le_bytes());
        let out = encode_response(Some(&h), &Response::Edid(vec![0xab; 128]));
        assert_eq!(out.len(), HDR_SIZE + 8 + EDID_SIZE);
        assert_eq!(&out[24..28], &128u32.to_le_bytes());
        assert_eq!(out[32 + 127], 0xab);
        assert_eq!(out[32 + 128], 0);
    }
}
