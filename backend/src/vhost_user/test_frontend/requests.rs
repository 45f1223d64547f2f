//! The guest driver's virtio-gpu requests and responses as bytes (virtio 1.2, section
//! 5.7.6), written here from the spec rather than with the device's own encoder, so a test
//! checks the device against the spec's layout.

/// Control-queue and cursor-queue request types.
pub mod cmd {
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
    /// `VIRTIO_GPU_CMD_UPDATE_CURSOR`.
    pub const UPDATE_CURSOR: u32 = 0x0300;
    /// `VIRTIO_GPU_CMD_MOVE_CURSOR`.
    pub const MOVE_CURSOR: u32 = 0x0301;
}

/// Response types.
pub mod resp {
    /// `VIRTIO_GPU_RESP_OK_NODATA`.
    pub const OK_NODATA: u32 = 0x1100;
    /// `VIRTIO_GPU_RESP_OK_DISPLAY_INFO`.
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
    /// `VIRTIO_GPU_RESP_OK_EDID`.
    pub const OK_EDID: u32 = 0x1104;
    /// `VIRTIO_GPU_RESP_ERR_UNSPEC`.
    pub const ERR_UNSPEC: u32 = 0x1200;
    /// `VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY`.
    pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
    /// `VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID`.
    pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
    /// `VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID`.
    pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
    /// `VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER`.
    pub const ERR_INVALID_PARAMETER: u32 = 0x1205;
}

/// `VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM`, what the Linux driver uses.
pub const FORMAT_B8G8R8X8: u32 = 2;
/// `VIRTIO_GPU_FLAG_FENCE`.
pub const FLAG_FENCE: u32 = 1;
/// Size of `struct virtio_gpu_ctrl_hdr`.
pub const HDR: usize = 24;
/// Size of `struct virtio_gpu_resp_display_info`.
pub const DISPLAY_INFO_SIZE: usize = HDR + 16 * 24;
/// Size of `struct virtio_gpu_resp_edid`.
pub const EDID_RESP_SIZE: usize = HDR + 8 + 1024;
/// A writable buffer that holds any 2D response.
pub const RESPONSE_MAX: u32 = EDID_RESP_SIZE as u32;

/// A rectangle: x, y, width, height.
pub type Rect = (u32, u32, u32, u32);

fn with_fields(kind: u32, fence: u64, fields: &[u32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HDR + fields.len() * 4);
    v.extend_from_slice(&kind.to_le_bytes());
    let flags = if fence != 0 { FLAG_FENCE } else { 0 };
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&fence.to_le_bytes());
    v.extend_from_slice(&[0u8; 8]); // ctx_id, ring_idx, padding
    for f in fields {
        v.extend_from_slice(&f.to_le_bytes());
    }
    v
}

/// GET_DISPLAY_INFO.
pub fn get_display_info() -> Vec<u8> {
    with_fields(cmd::GET_DISPLAY_INFO, 0, &[])
}

/// GET_EDID of `scanout`.
pub fn get_edid(scanout: u32) -> Vec<u8> {
    with_fields(cmd::GET_EDID, 0, &[scanout, 0])
}

/// RESOURCE_CREATE_2D, fenced with `fence` (0: no fence).
pub fn create_2d(id: u32, format: u32, width: u32, height: u32, fence: u64) -> Vec<u8> {
    with_fields(cmd::RESOURCE_CREATE_2D, fence, &[id, format, width, height])
}

/// RESOURCE_UNREF.
pub fn unref(id: u32) -> Vec<u8> {
    with_fields(cmd::RESOURCE_UNREF, 0, &[id, 0])
}

/// RESOURCE_ATTACH_BACKING with `(guest address, length)` entries.
pub fn attach_backing(id: u32, entries: &[(u64, u32)]) -> Vec<u8> {
    let mut v = with_fields(cmd::RESOURCE_ATTACH_BACKING, 0, &[id, entries.len() as u32]);
    for (addr, len) in entries {
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
    }
    v
}

/// RESOURCE_DETACH_BACKING.
pub fn detach_backing(id: u32) -> Vec<u8> {
    with_fields(cmd::RESOURCE_DETACH_BACKING, 0, &[id, 0])
}

/// SET_SCANOUT (`id` 0 disables the scanout).
pub fn set_scanout(scanout: u32, id: u32, r: Rect) -> Vec<u8> {
    with_fields(cmd::SET_SCANOUT, 0, &[r.0, r.1, r.2, r.3, scanout, id])
}

/// RESOURCE_FLUSH.
pub fn flush(id: u32, r: Rect) -> Vec<u8> {
    with_fields(cmd::RESOURCE_FLUSH, 0, &[r.0, r.1, r.2, r.3, id, 0])
}

/// TRANSFER_TO_HOST_2D from backing offset `offset`.
pub fn transfer(id: u32, r: Rect, offset: u64) -> Vec<u8> {
    let mut v = with_fields(cmd::TRANSFER_TO_HOST_2D, 0, &[r.0, r.1, r.2, r.3]);
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// UPDATE_CURSOR (cursor queue): resource `id` (0 hides) at `x`, `y` on `scanout`.
pub fn update_cursor(scanout: u32, x: u32, y: u32, id: u32, hot: (u32, u32)) -> Vec<u8> {
    with_fields(
        cmd::UPDATE_CURSOR,
        0,
        &[scanout, x, y, 0, id, hot.0, hot.1, 0],
    )
}

/// MOVE_CURSOR (cursor queue).
pub fn move_cursor(scanout: u32, x: u32, y: u32) -> Vec<u8> {
    with_fields(cmd::MOVE_CURSOR, 0, &[scanout, x, y, 0, 0, 0, 0, 0])
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The response type, if the response holds a header's first word.
pub fn resp_type(response: &[u8]) -> Option<u32> {
    u32_at(response, 0)
}

/// The fence id a response carries.
pub fn resp_fence(response: &[u8]) -> Option<u64> {
    response
        .get(8..16)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
}

/// The outputs of an OK_DISPLAY_INFO response: (width, height, enabled) per scanout.
pub fn display_info(response: &[u8]) -> Option<Vec<(u32, u32, bool)>> {
    if resp_type(response)? != resp::OK_DISPLAY_INFO || response.len() < DISPLAY_INFO_SIZE {
        return None;
    }
    Some(
        (0..16)
            .map(|i| {
                let at = HDR + i * 24;
                let w = u32_at(response, at + 8).unwrap_or(0);
                let h = u32_at(response, at + 12).unwrap_or(0);
                (w, h, u32_at(response, at + 16).unwrap_or(0) != 0)
            })
            .collect(),
    )
}

/// The EDID blob of an OK_EDID response.
pub fn edid(response: &[u8]) -> Option<Vec<u8>> {
    if resp_type(response)? != resp::OK_EDID {
        return None;
    }
    let size = u32_at(response, HDR)? as usize;
    response.get(HDR + 8..HDR + 8 + size).map(<[u8]>::to_vec)
}
