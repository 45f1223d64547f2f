//! What the emulated GSP-RM understands: the function and event numbers it uses (r570
//! numbering, gpu-facts 3.4/3.5; a subset, written apart from the host driver's table), the
//! NV_STATUS values it returns, the classes it allocates, and its payload codecs.
//!
//! # Payload layouts
//! SET_REGISTRY uses the real PACKED_REGISTRY_TABLE layout (gpu-facts 3.6). Every other
//! payload layout here is **project-defined** (little-endian, naturally aligned): the real
//! GspSystemInfo, GspStaticConfigInfo, RM alloc/free/control structures are far larger and
//! version-specific. The host driver's `gsp::rpc` module documents the same layouts.

use thiserror::Error;

use super::fb::FbRegion;

/// RPC function numbers (CPU→GSP), r570 numbering (0–200 identical in r535).
pub mod function {
    /// NOP. The emulated GSP echoes the payload in its reply (project behaviour).
    pub const NOP: u32 = 0;
    /// FREE: free an RM object.
    pub const FREE: u32 = 10;
    /// GET_GSP_STATIC_INFO: static configuration (framebuffer regions, handles).
    pub const GET_GSP_STATIC_INFO: u32 = 65;
    /// GSP_SET_SYSTEM_INFO: queued before the GSP starts; no reply.
    pub const GSP_SET_SYSTEM_INFO: u32 = 72;
    /// SET_REGISTRY: queued before the GSP starts; no reply.
    pub const SET_REGISTRY: u32 = 73;
    /// GSP_RM_CONTROL: a control call on an object.
    pub const GSP_RM_CONTROL: u32 = 76;
    /// GSP_RM_ALLOC: allocate an object.
    pub const GSP_RM_ALLOC: u32 = 103;
}

/// Event numbers (GSP→CPU, unsolicited), r570 numbering.
pub mod event {
    /// GSP_INIT_DONE.
    pub const GSP_INIT_DONE: u32 = 0x1001;
    /// OS_ERROR_LOG.
    pub const OS_ERROR_LOG: u32 = 0x1006;
    /// UCODE_LIBOS_PRINT.
    pub const UCODE_LIBOS_PRINT: u32 = 0x100C;
}

/// NV_STATUS values the emulated GSP returns. 0x51, 0x55 and 0x66 are in gpu-facts 3.2;
/// the others follow Open RM's `nvstatuscodes.h` as recalled, unverified against it.
pub mod status {
    /// NV_OK.
    pub const OK: u32 = 0;
    /// NV_ERR_INSERT_DUPLICATE_NAME: the handle is taken (unverified value).
    pub const INSERT_DUPLICATE_NAME: u32 = 0x19;
    /// NV_ERR_INVALID_ARGUMENT (unverified value).
    pub const INVALID_ARGUMENT: u32 = 0x1F;
    /// NV_ERR_INVALID_OBJECT_HANDLE (unverified value).
    pub const INVALID_OBJECT_HANDLE: u32 = 0x33;
    /// NV_ERR_NO_MEMORY.
    pub const NO_MEMORY: u32 = 0x51;
    /// NV_ERR_NOT_READY: the GSP has not finished initialising.
    pub const NOT_READY: u32 = 0x55;
    /// NV_ERR_NOT_SUPPORTED (unverified value).
    pub const NOT_SUPPORTED: u32 = 0x56;
    /// NV_ERR_OBJECT_NOT_FOUND (unverified value).
    pub const OBJECT_NOT_FOUND: u32 = 0x57;
}

/// Class numbers (Open RM's values).
pub mod class {
    /// NV01_ROOT (the client).
    pub const NV01_ROOT: u32 = 0x0000;
    /// NV01_MEMORY_LOCAL_USER: VRAM.
    pub const NV01_MEMORY_LOCAL_USER: u32 = 0x0040;
    /// NV01_DEVICE_0.
    pub const NV01_DEVICE_0: u32 = 0x0080;
    /// NV20_SUBDEVICE_0.
    pub const NV20_SUBDEVICE_0: u32 = 0x2080;
    /// FERMI_VASPACE_A: a GPU virtual address space.
    pub const FERMI_VASPACE_A: u32 = 0x90F1;
}

/// Control commands (project-defined numbers).
pub mod control {
    /// Bind a page directory to an address space (project-defined).
    pub const VASPACE_BIND_PAGE_DIRECTORY: u32 = 0x90F1_E001;
}

/// Errors of payload decoding.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PayloadError {
    /// The payload is shorter than its layout.
    #[error("payload of {found} bytes, layout needs {needed}")]
    Short {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        found: usize,
    },
    /// A registry table is malformed.
    #[error("malformed registry table: {0}")]
    Registry(String),
}

fn need(b: &[u8], n: usize) -> Result<(), PayloadError> {
    if b.len() < n {
        Err(PayloadError::Short {
            needed: n,
            found: b.len(),
        })
    } else {
        Ok(())
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// GSP_SET_SYSTEM_INFO payload (project-defined, 64 bytes; the fields the emulator reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemInfo {
    /// PCI vendor id (offset 0x2C).
    pub vendor_id: u16,
    /// PCI device id (0x2E).
    pub device_id: u16,
    /// Host page size (0x38).
    pub host_page_size: u32,
}

impl SystemInfo {
    /// Layout size.
    pub const SIZE: usize = 64;

    /// Decodes the payload.
    pub fn parse(b: &[u8]) -> Result<SystemInfo, PayloadError> {
        need(b, Self::SIZE)?;
        Ok(SystemInfo {
            vendor_id: u16_at(b, 0x2C),
            device_id: u16_at(b, 0x2E),
            host_page_size: u32_at(b, 0x38),
        })
    }
}

/// One registry entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEntry {
    /// Key.
    pub name: String,
    /// Type: 1 DWORD, 2 BINARY, 3 STRING.
    pub kind: u8,
    /// Value (DWORD) or offset of the value.
    pub data: u32,
    /// Value length.
    pub length: u32,
}

/// Decodes a PACKED_REGISTRY_TABLE: `{u32 size, u32 numEntries, entries[] {u32 nameOffset,
/// u8 type, 3 pad, u32 data, u32 length}}` then NUL-terminated keys.
pub fn parse_registry(b: &[u8]) -> Result<Vec<RegistryEntry>, PayloadError> {
    need(b, 8)?;
    let size = u32_at(b, 0) as usize;
    let count = u32_at(b, 4) as usize;
    if size > b.len()
        || count
            .checked_mul(16)
            .and_then(|n| n.checked_add(8))
            .is_none_or(|n| n > size)
    {
        return Err(PayloadError::Registry(format!(
            "size {size}, {count} entries, payload {}",
            b.len()
        )));
    }
    let table = &b[..size];
    (0..count)
        .map(|i| {
            let e = 8 + 16 * i;
            let name_off = u32_at(table, e) as usize;
            let rest = table
                .get(name_off..)
                .filter(|_| name_off >= 8 + 16 * count)
                .ok_or_else(|| {
                    PayloadError::Registry(format!("entry {i}: name offset {name_off}"))
                })?;
            let nul = rest
                .iter()
                .position(|&c| c == 0)
                .ok_or_else(|| PayloadError::Registry(format!("entry {i}: unterminated name")))?;
            let name = String::from_utf8(rest[..nul].to_vec())
                .map_err(|_| PayloadError::Registry(format!("entry {i}: name not UTF-8")))?;
            Ok(RegistryEntry {
                name,
                kind: table[e + 4],
                data: u32_at(table, e + 8),
                length: u32_at(table, e + 12),
            })
        })
        .collect()
}

/// Encodes the GET_GSP_STATIC_INFO reply (project-defined): a 32-byte head `{u32
/// regionCount, u32 reserved, u64 fbSize, u32 hClient, u32 hDevice, u32 hSubdevice, u32
/// reserved}` then `regionCount` × 32-byte regions `{u64 base, u64 limit (inclusive), u32
/// kind, u32 flags (bit 0 protected), u32 performance, u32 reserved}`.
pub fn encode_static_info(fb_size: u64, handles: [u32; 3], regions: &[FbRegion]) -> Vec<u8> {
    let mut b = vec![0u8; 32 + 32 * regions.len()];
    put_u32(&mut b, 0, regions.len() as u32);
    put_u64(&mut b, 8, fb_size);
    for (i, h) in handles.into_iter().enumerate() {
        put_u32(&mut b, 0x10 + 4 * i, h);
    }
    for (i, r) in regions.iter().enumerate() {
        let o = 32 + 32 * i;
        put_u64(&mut b, o, r.base);
        put_u64(&mut b, o + 8, r.limit);
        put_u32(&mut b, o + 16, r.kind.raw());
        put_u32(&mut b, o + 20, u32::from(r.protected));
    }
    b
}

/// GSP_RM_ALLOC payload head (project-defined, 24 bytes): `{u32 hClient, u32 hParent, u32
/// hObject, u32 hClass, u32 paramsSize, u32 reserved}` then the class's parameters.
/// Memory (`NV01_MEMORY_LOCAL_USER`) parameters, 32 bytes: `{u64 size, u64 alignment, u64
/// address (out), u32 flags, u32 reserved}`; on success the reply's size is the rounded
/// size. Address-space (`FERMI_VASPACE_A`) parameters, 32 bytes: `{u64 vaBase, u64 vaSize,
/// u32 bigPageSize, u32 flags, u64 reserved}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocRequest {
    /// Client handle.
    pub client: u32,
    /// Parent handle.
    pub parent: u32,
    /// New object's handle.
    pub object: u32,
    /// Class.
    pub class: u32,
    /// Parameter bytes that follow.
    pub params_size: u32,
}

impl AllocRequest {
    /// Head size.
    pub const HEAD: usize = 24;

    /// Decodes the head and checks the parameters are present.
    pub fn parse(b: &[u8]) -> Result<AllocRequest, PayloadError> {
        need(b, Self::HEAD)?;
        let r = AllocRequest {
            client: u32_at(b, 0),
            parent: u32_at(b, 4),
            object: u32_at(b, 8),
            class: u32_at(b, 12),
            params_size: u32_at(b, 16),
        };
        need(b, Self::HEAD + r.params_size as usize)?;
        Ok(r)
    }
}

/// Memory parameters of an alloc: `(size, alignment)`.
pub fn parse_memory_params(params: &[u8]) -> Result<(u64, u64), PayloadError> {
    need(params, 32)?;
    Ok((u64_at(params, 0), u64_at(params, 8)))
}

/// Writes the outputs of a memory alloc into its parameters.
pub fn set_memory_outputs(params: &mut [u8], addr: u64, size: u64) {
    put_u64(params, 0, size);
    put_u64(params, 16, addr);
}

/// Address-space parameters: `(vaBase, vaSize, bigPageSize)`.
pub fn parse_vaspace_params(params: &[u8]) -> Result<(u64, u64, u32), PayloadError> {
    need(params, 32)?;
    Ok((u64_at(params, 0), u64_at(params, 8), u32_at(params, 16)))
}

/// FREE payload (project-defined, 16 bytes): `{u32 hClient, u32 hParent, u32 hObject, u32
/// flags}`. Returns `(client, parent, object)`.
pub fn parse_free(b: &[u8]) -> Result<(u32, u32, u32), PayloadError> {
    need(b, 16)?;
    Ok((u32_at(b, 0), u32_at(b, 4), u32_at(b, 8)))
}

/// GSP_RM_CONTROL payload head (project-defined, 16 bytes): `{u32 hClient, u32 hObject, u32
/// cmd, u32 paramsSize}` then the parameters. `VASPACE_BIND_PAGE_DIRECTORY` parameters, 16
/// bytes: `{u64 pageDirectory (VRAM address), u32 aperture (0 video memory), u32 flags}`.
/// Returns `(client, object, cmd, params)`.
pub fn parse_control(b: &[u8]) -> Result<(u32, u32, u32, &[u8]), PayloadError> {
    need(b, 16)?;
    let size = u32_at(b, 12) as usize;
    need(b, 16 + size)?;
    Ok((u32_at(b, 0), u32_at(b, 4), u32_at(b, 8), &b[16..16 + size]))
}

/// Bind parameters: `(pageDirectory, aperture)`.
pub fn parse_bind_params(params: &[u8]) -> Result<(u64, u32), PayloadError> {
    need(params, 16)?;
    Ok((u64_at(params, 0), u32_at(params, 8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(entries: &[(&str, u32)]) -> Vec<u8> {
        let head = 8 + 16 * entries.len();
        let mut names = Vec::new();
        let mut b = vec![0u8; head];
        put_u32(&mut b, 4, entries.len() as u32);
        for (i, (name, v)) in entries.iter().enumerate() {
            let e = 8 + 16 * i;
            put_u32(&mut b, e, (head + names.len()) as u32);
            b[e + 4] = 1;
            put_u32(&mut b, e + 8, *v);
            put_u32(&mut b, e + 12, 4);
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        b.extend_from_slice(&names);
        let size = b.len() as u32;
        put_u32(&mut b, 0, size);
        b
    }

    #[test]
    fn registry_tables_decode_and_reject_garbage() {
        let b = registry(&[("RMSecBusResetEnable", 1), ("RMDevidCheckIgnore", 1)]);
        let e = parse_registry(&b).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].name, "RMDevidCheckIgnore");
        assert_eq!((e[1].kind, e[1].data, e[1].length), (1, 1, 4));
        let mut bad = b.clone();
        put_u32(&mut bad, 8, 3); // name inside the entry array
        assert!(parse_registry(&bad).is_err());
        let mut bad = b.clone();
        let n = bad.len();
        bad[n - 1] = b'x'; // unterminated
        assert!(parse_registry(&bad).is_err());
        let mut bad = b;
        put_u32(&mut bad, 4, 1000);
        assert!(parse_registry(&bad).is_err());
        assert!(parse_registry(&[0; 4]).is_err());
    }
}
