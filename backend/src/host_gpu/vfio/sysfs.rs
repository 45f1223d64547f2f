//! What sysfs says about a PCI function before anything touches it: that it exists, is
//! NVIDIA's, is bound to vfio-pci, and sits in a viable IOMMU group.
//!
//! Every check names the device and says what to do, because the person reading the error
//! is about to type a bind command. The kernel repeats the viability check when the group is
//! opened (`VFIO_GROUP_GET_STATUS`); doing it here first lets the error list the members
//! that are in the way.

use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::address::PciAddress;

/// NVIDIA's PCI vendor id.
pub const NVIDIA_VENDOR_ID: u16 = 0x10de;

/// Drivers a group member may be bound to without making the group unusable for VFIO:
/// vfio-pci itself, PCI-PCI bridges' port driver and pci-stub (the kernel's own allowance).
const HARMLESS_DRIVERS: &[&str] = &["pcieport", "pci-stub"];

/// Why a PCI function cannot be driven through VFIO.
#[derive(Debug, Error)]
pub enum SysfsError {
    /// No such PCI function.
    #[error("no PCI device {address} ({path} does not exist); `lspci -D` lists the PCI functions")]
    NoSuchDevice {
        /// The address asked for.
        address: PciAddress,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// Not an NVIDIA function.
    #[error(
        "{address} is not an NVIDIA GPU: vendor {vendor:#06x}, device {device:#06x} (NVIDIA is \
         {NVIDIA_VENDOR_ID:#06x})"
    )]
    NotNvidia {
        /// The device.
        address: PciAddress,
        /// Its vendor id.
        vendor: u16,
        /// Its device id.
        device: u16,
    },
    /// Bound to another driver, or to none.
    #[error(
        "{address} is {}, not to vfio-pci; bind it with:\n  {}",
        match driver { Some(d) => format!("bound to {d}"), None => "not bound to any driver".to_owned() },
        bind_commands(*address, driver.is_some())
    )]
    NotBoundToVfio {
        /// The device.
        address: PciAddress,
        /// The driver it is bound to, if any.
        driver: Option<String>,
    },
    /// No IOMMU group: the IOMMU is off.
    #[error(
        "{address} has no IOMMU group: the IOMMU is off (boot with intel_iommu=on or \
         amd_iommu=on); VFIO without an IOMMU (noiommu) is not supported"
    )]
    NoIommuGroup {
        /// The device.
        address: PciAddress,
    },
    /// A no-IOMMU group: DMA would be unprotected.
    #[error(
        "{address} is in VFIO no-IOMMU group {group}: not supported (the device could DMA \
         anywhere); boot with the IOMMU enabled"
    )]
    NoIommuMode {
        /// The device.
        address: PciAddress,
        /// The group.
        group: u32,
    },
    /// Another member of the group is bound to a host driver.
    #[error(
        "IOMMU group {group} of {address} is not viable: {} (every device of the group must be \
         bound to vfio-pci or unbound; bind them with the same commands as {address})",
        blockers.iter().map(|(a, d)| format!("{a} is bound to {d}")).collect::<Vec<_>>().join(", ")
    )]
    GroupNotViable {
        /// The device.
        address: PciAddress,
        /// The group.
        group: u32,
        /// Members bound to drivers that keep the group from VFIO: (address, driver).
        blockers: Vec<(String, String)>,
    },
    /// The group's character device is missing.
    #[error("{path} does not exist: is the vfio-pci module loaded, and is /dev mounted?")]
    NoGroupDevice {
        /// The missing path.
        path: PathBuf,
    },
    /// A sysfs attribute could not be read or parsed.
    #[error("reading {path}: {reason}")]
    Attribute {
        /// The attribute file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

fn bind_commands(address: PciAddress, bound: bool) -> String {
    let dev = format!("/sys/bus/pci/devices/{address}");
    let mut steps = vec![
        "modprobe vfio-pci".to_owned(),
        format!("echo vfio-pci > {dev}/driver_override"),
    ];
    if bound {
        steps.push(format!("echo {address} > {dev}/driver/unbind"));
    }
    steps.push(format!("echo {address} > /sys/bus/pci/drivers_probe"));
    steps.join("\n  ")
}

/// A PCI function that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioCandidate {
    /// The address.
    pub address: PciAddress,
    /// Its sysfs directory (what `vfio-ioctls` opens the device by).
    pub sysfs_path: PathBuf,
    /// Its IOMMU group.
    pub group: u32,
    /// PCI vendor id (NVIDIA).
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
}

/// A sysfs tree (`/sys` on a real system; any directory laid out the same way in tests),
/// and the `/dev` the group devices live in.
#[derive(Debug, Clone)]
pub struct Sysfs {
    sys: PathBuf,
    dev: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Sysfs {
        Sysfs::at("/sys", "/dev")
    }
}

impl Sysfs {
    /// A sysfs tree at `sys`, with device nodes under `dev`.
    pub fn at(sys: impl Into<PathBuf>, dev: impl Into<PathBuf>) -> Sysfs {
        Sysfs {
            sys: sys.into(),
            dev: dev.into(),
        }
    }

    fn device_dir(&self, address: PciAddress) -> PathBuf {
        self.sys.join("bus/pci/devices").join(address.to_string())
    }

    /// Checks, in order, that `address` exists, is NVIDIA's, is bound to vfio-pci and is in
    /// a viable IOMMU group whose device node exists. Nothing is opened or written.
    pub fn check(&self, address: PciAddress) -> Result<VfioCandidate, SysfsError> {
        let dir = self.device_dir(address);
        if !dir.is_dir() {
            return Err(SysfsError::NoSuchDevice { address, path: dir });
        }
        let vendor = read_hex_u16(&dir.join("vendor"))?;
        let device = read_hex_u16(&dir.join("device"))?;
        if vendor != NVIDIA_VENDOR_ID {
            return Err(SysfsError::NotNvidia {
                address,
                vendor,
                device,
            });
        }
        let driver = link_name(&dir.join("driver"));
        if !driver.as_deref().is_some_and(is_vfio_driver) {
            return Err(SysfsError::NotBoundToVfio { address, driver });
        }
        let group =
            link_name(&dir.join("iommu_group")).ok_or(SysfsError::NoIommuGroup { address })?;
        let group_path = dir.join("iommu_group");
        let group: u32 = group.parse().map_err(|_| SysfsError::Attribute {
            path: group_path.clone(),
            reason: format!("group name {group:?} is not a number"),
        })?;
        let group_dir = self.sys.join("kernel/iommu_groups").join(group.to_string());
        if fs::read_to_string(group_dir.join("name")).is_ok_and(|n| n.trim() == "vfio-noiommu") {
            return Err(SysfsError::NoIommuMode { address, group });
        }
        let blockers = self.group_blockers(&group_dir)?;
        if !blockers.is_empty() {
            return Err(SysfsError::GroupNotViable {
                address,
                group,
                blockers,
            });
        }
        let node = self.dev.join("vfio").join(group.to_string());
        if !node.exists() {
            return Err(SysfsError::NoGroupDevice { path: node });
        }
        Ok(VfioCandidate {
            address,
            sysfs_path: dir,
            group,
            vendor,
            device,
        })
    }

    /// Members of the group bound to a driver that keeps the group from VFIO.
    fn group_blockers(&self, group_dir: &Path) -> Result<Vec<(String, String)>, SysfsError> {
        let members = group_dir.join("devices");
        let entries = fs::read_dir(&members).map_err(|e| SysfsError::Attribute {
            path: members.clone(),
            reason: e.to_string(),
        })?;
        let mut blockers = Vec::new();
        for entry in entries.flatten() {
            let member = entry.file_name().to_string_lossy().into_owned();
            if let Some(driver) = link_name(&entry.path().join("driver")) {
                if !is_vfio_driver(&driver) && !HARMLESS_DRIVERS.contains(&driver.as_str()) {
                    blockers.push((member, driver));
                }
            }
        }
        blockers.sort();
        Ok(blockers)
    }
}

/// vfio-pci and its variant drivers (`nvgrace-gpu-vfio-pci`, ...).
fn is_vfio_driver(name: &str) -> bool {
    name == "vfio-pci" || name.ends_with("-vfio-pci") || name.ends_with("_vfio_pci")
}

/// The last component of the symlink at `path`, if it is one.
fn link_name(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// A sysfs hex attribute such as `vendor` (`0x10de\n`).
fn read_hex_u16(path: &Path) -> Result<u16, SysfsError> {
    let text = fs::read_to_string(path).map_err(|e| SysfsError::Attribute {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let trimmed = text.trim();
    let digits = trimmed.strip_prefix("0x").unwrap_or(trimmed);
    u16::from_str_radix(digits, 16).map_err(|_| SysfsError::Attribute {
        path: path.to_owned(),
        reason: format!("{trimmed:?} is not a 16-bit hex number"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake `/sys` + `/dev` under a temporary directory.
    struct FakeSys {
        root: PathBuf,
    }

    impl FakeSys {
        fn new(name: &str) -> FakeSys {
            let root = std::env::temp_dir()
                .join(format!("gpu-backend-sysfs-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
            fs::create_dir_all(root.join("sys/bus/pci/drivers")).unwrap();
            fs::create_dir_all(root.join("dev/vfio")).unwrap();
            FakeSys { root }
        }

        fn sysfs(&self) -> Sysfs {
            Sysfs::at(self.root.join("sys"), self.root.join("dev"))
        }

        /// Adds a function with ids, an optional driver and an optional group.
        fn add(
            &self,
            addr: &str,
            vendor: u16,
            device: u16,
            driver: Option<&str>,
            group: Option<u32>,
        ) {
            let dir = self.root.join("sys/bus/pci/devices").join(addr);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("vendor"), format!("{vendor:#06x}\n")).unwrap();
            fs::write(dir.join("device"), format!("{device:#06x}\n")).unwrap();
            if let Some(driver) = driver {
                let d = self.root.join("sys/bus/pci/drivers").join(driver);
                fs::create_dir_all(&d).unwrap();
                symlink(&d, dir.join("driver")).unwrap();
            }
            if let Some(group) = group {
                let g = self
                    .root
                    .join("sys/kernel/iommu_groups")
                    .join(group.to_string());
                fs::create_dir_all(g.join("devices")).unwrap();
                symlink(&g, dir.join("iommu_group")).unwrap();
                symlink(&dir, g.join("devices").join(addr)).unwrap();
                fs::write(self.root.join("dev/vfio").join(group.to_string()), b"").unwrap();
            }
        }
    }

    impl Drop for FakeSys {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    fn addr(text: &str) -> PciAddress {
        text.parse().unwrap()
    }

    #[test]
    fn a_bound_gpu_in_a_viable_group_passes() {
        let sys = FakeSys::new("ok");
        sys.add("0000:00:05.0", 0x10de, 0x2330, Some("vfio-pci"), Some(7));
        let found = sys.sysfs().check(addr("0000:00:05.0")).unwrap();
        assert_eq!(
            (found.group, found.vendor, found.device),
            (7, 0x10de, 0x2330)
        );
        assert!(found.sysfs_path.ends_with("0000:00:05.0"));
    }

    #[test]
    fn a_missing_device_is_named() {
        let sys = FakeSys::new("missing");
        let e = sys.sysfs().check(addr("0000:00:06.0")).unwrap_err();
        assert!(matches!(e, SysfsError::NoSuchDevice { .. }), "{e}");
        assert!(e.to_string().contains("0000:00:06.0"), "{e}");
    }

    #[test]
    fn a_non_nvidia_device_is_refused_before_its_driver_is_looked_at() {
        let sys = FakeSys::new("vendor");
        sys.add("0000:00:02.0", 0x8086, 0x1234, Some("vfio-pci"), Some(3));
        let e = sys.sysfs().check(addr("0000:00:02.0")).unwrap_err();
        assert!(
            matches!(e, SysfsError::NotNvidia { vendor: 0x8086, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("0x8086"), "{e}");
    }

    #[test]
    fn not_bound_gives_the_bind_commands() {
        let sys = FakeSys::new("unbound");
        sys.add("0000:01:00.0", 0x10de, 0x1e02, Some("nouveau"), Some(1));
        sys.add("0000:02:00.0", 0x10de, 0x1e02, None, Some(2));
        let e = sys.sysfs().check(addr("0000:01:00.0")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("bound to nouveau"), "{text}");
        assert!(text.contains("driver_override"), "{text}");
        assert!(text.contains("driver/unbind"), "{text}");
        let e = sys.sysfs().check(addr("0000:02:00.0")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("not bound to any driver"), "{text}");
        assert!(!text.contains("unbind"), "{text}");
    }

    #[test]
    fn variant_drivers_count_as_vfio() {
        let sys = FakeSys::new("variant");
        sys.add(
            "0009:01:00.0",
            0x10de,
            0x2342,
            Some("nvgrace-gpu-vfio-pci"),
            Some(4),
        );
        assert!(sys.sysfs().check(addr("0009:01:00.0")).is_ok());
    }

    #[test]
    fn no_group_means_no_iommu() {
        let sys = FakeSys::new("nogroup");
        sys.add("0000:00:05.0", 0x10de, 0x2330, Some("vfio-pci"), None);
        let e = sys.sysfs().check(addr("0000:00:05.0")).unwrap_err();
        assert!(matches!(e, SysfsError::NoIommuGroup { .. }), "{e}");
        assert!(e.to_string().contains("intel_iommu=on"), "{e}");
    }

    #[test]
    fn a_group_member_on_a_host_driver_makes_it_not_viable() {
        let sys = FakeSys::new("viable");
        sys.add("0000:01:00.0", 0x10de, 0x1e02, Some("vfio-pci"), Some(9));
        // The GPU's audio function, still on the host's sound driver, and a bridge.
        sys.add(
            "0000:01:00.1",
            0x10de,
            0x10f7,
            Some("snd_hda_intel"),
            Some(9),
        );
        sys.add("0000:00:01.0", 0x8086, 0x1901, Some("pcieport"), Some(9));
        let e = sys.sysfs().check(addr("0000:01:00.0")).unwrap_err();
        match &e {
            SysfsError::GroupNotViable {
                group, blockers, ..
            } => {
                assert_eq!(*group, 9);
                assert_eq!(
                    blockers,
                    &[("0000:01:00.1".to_owned(), "snd_hda_intel".to_owned())]
                );
            }
            other => panic!("{other}"),
        }
        assert!(
            e.to_string()
                .contains("0000:01:00.1 is bound to snd_hda_intel"),
            "{e}"
        );
    }

    #[test]
    fn noiommu_groups_are_refused() {
        let sys = FakeSys::new("noiommu");
        sys.add("0000:00:05.0", 0x10de, 0x2330, Some("vfio-pci"), Some(0));
        fs::write(
            sys.root.join("sys/kernel/iommu_groups/0/name"),
            "vfio-noiommu\n",
        )
        .unwrap();
        let e = sys.sysfs().check(addr("0000:00:05.0")).unwrap_err();
        assert!(matches!(e, SysfsError::NoIommuMode { group: 0, .. }), "{e}");
    }

    #[test]
    fn a_missing_group_node_says_to_load_vfio_pci() {
        let sys = FakeSys::new("node");
        sys.add("0000:00:05.0", 0x10de, 0x2330, Some("vfio-pci"), Some(5));
        fs::remove_file(sys.root.join("dev/vfio/5")).unwrap();
        let e = sys.sysfs().check(addr("0000:00:05.0")).unwrap_err();
        assert!(matches!(e, SysfsError::NoGroupDevice { .. }), "{e}");
    }

    #[test]
    fn garbage_attributes_are_errors_not_panics() {
        let sys = FakeSys::new("garbage");
        sys.add("0000:00:05.0", 0x10de, 0x2330, Some("vfio-pci"), Some(5));
        let dir = sys.root.join("sys/bus/pci/devices/0000:00:05.0");
        fs::write(dir.join("vendor"), "not hex\n").unwrap();
        let e = sys.sysfs().check(addr("0000:00:05.0")).unwrap_err();
        assert!(matches!(e, SysfsError::Attribute { .. }), "{e}");
    }
}
