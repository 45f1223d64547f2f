//! Hostile descriptor chains, rings and guest memory at the display's transport (vhost-user
//! GPU control queue): descriptors outside guest memory, oversized and split requests, no or
//! short writable space, indirect tables, loops, broken avail rings, guest memory the frontend
//! can shrink. After each, the offending display answers a good request (or, for a broken
//! ring, stops), and guest B's display and vfio-user side are served; nothing panics.

use std::time::Duration;

use gpu_backend::vhost_user::chain::MAX_REQUEST;
use gpu_backend::vhost_user::test_frontend::queue::{
    Desc, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
};
use gpu_backend::vhost_user::test_frontend::requests::{self as rq, resp};
use gpu_backend::vhost_user::test_frontend::{Chain, DisplayFrontend, FrontendOptions, CONTROL};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::display_rig::{answers, post, DisplayRig, ANSWER_WITHIN};

/// Guest RAM of the frontends (the default).
const RAM: u64 = 64 << 20;
/// How long to wait for a used entry that should come.
const USED_WITHIN: Duration = Duration::from_secs(5);

/// The response to `request` posted as the driver posts it.
fn reference(fe: &mut DisplayFrontend, request: &[u8]) -> Vec<u8> {
    fe.request(request).expect("reference request")
}

/// Writes `descs` by hand into consecutive slots and makes the first available; returns
/// the head.
fn post_raw(fe: &mut DisplayFrontend, descs: &[Desc]) -> u16 {
    let (queue, ram) = fe.queue(CONTROL);
    let head = queue.reserve_slots(descs.len() as u16);
    for (i, d) in descs.iter().enumerate() {
        let slot = (head + i as u16) % queue.size();
        queue.write_desc(ram, slot, *d).unwrap();
    }
    queue.publish(ram, head).unwrap();
    head
}

/// `bytes` placed in the frontend's scratch memory; their guest address.
fn place(fe: &mut DisplayFrontend, bytes: &[u8]) -> u64 {
    let at = fe.ram_mut().scratch(bytes.len() as u64).unwrap();
    fe.ram().write(at, bytes).unwrap();
    at
}

fn desc_bytes(descs: &[Desc]) -> Vec<u8> {
    descs.iter().flat_map(Desc::to_bytes).collect()
}

/// What a case must get back.
enum Expect {
    /// A response of this type, `len` bytes used.
    Resp(u32, u32),
    /// Exactly these bytes.
    Bytes(Vec<u8>),
    /// A used entry with nothing written.
    Nothing,
}

fn check(fe: &mut DisplayFrontend, name: &str, chain: &Chain, expect: Expect) {
    let (submitted, used) = post(fe, chain, USED_WITHIN);
    let used = used.unwrap_or_else(|| panic!("{name}: no used entry"));
    assert_eq!(used.id, u32::from(submitted.head), "{name}");
    let response = submitted.response(fe.ram(), used.len).unwrap();
    assert!(
        submitted.guards_intact(fe.ram()).unwrap(),
        "{name}: written past a buffer"
    );
    assert!(
        submitted
            .untouched_from(fe.ram(), u64::from(used.len))
            .unwrap(),
        "{name}: written past the used length"
    );
    match expect {
        Expect::Resp(t, len) => {
            assert_eq!(rq::resp_type(&response), Some(t), "{name}");
            assert_eq!(used.len, len, "{name}");
        }
        Expect::Bytes(b) => assert!(response == b, "{name}: {:02x?}", &response),
        Expect::Nothing => assert_eq!(used.len, 0, "{name}"),
    }
    answers(fe, ANSWER_WITHIN).unwrap_or_else(|e| panic!("after {name}: {e}"));
}

#[test]
fn display_chains_outside_memory_oversized_split_unwritable_short_indirect_and_looping() {
    let mut rig = DisplayRig::start("display-chains", ["16M", "16M"]);
    let mut fa = rig.display(0, FrontendOptions::default());
    let mut fb = rig.display(1, FrontendOptions::default());
    let gdi = rq::get_display_info();
    let info = reference(&mut fa, &gdi);
    assert_eq!(info.len(), rq::DISPLAY_INFO_SIZE);
    let full = rq::RESPONSE_MAX;
    let raw = |addr, len, flags| Desc {
        addr,
        len,
        flags,
        next: 0,
    };
    let invalid = || Expect::Resp(resp::ERR_INVALID_PARAMETER, 24);

    // Readable descriptors outside guest memory: ERR_UNSPEC, written where it may be.
    let outside: [(&str, Desc); 3] = [
        ("readable past RAM", raw(RAM + 4096, 24, 0)),
        (
            "readable wrapping the address space",
            raw(u64::MAX - 7, 24, 0),
        ),
        ("readable running off RAM's end", raw(RAM - 8, 24, 0)),
    ];
    for (name, d) in outside {
        let unspec = Expect::Resp(resp::ERR_UNSPEC, 24);
        check(&mut fa, name, &Chain::new().raw(d).write(full), unspec);
    }
    // Writable descriptors outside guest memory: nothing is written anywhere.
    let chain = Chain::new()
        .read(&gdi)
        .raw(raw(RAM + 4096, 512, DESC_F_WRITE));
    check(&mut fa, "writable past RAM", &chain, Expect::Nothing);
    let chain = Chain::new()
        .read(&gdi)
        .write(100)
        .raw(raw(u64::MAX - 100, 512, DESC_F_WRITE));
    check(
        &mut fa,
        "good writable then one outside RAM",
        &chain,
        Expect::Nothing,
    );

    // Longer than any request: oversized, whatever its header says.
    let mut long = gdi.clone();
    long.resize(MAX_REQUEST + 1, 0);
    check(
        &mut fa,
        "one byte past MAX_REQUEST",
        &Chain::request(&long, full),
        invalid(),
    );
    let chain = Chain::new()
        .read(&gdi)
        .read(&vec![0x5a; 4 << 20])
        .write(full);
    check(&mut fa, "4 MiB readable", &chain, invalid());

    // A request split into tiny descriptors decodes as one descriptor.
    let create = rq::create_2d(100, rq::FORMAT_B8G8R8X8, 16, 16, 0);
    let chain = Chain::new().read_split(&create, &[1]).write(full);
    check(&mut fa, "create in 1-byte descriptors", &chain, ok_nodata());
    check(
        &mut fa,
        "the same id again",
        &Chain::request(&create, full),
        Expect::Resp(resp::ERR_INVALID_RESOURCE_ID, 24),
    );
    let chain = Chain::new()
        .read_split(&gdi, &[1, 0, 2, 0])
        .write(full)
        .indirect();
    check(
        &mut fa,
        "indirect, 0-3 byte pieces",
        &chain,
        Expect::Bytes(info.clone()),
    );
    let mut chain = Chain::new().read(&gdi);
    for _ in 0..rq::DISPLAY_INFO_SIZE {
        chain = chain.write(1);
    }
    check(
        &mut fa,
        "1-byte writable descriptors",
        &chain.indirect(),
        Expect::Bytes(info.clone()),
    );

    // No writable descriptor: executed, nothing written.
    let create = rq::create_2d(101, rq::FORMAT_B8G8R8X8, 16, 16, 0);
    check(
        &mut fa,
        "no writable",
        &Chain::new().read(&create),
        Expect::Nothing,
    );
    check(
        &mut fa,
        "it was executed",
        &Chain::request(&create, full),
        Expect::Resp(resp::ERR_INVALID_RESOURCE_ID, 24),
    );
    // Writable space shorter than the response: cut, nothing past it.
    let chain = Chain::new().read(&gdi).write(10).write(0).write(7);
    check(
        &mut fa,
        "17 writable bytes",
        &chain,
        Expect::Bytes(info[..17].to_vec()),
    );
    // Writable before readable (against the spec): still one request, one response.
    let chain = Chain::new().write(full).read(&gdi);
    check(
        &mut fa,
        "writable first",
        &chain,
        Expect::Bytes(info.clone()),
    );

    // Indirect tables gone wrong: the chain ends there.
    let table = place(&mut fa, &desc_bytes(&[raw(0, 24, 0)]));
    let cases = [
        (
            "indirect table of 24 bytes",
            raw(table, 24, DESC_F_INDIRECT),
        ),
        ("indirect table of 0 bytes", raw(table, 0, DESC_F_INDIRECT)),
        (
            "indirect table past RAM",
            raw(RAM + 4096, 64, DESC_F_INDIRECT),
        ),
        (
            "indirect table over 65535 entries",
            raw(table, 16 * 70_000, DESC_F_INDIRECT),
        ),
        (
            "indirect table also chained",
            raw(table, 16, DESC_F_INDIRECT | DESC_F_NEXT),
        ),
    ];
    for (name, d) in cases {
        check(&mut fa, name, &Chain::new().raw(d), Expect::Nothing);
    }
    let inner = place(&mut fa, &desc_bytes(&[raw(0, 16, 0)]));
    let nested = place(&mut fa, &desc_bytes(&[raw(inner, 16, DESC_F_INDIRECT)]));
    let chain = Chain::new().raw(raw(nested, 16, DESC_F_INDIRECT));
    check(&mut fa, "nested indirect table", &chain, Expect::Nothing);

    // Loops and links past the table: the chain is cut after at most a queue's worth.
    let req = place(&mut fa, &gdi);
    let resp_at = place(&mut fa, &vec![0xEE; 512]);
    let head = {
        let (queue, _) = fa.queue(CONTROL);
        queue.reserve_slots(0)
    };
    let size = fa.queue(CONTROL).0.size();
    let (a, b) = (head, (head + 1) % size);
    post_raw(
        &mut fa,
        &[
            Desc {
                addr: req,
                len: 24,
                flags: DESC_F_NEXT,
                next: b,
            },
            Desc {
                addr: resp_at,
                len: 512,
                flags: DESC_F_NEXT | DESC_F_WRITE,
                next: a,
            },
        ],
    );
    expect_used_then_good(&mut fa, "a two-descriptor loop");
    post_raw(
        &mut fa,
        &[Desc {
            addr: req,
            len: 24,
            flags: DESC_F_NEXT,
            next: size + 7,
        }],
    );
    expect_used_then_good(&mut fa, "next past the queue size");
    let looping = place(
        &mut fa,
        &desc_bytes(&[
            Desc {
                addr: req,
                len: 24,
                flags: DESC_F_NEXT,
                next: 1,
            },
            Desc {
                addr: resp_at,
                len: 64,
                flags: DESC_F_NEXT | DESC_F_WRITE,
                next: 0,
            },
        ]),
    );
    post_raw(&mut fa, &[raw(looping, 32, DESC_F_INDIRECT)]);
    expect_used_then_good(&mut fa, "a loop inside an indirect table");

    rig.good_guest_served(&mut fb, "the hostile chains");
}

fn ok_nodata() -> Expect {
    Expect::Resp(resp::OK_NODATA, 24)
}

/// A chain posted by hand gets a used entry; the display then answers a good request.
fn expect_used_then_good(fe: &mut DisplayFrontend, name: &str) {
    fe.kick(CONTROL).unwrap();
    let used = fe.wait_used(CONTROL, USED_WITHIN);
    assert!(used.is_ok(), "{name}: no used entry");
    answers(fe, ANSWER_WITHIN).unwrap_or_else(|e| panic!("after {name}: {e}"));
}

/// One random chain: a request (picked from stateless ones), split into readable pieces,
/// writable buffers, direct or indirect.
#[derive(Debug, Clone)]
struct RandomChain {
    request: usize,
    pieces: Vec<usize>,
    writes: Vec<u32>,
    indirect: bool,
    writes_first: bool,
}

fn random_chain() -> impl Strategy<Value = RandomChain> {
    (
        0usize..4,
        proptest::collection::vec(prop_oneof![0usize..4, 1usize..64, 1usize..2000], 1..5),
        proptest::collection::vec(prop_oneof![0u32..8, 0u32..600, 1000u32..1100], 0..5),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(request, pieces, writes, indirect, writes_first)| RandomChain {
                request,
                pieces,
                writes,
                indirect,
                writes_first,
            },
        )
}

#[test]
fn display_random_chains_decode_as_one_descriptor_would() {
    let mut rig = DisplayRig::start("display-random-chains", ["16M", "16M"]);
    let mut fa = rig.display(0, FrontendOptions::default());
    let mut fb = rig.display(1, FrontendOptions::default());
    let mut unknown = rq::get_display_info();
    unknown[0..4].copy_from_slice(&0x0999u32.to_le_bytes());
    let requests = [
        rq::get_display_info(),
        rq::get_edid(0),
        unknown,
        rq::get_display_info()[..10].to_vec(),
    ];
    let references: Vec<Vec<u8>> = requests.iter().map(|r| reference(&mut fa, r)).collect();
    assert_eq!(rq::resp_type(&references[2]), Some(resp::ERR_UNSPEC));
    assert_eq!(
        rq::resp_type(&references[3]),
        Some(resp::ERR_INVALID_PARAMETER)
    );
    let fa = std::cell::RefCell::new(fa);
    let mut runner = TestRunner::new(Config {
        cases: 160,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&random_chain(), |c| {
            let fe = &mut *fa.borrow_mut();
            let bytes = &requests[c.request];
            let mut chain = Chain::new();
            if c.writes_first {
                for &w in &c.writes {
                    chain = chain.write(w);
                }
            }
            chain = chain.read_split(bytes, &c.pieces);
            if !c.writes_first {
                for &w in &c.writes {
                    chain = chain.write(w);
                }
            }
            if chain.parts.len() > usize::from(fe.queue(CONTROL).0.size()) {
                chain = chain.indirect();
            }
            if c.indirect {
                chain = chain.indirect();
            }
            let (submitted, used) = post(fe, &chain, USED_WITHIN);
            let used = used.ok_or_else(|| TestCaseError::fail("no used entry"))?;
            let room: u32 = c.writes.iter().sum();
            let want = &references[c.request];
            let n = want.len().min(room as usize);
            prop_assert_eq!(used.len as usize, n);
            let got = submitted.response(fe.ram(), used.len).unwrap();
            prop_assert!(got == want[..n], "{:02x?} != {:02x?}", got, &want[..n]);
            prop_assert!(submitted.guards_intact(fe.ram()).unwrap());
            prop_assert!(submitted.untouched_from(fe.ram(), n as u64).unwrap());
            Ok(())
        })
        .unwrap();
    let mut fa = fa.into_inner();
    answers(&mut fa, ANSWER_WITHIN).unwrap();
    rig.good_guest_served(&mut fb, "random chains");
}

#[test]
fn display_broken_avail_rings_stop_only_that_display() {
    let mut rig = DisplayRig::start("display-broken-rings", ["16M", "16M"]);
    let mut fa = rig.display(0, FrontendOptions::default());
    let mut fb = rig.display(1, FrontendOptions::default());
    answers(&mut fa, ANSWER_WITHIN).unwrap();

    // A head index past the queue: that chain gets no used entry; the chain behind it, made
    // available with the same kick, is answered.
    {
        let (queue, ram) = fa.queue(CONTROL);
        queue.publish(ram, queue.size() + 10).unwrap();
    }
    if let Err(e) = answers(&mut fa, ANSWER_WITHIN) {
        panic!(
            "after a head past the queue: {e}\n{}",
            rig.serve.log_tail(30)
        );
    }
    rig.good_guest_served(&mut fb, "a head past the queue");

    // The avail index jumps by more than the queue holds: the display stops taking chains.
    let before = fa.queue(CONTROL).0.avail_idx();
    {
        let (queue, ram) = fa.queue(CONTROL);
        queue.set_avail_idx(ram, before.wrapping_add(1000)).unwrap();
    }
    for _ in 0..50 {
        fa.kick(CONTROL).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let used = {
        let (queue, ram) = fa.queue(CONTROL);
        queue.take_used(ram).unwrap()
    };
    assert_eq!(used, None, "a broken ring is not processed");
    rig.good_guest_served(&mut fb, "an avail index jump");
    // The guest puts its index back: the display goes on.
    {
        let (queue, ram) = fa.queue(CONTROL);
        queue.set_avail_idx(ram, before).unwrap();
    }
    answers(&mut fa, ANSWER_WITHIN).unwrap();

    // A jump within the queue over stale entries: those chains are executed again.
    let before = fa.queue(CONTROL).0.avail_idx();
    {
        let (queue, ram) = fa.queue(CONTROL);
        queue.set_avail_idx(ram, before.wrapping_add(100)).unwrap();
    }
    fa.kick(CONTROL).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    {
        let (queue, ram) = fa.queue(CONTROL);
        queue.skip_used(ram).unwrap();
    }
    answers(&mut fa, ANSWER_WITHIN).unwrap();
    rig.good_guest_served(&mut fb, "stale chains replayed");

    // Fifty kicks of a broken ring and more: one warning, not one line per kick.
    let log = rig.serve.log_text();
    assert_eq!(
        log.matches("ring faults of this connection").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("virtio_queue"), "{log}");
}

/// Shrinks the frontend's (unsealed) guest RAM memfd to `len` bytes.
fn shrink(fe: &DisplayFrontend, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: ftruncate on the frontend's own memfd; the test touches nothing past `len`
    // afterwards.
    let rc = unsafe { libc::ftruncate(fe.ram().fd().as_raw_fd(), len as libc::off_t) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn display_guest_memory_that_can_shrink_or_is_short_is_refused_not_a_sigbus() {
    let mut rig = DisplayRig::start("display-memory", ["16M", "16M"]);
    let mut fb = rig.display(1, FrontendOptions::default());

    // Guest RAM not sealed against shrinking, shrunk under the backend once handed over:
    // the control queue's rings stay, the request buffer is past the new end.
    let unsealed = FrontendOptions {
        seal: false,
        ..FrontendOptions::default()
    };
    match DisplayFrontend::connect_idle(&rig.displays[0], unsealed).and_then(|mut fe| {
        fe.start()?;
        Ok(fe)
    }) {
        Ok(mut fa) => {
            let chain = Chain::request(&rq::get_display_info(), rq::RESPONSE_MAX);
            fa.submit(CONTROL, &chain).unwrap();
            shrink(&fa, 0x1_0000);
            fa.kick(CONTROL).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            let used = {
                let (queue, ram) = fa.queue(CONTROL);
                queue.take_used(ram).unwrap()
            };
            assert_eq!(used, None, "memory that can shrink is not used");
        }
        // Refused when the memory table is set: as good.
        Err(e) => eprintln!("unsealed guest RAM refused at setup: {e}"),
    }
    rig.good_guest_served(&mut fb, "guest RAM shrunk under the display");
    assert!(
        rig.serve
            .log_text()
            .contains("not sealed against shrinking"),
        "the refusal says why:\n{}",
        rig.serve.log_tail(10)
    );

    // A memory table claiming more than the memfd holds, and a descriptor in the part that
    // does not exist.
    let lying = FrontendOptions {
        mem_table_size: Some(2 * RAM),
        ..FrontendOptions::default()
    };
    match DisplayFrontend::connect_idle(&rig.displays[0], lying).and_then(|mut fe| {
        fe.start()?;
        Ok(fe)
    }) {
        Ok(mut fa) => {
            let chain = Chain::new()
                .raw(Desc {
                    addr: RAM + 4096,
                    len: 24,
                    flags: 0,
                    next: 0,
                })
                .write(rq::RESPONSE_MAX);
            fa.submit(CONTROL, &chain).unwrap();
            fa.kick(CONTROL).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(e) => eprintln!("a memory table past the memfd refused at setup: {e}"),
    }
    rig.good_guest_served(&mut fb, "a memory table past the end of its memfd");
    assert!(rig.serve.log_text().contains("is not backed by its file"));

    // The display takes a well-behaved QEMU afterwards.
    let mut fa = rig.display(0, FrontendOptions::default());
    answers(&mut fa, ANSWER_WITHIN).unwrap();
}
