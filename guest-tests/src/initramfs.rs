//! A minimal initramfs writer: the "newc" cpio format (what the kernel unpacks), gzip-compressed,
//! plus the guest image used by the tests (busybox, the probe, a tiny `/init`).

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;

use crate::error::{IoContext, Result};

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// An in-memory newc cpio archive.
///
/// Entries are written in the order they are added; parent directories must be added before
/// their contents. Timestamps and owners are zero so that the archive is reproducible.
#[derive(Default)]
pub struct CpioArchive {
    data: Vec<u8>,
    next_ino: u32,
    finished: bool,
}

impl CpioArchive {
    /// An empty archive.
    pub fn new() -> Self {
        CpioArchive {
            data: Vec::new(),
            next_ino: 1,
            finished: false,
        }
    }

    /// The start every guest image shares: the directories `dirs` (mode 0755), the console,
    /// `/dev/null` and the serial port's device nodes, and the static `busybox` as
    /// `/bin/busybox`.
    pub fn with_busybox(dirs: &[&str], busybox: &[u8]) -> Self {
        let mut a = CpioArchive::new();
        for d in dirs {
            a.dir(d, 0o755);
        }
        a.char_dev("dev/console", 0o600, 5, 1)
            .char_dev("dev/null", 0o666, 1, 3)
            .char_dev("dev/ttyS0", 0o600, 4, 64)
            .file("bin/busybox", 0o755, busybox);
        a
    }

    fn pad4(&mut self) {
        while self.data.len() % 4 != 0 {
            self.data.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        assert!(!self.finished, "entry added after finish()");
        let name = name.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFMT == S_IFDIR { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            body.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad4();
        self.data.extend_from_slice(body);
        self.pad4();
    }

    /// Add a directory.
    pub fn dir(&mut self, path: &str, perm: u32) -> &mut Self {
        self.entry(path, S_IFDIR | (perm & 0o7777), (0, 0), &[]);
        self
    }

    /// Add a regular file.
    pub fn file(&mut self, path: &str, perm: u32, contents: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | (perm & 0o7777), (0, 0), contents);
        self
    }

    /// Add a symbolic link `path -> target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes());
        self
    }

    /// Add a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.entry(path, S_IFCHR | (perm & 0o7777), (major, minor), &[]);
        self
    }

    /// Append the trailer and return the archive bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.finished = true;
        self.data
    }
}

/// Gzip `data` (what the kernel expects for a compressed initramfs).
pub fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::with_capacity(data.len() / 2), Compression::new(6));
    enc.write_all(data)?;
    enc.finish()
}

/// Busybox applets linked into `/bin` of the guest image.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "mount", "umount", "devmem", "poweroff", "reboot", "sync", "cat", "ls", "echo", "dmesg",
    "hexdump", "lspci", "sleep", "grep", "setsid", "cttyhack", "mkdir", "head", "dd", "od",
];

/// Kernel command-line word that makes `/init` start a shell after the probe instead of
/// powering off (interactive use, e.g. from `qemu-configs/gpu-vfio-user.sh`).
pub const SHELL_PARAM: &str = "gpuprobe.shell=1";

/// Kernel command-line word that makes `/init` wait for the GPU to be hot-plugged before the
/// probe runs, and for it to be unplugged afterwards (see [`INIT_SCRIPT`]).
pub const HOTPLUG_PARAM: &str = "gpuprobe.hotplug=1";

/// The marker of `/init`'s own lines in hot-plug mode.
pub const HOTPLUG_MARK: &str = "GPUHOTPLUG";

/// The `/init` script of the guest image. The probe powers the machine off itself; the lines
/// after it only run if it died without doing so.
///
/// With [`HOTPLUG_PARAM`], `/init` prints `GPUHOTPLUG ready`, waits (at most 120 s) until a
/// function of vendor 0x10de is on the PCI bus (`GPUHOTPLUG appeared after_ms=..`; the kernel
/// found it through the hot-plug event, nothing rescans), enables its memory decoding through
/// sysfs as a driver would (`GPUHOTPLUG enabled bdf=..`; firmware enabled the functions present
/// at boot, nobody enables a hot-plugged one), runs the probe without powering off
/// (`GPUHOTPLUG probe_rc=..`), then waits (at most 120 s) until the function is gone
/// (`GPUHOTPLUG gone after_ms=..` or `GPUHOTPLUG still_there`) and powers off.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
if /bin/busybox grep -q 'gpuprobe.hotplug=1' /proc/cmdline; then
    has_gpu() { /bin/busybox grep -q 0x10de /sys/bus/pci/devices/*/vendor 2>/dev/null; }
    echo "GPUHOTPLUG ready"
    i=0
    while ! has_gpu && [ $i -lt 1200 ]; do /bin/busybox sleep 0.1; i=$((i + 1)); done
    if has_gpu; then
        echo "GPUHOTPLUG appeared after_ms=$((i * 100))"
        # No driver enables a hot-plugged function's memory decoding: do what one would.
        for d in /sys/bus/pci/devices/*; do
            if /bin/busybox grep -q 0x10de $d/vendor; then
                echo 1 >$d/enable && echo "GPUHOTPLUG enabled bdf=${d##*/}"
            fi
        done
        /bin/gpu-guest-probe --no-poweroff
        echo "GPUHOTPLUG probe_rc=$?"
        i=0
        while has_gpu && [ $i -lt 1200 ]; do /bin/busybox sleep 0.1; i=$((i + 1)); done
        if has_gpu; then echo "GPUHOTPLUG still_there"; else echo "GPUHOTPLUG gone after_ms=$((i * 100))"; fi
    else
        echo "GPUHOTPLUG never_appeared"
    fi
    /bin/busybox sync
    /bin/busybox poweroff -f
fi
if /bin/busybox grep -q 'gpuprobe.shell=1' /proc/cmdline; then
    /bin/gpu-guest-probe --no-poweroff
    echo "gpu-guest-probe exited with status $?; starting a shell (poweroff -f to quit)"
    /bin/busybox --install -s /bin
    exec /bin/busybox setsid /bin/busybox cttyhack /bin/sh
fi
/bin/gpu-guest-probe
rc=$?
echo "GPUPROBE check name=probe_exit result=fail detail=gpu-guest-probe exited with status $rc without powering off"
echo "GPUPROBE done pass=0 fail=1 skip=0"
/bin/busybox sync
/bin/busybox poweroff -f
"#;

/// Build the guest image archive (uncompressed cpio) from a static busybox and the probe.
pub fn guest_archive(busybox: &[u8], probe: &[u8]) -> Vec<u8> {
    let mut a = CpioArchive::with_busybox(&["bin", "dev", "proc", "sys", "tmp", "root"], busybox);
    a.char_dev("dev/mem", 0o640, 1, 1);
    for applet in BUSYBOX_APPLETS {
        a.symlink(&format!("bin/{applet}"), "busybox");
    }
    a.file("bin/gpu-guest-probe", 0o755, probe);
    a.file("init", 0o755, INIT_SCRIPT.as_bytes());
    a.finish()
}

/// Name of the symlink in the harness directory pointing at the newest guest initramfs.
pub const LATEST_INITRAMFS: &str = "initramfs-latest.cpio.gz";

/// 64-bit FNV-1a, used to name content-addressed files.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Write the gzip-compressed guest initramfs into `dir` as `initramfs-<hash>.cpio.gz` (content
/// addressed, written through a temporary file and renamed, so concurrent writers are safe) and
/// return its path.
pub fn write_guest_initramfs(busybox: &Path, probe: &Path, dir: &Path) -> Result<PathBuf> {
    let bb = std::fs::read(busybox).ctx(|| format!("reading {}", busybox.display()))?;
    let pr = std::fs::read(probe).ctx(|| format!("reading {}", probe.display()))?;
    let gz = gzip(&guest_archive(&bb, &pr)).ctx(|| "compressing the initramfs".into())?;
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("initramfs-{:016x}.cpio.gz", fnv1a(&gz)));
    if !path.exists() {
        let tmp = dir.join(format!(".initramfs.tmp.{}", std::process::id()));
        std::fs::write(&tmp, &gz).ctx(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).ctx(|| format!("renaming to {}", path.display()))?;
    }
    // A stable name for manual use (qemu-configs/gpu-vfio-user.sh --initrd ...), replaced
    // atomically; best effort.
    if let Some(name) = path.file_name() {
        let link_tmp = dir.join(format!(".initramfs-link.tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&link_tmp);
        if std::os::unix::fs::symlink(name, &link_tmp).is_ok() {
            let _ = std::fs::rename(&link_tmp, dir.join(LATEST_INITRAMFS));
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walk a newc archive and return (name, mode, body) of each entry.
    fn parse(data: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        let hex = |b: &[u8]| u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
        loop {
            assert_eq!(&data[pos..pos + 6], b"070701", "magic at {pos}");
            let field = |i: usize| hex(&data[pos + 6 + 8 * i..pos + 14 + 8 * i]);
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name_start = pos + 110;
            let name = std::str::from_utf8(&data[name_start..name_start + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(data[name_start + namesize - 1], 0);
            let body_start = (name_start + namesize).next_multiple_of(4);
            let body = data[body_start..body_start + size].to_vec();
            pos = (body_start + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(pos, data.len());
                return out;
            }
            out.push((name, mode, body));
        }
    }

    #[test]
    fn newc_layout_round_trips() {
        let mut a = CpioArchive::new();
        a.dir("/bin", 0o755)
            .file("bin/x", 0o755, b"hello")
            .symlink("bin/sh", "busybox")
            .char_dev("dev/console", 0o600, 5, 1);
        let data = a.finish();
        assert_eq!(data.len() % 4, 0);
        let entries = parse(&data);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/x", "bin/sh", "dev/console"]);
        assert_eq!(entries[1].1, S_IFREG | 0o755);
        assert_eq!(entries[1].2, b"hello");
        assert_eq!(entries[2].2, b"busybox");
        assert_eq!(entries[3].1, S_IFCHR | 0o600);
        // rdevmajor/rdevminor of dev/console are fields 9 and 10 of its header.
        let hdr = data.windows(11).position(|w| w == b"dev/console").unwrap() - 110;
        assert_eq!(
            &data[hdr + 6 + 8 * 9..hdr + 6 + 8 * 11],
            b"0000000500000001"
        );
    }

    #[test]
    fn guest_archive_has_init_and_probe() {
        let data = guest_archive(b"BB", b"PROBE");
        let entries = parse(&data);
        let find = |n: &str| {
            entries
                .iter()
                .find(|e| e.0 == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        assert_eq!(find("init").2, INIT_SCRIPT.as_bytes());
        // The words the harness relies on are the ones the script uses.
        for word in [HOTPLUG_PARAM, SHELL_PARAM, &format!("{HOTPLUG_MARK} ready")] {
            assert!(INIT_SCRIPT.contains(word), "{word}");
        }
        assert_eq!(find("bin/gpu-guest-probe").2, b"PROBE");
        assert_eq!(find("bin/devmem").2, b"busybox");
        let gz = gzip(&data).unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    }
}
