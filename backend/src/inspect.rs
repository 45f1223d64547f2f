//! Human-readable rendering of a [`FunctionLayout`] (`gpu-backend inspect`), and the layout
//! of a GPU sliced between several guests ([`SlicedLayout`]).

use std::io::{self, Write};

pub use crate::units::human_size;

use serde::Serialize;

use crate::presentation::layout::{BarLayout, FunctionLayout, RangeLayout};
use crate::slice::SlicedGpu;

/// One guest of a sliced GPU: its socket and what it sees.
#[derive(Debug, Clone, Serialize)]
pub struct GuestLayout {
    /// The socket it is served on (absent for `--slice-size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// The vhost-user socket of its display, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// The presented function (chip, PCI, slice, BARs, MSI-X, registers).
    #[serde(flatten)]
    pub function: FunctionLayout,
}

/// How host VRAM is partitioned.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionLayout {
    /// Device memory.
    pub vram_size: u64,
    /// Usable device memory.
    pub usable_vram_size: u64,
    /// Where slices are carved: `[0, guest_area_end)`.
    pub guest_area_end: u64,
    /// The host-reserved region (BAR1 page tables and instance block).
    pub host_reserved: RangeLayout,
    /// Guest-area bytes not handed out.
    pub free: u64,
    /// Root page directory of the BAR1 address space.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bar1_root: Option<u64>,
    /// Instance block BAR1 is bound to (virtual mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bar1_instance_block: Option<u64>,
}

/// A GPU sliced between guests: the partition and every guest's function.
#[derive(Debug, Clone, Serialize)]
pub struct SlicedLayout {
    /// The partition.
    pub partition: PartitionLayout,
    /// The guests, in slice order.
    pub guests: Vec<GuestLayout>,
}

impl PartitionLayout {
    /// Describes `gpu`'s partition.
    pub fn of(gpu: &SlicedGpu) -> PartitionLayout {
        let p = gpu.partition();
        let reserved = p.host_reserved();
        let tables = gpu.vram().bar1_tables();
        PartitionLayout {
            vram_size: p.vram_size(),
            usable_vram_size: p.usable(),
            guest_area_end: p.guest_area_end(),
            host_reserved: RangeLayout {
                offset: reserved.start.raw(),
                size: reserved.len(),
            },
            free: p.free_bytes(),
            bar1_root: tables.map(|(root, _)| root.raw()),
            bar1_instance_block: tables.map(|(_, inst)| inst.raw()),
        }
    }
}

fn ranges(bar: &BarLayout) -> (String, String) {
    let mappable = if bar.mappable.is_empty() {
        "-".to_owned()
    } else {
        bar.mappable
            .iter()
            .map(|r| format!("[{:#x}, {:#x})", r.offset, r.offset + r.size))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let trapped = if bar.trapped.is_empty() {
        "-".to_owned()
    } else {
        bar.trapped
            .iter()
            .map(|r| format!("[{:#x}, {:#x}) {}", r.offset, r.offset + r.size, r.reason))
            .collect::<Vec<_>>()
            .join("; ")
    };
    (mappable, trapped)
}

/// Writes the layout as a table.
pub fn write_table(out: &mut impl Write, layout: &FunctionLayout) -> io::Result<()> {
    write_chip(out, layout)?;
    writeln!(out)?;
    write_function(out, layout)
}

/// Writes a sliced GPU: chip, partition, then each guest's function.
pub fn write_sliced_table(out: &mut impl Write, layout: &SlicedLayout) -> io::Result<()> {
    if let Some(first) = layout.guests.first() {
        write_chip(out, &first.function)?;
    }
    let p = &layout.partition;
    writeln!(
        out,
        "Guests    {} slice(s) in [0x0, {:#x}), {} free; host-reserved [{:#x}, {:#x}) ({}: BAR1 tables{})",
        layout.guests.len(),
        p.guest_area_end,
        human_size(p.free),
        p.host_reserved.offset,
        p.host_reserved.offset + p.host_reserved.size,
        human_size(p.host_reserved.size),
        p.bar1_root
            .map(|root| format!(", root {root:#x}"))
            .unwrap_or_default()
    )?;
    for (i, guest) in layout.guests.iter().enumerate() {
        writeln!(out)?;
        writeln!(
            out,
            "== guest {i}{}{}",
            guest
                .socket
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default(),
            guest
                .display
                .as_deref()
                .map(|d| format!(", display {d}"))
                .unwrap_or_default()
        )?;
        write_function(out, &guest.function)?;
    }
    Ok(())
}

fn write_chip(out: &mut impl Write, layout: &FunctionLayout) -> io::Result<()> {
    let chip = &layout.chip;
    let pci = &layout.pci;
    writeln!(
        out,
        "GPU       {} ({}, {})",
        chip.name, chip.description, chip.generation
    )?;
    writeln!(
        out,
        "BOOT_0    {:#010x}    BOOT_42 {:#010x}",
        chip.boot0, chip.boot42
    )?;
    writeln!(
        out,
        "PCI       {:04x}:{:04x} subsystem {:04x}:{:04x} class {:06x} rev {:02x}",
        pci.vendor_id,
        pci.device_id,
        pci.subsystem_vendor_id,
        pci.subsystem_id,
        pci.class_code,
        pci.revision
    )?;
    writeln!(
        out,
        "VRAM      {} ({} bytes)",
        human_size(chip.vram_size),
        chip.vram_size
    )
}

fn write_function(out: &mut impl Write, layout: &FunctionLayout) -> io::Result<()> {
    let slice = &layout.slice;
    let how = match slice.bar1_window {
        _ if slice.whole_gpu => "whole GPU: no host-reserved region, host BAR1 physical".to_owned(),
        Some(va) => format!("BAR1 window at VA {va:#x}"),
        None => String::new(),
    };
    writeln!(
        out,
        "Slice     host VRAM [{:#x}, {:#x}) = guest VRAM [0x0, {:#x}), {} ({how})",
        slice.start,
        slice.start + slice.size,
        slice.size,
        human_size(slice.size)
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<5} {:<16} {:>12} {:>12} {:>12}  {:<7} {:<30} trapped (served over the socket)",
        "BAR", "role", "real", "presented", "padding", "type", "mappable (direct)"
    )?;
    for bar in &layout.bars {
        let (mappable, trapped) = if bar.role == "registers" {
            let (mappable, _) = ranges(bar);
            (
                mappable,
                format!("[0x0, {:#x}) all of BAR0 (ranges below)", bar.real_size),
            )
        } else {
            ranges(bar)
        };
        let kind = format!(
            "{}{}",
            if bar.is_64bit { "64" } else { "32" },
            if bar.prefetchable { ",pf" } else { "" }
        );
        writeln!(
            out,
            "{:<5} {:<16} {:>12} {:>12} {:>12}  {:<7} {:<30} {}",
            format!("BAR{}", bar.index),
            bar.role,
            human_size(bar.real_size),
            human_size(bar.presented_size),
            human_size(bar.padding),
            kind,
            mappable,
            trapped
        )?;
    }
    for bar in layout.bars.iter().filter(|b| b.role == "registers") {
        writeln!(out)?;
        writeln!(
            out,
            "BAR{} trapped ranges (served over the socket):",
            bar.index
        )?;
        for r in &bar.trapped {
            writeln!(
                out,
                "  {:<26} {}",
                format!("[{:#x}, {:#x})", r.offset, r.offset + r.size),
                r.reason
            )?;
        }
    }
    writeln!(out)?;
    match &layout.msix {
        Some(msix) => writeln!(
            out,
            "MSI-X     {} vectors, table BAR{} +{:#x}, PBA BAR{} +{:#x}",
            msix.vectors, msix.table_bar, msix.table_offset, msix.pba_bar, msix.pba_offset
        )?,
        None => writeln!(out, "MSI-X     none (INTx only)")?,
    }
    Ok(())
}
