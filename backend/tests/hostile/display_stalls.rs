//! Stalls at the display stay with their display: guest A floods its control queue (thousands
//! of chains, full-frame transfers and flushes among them) and never reads its used ring, then
//! A's QEMU stops reading its display socket (A's device blocks mid-UPDATE). Throughout, guest
//! B's display answers and B's vfio-user side reads BAR0 within a bound, and the server stops on
//! SIGTERM while A's display is stuck.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_backend::vhost_user::test_frontend::requests as rq;
use gpu_backend::vhost_user::test_frontend::{Chain, DisplayFrontend, FrontendOptions, CONTROL};

use super::display_rig::{answers, post, DisplayRig};

/// What B may wait for one answer under A's flood or stall, on a loaded 2-core machine.
const BOUND: Duration = Duration::from_secs(1);
/// How long each phase lasts.
const PHASE: Duration = Duration::from_secs(3);
/// A's scanout.
const W: u32 = 1280;
const H: u32 = 800;

/// Sets up a `w` x `h` resource `id` with backing, transferred and shown on scanout 0.
fn scanout(fe: &mut DisplayFrontend, id: u32, w: u32, h: u32) {
    let len = u64::from(w * h * 4);
    let at = fe.ram_mut().reserve(len).unwrap();
    fe.ram().write(at, &vec![0x42; len as usize]).unwrap();
    for request in [
        rq::create_2d(id, rq::FORMAT_B8G8R8X8, w, h, 0),
        rq::attach_backing(id, &[(at, len as u32)]),
        rq::transfer(id, (0, 0, w, h), 0),
        rq::set_scanout(0, id, (0, 0, w, h)),
    ] {
        let response = fe.request(&request).unwrap();
        assert_eq!(rq::resp_type(&response), Some(rq::resp::OK_NODATA));
    }
}

/// Guest A's flood: keeps its descriptor table full (reading the used index only to know how
/// much room there is; never a used entry, a response or a notification) until `stop`.
/// Returns the frontend and the chains posted.
fn flood(
    mut fa: DisplayFrontend,
    stop: &AtomicBool,
    consumed: &AtomicU64,
) -> (DisplayFrontend, u64) {
    let mut unknown = rq::get_display_info();
    unknown[0..4].copy_from_slice(&0x0999u32.to_le_bytes());
    let chains = [
        Chain::request(&rq::transfer(1, (0, 0, W, H), 0), rq::RESPONSE_MAX),
        Chain::request(&rq::flush(1, (0, 0, W, H)), rq::RESPONSE_MAX),
        Chain::request(&rq::get_display_info(), rq::RESPONSE_MAX),
        Chain::request(&unknown, rq::RESPONSE_MAX),
        Chain::new().read(&rq::get_display_info()),
    ];
    let start_used = {
        let (queue, ram) = fa.queue(CONTROL);
        queue.used_idx(ram).unwrap()
    };
    let mut posted = 0u64;
    let mut last_used = start_used;
    let mut total_used = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (queue, ram) = fa.queue(CONTROL);
        let used = queue.used_idx(ram).unwrap();
        total_used += u64::from(used.wrapping_sub(last_used));
        last_used = used;
        consumed.store(total_used, Ordering::Relaxed);
        let outstanding = queue.avail_idx().wrapping_sub(used);
        // Two descriptors per chain: the table holds half a queue of them.
        if outstanding < queue.size() / 2 {
            // A full frame every 1024 chains, cheap requests and garbage otherwise.
            let pick = match posted % 1024 {
                0 => 0,
                1 => 1,
                n => 2 + (n as usize % 3),
            };
            queue.submit(ram, &chains[pick]).unwrap();
            posted += 1;
            if posted % 8 == 0 {
                queue.kick().unwrap();
            }
        } else {
            queue.kick().unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    (fa, posted)
}

/// B's worst answer times over `phase`: display info, a 64x64 transfer + flush, a BAR0 read.
fn measure_b(rig: &DisplayRig, fb: &mut DisplayFrontend, phase: Duration) -> [Duration; 3] {
    let mut vfio = rig.vfio(1);
    let mut worst = [Duration::ZERO; 3];
    let mut rounds = 0;
    let end = Instant::now() + phase;
    while Instant::now() < end || rounds < 5 {
        worst[0] = worst[0].max(answers(fb, Duration::from_secs(30)).expect("B's display info"));
        let start = Instant::now();
        for request in [
            rq::transfer(1, (0, 0, 64, 64), 0),
            rq::flush(1, (0, 0, 64, 64)),
        ] {
            let chain = Chain::request(&request, rq::RESPONSE_MAX);
            let (_, used) = post(fb, &chain, Duration::from_secs(30));
            assert!(used.is_some(), "B's frame");
        }
        worst[1] = worst[1].max(start.elapsed());
        let start = Instant::now();
        assert_eq!(vfio.region_read(0, 0, 4).expect("B's BAR0").len(), 4);
        worst[2] = worst[2].max(start.elapsed());
        rounds += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    worst
}

#[test]
fn display_floods_and_stalls_stay_with_their_display() {
    let mut rig = DisplayRig::start("display-stalls", ["32M", "16M"]);
    let mut fa = rig.display(0, FrontendOptions::default());
    let mut fb = rig.display(1, FrontendOptions::default());
    scanout(&mut fa, 1, W, H);
    scanout(&mut fb, 1, 64, 64);
    let qemu_a = fa.display().unwrap().handle();
    fa.display().unwrap().keep_pixels(false);
    fb.display().unwrap().keep_pixels(false);

    let stop = Arc::new(AtomicBool::new(false));
    let consumed = Arc::new(AtomicU64::new(0));
    let flooder = {
        let (stop, consumed) = (Arc::clone(&stop), Arc::clone(&consumed));
        std::thread::spawn(move || flood(fa, &stop, &consumed))
    };

    // Phase 1: A floods; its QEMU reads.
    let flooded = measure_b(&rig, &mut fb, PHASE);
    let in_flood = consumed.load(Ordering::Relaxed);
    let (_, update_bytes) = qemu_a.received();
    eprintln!(
        "A's flood: {in_flood} chains taken, {} MiB of updates; B's worst: display info \
         {:?}, frame {:?}, BAR0 {:?}",
        update_bytes >> 20,
        flooded[0],
        flooded[1],
        flooded[2]
    );
    assert!(in_flood >= 1000, "A's device took {in_flood} chains");
    assert!(
        update_bytes >= u64::from(W * H * 4),
        "A's frames reached its QEMU"
    );

    // Phase 2: A's QEMU stops reading; A's device blocks in an UPDATE or a reply.
    qemu_a.stall(true);
    std::thread::sleep(Duration::from_millis(500));
    let before = consumed.load(Ordering::Relaxed);
    let stalled = measure_b(&rig, &mut fb, PHASE);
    let after = consumed.load(Ordering::Relaxed);
    eprintln!(
        "A stalled ({} chains taken meanwhile); B's worst: display info {:?}, frame {:?}, \
         BAR0 {:?}",
        after - before,
        stalled[0],
        stalled[1],
        stalled[2]
    );
    assert!(
        after - before < 256,
        "A's device is stuck ({} taken)",
        after - before
    );
    for (what, worst) in ["display info", "a frame", "a BAR0 read"]
        .iter()
        .zip(flooded.iter().zip(&stalled))
    {
        assert!(
            *worst.0 < BOUND && *worst.1 < BOUND,
            "B's {what} took {:?} flooded, {:?} stalled",
            worst.0,
            worst.1
        );
    }
    rig.assert_alive("the flood and the stall");

    // SIGTERM while A's device is stuck mid-message: the server still stops, in time.
    let (status, took) = rig
        .serve
        .stop(libc::SIGTERM, Duration::from_secs(10))
        .expect("serve stops");
    eprintln!("SIGTERM with A's display stuck: stopped in {took:?}");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    stop.store(true, Ordering::Relaxed);
    qemu_a.stall(false);
    let (_fa, posted) = flooder.join().unwrap();
    assert!(posted >= in_flood);
}
