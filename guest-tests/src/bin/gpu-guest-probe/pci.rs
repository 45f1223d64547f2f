//! PCI discovery through sysfs (`/sys/bus/pci/devices/<bdf>/{vendor,device,class,resource}`).

use std::fs;
use std::io;
use std::path::PathBuf;

const SYSFS_PCI: &str = "/sys/bus/pci/devices";

/// `IORESOURCE_MEM`: a memory BAR.
pub const IORESOURCE_MEM: u64 = 0x200;

/// One PCI function as seen in sysfs.
#[derive(Debug, Clone)]
pub struct PciDevice {
    /// Bus/device/function, e.g. `0000:00:05.0`.
    pub bdf: String,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// 24-bit class code.
    pub class: u32,
}

/// One line of the sysfs `resource` file.
#[derive(Debug, Clone, Copy)]
pub struct Bar {
    /// Resource index (0-5 BARs, 6 expansion ROM).
    pub index: usize,
    /// Physical start address (0 if unassigned).
    pub start: u64,
    /// Size in bytes (0 if the BAR does not exist).
    pub size: u64,
    /// Kernel `IORESOURCE_*` flags.
    pub flags: u64,
}

impl Bar {
    /// True for a memory BAR.
    pub fn is_mem(&self) -> bool {
        self.flags & IORESOURCE_MEM != 0
    }
}

impl PciDevice {
    /// Sysfs directory of this function.
    pub fn dir(&self) -> PathBuf {
        PathBuf::from(SYSFS_PCI).join(&self.bdf)
    }

    /// Path of the `resourceN` file of BAR `index`.
    pub fn resource_path(&self, index: usize) -> String {
        format!("{SYSFS_PCI}/{}/resource{index}", self.bdf)
    }

    /// Read the BARs (only non-empty entries, ROM included as index 6).
    pub fn bars(&self) -> io::Result<Vec<Bar>> {
        let text = fs::read_to_string(self.dir().join("resource"))?;
        let mut bars = Vec::new();
        for (index, line) in text.lines().enumerate().take(7) {
            let mut it = line.split_whitespace().map(parse_hex);
            let (Some(Some(start)), Some(Some(end)), Some(Some(flags))) =
                (it.next(), it.next(), it.next())
            else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad resource line {line:?}"),
                ));
            };
            if end == 0 && start == 0 {
                continue;
            }
            let size = end.wrapping_sub(start).wrapping_add(1);
            bars.push(Bar {
                index,
                start,
                size,
                flags,
            });
        }
        Ok(bars)
    }
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

fn read_hex(dir: &std::path::Path, name: &str) -> io::Result<u64> {
    let text = fs::read_to_string(dir.join(name))?;
    parse_hex(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad {name}: {text:?}")))
}

/// All PCI functions, sorted by address.
pub fn list() -> io::Result<Vec<PciDevice>> {
    let mut devs = Vec::new();
    for entry in fs::read_dir(SYSFS_PCI)? {
        let entry = entry?;
        let dir = entry.path();
        let bdf = entry.file_name().to_string_lossy().into_owned();
        devs.push(PciDevice {
            bdf,
            vendor: read_hex(&dir, "vendor")? as u16,
            device: read_hex(&dir, "device")? as u16,
            class: read_hex(&dir, "class")? as u32,
        });
    }
    devs.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    Ok(devs)
}
