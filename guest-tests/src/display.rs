//! Display guests: boot a guest with a display device (the backend's `vhost-user-gpu-pci`, or
//! QEMU's own `virtio-gpu-pci` as a reference), wait until its `/init` drew its picture
//! ([`crate::display_image`]), take QEMU's screenshot over QMP and compare it with the picture
//! pixel by pixel, then stop the guest.
//!
//! ```no_run
//! use guest_tests::display::{start_display_guest, DisplayOptions, SETTLE_TIMEOUT};
//! use guest_tests::qemu::DisplayDevice;
//! let mut guest = start_display_guest(&DisplayOptions::new(DisplayDevice::QemuVirtioGpu, 1))?;
//! let drawn = guest.wait_drawn()?;
//! let shot = guest.screenshot_matching(&drawn, "screen", SETTLE_TIMEOUT)?;
//! assert!(shot.matches(), "{}", shot.verdict());
//! guest.finish()?;
//! # Ok::<(), guest_tests::HarnessError>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::display_image::{display_initramfs, AfterHold, DisplayParams, MARK};
use crate::error::{HarnessError, Result};
use crate::fb_pattern::FbPattern;
use crate::paths::{keep_runs, new_run_dir, new_socket_dir};
use crate::qemu::{DisplayDevice, QemuLab, VmConfig, VmOutcome};
use crate::screenshot::{Mismatch, RgbImage};
use crate::vm::{spawn_vm, RunningVm};

/// How long a boot may take until the picture is drawn (TCG: about 5 s unloaded; the
/// machine's two cores are shared by parallel tests).
pub const DRAW_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the host retries its screenshot until it shows the picture. The guest's write
/// reaches the device through the DRM fbdev emulation's damage worker (see `gpu-guest-fb`),
/// then the display side (the backend's UPDATE message, QEMU's console), none of which the
/// guest waits for: a bounded retry is robust where a fixed delay is not.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long QEMU may take to exit after `quit`.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two screenshots of [`DisplayGuest::screenshot_matching`].
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Options of one display guest.
#[derive(Clone, Debug)]
pub struct DisplayOptions {
    /// The display device.
    pub display: DisplayDevice,
    /// A vfio-user GPU to attach as well (the guest's GPU; the display is drawn without it).
    pub vfio_user_socket: Option<PathBuf>,
    /// Which picture the guest draws, and what it does after holding it.
    pub params: DisplayParams,
    /// Limit of each boot until its picture is drawn.
    pub draw_timeout: Duration,
    /// Guest vCPUs.
    pub smp: u32,
    /// Name of the run directory.
    pub label: String,
}

impl DisplayOptions {
    /// Guest `tag` on `display`, holding its picture for 120 s, then powering off.
    pub fn new(display: DisplayDevice, tag: u8) -> DisplayOptions {
        DisplayOptions {
            display,
            vfio_user_socket: None,
            params: DisplayParams {
                tag,
                hold: Duration::from_secs(120),
                after: AfterHold::PowerOff,
                loop_secs: 0,
            },
            draw_timeout: DRAW_TIMEOUT,
            smp: crate::qemu::DEFAULT_SMP,
            label: format!("display-{tag}"),
        }
    }

    /// Attach the vfio-user GPU on `socket` too.
    pub fn with_vfio_user(mut self, socket: &Path) -> Self {
        self.vfio_user_socket = Some(socket.to_path_buf());
        self
    }

    /// Reboot after holding each picture for `hold` (each boot draws with a new nonce).
    pub fn rebooting_after(mut self, hold: Duration) -> Self {
        self.params.hold = hold;
        self.params.after = AfterHold::Reboot;
        self
    }

    /// Name the run directory.
    pub fn label(mut self, label: &str) -> Self {
        self.label = label.into();
        self
    }

    /// Number of guest vCPUs.
    pub fn smp(mut self, vcpus: u32) -> Self {
        self.smp = vcpus.max(1);
        self
    }

    /// After the picture, write whole frames for `secs` seconds (the frame-rate figure; see
    /// [`DisplayGuest::wait_loop`]), then hold for `hold` and power off.
    pub fn looping(mut self, secs: u64, hold: Duration) -> Self {
        self.params.loop_secs = secs;
        self.params.hold = hold;
        self.params.after = AfterHold::PowerOff;
        self
    }
}

/// What the guest reported writing in its loop (its `GPUFB loop` line).
#[derive(Clone, Debug, PartialEq)]
pub struct FrameLoop {
    /// Whole frames written.
    pub frames: u64,
    /// How long, in ms.
    pub ms: u64,
}

impl FrameLoop {
    /// Parse a `GPUFB loop frames=.. ms=.. ...` line.
    pub fn parse(line: &str) -> Option<FrameLoop> {
        let rest = line.split_once(&format!("{MARK} loop "))?.1;
        let field = |key: &str| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .and_then(crate::report::parse_u64)
        };
        Some(FrameLoop {
            frames: field("frames")?,
            ms: field("ms")?.max(1),
        })
    }

    /// Frames per second written.
    pub fn fps(&self) -> f64 {
        self.frames as f64 * 1000.0 / self.ms as f64
    }
}

/// What the guest reported drawing (its `GPUFB ready` line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drawn {
    /// The picture.
    pub pattern: FbPattern,
    /// Framebuffer width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes per framebuffer row.
    pub stride: u32,
    /// Bits per pixel.
    pub bpp: u32,
    /// Time the guest took to draw, in ms.
    pub draw_ms: u64,
}

impl Drawn {
    /// Parse a `GPUFB ready tag=.. nonce=.. width=.. height=.. stride=.. bpp=.. ms=..` line.
    pub fn parse(line: &str) -> Option<Drawn> {
        let rest = line.split_once(&format!("{MARK} ready "))?.1;
        let field = |key: &str| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .and_then(crate::report::parse_u64)
        };
        Some(Drawn {
            pattern: FbPattern::new(
                u8::try_from(field("tag")?).ok()?,
                u16::try_from(field("nonce")?).ok()?,
            ),
            width: u32::try_from(field("width")?).ok()?,
            height: u32::try_from(field("height")?).ok()?,
            stride: u32::try_from(field("stride")?).ok()?,
            bpp: u32::try_from(field("bpp")?).ok()?,
            draw_ms: field("ms")?,
        })
    }

    /// The picture as the screen should show it.
    pub fn expected(&self) -> RgbImage {
        RgbImage::from_pattern(&self.pattern, self.width, self.height)
    }
}

/// A screenshot and how it compares with the picture drawn.
#[derive(Debug)]
pub struct Screenshot {
    /// The image.
    pub image: RgbImage,
    /// Where QEMU wrote it (PPM).
    pub path: PathBuf,
    /// `None` if every pixel equals the picture; else the first difference (a screen of
    /// another size counts every pixel of the picture as different, first at (0, 0)).
    pub mismatch: Option<Mismatch>,
    /// Screenshots taken until this one.
    pub attempts: u32,
    /// Time from the first screenshot to this one.
    pub waited: Duration,
}

impl Screenshot {
    /// True if the screen shows exactly the picture.
    pub fn matches(&self) -> bool {
        self.mismatch.is_none()
    }

    /// One line: matches or the first mismatch, with the screen size and the attempts.
    pub fn verdict(&self) -> String {
        let what = match &self.mismatch {
            None => "every pixel equals the guest's picture".to_string(),
            Some(m) => m.to_string(),
        };
        format!(
            "{}x{} screenshot ({}): {what}; {} screenshot(s) in {:.2} s",
            self.image.width(),
            self.image.height(),
            self.path.display(),
            self.attempts,
            self.waited.as_secs_f64()
        )
    }
}

/// Compare `image` with the picture of `drawn`.
pub fn compare(image: &RgbImage, drawn: &Drawn) -> Option<Mismatch> {
    if (image.width(), image.height()) != (drawn.width, drawn.height) {
        let want = drawn.pattern.rgb(0, 0);
        return Some(Mismatch {
            x: 0,
            y: 0,
            got: image.pixel(0, 0).unwrap_or([0; 3]),
            want,
            count: u64::from(drawn.width) * u64::from(drawn.height),
        });
    }
    image.compare(|x, y| drawn.pattern.rgb(x, y))
}

/// A running display guest.
pub struct DisplayGuest {
    vm: RunningVm,
    run_dir: PathBuf,
    _socket_dir: SocketDir,
    boots_seen: usize,
    draw_timeout: Duration,
}

/// Boot a display guest (QEMU keeps running until [`DisplayGuest::quit`] or the guest powers
/// off after its hold).
pub fn start_display_guest(opts: &DisplayOptions) -> Result<DisplayGuest> {
    let lab = QemuLab::get()?;
    let initrd = display_initramfs()?;
    let run_dir = new_run_dir(&opts.label)?;
    let socket_dir = new_socket_dir()?;
    let mut cfg = VmConfig::new(
        &lab.guest_kernel,
        &initrd,
        &opts.params.kernel_args(),
        &run_dir.join("serial.log"),
    );
    cfg.vfio_user_socket = opts.vfio_user_socket.clone();
    cfg.display = Some(opts.display.clone());
    cfg.qmp_socket = Some(socket_dir.join("qmp.sock"));
    cfg.allow_reboot = opts.params.after == AfterHold::Reboot;
    cfg.smp = opts.smp;
    let vm = spawn_vm(lab, &cfg)?;
    Ok(DisplayGuest {
        vm,
        run_dir,
        _socket_dir: SocketDir(socket_dir),
        boots_seen: 0,
        draw_timeout: opts.draw_timeout,
    })
}

impl DisplayGuest {
    /// The run directory (serial log, QEMU's output, screenshots).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        self.vm.serial()
    }

    /// Wait for the next boot's `GPUFB ready` line (the first call: the first boot's).
    pub fn wait_drawn(&mut self) -> Result<Drawn> {
        let line = self.vm.wait_for_line(
            &format!("{MARK} ready "),
            self.boots_seen,
            self.draw_timeout,
        )?;
        self.boots_seen += 1;
        Drawn::parse(&line).ok_or_else(|| HarnessError::GuestIncomplete {
            what: format!("an unreadable ready line `{line}`"),
            serial_tail: crate::error::tail(&self.vm.serial(), 20),
        })
    }

    /// Wait for the `GPUFB loop` line of the first boot (within the draw time limit plus the
    /// loop's own length).
    pub fn wait_loop(&mut self, loop_secs: u64) -> Result<FrameLoop> {
        let timeout = self.draw_timeout + Duration::from_secs(loop_secs);
        let line = self
            .vm
            .wait_for_line(&format!("{MARK} loop "), 0, timeout)?;
        FrameLoop::parse(&line).ok_or_else(|| HarnessError::GuestIncomplete {
            what: format!("an unreadable loop line `{line}`"),
            serial_tail: crate::error::tail(&self.vm.serial(), 20),
        })
    }

    /// Wait (at most `timeout`) for QEMU to exit after the guest powered off; remove the run
    /// directory unless `GUEST_TESTS_KEEP=1`.
    pub fn wait_poweroff(self, timeout: Duration) -> Result<VmOutcome> {
        let run_dir = self.run_dir.clone();
        let outcome = self.vm.wait_exit(timeout)?;
        if !keep_runs() {
            let _ = std::fs::remove_dir_all(&run_dir);
        }
        Ok(outcome)
    }

    /// Take QEMU's screenshot into `<run dir>/<name>.ppm` and read it.
    pub fn screenshot(&mut self, name: &str) -> Result<(RgbImage, PathBuf)> {
        let path = self.run_dir.join(format!("{name}.ppm"));
        let _ = std::fs::remove_file(&path);
        self.vm.qmp()?.screendump(&path)?;
        Ok((RgbImage::read_ppm(&path)?, path))
    }

    /// Take screenshots until one shows the picture of `drawn` or `settle` has passed; return
    /// the last one (check [`Screenshot::matches`]).
    pub fn screenshot_matching(
        &mut self,
        drawn: &Drawn,
        name: &str,
        settle: Duration,
    ) -> Result<Screenshot> {
        let start = Instant::now();
        let mut attempts = 0;
        loop {
            let (image, path) = self.screenshot(name)?;
            attempts += 1;
            let mismatch = compare(&image, drawn);
            if mismatch.is_none() || start.elapsed() >= settle {
                return Ok(Screenshot {
                    image,
                    path,
                    mismatch,
                    attempts,
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    /// Stop QEMU (QMP `quit`) and return how it ended.
    pub fn quit(self) -> Result<VmOutcome> {
        self.vm.quit(QUIT_TIMEOUT)
    }

    /// Stop QEMU like [`DisplayGuest::quit`], then remove the run directory unless
    /// `GUEST_TESTS_KEEP=1` (call after the checks passed).
    pub fn finish(self) -> Result<VmOutcome> {
        let run_dir = self.run_dir.clone();
        let outcome = self.quit()?;
        if !keep_runs() {
            let _ = std::fs::remove_dir_all(&run_dir);
        }
        Ok(outcome)
    }
}

/// The directory of the QMP socket, removed with the guest.
struct SocketDir(PathBuf);

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_ready_line_and_compares_sizes() {
        let line =
            "[  3.1] x GPUFB ready tag=2 nonce=0x3a7c width=8 height=4 stride=32 bpp=32 ms=41";
        let d = Drawn::parse(line).unwrap();
        assert_eq!(d.pattern, FbPattern::new(2, 0x3a7c));
        assert_eq!(
            (d.width, d.height, d.stride, d.bpp, d.draw_ms),
            (8, 4, 32, 32, 41)
        );
        assert_eq!(compare(&d.expected(), &d), None);
        let small = RgbImage::from_pattern(&d.pattern, 4, 4);
        assert_eq!(compare(&small, &d).unwrap().count, 32);
        assert!(
            Drawn::parse("GPUFB ready tag=9999 nonce=1 width=1 height=1 stride=4 bpp=32 ms=1")
                .is_none()
        );
        assert!(Drawn::parse("GPUFB error no fb").is_none());
        let l = FrameLoop::parse("[ 9.2] GPUFB loop frames=400 ms=20000 fps=20.0 mib_per_s=78.1")
            .unwrap();
        assert_eq!((l.frames, l.ms), (400, 20000));
        assert!((l.fps() - 20.0).abs() < 1e-9);
        assert!(FrameLoop::parse("GPUFB loop frames=x ms=1").is_none());
    }
}
