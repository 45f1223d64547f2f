//! A serialisable description of the presented function: what `gpu-backend inspect`
//! prints, as a table or as JSON with stable field names (sizes in bytes).

use serde::Serialize;

use crate::host_gpu::HostBarRole;

use super::aperture::{APERTURE_SIZE, APERTURE_START};
use super::function::PresentedFunction;
use super::registers::{Emulated, RegisterMap, RegisterMode, Treatment};

/// Everything a guest would see of the function, plus the host-side facts behind it.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionLayout {
    /// Chip identity.
    pub chip: ChipLayout,
    /// PCI identity.
    pub pci: PciLayout,
    /// The guest's VRAM in host VRAM.
    pub slice: SliceLayout,
    /// Presented BARs, by slot.
    pub bars: Vec<BarLayout>,
    /// MSI-X capability (`None`: presented without MSI-X).
    pub msix: Option<MsixLayout>,
    /// The register table of the generation and mode (what BAR0 passes, emulates, hides).
    pub registers: Vec<RegisterLayout>,
    /// What an offset the table does not name gets: `hidden` (a sliced guest) or
    /// `passed (reads and writes)` (a guest given the whole GPU).
    pub unlisted_registers: String,
}

/// Where the guest's VRAM lives in host VRAM.
#[derive(Debug, Clone, Serialize)]
pub struct SliceLayout {
    /// First host VRAM address.
    pub start: u64,
    /// Size (the guest's VRAM is `[0, size)`).
    pub size: u64,
    /// The guest owns the whole GPU (no host-reserved region; BAR1 physical until the
    /// guest changes it).
    pub whole_gpu: bool,
    /// First host BAR1 virtual address of the guest's window (sliced GPUs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bar1_window: Option<u64>,
}

/// One row of the register table.
#[derive(Debug, Clone, Serialize)]
pub struct RegisterLayout {
    /// Register name.
    pub name: String,
    /// BAR0 offset.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
    /// `passed (reads)`, `emulated` or `hidden` (see [`Treatment::label`]).
    pub treatment: String,
    /// Why.
    pub note: String,
}

/// Chip identity.
#[derive(Debug, Clone, Serialize)]
pub struct ChipLayout {
    /// Profile name (emulated GPU) or device name.
    pub name: String,
    /// Human-readable description.
    pub description: String,
    /// GPU generation.
    pub generation: String,
    /// `NV_PMC_BOOT_0`.
    pub boot0: u32,
    /// `NV_PMC_BOOT_42`.
    pub boot42: u32,
    /// Device memory in bytes, including reserved carve-outs.
    pub vram_size: u64,
}

/// PCI identity of the presented function.
#[derive(Debug, Clone, Serialize)]
pub struct PciLayout {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
    /// 24-bit class code.
    pub class_code: u32,
    /// Revision id.
    pub revision: u8,
}

/// A byte range of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RangeLayout {
    /// Offset inside the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

/// A range served by the backend (over the socket) rather than mapped, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrappedLayout {
    /// Offset inside the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
    /// Why it is trapped.
    pub reason: String,
}

/// One presented BAR.
#[derive(Debug, Clone, Serialize)]
pub struct BarLayout {
    /// First PCI BAR slot (= VFIO region index).
    pub index: u8,
    /// What the BAR exposes: `registers`, `vram` or `instance_memory`.
    pub role: String,
    /// Device-memory address of the BAR's first byte in the part's layout, i.e. in the
    /// guest's VRAM (VRAM BARs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vram_offset: Option<u64>,
    /// Host VRAM address of the BAR's first byte (`slice.start + vram_offset`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_vram_offset: Option<u64>,
    /// Real size of the backing.
    pub real_size: u64,
    /// Size the guest sees (a power of two).
    pub presented_size: u64,
    /// `presented_size - real_size`: reads ~0, writes dropped.
    pub padding: u64,
    /// 64-bit BAR.
    pub is_64bit: bool,
    /// Prefetchable BAR.
    pub prefetchable: bool,
    /// Areas QEMU maps directly into the guest.
    pub mappable: Vec<RangeLayout>,
    /// Areas served by the backend, with the reason.
    pub trapped: Vec<TrappedLayout>,
}

/// MSI-X capability.
#[derive(Debug, Clone, Serialize)]
pub struct MsixLayout {
    /// Vectors.
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Table offset in that BAR.
    pub table_offset: u32,
    /// BAR holding the pending bit array.
    pub pba_bar: u8,
    /// PBA offset in that BAR.
    pub pba_offset: u32,
}

impl FunctionLayout {
    /// Describes `function`.
    pub fn of(function: &PresentedFunction) -> Self {
        let identity = function.identity();
        let msix = function.msix();
        let guest = function.guest();
        let map = function.bar0().map_or_else(
            || RegisterMap::for_generation(identity.generation),
            |bar0| bar0.register_map().clone(),
        );
        FunctionLayout {
            chip: ChipLayout {
                name: identity.name.clone(),
                description: identity.description.clone(),
                generation: identity.generation.to_string(),
                boot0: identity.boot0,
                boot42: identity.boot42,
                vram_size: identity.vram_size,
            },
            pci: PciLayout {
                vendor_id: identity.pci.vendor_id,
                device_id: identity.pci.device_id,
                subsystem_vendor_id: identity.pci.subsystem_vendor_id,
                subsystem_id: identity.pci.subsystem_id,
                class_code: identity.pci.class_code,
                revision: identity.pci.revision,
            },
            slice: SliceLayout {
                start: guest.slice().start().raw(),
                size: guest.slice().size(),
                whole_gpu: guest.is_whole_gpu(),
                bar1_window: guest.bar1_window().map(|va| va.raw()),
            },
            bars: function
                .bars()
                .iter()
                .map(|bar| bar_layout(bar, &map, guest.is_whole_gpu(), identity))
                .collect(),
            unlisted_registers: map.mode().default_treatment().label().to_owned(),
            registers: map
                .rules()
                .iter()
                .map(|r| RegisterLayout {
                    name: r.name.to_owned(),
                    offset: r.offset,
                    size: r.size,
                    treatment: r.treatment.label().to_owned(),
                    note: r.note.to_owned(),
                })
                .collect(),
            msix: msix.map(|msix| MsixLayout {
                vectors: msix.vectors,
                table_bar: msix.table_bar,
                table_offset: msix.table_offset,
                pba_bar: msix.pba_bar,
                pba_offset: msix.pba_offset,
            }),
        }
    }

    /// The BAR at slot `index`.
    pub fn bar(&self, index: u8) -> Option<&BarLayout> {
        self.bars.iter().find(|bar| bar.index == index)
    }
}

/// BAR0's trapped ranges, precisely: the page holding the window register, the PRAMIN
/// aperture, the MSI-X table and PBA, and the register space around them (served per the
/// register table), covering the BAR in order.
fn bar0_trapped(map: &RegisterMap, real: u64) -> Vec<TrappedLayout> {
    const PAGE: u64 = 4096;
    let mut special: Vec<(u64, u64, String)> = Vec::new();
    if let Some(w) = map.emulated(Emulated::WindowRegister) {
        special.push((
            w.offset - w.offset % PAGE,
            PAGE,
            format!(
                "window register page: {} at {:#x} virtualised per guest (base relative to the guest's VRAM)",
                w.name, w.offset
            ),
        ));
    }
    special.push((
        APERTURE_START,
        APERTURE_SIZE,
        "PRAMIN aperture: the guest's VRAM under its window, through the host PRAMIN; past it reads ~0".to_owned(),
    ));
    for (kind, what) in [
        (Emulated::MsixTable, "MSI-X table"),
        (Emulated::MsixPba, "MSI-X PBA"),
    ] {
        if let Some(r) = map.emulated(kind) {
            special.push((r.offset, r.size, what.to_owned()));
        }
    }
    special.sort_by_key(|s| s.0);
    let registers = match map.mode() {
        RegisterMode::Sliced => {
            let passed: Vec<String> = map
                .rules()
                .iter()
                .filter(|r| r.treatment == Treatment::PassRead)
                .map(|r| format!("{:#x}", r.offset))
                .collect();
            format!(
                "registers per the register table: reads of {} passed, the rest hidden",
                passed.join("/")
            )
        }
        RegisterMode::WholeGpu => {
            "registers passed to the host GPU, reads and writes (whole-GPU mode)".to_owned()
        }
    };
    let mut out = Vec::new();
    let mut at = 0;
    for (offset, size, reason) in special {
        if offset > at {
            out.push(TrappedLayout {
                offset: at,
                size: offset - at,
                reason: registers.clone(),
            });
        }
        out.push(TrappedLayout {
            offset,
            size,
            reason,
        });
        at = offset + size;
    }
    if at < real {
        out.push(TrappedLayout {
            offset: at,
            size: real - at,
            reason: registers,
        });
    }
    out
}

fn bar_layout(
    bar: &super::function::PresentedBar,
    map: &RegisterMap,
    whole_gpu: bool,
    identity: &crate::host_gpu::ChipIdentity,
) -> BarLayout {
    let (role, vram_offset) = match bar.role() {
        HostBarRole::Registers => ("registers", None),
        HostBarRole::Vram { vram_offset } => ("vram", Some(vram_offset)),
        HostBarRole::InstanceMemory => ("instance_memory", None),
    };
    let real = bar.real_size();
    let presented = bar.presented_size();
    let mapped = bar.mappable().map(|(area, _)| area);
    let mappable: Vec<RangeLayout> = mapped
        .iter()
        .map(|area| RangeLayout {
            offset: area.offset,
            size: area.size,
        })
        .collect();
    let mapped_end = mapped.map_or(0, |area| area.offset + area.size);
    let mut trapped = Vec::new();
    if bar.role() == HostBarRole::Registers {
        trapped = bar0_trapped(map, real);
    } else if mapped_end < real {
        let bar1_aperture = identity
            .bar1_aperture()
            .is_some_and(|aperture| aperture.index == bar.index());
        let via = match (whole_gpu, bar1_aperture) {
            (false, _) => " via the guest's BAR1 window",
            (true, true) => " via the host BAR1 aperture (translated in virtual mode)",
            (true, false) => "",
        };
        let reason = if mapped_end == 0 {
            format!("real memory (no mappable fd){via}")
        } else {
            format!("real memory, partial last page{via}")
        };
        trapped.push(TrappedLayout {
            offset: mapped_end,
            size: real - mapped_end,
            reason,
        });
    }
    if presented > real {
        trapped.push(TrappedLayout {
            offset: real,
            size: presented - real,
            reason: "padding (reads ~0, writes dropped)".to_owned(),
        });
    }
    BarLayout {
        index: bar.index(),
        role: role.to_owned(),
        vram_offset,
        host_vram_offset: bar.host_vram().map(|a| a.raw()),
        real_size: real,
        presented_size: presented,
        padding: presented - real,
        is_64bit: bar.is_64bit(),
        prefetchable: bar.prefetchable(),
        mappable,
        trapped,
    }
}
