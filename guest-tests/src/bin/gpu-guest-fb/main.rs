//! `gpu-guest-fb`: a static program run inside a display guest that draws the picture of
//! [`pattern::FbPattern`] into the framebuffer device (`/dev/fb0` of the `virtio_gpu` driver's
//! fbdev emulation) and tells the host, on the console, what it drew:
//!
//! ```text
//! GPUFB ready tag=1 nonce=0x3a7c width=1280 height=800 stride=5120 bpp=32 ms=41
//! GPUFB loop frames=412 ms=20013 fps=20.6 mib_per_s=80.4      (with --loop-secs)
//! GPUFB error <what went wrong>          (exit status 1)
//! ```
//!
//! With `--loop-secs N` it then writes whole frames to `/dev/fb0` for N seconds, one `pwrite`
//! of the full frame each, alternating between its picture and the picture of the next nonce
//! (both prepared before the clock starts), and reports how many it wrote: the frame rate a
//! guest gets writing the framebuffer in a loop. The display sees fewer: each `write` marks its
//! rows damaged and queues the DRM fbdev emulation's damage worker, which sends the device one
//! transfer and flush for all the damage collected since it last ran.
//!
//! The geometry comes from sysfs (`virtual_size`, `stride`, `bits_per_pixel` of
//! `/sys/class/graphics/fb0`); only 32 bits per pixel (XRGB8888, what the DRM fbdev emulation
//! gives virtio-gpu) is drawn. The nonce is random per run (`getrandom`), so a second boot
//! draws a picture the host can tell from the first one's.
//!
//! ```text
//! gpu-guest-fb [--tag N] [--nonce N] [--loop-secs N] [--fb /dev/fb0] [--sysfs /sys/class/graphics/fb0]
//! ```
//!
//! Build it static like `gpu-guest-probe` (see `guest_tests::artifacts::GuestBinary`).

#[allow(dead_code)] // the host-side helpers of the shared file are not used here
#[path = "../../fb_pattern.rs"]
mod pattern;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pattern::{FbPattern, BYTES_PER_PIXEL, MAX_UNIQUE};

/// What the program was asked to do.
struct Args {
    tag: u8,
    nonce: Option<u16>,
    loop_secs: u64,
    fb: PathBuf,
    sysfs: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        tag: 0,
        nonce: None,
        loop_secs: 0,
        fb: "/dev/fb0".into(),
        sysfs: "/sys/class/graphics/fb0".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--tag" => a.tag = parse_num(&value()?)?,
            "--nonce" => a.nonce = Some(parse_num(&value()?)?),
            "--loop-secs" => a.loop_secs = parse_num(&value()?)?,
            "--fb" => a.fb = value()?.into(),
            "--sysfs" => a.sysfs = value()?.into(),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(a)
}

/// A decimal or `0x` hexadecimal number that fits `T`.
fn parse_num<T: TryFrom<u64>>(s: &str) -> Result<T, String> {
    let v = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    T::try_from(v).map_err(|_| format!("{s} is out of range"))
}

/// The framebuffer's geometry as sysfs reports it.
struct Geometry {
    width: u32,
    height: u32,
    stride: u32,
    bpp: u32,
}

fn read_sysfs(dir: &Path, name: &str) -> Result<String, String> {
    let path = dir.join(name);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("reading {}: {e}", path.display()))
}

fn geometry(dir: &Path) -> Result<Geometry, String> {
    let size = read_sysfs(dir, "virtual_size")?;
    let (w, h) = size
        .split_once(',')
        .ok_or(format!("virtual_size `{size}` is not W,H"))?;
    let g = Geometry {
        width: parse_num(w)?,
        height: parse_num(h)?,
        stride: parse_num(&read_sysfs(dir, "stride")?)?,
        bpp: parse_num(&read_sysfs(dir, "bits_per_pixel")?)?,
    };
    if g.bpp != 32 {
        return Err(format!("{} bits per pixel: only 32 is drawn", g.bpp));
    }
    let row = u64::from(g.width) * BYTES_PER_PIXEL as u64;
    if g.width == 0 || g.height == 0 || u64::from(g.stride) < row {
        return Err(format!(
            "geometry {}x{} stride {} does not hold {row}-byte rows",
            g.width, g.height, g.stride
        ));
    }
    if g.width > MAX_UNIQUE || g.height > MAX_UNIQUE {
        return Err(format!(
            "{}x{} is larger than {MAX_UNIQUE}x{MAX_UNIQUE}, whose pixels are all distinct",
            g.width, g.height
        ));
    }
    Ok(g)
}

fn random_nonce() -> Result<u16, String> {
    let mut buf = [0u8; 2];
    // SAFETY: getrandom writes at most `buf.len()` bytes into the valid buffer `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        return Err(format!("getrandom: {}", std::io::Error::last_os_error()));
    }
    Ok(u16::from_le_bytes(buf))
}

/// Write every row with `pwrite` at `y * stride`, then `fsync`. A `write` to the DRM fbdev
/// emulation marks the rows damaged and queues the damage worker, which sends the virtio-gpu
/// transfer and flush; `fsync` flushes the deferred-I/O work of mmap writes. Neither waits for
/// the device, so the host retries its screenshot for a bounded time instead of trusting a
/// fixed delay.
fn draw(fb: &File, g: &Geometry, p: &FbPattern) -> Result<(), String> {
    for y in 0..g.height {
        let row = p.xrgb_row(y, g.width);
        fb.write_all_at(&row, u64::from(y) * u64::from(g.stride))
            .map_err(|e| format!("writing row {y}: {e}"))?;
    }
    fb.sync_all().map_err(|e| format!("fsync: {e}"))
}

/// The whole frame of `p` as the framebuffer holds it (`height` rows `stride` apart).
fn frame(g: &Geometry, p: &FbPattern) -> Vec<u8> {
    let mut f = vec![0u8; g.stride as usize * g.height as usize];
    for y in 0..g.height {
        let row = p.xrgb_row(y, g.width);
        let at = y as usize * g.stride as usize;
        f[at..at + row.len()].copy_from_slice(&row);
    }
    f
}

/// Write whole frames, alternating `frames`, for `secs` seconds; the `GPUFB loop` line.
fn write_loop(fb: &File, frames: &[Vec<u8>; 2], secs: u64) -> Result<String, String> {
    let start = Instant::now();
    let until = Duration::from_secs(secs);
    let mut n: u64 = 0;
    while start.elapsed() < until {
        fb.write_all_at(&frames[(n % 2) as usize], 0)
            .map_err(|e| format!("writing frame {n}: {e}"))?;
        n += 1;
    }
    fb.sync_all().map_err(|e| format!("fsync: {e}"))?;
    let s = start.elapsed().as_secs_f64();
    let bytes = n as f64 * frames[0].len() as f64;
    Ok(format!(
        "GPUFB loop frames={n} ms={} fps={:.1} mib_per_s={:.1}",
        start.elapsed().as_millis(),
        n as f64 / s,
        bytes / s / f64::from(1 << 20)
    ))
}

fn run(args: &Args) -> Result<(), String> {
    let start = Instant::now();
    let g = geometry(&args.sysfs)?;
    let nonce = match args.nonce {
        Some(n) => n,
        None => random_nonce()?,
    };
    let p = FbPattern::new(args.tag, nonce);
    let fb = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.fb)
        .map_err(|e| format!("opening {}: {e}", args.fb.display()))?;
    draw(&fb, &g, &p)?;
    println!(
        "GPUFB ready tag={} nonce={:#06x} width={} height={} stride={} bpp={} ms={}",
        p.tag,
        p.nonce,
        g.width,
        g.height,
        g.stride,
        g.bpp,
        start.elapsed().as_millis()
    );
    if args.loop_secs > 0 {
        let other = FbPattern::new(args.tag, nonce.wrapping_add(1));
        let frames = [frame(&g, &p), frame(&g, &other)];
        println!("{}", write_loop(&fb, &frames, args.loop_secs)?);
    }
    Ok(())
}

fn main() {
    if let Err(e) = parse_args().and_then(|a| run(&a)) {
        println!("GPUFB error {e}");
        std::process::exit(1);
    }
}
