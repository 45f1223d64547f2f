//! RPC vocabulary: the function/event number table, NV_STATUS, and typed payloads.
//!
//! # Numbering
//! One table, [`Function`], in **r570** numbering (Open RM / nouveau r570 `rpcfn.h` and
//! `msgfn.h`, gpu-facts 3.4/3.5). Functions 0–200 are the same in r535; events from 0x101B
//! were renumbered in r570 (it dropped GSP_SEND_USER_SHARED_DATA) and function 201 differs.
//! Numbers not in the table decode to [`Function::Unknown`].
//!
//! # Payload layouts
//! SET_REGISTRY uses the real PACKED_REGISTRY_TABLE layout (gpu-facts 3.6). All other
//! payloads here are **project-defined**, not NVIDIA's: the real GspSystemInfo,
//! GspStaticConfigInfo and RM alloc/free/control parameter structures are large and change
//! between firmware versions, so this project (host driver and emulated GSP alike) uses the
//! small little-endian layouts documented on each type. A real-firmware backend would
//! replace the encoders, not the queues.

use thiserror::Error;

use crate::host_driver::addr::{GpuVa, VramAddr};
use crate::host_gpu::ChipIdentity;

/// Errors of payload encoding and decoding.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PayloadError {
    /// The payload is shorter than its layout.
    #[error("{what}: payload of {found} bytes, layout needs {needed}")]
    Short {
        /// Which payload.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        found: usize,
    },
    /// A field holds a value the layout does not allow.
    #[error("{what}: {detail}")]
    Invalid {
        /// Which payload.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
}

macro_rules! number_table {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $value:literal, )* }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A number not in the table.
            Unknown(u32),
        }

        impl $name {
            /// Every named entry, in table order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// Decodes a raw number.
            pub const fn from_raw(raw: u32) -> $name {
                match raw {
                    $( $value => $name::$variant, )*
                    other => $name::Unknown(other),
                }
            }

            /// The raw number.
            pub const fn raw(self) -> u32 {
                match self {
                    $( $name::$variant => $value, )*
                    $name::Unknown(raw) => raw,
                }
            }

            /// The NVIDIA name (`UNKNOWN` for numbers not in the table).
            pub const fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => stringify!($variant), )*
                    $name::Unknown(_) => "UNKNOWN",
                }
            }
        }
    };
}

number_table! {
    /// RPC function (CPU→GSP) and event (GSP→CPU, 0x1000 and up) numbers, r570.
    #[allow(non_camel_case_types)]
    pub enum Function {
        /// No operation (the emulated GSP echoes the payload).
        NOP = 0,
        /// Free an RM object.
        FREE = 10,
        /// Shutdown/suspend notice.
        UNLOADING_GUEST_DRIVER = 47,
        /// First RPC after INIT_DONE: static configuration (framebuffer regions, handles).
        GET_GSP_STATIC_INFO = 65,
        /// BAR2 root PDE setup.
        UPDATE_BAR_PDE = 70,
        /// Continuation of a split message.
        CONTINUATION_RECORD = 71,
        /// System information, queued before the GSP starts.
        GSP_SET_SYSTEM_INFO = 72,
        /// Registry, queued before the GSP starts.
        SET_REGISTRY = 73,
        /// Deprecated.
        GSP_INIT_POST_OBJGPU = 74,
        /// RM control call.
        GSP_RM_CONTROL = 76,
        /// RM object allocation.
        GSP_RM_ALLOC = 103,
        /// TLB invalidate.
        INVALIDATE_TLB = 200,
        /// ECC status query (r570; RESERVED_201 in r535).
        CTRL_GPU_QUERY_ECC_STATUS = 201,
        /// Event: the GSP finished initialising.
        GSP_INIT_DONE = 0x1001,
        /// Event: run a CPU register sequence.
        GSP_RUN_CPU_SEQUENCER = 0x1002,
        /// Event: RM event notification.
        POST_EVENT = 0x1003,
        /// Event: robust-channel recovery triggered.
        RC_TRIGGERED = 0x1004,
        /// Event: MMU fault queued.
        MMU_FAULT_QUEUED = 0x1005,
        /// Event: error log entry.
        OS_ERROR_LOG = 0x1006,
        /// Event: firmware log line.
        UCODE_LIBOS_PRINT = 0x100C,
        /// Event: bridgeless performance info.
        PERF_BRIDGELESS_INFO_UPDATE = 0x100F,
        /// Event: NVLink fault (r570 number).
        NVLINK_FAULT_UP = 0x101B,
        /// Event: lockdown notice (r570 number).
        GSP_LOCKDOWN_NOTICE = 0x101C,
        /// Event: MIG compute-instance configuration update (r570 number).
        MIG_CI_CONFIG_UPDATE = 0x101D,
        /// Event: GSP trace update (r570).
        UPDATE_GSP_TRACE = 0x101E,
        /// Event: NOCAT record (r570).
        GSP_POST_NOCAT_RECORD = 0x1020,
    }
}

impl Function {
    /// Whether the number is in the event range (GSP→CPU unsolicited messages).
    pub const fn is_event(self) -> bool {
        self.raw() >= 0x1000
    }
}

number_table! {
    /// NV_STATUS values in `rpc_result`. 0x51, 0x55 and 0x66 are in gpu-facts 3.2; the
    /// others follow Open RM's `nvstatuscodes.h` as recalled here, unverified.
    #[allow(non_camel_case_types)]
    pub enum NvStatus {
        /// Success.
        NV_OK = 0,
        /// The handle is already in use.
        NV_ERR_INSERT_DUPLICATE_NAME = 0x19,
        /// A parameter is invalid.
        NV_ERR_INVALID_ARGUMENT = 0x1F,
        /// The handle does not name a suitable object.
        NV_ERR_INVALID_OBJECT_HANDLE = 0x33,
        /// Out of memory.
        NV_ERR_NO_MEMORY = 0x51,
        /// Not ready yet (retry).
        NV_ERR_NOT_READY = 0x55,
        /// Not supported.
        NV_ERR_NOT_SUPPORTED = 0x56,
        /// No such object.
        NV_ERR_OBJECT_NOT_FOUND = 0x57,
        /// Timed out (retry).
        NV_ERR_TIMEOUT_RETRY = 0x66,
    }
}

impl NvStatus {
    /// Whether the caller may retry (nouveau maps these to EBUSY).
    pub const fn is_retry(self) -> bool {
        matches!(
            self,
            NvStatus::NV_ERR_NOT_READY | NvStatus::NV_ERR_TIMEOUT_RETRY
        )
    }
}

/// An RM object handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Handle(pub u32);

/// RM class numbers used here (Open RM's values).
pub mod class {
    /// NV01_MEMORY_LOCAL_USER: video memory.
    pub const NV01_MEMORY_LOCAL_USER: u32 = 0x0040;
    /// FERMI_VASPACE_A: a GPU virtual address space.
    pub const FERMI_VASPACE_A: u32 = 0x90F1;
}

/// Project-defined RM control command: bind a page directory to an address space.
pub const CTRL_VASPACE_BIND_PAGE_DIRECTORY: u32 = 0x90F1_E001;

/// Little-endian payload builder.
#[derive(Debug, Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn pad(mut self, n: usize) -> Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    fn done(self) -> Vec<u8> {
        self.0
    }
}

/// Little-endian payload reader over a checked-length slice.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(what: &'static str, b: &'a [u8], needed: usize) -> Result<Reader<'a>, PayloadError> {
        if b.len() < needed {
            return Err(PayloadError::Short {
                what,
                needed,
                found: b.len(),
            });
        }
        Ok(Reader { b })
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.b[at..at + 4].try_into().expect("length checked"))
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.b[at..at + 8].try_into().expect("length checked"))
    }
}

/// GSP_SET_SYSTEM_INFO payload (project-defined, 64 bytes): `{u64 gpuPhysAddr (BAR0),
/// u64 gpuPhysFbAddr (BAR1), u64 gpuPhysInstAddr (BAR3), u64 maxUserVa, u32
/// nvDomainBusDeviceFunc, u32 pciConfigMirrorBase, u32 pciConfigMirrorSize, u16 vendorId,
/// u16 deviceId, u16 subsystemVendorId, u16 subsystemId, u8 revision, 3 pad, u32
/// hostPageSize, u32 reserved}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemInfo {
    /// Bus address of BAR0 (0 when unknown, as for the emulated GPU).
    pub gpu_phys_addr: u64,
    /// Bus address of BAR1.
    pub gpu_phys_fb_addr: u64,
    /// Bus address of the instance-memory BAR.
    pub gpu_phys_inst_addr: u64,
    /// Highest user virtual address.
    pub max_user_va: u64,
    /// PCI domain/bus/device/function.
    pub nv_domain_bus_device_func: u32,
    /// PCI config mirror base in BAR0 (0x88000).
    pub pci_config_mirror_base: u32,
    /// PCI config mirror size (0x1000).
    pub pci_config_mirror_size: u32,
    /// PCI vendor id.
    pub vendor_id: u16,
    /// PCI device id.
    pub device_id: u16,
    /// PCI subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// PCI subsystem id.
    pub subsystem_id: u16,
    /// PCI revision.
    pub revision: u8,
    /// Host page size.
    pub host_page_size: u32,
}

impl SystemInfo {
    /// Encoded size.
    pub const SIZE: usize = 64;

    /// The system info for `identity` (bus addresses unknown: 0).
    pub fn for_chip(identity: &ChipIdentity) -> SystemInfo {
        SystemInfo {
            gpu_phys_addr: 0,
            gpu_phys_fb_addr: 0,
            gpu_phys_inst_addr: 0,
            max_user_va: (1 << 47) - 1,
            nv_domain_bus_device_func: 0,
            pci_config_mirror_base: 0x88000,
            pci_config_mirror_size: 0x1000,
            vendor_id: identity.pci.vendor_id,
            device_id: identity.pci.device_id,
            subsystem_vendor_id: identity.pci.subsystem_vendor_id,
            subsystem_id: identity.pci.subsystem_id,
            revision: identity.pci.revision,
            host_page_size: 4096,
        }
    }

    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        Writer::default()
            .u64(self.gpu_phys_addr)
            .u64(self.gpu_phys_fb_addr)
            .u64(self.gpu_phys_inst_addr)
            .u64(self.max_user_va)
            .u32(self.nv_domain_bus_device_func)
            .u32(self.pci_config_mirror_base)
            .u32(self.pci_config_mirror_size)
            .u16(self.vendor_id)
            .u16(self.device_id)
            .u16(self.subsystem_vendor_id)
            .u16(self.subsystem_id)
            .u8(self.revision)
            .pad(3)
            .u32(self.host_page_size)
            .u32(0)
            .done()
    }
}

/// A registry entry (DWORD values only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEntry {
    /// Key.
    pub name: String,
    /// DWORD value.
    pub value: u32,
}

/// SET_REGISTRY payload: PACKED_REGISTRY_TABLE `{u32 size, u32 numEntries, entries[]
/// {u32 nameOffset, u8 type, 3 pad, u32 data, u32 length}}` then the NUL-terminated keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// The entries.
    pub entries: Vec<RegistryEntry>,
}

impl Registry {
    /// Registry type of a DWORD value.
    pub const TYPE_DWORD: u8 = 1;

    /// The three keys nova-core sends (gpu-facts 3.6).
    pub fn nova_defaults() -> Registry {
        let entry = |name: &str| RegistryEntry {
            name: name.to_owned(),
            value: 1,
        };
        Registry {
            entries: vec![
                entry("RMSecBusResetEnable"),
                entry("RMForcePcieConfigSave"),
                entry("RMDevidCheckIgnore"),
            ],
        }
    }

    /// The payload bytes.
    pub fn encode(&self) -> Result<Vec<u8>, PayloadError> {
        let table = 8 + 16 * self.entries.len();
        let names: usize = self.entries.iter().map(|e| e.name.len() + 1).sum();
        let size = u32::try_from(table + names).map_err(|_| PayloadError::Invalid {
            what: "SET_REGISTRY",
            detail: "table too large".into(),
        })?;
        let mut w = Writer::default().u32(size).u32(self.entries.len() as u32);
        let mut name_offset = table as u32;
        for e in &self.entries {
            if e.name.as_bytes().contains(&0) {
                return Err(PayloadError::Invalid {
                    what: "SET_REGISTRY",
                    detail: format!("key {:?} contains NUL", e.name),
                });
            }
            w = w
                .u32(name_offset)
                .u8(Self::TYPE_DWORD)
                .pad(3)
                .u32(e.value)
                .u32(4);
            name_offset += e.name.len() as u32 + 1;
        }
        let mut b = w.done();
        for e in &self.entries {
            b.extend_from_slice(e.name.as_bytes());
            b.push(0);
        }
        Ok(b)
    }
}

/// What a framebuffer region is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FbRegionKind {
    /// Allocatable.
    Usable,
    /// Carved out by the board (e.g. nvgrace resmem).
    BoardReserved,
    /// Held by the GSP firmware (WPR2, heap).
    Firmware,
}

/// One framebuffer region, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FbRegion {
    /// First byte.
    pub start: VramAddr,
    /// One past the last byte.
    pub end: VramAddr,
    /// Purpose.
    pub kind: FbRegionKind,
    /// Not accessible to the CPU.
    pub protected: bool,
}

impl FbRegion {
    /// Bytes in the region.
    pub fn size(&self) -> u64 {
        self.end.raw() - self.start.raw()
    }
}

/// Internal RM handles the GSP created at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct InternalHandles {
    /// The internal client.
    pub client: Handle,
    /// The device.
    pub device: Handle,
    /// The subdevice.
    pub subdevice: Handle,
}

/// GET_GSP_STATIC_INFO reply (project-defined): a 32-byte head `{u32 regionCount, u32
/// reserved, u64 fbSize, u32 hClient, u32 hDevice, u32 hSubdevice, u32 reserved}` and
/// `regionCount` × 32-byte regions `{u64 base, u64 limit (inclusive), u32 kind (0 usable,
/// 1 board-reserved, 2 firmware), u32 flags (bit 0 protected), u32 performance, u32
/// reserved}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticInfo {
    /// Framebuffer bytes the GSP reports (the board's total).
    pub fb_size: u64,
    /// Internal handles.
    pub handles: InternalHandles,
    /// Regions in address order.
    pub fb_regions: Vec<FbRegion>,
}

impl StaticInfo {
    /// Most regions accepted.
    pub const MAX_REGIONS: u32 = 16;

    /// Decodes the reply payload; regions must be non-empty, ordered and disjoint.
    pub fn decode(b: &[u8]) -> Result<StaticInfo, PayloadError> {
        const WHAT: &str = "GET_GSP_STATIC_INFO";
        let head = Reader::new(WHAT, b, 32)?;
        let count = head.u32(0);
        if count == 0 || count > Self::MAX_REGIONS {
            return Err(PayloadError::Invalid {
                what: WHAT,
                detail: format!("{count} framebuffer regions"),
            });
        }
        let r = Reader::new(WHAT, b, 32 + 32 * count as usize)?;
        let mut fb_regions: Vec<FbRegion> = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let o = 32 + 32 * i;
            let (base, limit) = (r.u64(o), r.u64(o + 8));
            let kind = match r.u32(o + 16) {
                0 => FbRegionKind::Usable,
                1 => FbRegionKind::BoardReserved,
                2 => FbRegionKind::Firmware,
                k => {
                    return Err(PayloadError::Invalid {
                        what: WHAT,
                        detail: format!("region {i}: kind {k}"),
                    })
                }
            };
            let end = limit.checked_add(1).filter(|&e| e > base);
            let after_previous = fb_regions.last().is_none_or(|p| p.end.raw() <= base);
            let Some(end) = end.filter(|_| after_previous) else {
                return Err(PayloadError::Invalid {
                    what: WHAT,
                    detail: format!(
                        "region {i} [{base:#x}, {limit:#x}] empty, overlapping or out of order"
                    ),
                });
            };
            fb_regions.push(FbRegion {
                start: VramAddr::new(base),
                end: VramAddr::new(end),
                kind,
                protected: r.u32(o + 20) & 1 != 0,
            });
        }
        Ok(StaticInfo {
            fb_size: r.u64(8),
            handles: InternalHandles {
                client: Handle(r.u32(0x10)),
                device: Handle(r.u32(0x14)),
                subdevice: Handle(r.u32(0x18)),
            },
            fb_regions,
        })
    }

    /// The usable regions, for the VRAM allocator.
    pub fn usable_regions(&self) -> impl Iterator<Item = &FbRegion> {
        self.fb_regions
            .iter()
            .filter(|r| r.kind == FbRegionKind::Usable)
    }

    /// The reserved regions (board or firmware).
    pub fn reserved_regions(&self) -> impl Iterator<Item = &FbRegion> {
        self.fb_regions
            .iter()
            .filter(|r| r.kind != FbRegionKind::Usable)
    }

    /// Total usable bytes.
    pub fn usable_bytes(&self) -> u64 {
        self.usable_regions().map(FbRegion::size).sum()
    }
}

/// GSP_RM_ALLOC request head (project-defined, 24 bytes): `{u32 hClient, u32 hParent,
/// u32 hObject, u32 hClass, u32 paramsSize, u32 reserved}`, then the class parameters.
/// The reply carries the same layout with output fields filled in.
fn alloc_head(
    client: Handle,
    parent: Handle,
    object: Handle,
    class: u32,
    params: &[u8],
) -> Vec<u8> {
    let mut b = Writer::default()
        .u32(client.0)
        .u32(parent.0)
        .u32(object.0)
        .u32(class)
        .u32(params.len() as u32)
        .u32(0)
        .done();
    b.extend_from_slice(params);
    b
}

/// Allocate video memory (GSP_RM_ALLOC of `NV01_MEMORY_LOCAL_USER`). Parameters
/// (project-defined, 32 bytes): `{u64 size, u64 alignment, u64 address (out), u32 flags,
/// u32 reserved}`; the reply's `size` is the size actually allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocMemory {
    /// Client.
    pub client: Handle,
    /// Parent (the device).
    pub parent: Handle,
    /// New object's handle.
    pub object: Handle,
    /// Bytes wanted.
    pub size: u64,
    /// Alignment (power of two; 0 = 4 KiB).
    pub alignment: u64,
}

/// A memory object the GSP allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryObject {
    /// Its handle.
    pub handle: Handle,
    /// Where it lives in VRAM.
    pub addr: VramAddr,
    /// Bytes allocated (rounded up).
    pub size: u64,
}

impl AllocMemory {
    /// The request payload.
    pub fn encode(&self) -> Vec<u8> {
        let params = Writer::default()
            .u64(self.size)
            .u64(self.alignment)
            .u64(0)
            .u32(0)
            .u32(0)
            .done();
        alloc_head(
            self.client,
            self.parent,
            self.object,
            class::NV01_MEMORY_LOCAL_USER,
            &params,
        )
    }

    /// Decodes the reply payload.
    pub fn decode_reply(&self, b: &[u8]) -> Result<MemoryObject, PayloadError> {
        let r = Reader::new("GSP_RM_ALLOC (memory)", b, 24 + 32)?;
        Ok(MemoryObject {
            handle: self.object,
            size: r.u64(24),
            addr: VramAddr::new(r.u64(24 + 16)),
        })
    }
}

/// Create a GPU virtual address space (GSP_RM_ALLOC of `FERMI_VASPACE_A`). Parameters
/// (project-defined, 32 bytes): `{u64 vaBase, u64 vaSize, u32 bigPageSize, u32 flags, u64
/// reserved}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocVaSpace {
    /// Client.
    pub client: Handle,
    /// Parent (the device).
    pub parent: Handle,
    /// New object's handle.
    pub object: Handle,
    /// First VA.
    pub va_base: GpuVa,
    /// Bytes of VA.
    pub va_size: u64,
    /// Big page size (64 KiB or 128 KiB).
    pub big_page_size: u32,
}

impl AllocVaSpace {
    /// The request payload.
    pub fn encode(&self) -> Vec<u8> {
        let params = Writer::default()
            .u64(self.va_base.raw())
            .u64(self.va_size)
            .u32(self.big_page_size)
            .u32(0)
            .u64(0)
            .done();
        alloc_head(
            self.client,
            self.parent,
            self.object,
            class::FERMI_VASPACE_A,
            &params,
        )
    }
}

/// FREE payload (project-defined, 16 bytes): `{u32 hClient, u32 hParent, u32 hObject,
/// u32 flags}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeObject {
    /// Client.
    pub client: Handle,
    /// Parent of the object.
    pub parent: Handle,
    /// The object.
    pub object: Handle,
}

impl FreeObject {
    /// The request payload.
    pub fn encode(&self) -> Vec<u8> {
        Writer::default()
            .u32(self.client.0)
            .u32(self.parent.0)
            .u32(self.object.0)
            .u32(0)
            .done()
    }
}

/// Bind a page directory to an address space: GSP_RM_CONTROL (project-defined head, 16
/// bytes: `{u32 hClient, u32 hObject, u32 cmd, u32 paramsSize}`) with command
/// [`CTRL_VASPACE_BIND_PAGE_DIRECTORY`] and parameters (16 bytes) `{u64 pageDirectory
/// (VRAM address), u32 aperture (0 video memory), u32 flags}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindPageDirectory {
    /// Client.
    pub client: Handle,
    /// The address space.
    pub vaspace: Handle,
    /// Root page directory in VRAM.
    pub page_directory: VramAddr,
}

impl BindPageDirectory {
    /// The request payload.
    pub fn encode(&self) -> Vec<u8> {
        Writer::default()
            .u32(self.client.0)
            .u32(self.vaspace.0)
            .u32(CTRL_VASPACE_BIND_PAGE_DIRECTORY)
            .u32(16)
            .u64(self.page_directory.raw())
            .u32(0)
            .u32(0)
            .done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_emulation::gsp::rm as emu;

    #[test]
    fn one_table_r570_numbers() {
        assert_eq!(Function::from_raw(72), Function::GSP_SET_SYSTEM_INFO);
        assert_eq!(Function::GSP_INIT_DONE.raw(), 0x1001);
        assert_eq!(Function::from_raw(0x101C), Function::GSP_LOCKDOWN_NOTICE);
        assert_eq!(Function::from_raw(0x101B).name(), "NVLINK_FAULT_UP");
        assert_eq!(Function::from_raw(0x10FF), Function::Unknown(0x10FF));
        assert_eq!(Function::Unknown(5).raw(), 5);
        assert!(Function::OS_ERROR_LOG.is_event() && !Function::FREE.is_event());
        // Numbers are unique and round-trip.
        for f in Function::ALL {
            assert_eq!(Function::from_raw(f.raw()), *f);
        }
        let mut raw: Vec<u32> = Function::ALL.iter().map(|f| f.raw()).collect();
        raw.sort_unstable();
        raw.dedup();
        assert_eq!(raw.len(), Function::ALL.len());
        assert!(NvStatus::from_raw(0x55).is_retry());
        assert_eq!(NvStatus::from_raw(0x51), NvStatus::NV_ERR_NO_MEMORY);
    }

    #[test]
    fn the_emulated_gsp_uses_the_same_numbers() {
        use emu::{event, function, status};
        for (ours, theirs) in [
            (Function::NOP, function::NOP),
            (Function::FREE, function::FREE),
            (Function::GET_GSP_STATIC_INFO, function::GET_GSP_STATIC_INFO),
            (Function::GSP_SET_SYSTEM_INFO, function::GSP_SET_SYSTEM_INFO),
            (Function::SET_REGISTRY, function::SET_REGISTRY),
            (Function::GSP_RM_CONTROL, function::GSP_RM_CONTROL),
            (Function::GSP_RM_ALLOC, function::GSP_RM_ALLOC),
            (Function::GSP_INIT_DONE, event::GSP_INIT_DONE),
            (Function::OS_ERROR_LOG, event::OS_ERROR_LOG),
            (Function::UCODE_LIBOS_PRINT, event::UCODE_LIBOS_PRINT),
        ] {
            assert_eq!(ours.raw(), theirs, "{}", ours.name());
        }
        for (ours, theirs) in [
            (NvStatus::NV_OK, status::OK),
            (
                NvStatus::NV_ERR_INSERT_DUPLICATE_NAME,
                status::INSERT_DUPLICATE_NAME,
            ),
            (NvStatus::NV_ERR_INVALID_ARGUMENT, status::INVALID_ARGUMENT),
            (
                NvStatus::NV_ERR_INVALID_OBJECT_HANDLE,
                status::INVALID_OBJECT_HANDLE,
            ),
            (NvStatus::NV_ERR_NO_MEMORY, status::NO_MEMORY),
            (NvStatus::NV_ERR_NOT_READY, status::NOT_READY),
            (NvStatus::NV_ERR_NOT_SUPPORTED, status::NOT_SUPPORTED),
            (NvStatus::NV_ERR_OBJECT_NOT_FOUND, status::OBJECT_NOT_FOUND),
        ] {
            assert_eq!(ours.raw(), theirs, "{}", ours.name());
        }
        assert_eq!(class::FERMI_VASPACE_A, emu::class::FERMI_VASPACE_A);
        assert_eq!(
            class::NV01_MEMORY_LOCAL_USER,
            emu::class::NV01_MEMORY_LOCAL_USER
        );
        assert_eq!(
            CTRL_VASPACE_BIND_PAGE_DIRECTORY,
            emu::control::VASPACE_BIND_PAGE_DIRECTORY
        );
    }

    #[test]
    fn payloads_decode_on_the_emulated_side() {
        let reg = Registry::nova_defaults().encode().unwrap();
        let parsed = emu::parse_registry(&reg).unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[2].name, "RMDevidCheckIgnore");
        assert_eq!(
            (parsed[2].kind, parsed[2].data, parsed[2].length),
            (1, 1, 4)
        );
        let bad = Registry {
            entries: vec![RegistryEntry {
                name: "a\0b".into(),
                value: 0,
            }],
        };
        assert!(bad.encode().is_err());

        let host = crate::host_gpu::emulated::EmulatedHostGpu::by_name("gb202-32g").unwrap();
        let info = SystemInfo::for_chip(crate::host_gpu::HostGpu::identity(&host)).encode();
        assert_eq!(info.len(), SystemInfo::SIZE);
        let parsed = emu::SystemInfo::parse(&info).unwrap();
        assert_eq!(
            (parsed.vendor_id, parsed.device_id, parsed.host_page_size),
            (0x10DE, 0x2B85, 4096)
        );

        let alloc = AllocMemory {
            client: Handle(1),
            parent: Handle(2),
            object: Handle(3),
            size: 0x3000,
            alignment: 0x10000,
        }
        .encode();
        let head = emu::AllocRequest::parse(&alloc).unwrap();
        assert_eq!(
            (
                head.client,
                head.parent,
                head.object,
                head.class,
                head.params_size
            ),
            (1, 2, 3, 0x40, 32)
        );
        assert_eq!(
            emu::parse_memory_params(&alloc[24..]).unwrap(),
            (0x3000, 0x10000)
        );
        let vas = AllocVaSpace {
            client: Handle(1),
            parent: Handle(2),
            object: Handle(4),
            va_base: GpuVa::new(0x1000),
            va_size: 1 << 40,
            big_page_size: 0x10000,
        }
        .encode();
        assert_eq!(
            emu::parse_vaspace_params(&vas[24..]).unwrap(),
            (0x1000, 1 << 40, 0x10000)
        );
        let free = FreeObject {
            client: Handle(1),
            parent: Handle(2),
            object: Handle(3),
        }
        .encode();
        assert_eq!(emu::parse_free(&free).unwrap(), (1, 2, 3));
        let bind = BindPageDirectory {
            client: Handle(1),
            vaspace: Handle(4),
            page_directory: VramAddr::new(0x20_0000),
        }
        .encode();
        let (c, o, cmd, params) = emu::parse_control(&bind).unwrap();
        assert_eq!((c, o, cmd), (1, 4, CTRL_VASPACE_BIND_PAGE_DIRECTORY));
        assert_eq!(emu::parse_bind_params(params).unwrap(), (0x20_0000, 0));
    }

    #[test]
    fn static_info_decodes_and_rejects_bad_regions() {
        let region = |base: u64, limit: u64, kind: u32| {
            Writer::default()
                .u64(base)
                .u64(limit)
                .u32(kind)
                .u32(0)
                .u32(0)
                .u32(0)
                .done()
        };
        let info = |regions: &[Vec<u8>]| {
            let mut b = Writer::default()
                .u32(regions.len() as u32)
                .u32(0)
                .u64(1 << 30)
                .u32(10)
                .u32(11)
                .u32(12)
                .u32(0)
                .done();
            for r in regions {
                b.extend_from_slice(r);
            }
            b
        };
        let ok = StaticInfo::decode(&info(&[
            region(0, 0xFFF_FFFF, 0),
            region(0x1000_0000, 0x1FFF_FFFF, 2),
        ]))
        .unwrap();
        assert_eq!(ok.usable_bytes(), 0x1000_0000);
        assert_eq!(ok.handles.device, Handle(11));
        assert_eq!(ok.reserved_regions().count(), 1);
        assert!(StaticInfo::decode(&info(&[])).is_err());
        assert!(StaticInfo::decode(&info(&[region(0, 0xFFF, 7)])).is_err());
        assert!(StaticInfo::decode(&info(&[region(0x2000, 0xFFF, 0)])).is_err());
        assert!(
            StaticInfo::decode(&info(&[region(0, 0xFFF, 0), region(0x800, 0x1FFF, 1)])).is_err()
        );
        assert!(StaticInfo::decode(&info(&[region(0, u64::MAX, 0)])).is_err());
        let mut short = info(&[region(0, 0xFFF, 0)]);
        short.truncate(40);
        assert!(matches!(
            StaticInfo::decode(&short),
            Err(PayloadError::Short { .. })
        ));
    }
}
