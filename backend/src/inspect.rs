//! Human-readable rendering of a [`FunctionLayout`] (`gpu-backend inspect`).

use std::io::{self, Write};

use crate::presentation::layout::{BarLayout, FunctionLayout};

/// Formats a byte count as `N GiB`/`N MiB`/`N KiB`/`N B`, with two decimals when inexact.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ];
    for (unit, scale) in UNITS {
        if bytes >= scale {
            return if bytes % scale == 0 {
                format!("{} {unit}", bytes / scale)
            } else {
                format!("{:.2} {unit}", bytes as f64 / scale as f64)
            };
        }
    }
    "0 B".to_owned()
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
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<5} {:<16} {:>12} {:>12} {:>12}  {:<7} {:<30} trapped (served over the socket)",
        "BAR", "role", "real", "presented", "padding", "type", "mappable (direct)"
    )?;
    for bar in &layout.bars {
        let (mappable, trapped) = ranges(bar);
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
    writeln!(out)?;
    writeln!(
        out,
        "MSI-X     {} vectors, table BAR{} +{:#x}, PBA BAR{} +{:#x}",
        layout.msix.vectors,
        layout.msix.table_bar,
        layout.msix.table_offset,
        layout.msix.pba_bar,
        layout.msix.pba_offset
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(128 << 30), "128 GiB");
        assert_eq!(human_size(95 << 30), "95 GiB");
        assert_eq!(human_size(16 << 20), "16 MiB");
        assert_eq!(human_size(1536 << 20), "1.50 GiB");
        assert_eq!(human_size(0), "0 B");
    }
}
