//! Device-level tests: each command through [`GpuCommandHandler`], and property tests with
//! hostile requests checking every response type, that nothing panics, and that no byte of the
//! slice outside a live resource is ever read or written.

use std::sync::Mutex;

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{DisplayEvent, GpuCommandHandler, GpuConfig, CURSOR_SIZE};
use super::resources::Format;
use super::store::{SliceStore, StoreError, VecStore};
use super::wire::test_encode::{attach, hdr, req, transfer};
use super::wire::{ctrl, CursorPos, DisplayOne, Rect, RespType, ScanoutId, HDR_SIZE};

/// Never-allocated slice bytes.
const CANARY: u8 = 0xa5;
/// Guest memory: two regions with a hole between them.
const REGIONS: [(u64, usize); 2] = [(0x1_0000, 0x1_0000), (0x3_0000, 0x1_0000)];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Scrub,
}

/// A store that records every access.
struct RecordingStore {
    inner: VecStore,
    log: Mutex<Vec<(Kind, u64, u64)>>,
}

impl RecordingStore {
    fn new(size: usize) -> RecordingStore {
        RecordingStore {
            inner: VecStore::new(size, CANARY),
            log: Mutex::new(Vec::new()),
        }
    }

    fn take_log(&self) -> Vec<(Kind, u64, u64)> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl SliceStore for RecordingStore {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.log
            .lock()
            .unwrap()
            .push((Kind::Read, offset, buf.len() as u64));
        self.inner.read(offset, buf)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        self.log
            .lock()
            .unwrap()
            .push((Kind::Write, offset, data.len() as u64));
        self.inner.write(offset, data)
    }

    fn scrub(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.log.lock().unwrap().push((Kind::Scrub, offset, len));
        self.inner.scrub(offset, len)
    }
}

/// Guest memory whose byte at `a` is `pattern(a)` (never the canary or 0).
fn guest() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|(a, l)| (GuestAddress(*a), *l))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
    for (a, l) in REGIONS {
        let bytes: Vec<u8> = (a..a + l as u64).map(pattern).collect();
        mem.write_slice(&bytes, GuestAddress(a)).unwrap();
    }
    mem
}

fn pattern(a: u64) -> u8 {
    (a % 251) as u8 + 1
}

/// A device, guest memory and the ever-allocated byte map for canary checks.
struct Rig {
    dev: GpuCommandHandler<RecordingStore>,
    mem: GuestMemoryMmap,
    ever: Vec<bool>,
}

impl Rig {
    fn new(slice: usize, config: GpuConfig) -> Rig {
        Rig {
            dev: GpuCommandHandler::new(config, RecordingStore::new(slice)),
            mem: guest(),
            ever: vec![false; slice],
        }
    }

    fn live(&self) -> Vec<(u64, u64)> {
        self.dev
            .resources()
            .iter()
            .map(|(_, r)| (r.offset, r.offset + r.len))
            .collect()
    }

    /// Runs a control request, checking every store access lies inside a resource that was
    /// live before the request (scrubs: one that is gone after it).
    fn ctl(&mut self, bytes: &[u8]) -> (u32, Vec<u8>, Vec<DisplayEvent>) {
        let before = self.live();
        self.dev.store().take_log();
        let (resp, events) = self.dev.handle_control(&self.mem, bytes);
        let after = self.live();
        for (kind, off, len) in self.dev.store().take_log() {
            let end = off + len;
            assert!(
                kind == Kind::Scrub || len <= 1 << 20,
                "{kind:?} of {len} bytes"
            );
            let inside = |rs: &[(u64, u64)]| rs.iter().any(|&(s, e)| s <= off && end <= e);
            assert!(
                inside(&before),
                "{kind:?} {off:#x}+{len:#x} outside live resources"
            );
            if kind == Kind::Scrub {
                assert!(!after.contains(&(off, end)), "scrubbed a live resource");
            }
        }
        for (s, e) in after {
            self.ever[s as usize..e as usize].fill(true);
        }
        assert!(resp.len() >= HDR_SIZE);
        let t = u32::from_le_bytes(resp[0..4].try_into().unwrap());
        (t, resp, events)
    }

    fn ok(&mut self, bytes: &[u8]) -> Vec<DisplayEvent> {
        let (t, _, events) = self.ctl(bytes);
        assert_eq!(t, RespType::OkNoData as u32, "request {:x?}", &bytes[..4]);
        events
    }

    fn err(&mut self, bytes: &[u8]) -> RespType {
        let (t, _, _) = self.ctl(bytes);
        [
            RespType::ErrUnspec,
            RespType::ErrOutOfMemory,
            RespType::ErrInvalidScanoutId,
            RespType::ErrInvalidResourceId,
            RespType::ErrInvalidParameter,
        ]
        .into_iter()
        .find(|r| *r as u32 == t)
        .unwrap_or_else(|| panic!("{t:#x} is not an error response"))
    }

    /// Bytes outside live resources are the canary (never allocated) or 0 (scrubbed).
    fn check_canaries(&self) {
        let live = self.live();
        let bytes = self.dev.store().inner.bytes();
        for (i, b) in bytes.iter().enumerate() {
            let i64_ = i as u64;
            if live.iter().any(|&(s, e)| s <= i64_ && i64_ < e) {
                continue;
            }
            if self.ever[i] {
                assert!(
                    *b == 0 || *b == CANARY,
                    "freed byte {i:#x} not scrubbed: {b:#x}"
                );
            } else {
                assert_eq!(*b, CANARY, "never-allocated byte {i:#x} touched");
            }
        }
    }
}

fn rig() -> Rig {
    Rig::new(256 * 1024, GpuConfig::default())
}

fn create(id: u32, w: u32, h: u32) -> Vec<u8> {
    req(
        ctrl::RESOURCE_CREATE_2D,
        &[id, Format::B8G8R8X8 as u32, w, h],
    )
}

fn scanout(rect: Rect, s: u32, id: u32) -> Vec<u8> {
    req(
        ctrl::SET_SCANOUT,
        &[rect.x, rect.y, rect.width, rect.height, s, id],
    )
}

fn flush(rect: Rect, id: u32) -> Vec<u8> {
    req(
        ctrl::RESOURCE_FLUSH,
        &[rect.x, rect.y, rect.width, rect.height, id, 0],
    )
}

fn cursor(t: u32, s: u32, x: u32, y: u32, id: u32) -> Vec<u8> {
    req(t, &[s, x, y, 0, id, 1, 2, 0])
}

#[test]
fn display_info_reports_configured_outputs_and_resizes() {
    let mut r = rig();
    let (t, resp, _) = r.ctl(&req(ctrl::GET_DISPLAY_INFO, &[]));
    assert_eq!(t, RespType::OkDisplayInfo as u32);
    assert_eq!(resp.len(), HDR_SIZE + 16 * 24);
    assert_eq!(&resp[8..16], &7u64.to_le_bytes(), "fence echoed");
    assert_eq!(&resp[32..36], &1280u32.to_le_bytes());
    assert_eq!(&resp[36..40], &800u32.to_le_bytes());
    assert_eq!(&resp[40..44], &1u32.to_le_bytes());
    r.dev.set_outputs(vec![DisplayOne {
        rect: Rect::new(0, 0, 1024, 768),
        enabled: true,
        flags: 0,
    }]);
    let (_, resp, _) = r.ctl(&req(ctrl::GET_DISPLAY_INFO, &[]));
    assert_eq!(&resp[32..40], &[0, 4, 0, 0, 0, 3, 0, 0]);
}

#[test]
fn edid_is_answered_from_config() {
    let mut r = rig();
    let (t, resp, _) = r.ctl(&req(ctrl::GET_EDID, &[0, 0]));
    assert_eq!(
        t,
        RespType::OkEdid as u32,
        "generated from the 1280x800 output"
    );
    assert_eq!(&resp[24..28], &128u32.to_le_bytes());
    assert_eq!(resp[32 + 54 + 2], (1280 & 0xff) as u8);
    r.dev.set_outputs(vec![DisplayOne {
        rect: Rect::new(0, 0, 8000, 800),
        enabled: true,
        flags: 0,
    }]);
    assert_eq!(r.err(&req(ctrl::GET_EDID, &[0, 0])), RespType::ErrUnspec);
    assert_eq!(
        r.err(&req(ctrl::GET_EDID, &[1, 0])),
        RespType::ErrInvalidScanoutId
    );
    let config = GpuConfig {
        edids: vec![Some(vec![0x00, 0xff, 0xff, 0xff])],
        ..GpuConfig::default()
    };
    let mut r = Rig::new(4096, config);
    let (t, resp, _) = r.ctl(&req(ctrl::GET_EDID, &[0, 0]));
    assert_eq!(t, RespType::OkEdid as u32);
    assert_eq!(&resp[24..28], &4u32.to_le_bytes());
    assert_eq!(&resp[32..36], &[0x00, 0xff, 0xff, 0xff]);
}

#[test]
fn create_and_unref_count_against_the_slice() {
    let mut r = Rig::new(64 * 1024, GpuConfig::default());
    r.ok(&create(1, 64, 64));
    assert_eq!(r.err(&create(1, 4, 4)), RespType::ErrInvalidResourceId);
    assert_eq!(r.err(&create(0, 4, 4)), RespType::ErrInvalidResourceId);
    assert_eq!(r.err(&create(2, 64, 256)), RespType::ErrOutOfMemory);
    assert_eq!(
        r.err(&req(ctrl::RESOURCE_CREATE_2D, &[2, 999, 4, 4])),
        RespType::ErrInvalidParameter
    );
    assert_eq!(
        r.err(&req(ctrl::RESOURCE_UNREF, &[9, 0])),
        RespType::ErrInvalidResourceId
    );
    r.ok(&req(ctrl::RESOURCE_UNREF, &[1, 0]));
    assert_eq!(r.dev.resources().allocated_bytes(), 0);
    r.ok(&create(2, 64, 192));
    r.check_canaries();
}

#[test]
fn transfer_set_scanout_and_flush_show_guest_pixels() {
    let mut r = rig();
    r.ok(&create(1, 8, 4));
    // 128 bytes of backing in two entries from both guest regions.
    let (a0, a1) = (REGIONS[0].0 + 0x100, REGIONS[1].0 + 0x40);
    r.ok(&attach(1, &[(a0, 64), (a1, 64)]));
    let backing: Vec<u8> = (a0..a0 + 64).chain(a1..a1 + 64).map(pattern).collect();
    // Rows 1..3, columns 2..6: offset of (2,1) in a 32-byte-stride image.
    r.ok(&transfer(Rect::new(2, 1, 4, 2), 32 + 8, 1));
    let events = r.ok(&scanout(Rect::new(0, 0, 8, 4), 0, 1));
    assert_eq!(
        events,
        vec![DisplayEvent::Scanout {
            scanout: ScanoutId(0),
            width: 8,
            height: 4,
            format: Some(Format::B8G8R8X8)
        }]
    );
    let events = r.ok(&flush(Rect::new(0, 0, 8, 4), 1));
    let [DisplayEvent::Update {
        scanout,
        rect,
        pixels,
    }] = &events[..]
    else {
        panic!("{events:?}")
    };
    assert_eq!((*scanout, *rect), (ScanoutId(0), Rect::new(0, 0, 8, 4)));
    for y in 0..4usize {
        for x in 0..32usize {
            let got = pixels[y * 32 + x];
            let inside = (1..3).contains(&y) && (8..24).contains(&x);
            // Bytes never transferred hold what the slice held: here, the canary.
            let want = if inside { backing[y * 32 + x] } else { CANARY };
            assert_eq!(got, want, "pixel byte ({x},{y})");
        }
    }
    // A full-width transfer, then a partial flush in scanout coordinates.
    r.ok(&transfer(Rect::new(0, 0, 8, 4), 0, 1));
    let events = r.ok(&flush(Rect::new(1, 1, 2, 1), 1));
    let [DisplayEvent::Update { rect, pixels, .. }] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(*rect, Rect::new(1, 1, 2, 1));
    assert_eq!(pixels[..], backing[36..44]);
    r.check_canaries();
}

#[test]
fn transfer_errors() {
    let mut r = rig();
    r.ok(&create(1, 8, 4));
    assert_eq!(
        r.err(&transfer(Rect::new(0, 0, 8, 4), 0, 1)),
        RespType::ErrUnspec,
        "no backing"
    );
    assert_eq!(
        r.err(&transfer(Rect::new(0, 0, 1, 1), 0, 2)),
        RespType::ErrInvalidResourceId
    );
    r.ok(&attach(1, &[(REGIONS[0].0, 128)]));
    for (rect, offset) in [
        (Rect::new(1, 0, 8, 4), 0),
        (Rect::new(0, 0, 8, 5), 0),
        (Rect::new(u32::MAX, 0, 2, 1), 0),
        (Rect::new(0, 0, 8, 4), 4),
        (Rect::new(0, 0, 1, 1), 125),
        (Rect::new(0, 0, 1, 1), u64::MAX),
    ] {
        assert_eq!(
            r.err(&transfer(rect, offset, 1)),
            RespType::ErrInvalidParameter,
            "{rect:?} at {offset}"
        );
    }
    r.ok(&transfer(Rect::new(0, 0, 1, 1), 124, 1));
    r.check_canaries();
}

#[test]
fn attach_and_detach_backing_errors() {
    let mut r = rig();
    r.ok(&create(1, 4, 4));
    let (g0, g1) = (REGIONS[0].0, REGIONS[1].0);
    for entries in [
        vec![],
        vec![(g0, 0)],
        vec![(0, 64)],
        vec![(g0 + REGIONS[0].1 as u64 - 8, 64)],
        vec![(g0, 64), (g0 + 32, 64)],
        vec![(g1, 64), (g1, 64)],
        vec![(u64::MAX - 8, 64)],
    ] {
        assert_eq!(
            r.err(&attach(1, &entries)),
            RespType::ErrUnspec,
            "{entries:x?}"
        );
    }
    assert_eq!(
        r.err(&attach(2, &[(g0, 64)])),
        RespType::ErrInvalidResourceId
    );
    r.ok(&attach(1, &[(g0, 64)]));
    assert_eq!(r.err(&attach(1, &[(g0, 64)])), RespType::ErrUnspec);
    r.ok(&req(ctrl::RESOURCE_DETACH_BACKING, &[1, 0]));
    assert_eq!(
        r.err(&req(ctrl::RESOURCE_DETACH_BACKING, &[1, 0])),
        RespType::ErrUnspec
    );
    assert_eq!(
        r.err(&req(ctrl::RESOURCE_ATTACH_BACKING, &[1, 1_000_000])),
        RespType::ErrInvalidParameter,
        "entry count cap"
    );
}

#[test]
fn scanout_ids_rects_and_disable() {
    let config = GpuConfig {
        max_scanouts: 2,
        ..GpuConfig::default()
    };
    let mut r = Rig::new(64 * 1024, config);
    r.ok(&create(1, 16, 16));
    let full = Rect::new(0, 0, 16, 16);
    assert_eq!(r.err(&scanout(full, 2, 1)), RespType::ErrInvalidScanoutId);
    assert_eq!(
        r.err(&scanout(full, u32::MAX, 1)),
        RespType::ErrInvalidScanoutId
    );
    assert_eq!(r.err(&scanout(full, 0, 2)), RespType::ErrInvalidResourceId);
    assert_eq!(
        r.err(&scanout(Rect::new(8, 8, 16, 16), 0, 1)),
        RespType::ErrInvalidParameter
    );
    assert_eq!(
        r.err(&scanout(Rect::new(0, 0, 0, 16), 0, 1)),
        RespType::ErrInvalidParameter
    );
    r.ok(&scanout(full, 0, 1));
    r.ok(&scanout(Rect::new(8, 8, 8, 8), 1, 1));
    let events = r.ok(&flush(Rect::new(4, 4, 8, 8), 1));
    assert_eq!(events.len(), 2, "both scanouts show the resource");
    let DisplayEvent::Update { rect, .. } = &events[1] else {
        panic!()
    };
    assert_eq!(*rect, Rect::new(0, 0, 4, 4), "in scanout 1's coordinates");
    assert_eq!(
        r.err(&flush(Rect::new(4, 4, 16, 8), 1)),
        RespType::ErrInvalidParameter
    );
    let events = r.ok(&req(ctrl::RESOURCE_UNREF, &[1, 0]));
    assert_eq!(events.len(), 2, "unref disables both scanouts: {events:?}");
    let events = r.ok(&scanout(full, 1, 0));
    assert!(matches!(
        events[..],
        [DisplayEvent::Scanout {
            width: 0,
            height: 0,
            ..
        }]
    ));
}

#[test]
fn cursor_queue() {
    let mut r = rig();
    r.ok(&create(5, CURSOR_SIZE, CURSOR_SIZE));
    r.ok(&create(6, 8, 8));
    let pos = CursorPos {
        scanout: ScanoutId(0),
        x: 10,
        y: 20,
    };
    let ev = r
        .dev
        .handle_cursor(&cursor(ctrl::UPDATE_CURSOR, 0, 10, 20, 5));
    let [DisplayEvent::CursorUpdate {
        pos: p,
        hot_x: 1,
        hot_y: 2,
        format: Format::B8G8R8X8,
        pixels,
    }] = &ev[..]
    else {
        panic!("{ev:?}")
    };
    assert_eq!((*p, pixels.len()), (pos, 64 * 64 * 4));
    assert_eq!(
        r.dev
            .handle_cursor(&cursor(ctrl::MOVE_CURSOR, 0, 10, 20, 0)),
        vec![DisplayEvent::CursorMove(pos)]
    );
    assert_eq!(
        r.dev
            .handle_cursor(&cursor(ctrl::UPDATE_CURSOR, 0, 10, 20, 0)),
        vec![DisplayEvent::CursorHide(pos)]
    );
    for bad in [
        cursor(ctrl::UPDATE_CURSOR, 0, 0, 0, 6),
        cursor(ctrl::UPDATE_CURSOR, 0, 0, 0, 7),
        cursor(ctrl::UPDATE_CURSOR, 1, 0, 0, 5),
        cursor(ctrl::MOVE_CURSOR, 3, 0, 0, 5),
        req(ctrl::GET_DISPLAY_INFO, &[]),
        vec![1, 2, 3],
    ] {
        assert!(r.dev.handle_cursor(&bad).is_empty());
    }
    for (kind, off, len) in r.dev.store().take_log() {
        assert_eq!(kind, Kind::Read);
        let res = r.dev.resources().get(super::wire::ResourceId(5)).unwrap();
        assert_eq!((off, len), (res.offset, res.len));
    }
    assert_eq!(
        r.err(&cursor(ctrl::MOVE_CURSOR, 0, 0, 0, 5)),
        RespType::ErrUnspec,
        "cursor commands on the control queue"
    );
}

#[test]
fn reset_scrubs_everything() {
    let mut r = rig();
    r.ok(&create(1, 8, 8));
    r.ok(&attach(1, &[(REGIONS[0].0, 256)]));
    r.ok(&transfer(Rect::new(0, 0, 8, 8), 0, 1));
    let before = r.live();
    r.dev.reset().unwrap();
    let scrubs: Vec<(u64, u64)> = r
        .dev
        .store()
        .take_log()
        .into_iter()
        .map(|(k, o, l)| {
            assert_eq!(k, Kind::Scrub);
            (o, o + l)
        })
        .collect();
    assert_eq!(scrubs, before);
    assert_eq!(r.dev.resources().iter().count(), 0);
    r.check_canaries();
    r.ok(&create(1, 8, 8));
}

/// A guest-chosen value: mostly small, else near a boundary or anything.
fn value() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => 0u32..24,
        1 => Just(u32::MAX),
        1 => (u32::MAX - 40)..=u32::MAX,
        1 => any::<u32>(),
    ]
}

/// A rectangle: often a small one that fits the resources the sequences create, else hostile.
fn rect() -> impl Strategy<Value = Rect> {
    prop_oneof![
        2 => (0u32..4, 0u32..4, 1u32..12, 1u32..12),
        1 => (value(), value(), value(), value()),
    ]
    .prop_map(|(x, y, w, h)| Rect::new(x, y, w, h))
}

/// A backing address: mostly inside a guest region, else anywhere (holes, past the end).
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (0usize..2, 0u64..0x8000).prop_map(|(r, o)| REGIONS[r].0 + o),
        1 => 0u64..0x5_0000,
        1 => Just(u64::MAX - 16),
        1 => any::<u64>(),
        1 => (0u64..0x1000).prop_map(|o| REGIONS[0].0 + REGIONS[0].1 as u64 - o),
    ]
}

/// A resource id: mostly one of the few the sequence creates, sometimes 0 or unknown.
fn id() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 1u32..4, 1 => 0u32..8]
}

/// One request, well-formed or not.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let format = prop_oneof![3 => Just(1u32), 1 => Just(134), 1 => any::<u32>()];
    let size = prop_oneof![4 => 1u32..40, 1 => 0u32..70];
    prop_oneof![
        3 => (id(), format, size.clone(), size)
            .prop_map(|(i, f, w, h)| req(ctrl::RESOURCE_CREATE_2D, &[i, f, w, h])),
        1 => id().prop_map(|i| req(ctrl::RESOURCE_UNREF, &[i, 0])),
        3 => (id(), proptest::collection::vec((addr(), 0u32..0x3000), 0..4))
            .prop_map(|(i, e)| attach(i, &e)),
        1 => id().prop_map(|i| req(ctrl::RESOURCE_DETACH_BACKING, &[i, 0])),
        4 => (rect(), prop_oneof![3 => 0u64..2000, 1 => any::<u64>()], id())
            .prop_map(|(r, o, i)| transfer(r, o, i)),
        2 => (rect(), 0u32..3, id()).prop_map(|(r, s, i)| scanout(r, s, i)),
        3 => (rect(), id()).prop_map(|(r, i)| flush(r, i)),
        1 => (value(), value()).prop_map(|(a, b)| req(ctrl::GET_EDID, &[a % 20, b])),
        1 => Just(req(ctrl::GET_DISPLAY_INFO, &[])),
        1 => proptest::collection::vec(any::<u8>(), 0..80),
    ]
}

/// A request, sometimes cut short or padded.
fn mangled() -> impl Strategy<Value = (Vec<u8>, Option<i16>)> {
    (
        request(),
        prop_oneof![5 => Just(None), 1 => (-30i16..30).prop_map(Some)],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn hostile_sequences_stay_inside_resources(
        sizes in proptest::collection::vec((8u32..40, 8u32..40), 3),
        ops in proptest::collection::vec(mangled(), 1..60),
    ) {
        let mut r = Rig::new(96 * 1024, GpuConfig { max_scanouts: 2, max_resources: 4, ..GpuConfig::default() });
        // Start from live state: three resources, two with backing, one on a scanout.
        for (i, (w, h)) in sizes.iter().enumerate() {
            r.ok(&create(i as u32 + 1, *w, *h));
        }
        r.ok(&attach(1, &[(REGIONS[0].0, 0x4000), (REGIONS[1].0 + 0x8000, 0x4000)]));
        r.ok(&attach(2, &[(REGIONS[1].0, 0x2000)]));
        r.ok(&scanout(Rect::new(0, 0, sizes[0].0, sizes[0].1), 0, 1));
        for (mut bytes, cut) in ops {
            let full = bytes.len();
            match cut {
                Some(c) if c < 0 => bytes.truncate(full.saturating_sub(c.unsigned_abs() as usize)),
                Some(c) => bytes.extend(std::iter::repeat_n(0x5a, c as usize)),
                None => {}
            }
            let mangled = bytes.len() != full && bytes.len() >= HDR_SIZE;
            let (t, _, _) = r.ctl(&bytes);
            if mangled {
                let known = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
                if (0x0100..=0x0107).contains(&known) || known == 0x010a {
                    prop_assert_eq!(t, RespType::ErrInvalidParameter as u32, "{:x?}", bytes);
                }
            }
            let _ = r.dev.handle_cursor(&bytes);
            prop_assert!(r.dev.store().take_log().iter().all(|(k, _, _)| *k == Kind::Read));
        }
        r.check_canaries();
    }

    #[test]
    fn unknown_commands_get_unspec_with_fence(t in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        prop_assume!(!(0x0100..=0x0107).contains(&t) && t != 0x010a);
        let mut r = rig();
        let mut bytes = hdr(t, 0xfeed);
        bytes.extend(tail);
        let (ty, resp, events) = r.ctl(&bytes);
        prop_assert_eq!(ty, RespType::ErrUnspec as u32);
        prop_assert_eq!(&resp[8..16], &0xfeedu64.to_le_bytes());
        prop_assert!(events.is_empty());
    }

    #[test]
    fn transfer_accepts_exactly_what_fits(rect in rect(), offset in prop_oneof![0u64..3000, any::<u64>()]) {
        let mut r = rig();
        r.ok(&create(1, 16, 8));
        let backing = 2048u64;
        r.ok(&attach(1, &[(REGIONS[0].0, 1024), (REGIONS[1].0, 1024)]));
        let fits = u64::from(rect.x) + u64::from(rect.width) <= 16
            && u64::from(rect.y) + u64::from(rect.height) <= 8;
        let end = if rect.height == 0 || rect.width == 0 {
            0
        } else {
            u128::from(offset) + 64 * u128::from(rect.height - 1) + 4 * u128::from(rect.width)
        };
        let (t, _, _) = r.ctl(&transfer(rect, offset, 1));
        let want = if fits && end <= u128::from(backing) { RespType::OkNoData } else { RespType::ErrInvalidParameter };
        prop_assert_eq!(t, want as u32);
        r.check_canaries();
    }

    #[test]
    fn scanout_ids_past_max_are_refused(max in 1u32..=16, id in any::<u32>()) {
        let mut r = Rig::new(8192, GpuConfig { max_scanouts: max, ..GpuConfig::default() });
        r.ok(&create(1, 4, 4));
        let (t, _, _) = r.ctl(&scanout(Rect::new(0, 0, 4, 4), id, 1));
        let want = if id < max { RespType::OkNoData } else { RespType::ErrInvalidScanoutId };
        prop_assert_eq!(t, want as u32);
    }

    #[test]
    fn ids_reused_or_unknown_are_refused(ids in proptest::collection::vec((any::<bool>(), 0u32..5), 1..30)) {
        let mut r = rig();
        let mut live = std::collections::BTreeSet::new();
        for (make, id) in ids {
            let (t, _, _) = if make { r.ctl(&create(id, 2, 2)) } else { r.ctl(&req(ctrl::RESOURCE_UNREF, &[id, 0])) };
            let ok = if make { id != 0 && live.insert(id) } else { live.remove(&id) };
            let want = if ok { RespType::OkNoData } else { RespType::ErrInvalidResourceId };
            prop_assert_eq!(t, want as u32);
        }
        r.check_canaries();
    }
}

#[test]
fn full_frame_transfer_copies_in_bounded_chunks() {
    let frame = 1280 * 800 * 4;
    let base = 0x10_0000u64;
    let mut r = Rig::new(8 << 20, GpuConfig::default());
    r.mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(base), frame)]).unwrap();
    let bytes: Vec<u8> = (0..frame as u64).map(pattern).collect();
    r.mem.write_slice(&bytes, GuestAddress(base)).unwrap();
    r.ok(&create(1, 1280, 800));
    r.ok(&attach(1, &[(base, frame as u32)]));
    let before = r.dev.store().take_log();
    assert!(before.is_empty());
    let (t, _, _) = r.ctl(&transfer(Rect::new(0, 0, 1280, 800), 0, 1));
    assert_eq!(t, RespType::OkNoData as u32);
    let off = r
        .dev
        .resources()
        .get(super::wire::ResourceId(1))
        .unwrap()
        .offset as usize;
    assert_eq!(&r.dev.store().inner.bytes()[off..off + frame], &bytes[..]);
    r.ok(&scanout(Rect::new(0, 0, 1280, 800), 0, 1));
    let events = r.ok(&flush(Rect::new(0, 0, 1280, 800), 1));
    let [DisplayEvent::Update { pixels, .. }] = &events[..] else {
        panic!()
    };
    assert_eq!(pixels[..], bytes[..]);
}

/// Two guests, each with a device over its own slice of one GPU's VRAM: each one's resource
/// bytes land in its own slice and nowhere else, and a guest whose slice is full gets
/// OUT_OF_MEMORY rather than the other's VRAM.
#[test]
fn two_guests_keep_their_pixels_in_their_own_slices() {
    use std::sync::Arc;

    use super::store::SliceVramStore;
    use crate::host_driver::addr::VramAddr;
    use crate::host_gpu::emulated::EmulatedHostGpu;
    use crate::host_gpu::HostGpu;
    use crate::slice::{HostVram, Slice};

    let host: Arc<dyn HostGpu> = Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap());
    let vram = Arc::new(HostVram::new(host).unwrap());
    let size = 64 * 1024u64;
    let slices = [
        Slice::new(VramAddr::new(0x800_0000), size),
        Slice::new(VramAddr::new(0x800_0000 + size), size),
    ];
    let mem = guest();
    let data = |g: usize| -> Vec<u8> {
        (0..1024)
            .map(|i| (i % 7) as u8 + 0x10 * (g as u8 + 1))
            .collect()
    };
    for (g, (region, _)) in REGIONS.iter().enumerate() {
        mem.write_slice(&data(g), GuestAddress(*region)).unwrap();
    }
    let mut devs: Vec<_> = slices
        .iter()
        .map(|s| {
            GpuCommandHandler::new(
                GpuConfig::default(),
                SliceVramStore::new(Arc::clone(&vram), *s),
            )
        })
        .collect();
    let ok = RespType::OkNoData as u32;
    let t =
        |resp: (Vec<u8>, Vec<DisplayEvent>)| u32::from_le_bytes(resp.0[0..4].try_into().unwrap());
    for (g, dev) in devs.iter_mut().enumerate() {
        assert_eq!(t(dev.handle_control(&mem, &create(1, 16, 16))), ok);
        let region = REGIONS[g].0;
        assert_eq!(
            t(dev.handle_control(&mem, &attach(1, &[(region, 1024)]))),
            ok
        );
        assert_eq!(
            t(dev.handle_control(&mem, &transfer(Rect::new(0, 0, 16, 16), 0, 1))),
            ok
        );
        assert_eq!(
            t(dev.handle_control(&mem, &create(2, 128, 128))),
            RespType::ErrOutOfMemory as u32,
            "64 KiB of slice already holds 1 KiB; 64 KiB more does not fit"
        );
    }
    for (g, s) in slices.iter().enumerate() {
        let want = data(g);
        let mut all = vec![0u8; size as usize];
        vram.read(s.start(), &mut all).unwrap();
        let at = devs[g]
            .resources()
            .get(super::wire::ResourceId(1))
            .unwrap()
            .offset as usize;
        assert_eq!(
            &all[at..at + 1024],
            &want[..],
            "guest {g}'s pixels in its slice"
        );
        let theirs = data(1 - g);
        assert!(
            !all.windows(64).any(|w| w == &theirs[..64]),
            "the other guest's pixels are not in slice {g}"
        );
    }
}

/// A flush larger than one update is sent as tiles of at most `MAX_UPDATE_BYTES`, which
/// together show every pixel of the flushed area exactly once, at its place.
#[test]
fn large_flushes_are_tiled_and_cover_every_pixel_once() {
    use super::device::MAX_UPDATE_BYTES;
    use std::sync::Arc;

    for (w, h) in [
        (2048u32, 1024u32),
        ((MAX_UPDATE_BYTES / 4) as u32 + 1, 2),
        (1280, 800),
    ] {
        let len = w as usize * h as usize * 4;
        let store = Arc::new(Mutex::new(VecStore::new(len + 8192, 0)));
        let mut dev = GpuCommandHandler::new(GpuConfig::default(), Arc::clone(&store));
        let mem = guest();
        let ok = |(resp, _): (Vec<u8>, Vec<DisplayEvent>)| {
            assert_eq!(
                u32::from_le_bytes(resp[..4].try_into().unwrap()),
                RespType::OkNoData as u32
            );
        };
        ok(dev.handle_control(&mem, &create(1, w, h)));
        let offset = dev.resources().iter().next().unwrap().1.offset;
        // Pixel (x, y) holds y << 24 | x (x < 2^24 here).
        let bytes: Vec<u8> = (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| ((y << 24) | x).to_le_bytes()))
            .collect();
        store.lock().unwrap().write(offset, &bytes).unwrap();
        ok(dev.handle_control(&mem, &scanout(Rect::new(0, 0, w, h), 0, 1)));
        let (resp, events) = dev.handle_control(&mem, &flush(Rect::new(0, 0, w, h), 1));
        assert_eq!(
            u32::from_le_bytes(resp[..4].try_into().unwrap()),
            RespType::OkNoData as u32
        );
        let mut seen = vec![false; w as usize * h as usize];
        let mut updates = 0;
        for e in events {
            let DisplayEvent::Update { rect, pixels, .. } = e else {
                panic!("{e:?}")
            };
            updates += 1;
            assert!(pixels.len() as u64 <= MAX_UPDATE_BYTES, "{rect:?}");
            assert_eq!(pixels.len(), rect.width as usize * rect.height as usize * 4);
            for (i, px) in pixels.chunks_exact(4).enumerate() {
                let (x, y) = (
                    rect.x + i as u32 % rect.width,
                    rect.y + i as u32 / rect.width,
                );
                assert_eq!(u32::from_le_bytes(px.try_into().unwrap()), (y << 24) | x);
                let at = y as usize * w as usize + x as usize;
                assert!(!seen[at], "pixel ({x}, {y}) sent twice");
                seen[at] = true;
            }
        }
        assert!(seen.iter().all(|s| *s), "{w}x{h}: a pixel was not sent");
        let want = (len as u64).div_ceil(MAX_UPDATE_BYTES);
        assert!(updates as u64 >= want, "{w}x{h}: {updates} updates");
        if len as u64 <= MAX_UPDATE_BYTES {
            assert_eq!(updates, 1, "{w}x{h} fits one update");
        }
    }
}
