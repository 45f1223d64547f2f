//! The vhost-user display of the real `gpu-backend serve`, driven by the project's test
//! frontend (`vhost_user::test_frontend`) playing QEMU's `vhost-user-gpu-pci`: guest RAM in
//! a memfd, split virtqueues, and QEMU's display side of `VHOST_USER_GPU_SET_SOCKET`.
//!
//! - the happy path: display info from "QEMU" (and a resize from its side), EDID, a frame
//!   (create, attach, transfer, set scanout, flush) reaching QEMU as SCANOUT + UPDATE with
//!   exactly the guest's pixels, cursor messages;
//! - reconnects and device restarts (a second SET_SOCKET) destroy the guest's resources and
//!   scrub their bytes in its slice;
//! - two guests: each one's resource bytes are in its own slice of host VRAM and nowhere else
//!   (every data extent of every VRAM memfd is searched), and a full slice gets
//!   ERR_OUT_OF_MEMORY.

#[allow(dead_code)]
#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use gpu_backend::vhost_user::test_frontend::requests::{self as rq, resp};
use gpu_backend::vhost_user::test_frontend::{qemu_display, DisplayFrontend, DisplayMsg};
use support::proc_stats::HostVramFiles;
use support::serve_process::{ServeProcess, TempDir};

const MIB: u64 = 1 << 20;
/// How long a display message may take to arrive.
const WAIT: Duration = Duration::from_secs(20);

/// `gpu-backend serve --profile tu102-24g ARGS`, waiting for `sockets`.
fn serve(dir: &TempDir, args: &[String], sockets: &[&Path]) -> ServeProcess {
    let mut all = vec!["--profile".to_owned(), "tu102-24g".to_owned()];
    all.extend_from_slice(args);
    ServeProcess::start(
        Path::new(env!("CARGO_BIN_EXE_gpu-backend")),
        &all,
        sockets.iter().map(|s| s.to_path_buf()).collect(),
        dir.join("serve.log"),
    )
}

/// `--guest socket=S,vram=SIZE,display=D`.
fn guest(socket: &Path, vram: &str, display: &Path) -> [String; 2] {
    [
        "--guest".to_owned(),
        format!(
            "socket={},vram={vram},display={}",
            socket.display(),
            display.display()
        ),
    ]
}

/// Connects, retrying while the server still tears down the previous connection.
fn connect(path: &Path) -> DisplayFrontend {
    let deadline = Instant::now() + WAIT;
    loop {
        match DisplayFrontend::connect(path) {
            Ok(frontend) => return frontend,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Random-looking bytes from `seed` (splitmix64), so every 64-byte block of a frame is
/// unique and found nowhere by accident.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn assert_ok(what: &str, response: &[u8]) {
    assert_eq!(
        rq::resp_type(response),
        Some(resp::OK_NODATA),
        "{what}: {:02x?}",
        &response[..response.len().min(24)]
    );
}

/// Creates resource `id` (`w` x `h`, B8G8R8X8) with `pixels` as its backing, split into
/// `pieces` backing entries at scattered guest addresses, and transfers it whole.
fn upload(frontend: &mut DisplayFrontend, id: u32, w: u32, h: u32, pixels: &[u8], pieces: usize) {
    assert_eq!(pixels.len(), (w * h * 4) as usize);
    let piece = pixels.len().div_ceil(pieces);
    let mut entries = Vec::new();
    for chunk in pixels.chunks(piece) {
        let at = frontend.ram_mut().reserve(chunk.len() as u64).unwrap();
        // A gap between entries, so the backing is not contiguous in guest memory.
        frontend.ram_mut().reserve(4096).unwrap();
        frontend.ram().write(at, chunk).unwrap();
        entries.push((at, chunk.len() as u32));
    }
    let create = rq::create_2d(id, rq::FORMAT_B8G8R8X8, w, h, 0);
    assert_ok("create", &frontend.request(&create).unwrap());
    let attach = rq::attach_backing(id, &entries);
    assert_ok("attach", &frontend.request(&attach).unwrap());
    let transfer = rq::transfer(id, (0, 0, w, h), 0);
    assert_ok("transfer", &frontend.request(&transfer).unwrap());
}

/// The rows of `rect` of a `w`-pixel-wide frame.
fn sub_rect(frame: &[u8], w: u32, rect: rq::Rect) -> Vec<u8> {
    let (x, y, rw, rh) = rect;
    let mut out = Vec::new();
    for row in y..y + rh {
        let at = ((row * w + x) * 4) as usize;
        out.extend_from_slice(&frame[at..at + (rw * 4) as usize]);
    }
    out
}

#[test]
fn display_info_resize_edid_frame_and_cursor_over_the_real_socket() {
    let dir = TempDir::new("display-happy");
    let (socket, display) = (dir.join("gpu.sock"), dir.join("display.sock"));
    let args = [
        "--socket".to_owned(),
        socket.display().to_string(),
        "--display".to_owned(),
        display.display().to_string(),
    ];
    let _serve = serve(&dir, &args, &[&socket, &display]);
    let mut fe = connect(&display);
    assert_eq!(
        fe.offered_features() & gpu_backend::vhost_user::test_frontend::QEMU_FEATURES,
        gpu_backend::vhost_user::test_frontend::QEMU_FEATURES,
        "every feature QEMU acks is offered"
    );
    // num_scanouts in the config space.
    assert_eq!(fe.config(8, 4).unwrap(), 1u32.to_le_bytes());

    // Display info is what QEMU says, asked anew each time: a resize on QEMU's side is what
    // the guest's next GET_DISPLAY_INFO reads.
    let info = rq::display_info(&fe.request(&rq::get_display_info()).unwrap()).unwrap();
    assert_eq!(info[0], (1280, 800, true));
    assert!(info[1..].iter().all(|o| *o == (0, 0, false)), "{info:?}");
    fe.display().unwrap().set_output(0, 1024, 768, true);
    let info = rq::display_info(&fe.request(&rq::get_display_info()).unwrap()).unwrap();
    assert_eq!(info[0], (1024, 768, true));
    let edid = rq::edid(&fe.request(&rq::get_edid(0)).unwrap()).unwrap();
    assert_eq!(edid, qemu_display::qemu_edid(), "QEMU's EDID is passed on");
    let asked = fe.display().unwrap().take_messages();
    assert_eq!(
        asked,
        vec![
            DisplayMsg::GetProtocolFeatures,
            // EDID only: DMABUF scanouts need a GL console.
            DisplayMsg::SetProtocolFeatures(1),
            DisplayMsg::GetDisplayInfo,
            DisplayMsg::GetDisplayInfo,
            DisplayMsg::GetEdid(0),
        ]
    );

    // A frame: SCANOUT, then UPDATE with exactly the guest's pixels.
    let (w, h) = (320u32, 200u32);
    let frame = pattern(1, (w * h * 4) as usize);
    upload(&mut fe, 1, w, h, &frame, 3);
    assert_ok(
        "scanout",
        &fe.request(&rq::set_scanout(0, 1, (0, 0, w, h))).unwrap(),
    );
    assert_ok("flush", &fe.request(&rq::flush(1, (0, 0, w, h))).unwrap());
    let sub = (17, 9, 100, 50);
    assert_ok("flush part", &fe.request(&rq::flush(1, sub)).unwrap());
    let shown = fe
        .display()
        .unwrap()
        .wait_for(WAIT, |m| (m.len() >= 3).then(|| m.to_vec()))
        .unwrap();
    assert_eq!(
        shown[0],
        DisplayMsg::Scanout {
            scanout: 0,
            width: w,
            height: h
        }
    );
    match &shown[1] {
        DisplayMsg::Update {
            scanout: 0,
            rect,
            pixels,
        } => {
            assert_eq!(*rect, (0, 0, w, h));
            assert!(*pixels == frame, "the update holds the guest's pixels");
        }
        other => panic!("expected an update, got {other:?}"),
    }
    match &shown[2] {
        DisplayMsg::Update {
            scanout: 0,
            rect,
            pixels,
        } => {
            assert_eq!(*rect, sub);
            assert!(*pixels == sub_rect(&frame, w, sub));
        }
        other => panic!("expected an update, got {other:?}"),
    }

    // A fenced request gets its fence back.
    let fenced = fe
        .request(&rq::create_2d(9, rq::FORMAT_B8G8R8X8, 8, 8, 0xFE4CE))
        .unwrap();
    assert_ok("fenced create", &fenced);
    assert_eq!(rq::resp_fence(&fenced), Some(0xFE4CE));

    // The cursor queue: image, move, hide.
    fe.display().unwrap().take_messages();
    let cursor = pattern(2, 64 * 64 * 4);
    upload(&mut fe, 2, 64, 64, &cursor, 1);
    fe.cursor(&rq::update_cursor(0, 10, 20, 2, (3, 4))).unwrap();
    fe.cursor(&rq::move_cursor(0, 30, 40)).unwrap();
    fe.cursor(&rq::update_cursor(0, 50, 60, 0, (0, 0))).unwrap();
    let shown = fe
        .display()
        .unwrap()
        .wait_for(WAIT, |m| (m.len() >= 3).then(|| m.to_vec()))
        .unwrap();
    assert_eq!(
        shown[0],
        DisplayMsg::CursorUpdate {
            scanout: 0,
            x: 10,
            y: 20,
            hot: (3, 4),
            image: cursor
        }
    );
    assert_eq!(
        shown[1],
        DisplayMsg::CursorPos {
            scanout: 0,
            x: 30,
            y: 40
        }
    );
    assert_eq!(shown[2], DisplayMsg::CursorHide { scanout: 0 });
    assert_eq!(shown.len(), 3);
}

/// The data extents (`SEEK_DATA`/`SEEK_HOLE`) of `file`: `(offset, length)`.
fn data_extents(file: &std::fs::File) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let size = file.metadata().unwrap().len();
    let mut extents = Vec::new();
    let mut at = 0u64;
    while at < size {
        // SAFETY: lseek on a valid fd; no memory is involved.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data past `at`
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { hole as u64 };
        extents.push((data as u64, end - data as u64));
        at = end;
    }
    extents
}

/// Host VRAM addresses of the 64-byte-aligned blocks of every VRAM memfd of the server that
/// equal a 64-byte block of `frame` (whose length is a multiple of 64).
fn find_frame_blocks(files: &HostVramFiles, frame: &[u8]) -> Vec<u64> {
    let blocks: HashSet<&[u8]> = frame.chunks_exact(64).collect();
    let mut found = Vec::new();
    let all = std::iter::once(&files.base).chain(&files.slices);
    for vram in all {
        for (start, len) in data_extents(&vram.file) {
            let mut buf = vec![0u8; 1 << 20];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                std::os::unix::fs::FileExt::read_exact_at(&vram.file, &mut buf[..n], start + done)
                    .unwrap();
                for (i, block) in buf[..n].chunks_exact(64).enumerate() {
                    if block[..8] != [0; 8] && blocks.contains(block) {
                        found.push(vram.start + start + done + i as u64 * 64);
                    }
                }
                done += n as u64;
            }
        }
    }
    found
}

/// The slice memfd whose range holds `addr`, as `(start, size)`.
fn slice_of(files: &HostVramFiles, addr: u64) -> Option<(u64, u64)> {
    files.slices.iter().find_map(|s| {
        let size = s.file.metadata().ok()?.len();
        (addr >= s.start && addr < s.start + size).then_some((s.start, size))
    })
}

#[test]
fn reconnects_and_device_restarts_destroy_the_guests_resources_and_scrub_them() {
    let dir = TempDir::new("display-reconnect");
    let (socket, display) = (dir.join("gpu.sock"), dir.join("display.sock"));
    let serve = serve(&dir, &guest(&socket, "32M", &display), &[&socket, &display]);
    let (w, h) = (256u32, 64u32);

    // Connection 1 leaves a resource behind when it goes.
    let first = pattern(10, (w * h * 4) as usize);
    let mut fe = connect(&display);
    upload(&mut fe, 7, w, h, &first, 2);
    let files = HostVramFiles::open(serve.pid()).unwrap();
    let found = find_frame_blocks(&files, &first);
    assert_eq!(found.len(), first.len() / 64, "the resource is in VRAM");
    drop(fe);

    // Connection 2: the resource is gone (its id is free) and its bytes were scrubbed.
    let mut fe = connect(&display);
    let deadline = Instant::now() + WAIT;
    while !find_frame_blocks(&files, &first).is_empty() {
        assert!(Instant::now() < deadline, "the resource was not scrubbed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = pattern(11, (w * h * 4) as usize);
    upload(&mut fe, 7, w, h, &second, 1);
    assert_eq!(find_frame_blocks(&files, &second).len(), second.len() / 64);

    // The guest driver resets the device: QEMU stops the rings and, when the driver is
    // back, sends SET_SOCKET again. Everything the old driver made is gone.
    fe.stop().unwrap();
    fe.start().unwrap();
    // A message with a reply: everything before it was handled.
    assert_eq!(fe.config(8, 4).unwrap(), 1u32.to_le_bytes());
    assert!(
        find_frame_blocks(&files, &second).is_empty(),
        "the restart scrubbed the resource"
    );
    let create = rq::create_2d(7, rq::FORMAT_B8G8R8X8, w, h, 0);
    assert_ok("create after restart", &fe.request(&create).unwrap());
    // The new display channel is the one used.
    let info = rq::display_info(&fe.request(&rq::get_display_info()).unwrap()).unwrap();
    assert_eq!(info[0], (1280, 800, true));
    assert!(fe
        .display()
        .unwrap()
        .messages()
        .contains(&DisplayMsg::GetDisplayInfo));
}

#[test]
fn each_guests_resource_bytes_are_in_its_own_slice_only_and_a_full_slice_is_out_of_memory() {
    let dir = TempDir::new("display-slices");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let (da, db) = (dir.join("a-display.sock"), dir.join("b-display.sock"));
    let mut args = guest(&a, "16M", &da).to_vec();
    args.extend(guest(&b, "8M", &db));
    let serve = serve(&dir, &args, &[&a, &b, &da, &db]);
    let mut fa = connect(&da);
    let mut fb = connect(&db);
    let (w, h) = (512u32, 256u32);
    let pa = pattern(20, (w * h * 4) as usize);
    let pb = pattern(21, (w * h * 4) as usize);
    upload(&mut fa, 1, w, h, &pa, 4);
    upload(&mut fb, 1, w, h, &pb, 4);

    let files = HostVramFiles::open(serve.pid()).unwrap();
    assert!(files.slices.len() >= 2, "both guests' slices are carved");
    for (what, frame) in [("A", &pa), ("B", &pb)] {
        let found = find_frame_blocks(&files, frame);
        assert_eq!(found.len(), frame.len() / 64, "guest {what}'s bytes, once");
        let slices: HashSet<_> = found.iter().map(|&at| slice_of(&files, at)).collect();
        assert_eq!(slices.len(), 1, "guest {what}'s bytes lie in one slice");
        assert!(slices.iter().all(Option::is_some), "and not outside slices");
    }
    let slice_a = slice_of(&files, find_frame_blocks(&files, &pa)[0]).unwrap();
    let slice_b = slice_of(&files, find_frame_blocks(&files, &pb)[0]).unwrap();
    assert_ne!(slice_a, slice_b);
    assert_eq!(
        (slice_a.1, slice_b.1),
        (16 * MIB, 8 * MIB),
        "each guest's own slice"
    );

    // B's 8 MiB slice holds 512 KiB already; 1024x1024 resources are 4 MiB: one more fits,
    // the next is out of memory. A is not affected and can still allocate.
    let big = |id| rq::create_2d(id, rq::FORMAT_B8G8R8X8, 1024, 1024, 0);
    assert_ok("B's second", &fb.request(&big(2)).unwrap());
    assert_eq!(
        rq::resp_type(&fb.request(&big(3)).unwrap()),
        Some(resp::ERR_OUT_OF_MEMORY)
    );
    assert_ok("A's second", &fa.request(&big(2)).unwrap());
    assert_ok("A's third", &fa.request(&big(3)).unwrap());
    // Freeing makes room again.
    assert_ok("B unref", &fb.request(&rq::unref(2)).unwrap());
    assert_ok("B's third", &fb.request(&big(3)).unwrap());
    // A's bytes are where they were.
    assert_eq!(find_frame_blocks(&files, &pa).len(), pa.len() / 64);
}
