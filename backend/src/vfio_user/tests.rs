//! Protocol tests: a fake device served over a socketpair or a socket file, driven by the
//! test client; plus a proptest byte-stream fuzzer and a benchmark smoke run.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::device::{
    ClientDmaMap, DeviceInfo, Errno, IrqInfo, RegionInfo, RegionMmap, SparseArea, VfioUserDevice,
};
use super::protocol::{
    dma_flags, flags, irq_flags, pci, region_flags, CapHeader, Command, DmaMessageLayout, Header,
    RegionAccessMsg, RegionInfoMsg, SparseAreaMsg, SparseMmapMsg, HEADER_SIZE,
};
use super::server::BindError;
use super::test_client::{ClientError, DmaBacking, TestClient};
use super::{
    bench_region_read, serve_stream, BenchMode, ClientHandle, ConnectionStats, DmaError, IrqError,
    Server, ServerConfig, ServerError, ShutdownSignal, DEFAULT_SOCKET_MODE,
};

// ---------------------------------------------------------------------------------------------
// Helpers

fn memfd(name: &str, size: u64) -> OwnedFd {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: valid fd.
    assert_eq!(
        unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) },
        0
    );
    fd
}

/// A memfd that can be sealed, with `seals` added (`F_ADD_SEALS`; none if 0).
fn memfd_with_seals(name: &str, size: u64, seals: libc::c_int) -> OwnedFd {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: valid fd.
    assert_eq!(
        unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) },
        0
    );
    if seals != 0 {
        // SAFETY: F_ADD_SEALS with an int argument on a valid memfd.
        assert_eq!(
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) },
            0
        );
    }
    fd
}

/// Guest RAM as QEMU's `memory-backend-memfd` shares it: sealed against shrinking and growing,
/// so the server maps it directly.
fn sealed_memfd(name: &str, size: u64) -> OwnedFd {
    memfd_with_seals(
        name,
        size,
        libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
    )
}

fn eventfd() -> OwnedFd {
    // SAFETY: plain eventfd creation.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Read and reset an eventfd counter (0 if it was not signalled).
fn eventfd_count(fd: &OwnedFd) -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: 8-byte read into a local buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    if n == 8 {
        u64::from_ne_bytes(buf)
    } else {
        0
    }
}

fn pread(fd: &OwnedFd, offset: u64, buf: &mut [u8]) {
    // SAFETY: reads into a valid buffer of buf.len() bytes.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    };
    assert_eq!(n, buf.len() as isize);
}

fn pwrite(fd: &OwnedFd, offset: u64, data: &[u8]) {
    // SAFETY: writes from a valid buffer of data.len() bytes.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            offset as libc::off_t,
        )
    };
    assert_eq!(n, data.len() as isize);
}

/// A shared read-write mapping owned by the test, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Mapping {
        // SAFETY: a fresh shared mapping of `len` bytes of `fd`; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Mapping {
            ptr: ptr.cast(),
            len,
        }
    }
    fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        // SAFETY: in bounds of the mapping; the memory is shared with the server but only raw
        // byte copies are done (no references are formed).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
    }
    fn read(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset + buf.len() <= self.len);
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), buf.as_mut_ptr(), buf.len()) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn proc_maps_contains(needle: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .contains(needle)
}

fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

// ---------------------------------------------------------------------------------------------
// Fake device

const BAR0: u32 = 0;
const BAR1: u32 = 1; // memfd-backed, sparse mmap
const BAR2: u32 = 2; // memfd-backed, whole-region mmap
const CONFIG: u32 = pci::CONFIG_REGION_INDEX;
const BAR1_SIZE: u64 = 0x10000;
const BAR1_FILE_OFFSET: u64 = 0x10000;
const BAR2_SIZE: u64 = 0x2000;
const MSIX_VECTORS: u32 = 16;

/// A minimal type-0 PCI header (vendor 0x1234, device 0x0001, class 0xff, no capabilities):
/// enough for QEMU to realize the device.
fn fake_config_space() -> Vec<u8> {
    let mut c = vec![0u8; 256];
    c[0..2].copy_from_slice(&0x1234u16.to_le_bytes());
    c[2..4].copy_from_slice(&0x0001u16.to_le_bytes());
    c[0x0b] = 0xff;
    c
}

struct FakeDevice {
    bar0: Mutex<Vec<u8>>,
    config: Mutex<Vec<u8>>,
    bar1: Arc<OwnedFd>,
    bar2: Arc<OwnedFd>,
    handle: Mutex<Option<ClientHandle>>,
    connects: AtomicU32,
    disconnects: AtomicU32,
    resets: AtomicU32,
    writes: AtomicU64,
}

impl FakeDevice {
    fn new() -> Arc<FakeDevice> {
        Arc::new(FakeDevice {
            bar0: Mutex::new(vec![0; 4096]),
            config: Mutex::new(fake_config_space()),
            bar1: Arc::new(memfd("bar1", BAR1_FILE_OFFSET + BAR1_SIZE)),
            bar2: Arc::new(memfd("bar2", BAR2_SIZE)),
            handle: Mutex::new(None),
            connects: AtomicU32::new(0),
            disconnects: AtomicU32::new(0),
            resets: AtomicU32::new(0),
            writes: AtomicU64::new(0),
        })
    }

    fn handle(&self) -> ClientHandle {
        self.handle
            .lock()
            .unwrap()
            .clone()
            .expect("no client connected")
    }
}

impl VfioUserDevice for FakeDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            num_regions: pci::NUM_REGIONS,
            num_irqs: pci::NUM_IRQS,
            resettable: true,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        match index {
            BAR0 => Some(RegionInfo {
                size: 4096,
                readable: true,
                writable: true,
                mmap: None,
            }),
            BAR1 => Some(RegionInfo {
                size: BAR1_SIZE,
                readable: true,
                writable: true,
                mmap: Some(RegionMmap {
                    fd: Arc::clone(&self.bar1),
                    file_offset: BAR1_FILE_OFFSET,
                    sparse_areas: vec![
                        SparseArea {
                            offset: 0x1000,
                            size: 0x2000,
                        },
                        SparseArea {
                            offset: 0x8000,
                            size: 0x8000,
                        },
                        // Outside the region: dropped by the server.
                        SparseArea {
                            offset: 0xf000,
                            size: 0x2000,
                        },
                    ],
                }),
            }),
            BAR2 => Some(RegionInfo {
                size: BAR2_SIZE,
                readable: true,
                writable: true,
                mmap: Some(RegionMmap {
                    fd: Arc::clone(&self.bar2),
                    file_offset: 0,
                    sparse_areas: Vec::new(),
                }),
            }),
            CONFIG => Some(RegionInfo {
                size: 256,
                readable: true,
                writable: true,
                mmap: None,
            }),
            _ => None,
        }
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let eventfd = true;
        match index {
            pci::INTX_IRQ_INDEX => Some(IrqInfo {
                count: 1,
                eventfd,
                maskable: true,
                automasked: true,
                noresize: false,
            }),
            pci::MSI_IRQ_INDEX => Some(IrqInfo {
                count: 1,
                eventfd,
                ..Default::default()
            }),
            pci::MSIX_IRQ_INDEX => Some(IrqInfo {
                count: MSIX_VECTORS,
                eventfd,
                maskable: true,
                automasked: false,
                noresize: true,
            }),
            pci::ERR_IRQ_INDEX | pci::REQ_IRQ_INDEX => Some(IrqInfo {
                count: 1,
                eventfd,
                ..Default::default()
            }),
            _ => None,
        }
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        let o = offset as usize;
        match index {
            BAR0 => buf.copy_from_slice(&self.bar0.lock().unwrap()[o..o + buf.len()]),
            CONFIG => buf.copy_from_slice(&self.config.lock().unwrap()[o..o + buf.len()]),
            BAR1 => pread(&self.bar1, BAR1_FILE_OFFSET + offset, buf),
            BAR2 => pread(&self.bar2, offset, buf),
            _ => return Err(Errno::EIO),
        }
        Ok(buf.len())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let o = offset as usize;
        match index {
            BAR0 => self.bar0.lock().unwrap()[o..o + data.len()].copy_from_slice(data),
            CONFIG => self.config.lock().unwrap()[o..o + data.len()].copy_from_slice(data),
            BAR1 => pwrite(&self.bar1, BAR1_FILE_OFFSET + offset, data),
            BAR2 => pwrite(&self.bar2, offset, data),
            _ => return Err(Errno::EIO),
        }
        Ok(data.len())
    }

    fn reset(&self) -> Result<(), Errno> {
        self.resets.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn client_connected(&self, client: ClientHandle) {
        self.connects.fetch_add(1, Ordering::SeqCst);
        *self.handle.lock().unwrap() = Some(client);
    }

    fn client_disconnected(&self) {
        self.disconnects.fetch_add(1, Ordering::SeqCst);
    }
}

/// A connection served over a socketpair on its own thread.
struct Session {
    client: TestClient,
    device: Arc<FakeDevice>,
    server: JoinHandle<Result<ConnectionStats, ServerError>>,
}

impl Session {
    fn start(config: ServerConfig) -> Session {
        let device = FakeDevice::new();
        let (a, b) = UnixStream::pair().unwrap();
        let dev: Arc<dyn VfioUserDevice> = device.clone();
        let server = std::thread::spawn(move || serve_stream(b, dev, config, None));
        Session {
            client: TestClient::new(a),
            device,
            server,
        }
    }

    fn negotiated() -> Session {
        let mut s = Session::start(ServerConfig::default());
        s.client.version().unwrap();
        s
    }

    /// Close the client side and wait for the connection to end.
    fn close(self) -> (Arc<FakeDevice>, ConnectionStats) {
        drop(self.client);
        let stats = self.server.join().unwrap().unwrap();
        (self.device, stats)
    }
}

fn errno_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> i32 {
    match r {
        Err(ClientError::Errno(e)) => e.0,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake and device information

#[test]
fn version_negotiates_limits_and_echoes_only_offered_caps() {
    let mut s = Session::start(ServerConfig::default());
    let json = r#"{"capabilities":{"max_msg_fds":4,"max_data_xfer_size":65536,"max_dma_maps":100,"twin_socket":{"supported":true},"unknown":[1]}}"#;
    let (v, caps) = s.client.version_with(0, 0, Some(json)).unwrap();
    assert_eq!((v.major, v.minor), (0, 0));
    assert_eq!(caps.max_data_xfer_size, Some(65536));
    assert_eq!(caps.max_dma_maps, Some(100));
    assert_eq!(caps.max_msg_fds, Some(16));
    assert_eq!(caps.pgsizes, Some(4096));
    assert_eq!(caps.write_multiple, None, "not offered by the client");
    // The negotiated transfer size applies.
    assert_eq!(errno_of(s.client.region_read(BAR1, 0, 65537)), libc::E2BIG);
    assert_eq!(s.client.region_read(BAR1, 0, 65536).unwrap().len(), 65536);
    // A second VERSION is refused.
    assert_eq!(errno_of(s.client.version()), libc::EINVAL);
    s.close();
}

#[test]
fn version_without_json_and_higher_minor() {
    let mut s = Session::start(ServerConfig::default());
    let (v, caps) = s.client.version_with(0, 7, None).unwrap();
    assert_eq!((v.major, v.minor), (0, 1));
    assert_eq!(caps.max_data_xfer_size, Some(1 << 20));
    assert_eq!(
        s.client.device_info().unwrap().num_regions,
        pci::NUM_REGIONS
    );
    s.close();

    let mut s = Session::start(ServerConfig::default());
    assert_eq!(errno_of(s.client.version_with(1, 0, None)), libc::ENOTSUP);
    assert_eq!(
        errno_of(s.client.version_with(0, 0, Some("{broken"))),
        libc::EINVAL
    );
    s.client
        .version_with(0, 0, Some(r#"{"capabilities":"odd"}"#))
        .unwrap();
    s.close();
}

#[test]
fn commands_before_version_are_refused() {
    let mut s = Session::start(ServerConfig::default());
    assert_eq!(errno_of(s.client.device_info()), libc::EINVAL);
    s.client.version().unwrap();
    let info = s.client.device_info().unwrap();
    assert_eq!(info.flags, 0b11, "PCI | RESET");
    assert_eq!((info.num_regions, info.num_irqs, info.argsz), (9, 5, 16));
    s.close();
}

#[test]
fn irq_info_and_missing_regions() {
    let mut s = Session::negotiated();
    let msix = s.client.irq_info(pci::MSIX_IRQ_INDEX).unwrap();
    assert_eq!(msix.count, MSIX_VECTORS);
    assert_eq!(
        msix.flags,
        irq_flags::INFO_EVENTFD | irq_flags::INFO_MASKABLE | irq_flags::INFO_NORESIZE
    );
    let intx = s.client.irq_info(pci::INTX_IRQ_INDEX).unwrap();
    assert_eq!(
        intx.flags & irq_flags::INFO_AUTOMASKED,
        irq_flags::INFO_AUTOMASKED
    );
    assert_eq!(errno_of(s.client.irq_info(5)), libc::EINVAL);
    // Regions the device does not have (but within num_regions) are empty, not errors.
    let (vga, _, fd) = s.client.region_info(pci::VGA_REGION_INDEX, 32).unwrap();
    assert_eq!((vga.size, vga.flags), (0, 0));
    assert!(fd.is_none());
    assert_eq!(errno_of(s.client.region_info(9, 32)), libc::EINVAL);
    assert_eq!(errno_of(s.client.region_info(0, 16)), libc::EINVAL);
    let (cfg, _, _) = s.client.region_info(CONFIG, 32).unwrap();
    assert_eq!(
        (cfg.size, cfg.flags),
        (256, region_flags::READ | region_flags::WRITE)
    );
    s.close();
}

// ---------------------------------------------------------------------------------------------
// Regions

#[test]
fn sparse_region_info_argsz_retry_fd_and_mmap() {
    let mut s = Session::negotiated();
    // First query with the bare struct size: needed argsz only, no caps, no fd.
    let (short, payload, fd) = s.client.region_info(BAR1, 32).unwrap();
    let needed =
        (RegionInfoMsg::SIZE + CapHeader::SIZE + SparseMmapMsg::SIZE + 2 * SparseAreaMsg::SIZE)
            as u32;
    assert_eq!(short.argsz, needed);
    assert_eq!(short.flags & region_flags::CAPS, 0);
    assert_eq!(short.cap_offset, 0);
    assert_eq!(payload.len(), RegionInfoMsg::SIZE);
    assert!(fd.is_none());

    // Retry with the needed size: caps and the fd.
    let (info, payload, fd) = s.client.region_info(BAR1, needed).unwrap();
    assert_eq!(info.argsz, needed);
    assert_eq!(
        info.flags,
        region_flags::READ | region_flags::WRITE | region_flags::MMAP | region_flags::CAPS
    );
    assert_eq!(
        (info.size, info.offset, info.cap_offset),
        (BAR1_SIZE, BAR1_FILE_OFFSET, 32)
    );
    let cap = CapHeader::decode(&payload[32..]).unwrap();
    assert_eq!((cap.id, cap.version, cap.next), (1, 1, 0));
    let sparse = SparseMmapMsg::decode(&payload[40..]).unwrap();
    assert_eq!(sparse.nr_areas, 2);
    let a0 = SparseAreaMsg::decode(&payload[48..]).unwrap();
    let a1 = SparseAreaMsg::decode(&payload[64..]).unwrap();
    assert_eq!(
        (a0.offset, a0.size, a1.offset, a1.size),
        (0x1000, 0x2000, 0x8000, 0x8000)
    );
    let fd = fd.expect("region fd");

    // Map the first area as QEMU would, write through it, read it back with REGION_READ.
    let map = Mapping::new(fd.as_fd(), info.offset + a0.offset, a0.size as usize);
    map.write(0x10, &[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(
        s.client.region_read(BAR1, 0x1010, 4).unwrap(),
        vec![0xde, 0xad, 0xbe, 0xef]
    );
    // And the other way round: a trapped write shows up in the mapping.
    s.client
        .region_write(BAR1, 0x1020, &[1, 2, 3], false)
        .unwrap();
    let mut back = [0u8; 3];
    map.read(0x20, &mut back);
    assert_eq!(back, [1, 2, 3]);

    // A larger argsz than needed still gets exactly the needed size back.
    let (info, payload, _) = s.client.region_info(BAR1, 4096).unwrap();
    assert_eq!(
        (info.argsz as usize, payload.len()),
        (needed as usize, needed as usize)
    );
    s.close();
}

#[test]
fn whole_region_mmap_sends_fd_without_caps() {
    let mut s = Session::negotiated();
    let (info, payload, fd) = s.client.region_info(BAR2, 32).unwrap();
    assert_eq!(
        info.flags,
        region_flags::READ | region_flags::WRITE | region_flags::MMAP
    );
    assert_eq!((info.argsz, payload.len()), (32, 32));
    let fd = fd.expect("fd with the first reply");
    let map = Mapping::new(fd.as_fd(), 0, BAR2_SIZE as usize);
    map.write(0x1ffc, &7u32.to_ne_bytes());
    assert_eq!(
        s.client.region_read(BAR2, 0x1ffc, 4).unwrap(),
        7u32.to_ne_bytes()
    );
    s.close();
}

#[test]
fn region_access_bounds_and_short_messages() {
    let mut s = Session::negotiated();
    assert_eq!(errno_of(s.client.region_read(BAR0, 4093, 4)), libc::EINVAL);
    assert_eq!(
        errno_of(s.client.region_read(BAR0, u64::MAX - 1, 4)),
        libc::EINVAL
    );
    assert_eq!(errno_of(s.client.region_read(3, 0, 4)), libc::EINVAL);
    assert_eq!(errno_of(s.client.region_read(77, 0, 4)), libc::EINVAL);
    assert_eq!(
        errno_of(s.client.region_read(BAR0, 0, (1 << 20) + 1)),
        libc::E2BIG
    );
    assert_eq!(s.client.region_read(BAR0, 0, 0).unwrap(), Vec::<u8>::new());
    // A write whose count exceeds the data it carries.
    let mut req = [0u8; RegionAccessMsg::SIZE];
    RegionAccessMsg {
        offset: 0,
        region: BAR0,
        count: 64,
    }
    .encode(&mut req)
    .unwrap();
    let r = s
        .client
        .request(Command::RegionWrite, &[&req, &[1, 2, 3, 4]], &[]);
    assert_eq!(errno_of(r), libc::EINVAL);
    // A payload shorter than the fixed part.
    assert_eq!(
        errno_of(s.client.request(Command::RegionRead, &[&[0u8; 8]], &[])),
        libc::EINVAL
    );
    // The stream is still in step.
    s.client.region_write(BAR0, 8, &[5, 6], false).unwrap();
    assert_eq!(s.client.region_read(BAR0, 8, 2).unwrap(), vec![5, 6]);
    s.close();
}

#[test]
fn posted_writes_are_ordered_before_a_later_read() {
    let mut s = Session::negotiated();
    for i in 0..2000u32 {
        assert!(s
            .client
            .region_write(BAR0, 0x100, &i.to_ne_bytes(), true)
            .unwrap()
            .is_none());
    }
    // The next message received is the read's reply: posted writes got no replies.
    assert_eq!(
        s.client.region_read(BAR0, 0x100, 4).unwrap(),
        1999u32.to_ne_bytes()
    );
    assert_eq!(s.device.writes.load(Ordering::SeqCst), 2000);
    // A failing posted write is only logged: no reply, and the stream stays in step.
    s.client.region_write(BAR0, 4095, &[1, 2], true).unwrap();
    assert_eq!(
        s.client.region_read(BAR0, 0x100, 4).unwrap(),
        1999u32.to_ne_bytes()
    );
    let (_, stats) = s.close();
    assert_eq!(stats.errors, 1);
}

#[test]
fn write_multi_and_io_fds_and_reset() {
    let mut s = Session::negotiated();
    let done = s
        .client
        .region_write_multi(
            &[
                (BAR0, 0, &[1, 2, 3, 4]),
                (BAR0, 8, &[9; 8]),
                (CONFIG, 4, &[0xaa]),
            ],
            false,
        )
        .unwrap();
    assert_eq!(done, Some(3));
    s.client
        .region_write_multi(&[(BAR0, 16, &[7])], true)
        .unwrap();
    assert_eq!(
        s.client.region_read(BAR0, 0, 17).unwrap(),
        [&[1, 2, 3, 4, 0, 0, 0, 0][..], &[9; 8], &[7]].concat()
    );
    assert_eq!(s.client.region_read(CONFIG, 4, 1).unwrap(), vec![0xaa]);
    // An entry with more than 8 bytes is refused.
    assert_eq!(
        errno_of(s.client.region_write_multi(&[(BAR0, 0, &[0; 9])], false)),
        libc::EINVAL
    );

    // GET_REGION_IO_FDS: no sub-regions, no fds.
    let req = [16u32, 0, BAR0, 0].map(u32::to_ne_bytes).concat();
    let reply = s
        .client
        .request(Command::DeviceGetRegionIoFds, &[&req], &[])
        .unwrap();
    assert_eq!(
        reply.payload,
        [16u32, 0, BAR0, 0].map(u32::to_ne_bytes).concat()
    );
    assert!(reply.fds.is_empty());
    let bad = [16u32, 1, BAR0, 0].map(u32::to_ne_bytes).concat();
    assert_eq!(
        errno_of(
            s.client
                .request(Command::DeviceGetRegionIoFds, &[&bad], &[])
        ),
        libc::EINVAL
    );

    s.client.reset().unwrap();
    assert_eq!(s.device.resets.load(Ordering::SeqCst), 1);
    s.close();
}

#[test]
fn unknown_and_unsupported_commands_keep_the_stream_in_step() {
    let mut s = Session::negotiated();
    let id = s.client.send(99, 0, &[&[0xab; 37]], &[]).unwrap();
    assert_eq!(errno_of(s.client.reply_to(id)), libc::ENOSYS);
    let id = s
        .client
        .send(Command::DeviceFeature as u16, 0, &[&[0; 24]], &[])
        .unwrap();
    assert_eq!(errno_of(s.client.reply_to(id)), libc::ENOTSUP);
    let id = s
        .client
        .send(Command::DmaRead as u16, 0, &[&[0; 16]], &[])
        .unwrap();
    assert_eq!(errno_of(s.client.reply_to(id)), libc::EINVAL);
    // A message with an invalid type.
    let id = s
        .client
        .send(
            Command::DeviceGetInfo as u16,
            0x7,
            &[&[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
            &[],
        )
        .unwrap();
    assert_eq!(errno_of(s.client.reply_to(id)), libc::EINVAL);
    // An unexpected reply from the client is ignored.
    s.client
        .send(Command::DmaRead as u16, flags::TYPE_REPLY, &[&[0; 40]], &[])
        .unwrap();
    assert_eq!(s.client.device_info().unwrap().num_irqs, 5);
    s.close();
}

#[test]
fn oversized_message_gets_e2big_and_undersized_header_disconnects() {
    let config = ServerConfig {
        max_data_xfer_size: 4096,
        ..Default::default()
    };
    let mut s = Session::start(config);
    s.client.version().unwrap();
    let big = vec![0u8; 64 << 10];
    let id = s
        .client
        .send(Command::RegionWrite as u16, 0, &[&big], &[])
        .unwrap();
    assert_eq!(errno_of(s.client.reply_to(id)), libc::E2BIG);
    assert_eq!(s.client.region_read(BAR0, 0, 4).unwrap().len(), 4);

    let mut raw = [0u8; HEADER_SIZE];
    Header {
        id: 77,
        command: 4,
        size: 8,
        flags: 0,
        error: 0,
    }
    .encode(&mut raw)
    .unwrap();
    s.client.send_raw(&raw, &[]).unwrap();
    assert_eq!(errno_of(s.client.reply_to(77)), libc::EINVAL);
    assert!(
        matches!(s.client.recv(), Err(ClientError::Socket(_))),
        "server hung up"
    );
    let stats = s.server.join().unwrap().unwrap();
    assert!(stats.end.contains("size 8"), "{}", stats.end);
}

#[test]
fn busy_polling_connection_still_serves_and_stops() {
    let config = ServerConfig {
        poll_spin: Duration::from_micros(200),
        ..Default::default()
    };
    let mut s = Session::start(config);
    s.client.version().unwrap();
    for i in 0..50u32 {
        s.client
            .region_write(BAR0, 0, &i.to_ne_bytes(), true)
            .unwrap();
        assert_eq!(s.client.region_read(BAR0, 0, 4).unwrap(), i.to_ne_bytes());
    }
    s.close();
}

#[test]
fn shutdown_ends_a_connection_waiting_idle_or_mid_message_at_once() {
    for spin in [Duration::ZERO, Duration::from_micros(200)] {
        for mid_message in [false, true] {
            let config = ServerConfig {
                poll_spin: spin,
                ..Default::default()
            };
            let signal = ShutdownSignal::new().unwrap();
            let (a, b) = UnixStream::pair().unwrap();
            let device: Arc<dyn VfioUserDevice> = FakeDevice::new();
            let stop = signal.clone();
            let server = std::thread::spawn(move || serve_stream(b, device, config, Some(stop)));
            let mut client = TestClient::new(a);
            client.version().unwrap();
            assert_eq!(client.region_read(BAR0, 0, 4).unwrap().len(), 4);
            if mid_message {
                client.send_raw(&[0u8; 10], &[]).unwrap();
            }
            std::thread::sleep(Duration::from_millis(30));
            let start = Instant::now();
            signal.trigger();
            while !server.is_finished() {
                assert!(
                    start.elapsed() < Duration::from_millis(500),
                    "spin {spin:?}, mid-message {mid_message}: shutdown did not end the connection"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            let stats = server.join().unwrap().unwrap();
            assert_eq!(stats.end, "shutdown requested");
            assert!(client.device_info().is_err());
        }
    }
}

#[test]
fn stalled_client_is_dropped_after_the_message_timeout() {
    let config = ServerConfig {
        msg_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let mut s = Session::start(config);
    s.client.version().unwrap();
    let mut raw = [0u8; HEADER_SIZE];
    Header {
        id: 1,
        command: 9,
        size: 32,
        flags: 0,
        error: 0,
    }
    .encode(&mut raw)
    .unwrap();
    s.client.send_raw(&raw[..10], &[]).unwrap();
    let start = Instant::now();
    let stats = s.server.join().unwrap().unwrap();
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(stats.end.contains("timed out"), "{}", stats.end);
    assert_eq!(s.device.disconnects.load(Ordering::SeqCst), 1);
}

#[test]
fn unexpected_fds_are_refused_and_closed() {
    let mut s = Session::negotiated();
    let (e1, e2) = (eventfd(), eventfd());
    let r = s.client.request(
        Command::DeviceGetInfo,
        &[&[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
        &[e1.as_fd()],
    );
    assert_eq!(errno_of(r), libc::EINVAL);
    // DMA_MAP takes at most one fd.
    let m = memfd("two", 4096);
    let req = [
        32u32.to_ne_bytes().as_slice(),
        &3u32.to_ne_bytes(),
        &0u64.to_ne_bytes(),
        &0u64.to_ne_bytes(),
        &4096u64.to_ne_bytes(),
    ]
    .concat();
    let r = s
        .client
        .request(Command::DmaMap, &[&req], &[m.as_fd(), e2.as_fd()]);
    assert_eq!(errno_of(r), libc::EINVAL);
    assert_eq!(s.client.device_info().unwrap().num_regions, 9);
    s.close();
}

#[test]
fn more_fds_than_max_msg_fds_are_refused() {
    let config = ServerConfig {
        max_msg_fds: 2,
        ..Default::default()
    };
    let mut s = Session::start(config);
    let (_, caps) = s.client.version().unwrap();
    assert_eq!(caps.max_msg_fds, Some(2));
    let fds: Vec<OwnedFd> = (0..3).map(|_| eventfd()).collect();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let trig = irq_flags::DATA_EVENTFD | irq_flags::ACTION_TRIGGER;
    // The third fd does not fit the server's control buffer: the kernel closes it and the
    // message is refused as a whole.
    let r = s
        .client
        .set_irqs(pci::MSIX_IRQ_INDEX, trig, 0, 3, &[], &borrowed);
    assert_eq!(errno_of(r), libc::EINVAL);
    assert!(!s.device.handle().irq_configured(pci::MSIX_IRQ_INDEX, 0));
    s.client
        .set_irqs(pci::MSIX_IRQ_INDEX, trig, 0, 2, &[], &borrowed[..2])
        .unwrap();
    assert!(s.device.handle().irq_configured(pci::MSIX_IRQ_INDEX, 1));
    s.close();
}

// ---------------------------------------------------------------------------------------------
// DMA

#[test]
fn fd_backed_dma_is_shared_with_the_device() {
    let mut s = Session::negotiated();
    let guest = sealed_memfd(&unique("guest-ram"), 0x20000);
    pwrite(&guest, 0x10000 + 0x40, b"hello from the guest");
    // iova 0x100000 maps file offset 0x10000.
    s.client
        .dma_map(
            dma_flags::MAP_READ | dma_flags::MAP_WRITE,
            0x10000,
            0x100000,
            0x10000,
            Some(guest.as_fd()),
        )
        .unwrap();
    let h = s.device.handle();
    let mut buf = [0u8; 20];
    h.dma_read(0x100040, &mut buf).unwrap();
    assert_eq!(&buf, b"hello from the guest");
    h.dma_write(0x100800, b"device was here").unwrap();
    let mut back = [0u8; 15];
    pread(&guest, 0x10800, &mut back);
    assert_eq!(&back, b"device was here");
    // Outside any map, across the end of a map, read-only maps.
    assert_eq!(
        h.dma_read(0x200000, &mut buf),
        Err(DmaError::Unmapped { iova: 0x200000 })
    );
    assert_eq!(
        h.dma_read(0x10fff0, &mut buf),
        Err(DmaError::Unmapped { iova: 0x110000 })
    );
    let ro = sealed_memfd("ro", 0x1000);
    s.client
        .dma_map(dma_flags::MAP_READ, 0, 0x300000, 0x1000, Some(ro.as_fd()))
        .unwrap();
    assert!(matches!(
        h.dma_write(0x300000, &[1]),
        Err(DmaError::Permission { .. })
    ));
    // Overlap, bad flags, file too short.
    assert_eq!(
        errno_of(s.client.dma_map(3, 0, 0x100800, 0x1000, None)),
        libc::EEXIST
    );
    assert_eq!(
        errno_of(s.client.dma_map(0x10, 0, 0x900000, 0x1000, None)),
        libc::EINVAL
    );
    assert_eq!(
        errno_of(s.client.dma_map(3, 0, 0x900000, 0x100000, Some(ro.as_fd()))),
        libc::EINVAL
    );
    s.close();
}

/// Keep the client reading (it answers the server's DMA requests) until `worker` is done.
fn serve_dma_until_done<T>(client: &mut TestClient, worker: &JoinHandle<T>) {
    while !worker.is_finished() {
        let id = client
            .send(
                Command::DeviceGetInfo as u16,
                0,
                &[&[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
                &[],
            )
            .unwrap();
        client.reply_to(id).unwrap();
    }
}

#[test]
fn only_shrink_sealed_fds_are_mapped_and_truncation_cannot_crash_the_server() {
    let mut s = Session::negotiated();
    let memory = Arc::new(Mutex::new(vec![0x77u8; 0x4000]));
    s.client.set_dma_backing(
        DmaBacking {
            base: 0x100000,
            memory: Arc::clone(&memory),
        },
        DmaMessageLayout::Spec,
    );
    // An fd that can shrink (memory-backend-file, memfd seal=off): accepted, not mmapped.
    let name = unique("unsealed-ram");
    let unsealed = memfd_with_seals(&name, 0x4000, 0);
    s.client
        .dma_map(3, 0, 0x100000, 0x4000, Some(unsealed.as_fd()))
        .unwrap();
    assert!(
        !proc_maps_contains(&name),
        "an unsealed fd must not be mmapped"
    );
    // The client truncates it to nothing; accesses go through DMA_READ/DMA_WRITE, which the
    // client answers (here from its byte vector), so nothing faults.
    // SAFETY: valid fd.
    assert_eq!(unsafe { libc::ftruncate(unsealed.as_raw_fd(), 0) }, 0);
    let h = s.device.handle();
    let worker = std::thread::spawn(move || {
        let mut b = [0u8; 8];
        let r = h.dma_read(0x100ff8, &mut b);
        let w = h.dma_write(0x100010, b"still here");
        (r, w, b)
    });
    serve_dma_until_done(&mut s.client, &worker);
    let (r, w, b) = worker.join().unwrap();
    r.unwrap();
    w.unwrap();
    assert_eq!(b, [0x77; 8]);
    assert_eq!(&memory.lock().unwrap()[0x10..0x1a], b"still here");
    assert!(s.client.dma_requests_served() >= 2);

    // Sealed against shrinking (QEMU's memory-backend-memfd): mapped and accessed directly,
    // with no message to the client (which is not reading here).
    let name = unique("sealed-ram");
    let sealed = sealed_memfd(&name, 0x4000);
    s.client
        .dma_map(3, 0, 0x200000, 0x4000, Some(sealed.as_fd()))
        .unwrap();
    assert!(proc_maps_contains(&name), "a sealed fd is mmapped");
    let served = s.client.dma_requests_served();
    let h = s.device.handle();
    h.dma_write(0x200100, b"direct").unwrap();
    let mut back = [0u8; 6];
    pread(&sealed, 0x100, &mut back);
    assert_eq!(&back, b"direct");
    // SAFETY: valid fd.
    assert_ne!(
        unsafe { libc::ftruncate(sealed.as_raw_fd(), 0) },
        0,
        "sealed"
    );

    // A file too small for the map is refused, sealed or not.
    for seals in [0, libc::F_SEAL_SHRINK] {
        let small = memfd_with_seals("small", 0x2000, seals);
        assert_eq!(
            errno_of(
                s.client
                    .dma_map(3, 0, 0x300000, 0x4000, Some(small.as_fd()))
            ),
            libc::EINVAL
        );
        assert_eq!(
            errno_of(
                s.client
                    .dma_map(3, 0x1000, 0x300000, 0x2000, Some(small.as_fd()))
            ),
            libc::EINVAL
        );
    }
    assert_eq!(s.client.dma_requests_served(), served);
    let (_, stats) = s.close();
    assert_eq!(stats.end, "peer closed the connection");
}

#[test]
fn unmap_rules_and_unmap_all() {
    let mut s = Session::negotiated();
    let ram = sealed_memfd(&unique("unmap-ram"), 0x4000);
    s.client
        .dma_map(3, 0, 0x0, 0x4000, Some(ram.as_fd()))
        .unwrap();
    s.client.dma_map(3, 0, 0x10000, 0x1000, None).unwrap();
    s.client.dma_map(3, 0, 0x20000, 0x1000, None).unwrap();
    assert_eq!(
        errno_of(s.client.dma_unmap(0, 0x0, 0x1000)),
        libc::EINVAL,
        "partial"
    );
    assert_eq!(
        errno_of(
            s.client
                .dma_unmap(dma_flags::UNMAP_GET_DIRTY_BITMAP, 0, 0x4000)
        ),
        libc::ENOTSUP
    );
    assert_eq!(
        errno_of(s.client.dma_unmap(dma_flags::UNMAP_ALL, 0, 0x4000)),
        libc::EINVAL
    );
    assert_eq!(errno_of(s.client.dma_unmap(0x8, 0, 0x4000)), libc::EINVAL);
    let echoed = s.client.dma_unmap(0, 0x20000, 0x1000).unwrap();
    assert_eq!(
        (echoed.address, echoed.size, echoed.argsz),
        (0x20000, 0x1000, 24)
    );
    let h = s.device.handle();
    let mut b = [0u8; 4];
    h.dma_read(0x100, &mut b).unwrap();
    s.client.dma_unmap(dma_flags::UNMAP_ALL, 0, 0).unwrap();
    assert_eq!(
        h.dma_read(0x100, &mut b),
        Err(DmaError::Unmapped { iova: 0x100 })
    );
    assert_eq!(
        h.dma_read(0x10000, &mut b),
        Err(DmaError::Unmapped { iova: 0x10000 })
    );
    // Maps can be re-added afterwards.
    s.client
        .dma_map(3, 0, 0x0, 0x4000, Some(ram.as_fd()))
        .unwrap();
    s.close();
}

#[test]
fn dma_map_limit_is_enforced() {
    let config = ServerConfig {
        max_dma_maps: 2,
        ..Default::default()
    };
    let mut s = Session::start(config);
    let (_, caps) = s.client.version().unwrap();
    assert_eq!(caps.max_dma_maps, Some(2));
    s.client.dma_map(3, 0, 0x0, 0x1000, None).unwrap();
    s.client.dma_map(3, 0, 0x1000, 0x1000, None).unwrap();
    assert_eq!(
        errno_of(s.client.dma_map(3, 0, 0x2000, 0x1000, None)),
        libc::ENOSPC
    );
    s.close();
}

fn socket_dma_roundtrip(layout: DmaMessageLayout) {
    let config = ServerConfig {
        dma_layout: layout,
        max_data_xfer_size: 4096,
        ..Default::default()
    };
    let mut s = Session::start(config);
    s.client.version().unwrap();
    let memory = Arc::new(Mutex::new(
        (0..0x3000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
    ));
    s.client.set_dma_backing(
        DmaBacking {
            base: 0x40000,
            memory: Arc::clone(&memory),
        },
        layout,
    );
    // No fd: the server must use DMA_READ/DMA_WRITE messages.
    s.client.dma_map(3, 0, 0x40000, 0x3000, None).unwrap();
    let h = s.device.handle();
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        // 6000 bytes: two requests with a 4 KiB transfer limit.
        let mut buf = vec![0u8; 6000];
        let r = h.dma_read(0x40100, &mut buf);
        let w = h.dma_write(0x40010, &[0x5a; 5000]);
        tx.send(()).unwrap();
        (r, w, buf)
    });
    // Keep the client reading (it answers DMA requests) until the worker is done.
    while rx.try_recv().is_err() {
        let id = s
            .client
            .send(
                Command::DeviceGetInfo as u16,
                0,
                &[&[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
                &[],
            )
            .unwrap();
        s.client.reply_to(id).unwrap();
    }
    let (r, w, buf) = worker.join().unwrap();
    r.unwrap();
    w.unwrap();
    let expected: Vec<u8> = (0x100..0x100 + 6000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(buf, expected);
    assert!(memory.lock().unwrap()[0x10..0x10 + 5000]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(s.client.dma_requests_served() >= 4);
    // An address the client refuses: its error comes back.
    s.client.dma_map(3, 0, 0x90000, 0x1000, None).unwrap();
    let h = s.device.handle();
    let worker = std::thread::spawn(move || {
        let mut b = [0u8; 8];
        h.dma_read(0x90000, &mut b)
    });
    serve_dma_until_done(&mut s.client, &worker);
    assert_eq!(worker.join().unwrap(), Err(DmaError::Remote(Errno::EFAULT)));
    s.close();
}

#[test]
fn fd_less_dma_uses_server_to_client_messages_legacy_layout() {
    socket_dma_roundtrip(DmaMessageLayout::LegacyQemu);
}

#[test]
fn fd_less_dma_uses_server_to_client_messages_spec_layout() {
    socket_dma_roundtrip(DmaMessageLayout::Spec);
}

#[test]
fn socket_dma_times_out_and_refuses_the_connection_thread() {
    let config = ServerConfig {
        msg_timeout: Duration::from_millis(150),
        ..Default::default()
    };
    let mut s = Session::start(config);
    s.client.version().unwrap();
    s.client.dma_map(3, 0, 0x1000, 0x1000, None).unwrap();
    // The client never reads: the request times out.
    let h = s.device.handle();
    let mut b = [0u8; 4];
    assert_eq!(h.dma_read(0x1000, &mut b), Err(DmaError::Timeout));
    // After disconnect every DMA fails with NotConnected.
    let (device, _) = s.close();
    assert!(!h.is_connected());
    assert_eq!(h.dma_read(0x1000, &mut b), Err(DmaError::NotConnected));
    assert_eq!(h.trigger_irq(2, 0), Err(IrqError::NotConnected));
    assert_eq!(device.disconnects.load(Ordering::SeqCst), 1);
}

/// A device that tries socket DMA from inside a region write (on the connection thread).
struct DmaInCallback {
    inner: Arc<FakeDevice>,
    result: Mutex<Option<Result<(), DmaError>>>,
}

impl VfioUserDevice for DmaInCallback {
    fn device_info(&self) -> DeviceInfo {
        self.inner.device_info()
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        self.inner.region_info(index)
    }
    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.inner.irq_info(index)
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        self.inner.region_read(index, offset, buf)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let mut b = [0u8; 4];
        *self.result.lock().unwrap() = Some(self.inner.handle().dma_read(0x1000, &mut b));
        self.inner.region_write(index, offset, data)
    }
    fn reset(&self) -> Result<(), Errno> {
        Ok(())
    }
    fn client_connected(&self, client: ClientHandle) {
        self.inner.client_connected(client);
    }
}

#[test]
fn socket_dma_from_a_region_callback_reports_deadlock() {
    let dev = Arc::new(DmaInCallback {
        inner: FakeDevice::new(),
        result: Mutex::new(None),
    });
    let (a, b) = UnixStream::pair().unwrap();
    let d: Arc<dyn VfioUserDevice> = dev.clone();
    let server = std::thread::spawn(move || serve_stream(b, d, ServerConfig::default(), None));
    let mut client = TestClient::new(a);
    client.version().unwrap();
    client.dma_map(3, 0, 0x1000, 0x1000, None).unwrap();
    client.region_write(BAR0, 0, &[1], false).unwrap();
    assert_eq!(
        *dev.result.lock().unwrap(),
        Some(Err(DmaError::WouldDeadlock))
    );
    drop(client);
    server.join().unwrap().unwrap();
}

/// A device that keeps every DMA map it is handed and records removals; it refuses the next
/// map when told to, and a removal can wait for a worker's DMA to end (as a GPU waits for
/// its DMA in flight before it lets a map go).
struct MapRecorder {
    inner: Arc<FakeDevice>,
    maps: Mutex<Vec<ClientDmaMap>>,
    unmapped: Mutex<Vec<(u64, u64)>>,
    refuse_next: Mutex<Option<Errno>>,
    wait_in_unmap: Mutex<Option<mpsc::Receiver<Result<(), DmaError>>>>,
    waited: Mutex<Option<Result<(), DmaError>>>,
}

impl MapRecorder {
    fn new() -> Arc<MapRecorder> {
        Arc::new(MapRecorder {
            inner: FakeDevice::new(),
            maps: Mutex::new(Vec::new()),
            unmapped: Mutex::new(Vec::new()),
            refuse_next: Mutex::new(None),
            wait_in_unmap: Mutex::new(None),
            waited: Mutex::new(None),
        })
    }

    fn map(&self, iova: u64) -> ClientDmaMap {
        self.maps
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|m| m.iova() == iova)
            .cloned()
            .expect("no such map")
    }

    fn unmapped(&self) -> Vec<(u64, u64)> {
        self.unmapped.lock().unwrap().clone()
    }
}

impl VfioUserDevice for MapRecorder {
    fn device_info(&self) -> DeviceInfo {
        self.inner.device_info()
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        self.inner.region_info(index)
    }
    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.inner.irq_info(index)
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        self.inner.region_read(index, offset, buf)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        self.inner.region_write(index, offset, data)
    }
    fn reset(&self) -> Result<(), Errno> {
        Ok(())
    }
    fn client_connected(&self, client: ClientHandle) {
        self.inner.client_connected(client);
    }
    fn client_disconnected(&self) {
        self.inner.client_disconnected();
    }
    fn dma_mapped(&self, map: ClientDmaMap) -> Result<(), Errno> {
        self.maps.lock().unwrap().push(map);
        match self.refuse_next.lock().unwrap().take() {
            Some(errno) => Err(errno),
            None => Ok(()),
        }
    }
    fn dma_unmapped(&self, iova: u64, size: u64) {
        if let Some(rx) = self.wait_in_unmap.lock().unwrap().take() {
            *self.waited.lock().unwrap() = rx.recv_timeout(Duration::from_secs(10)).ok();
        }
        self.unmapped.lock().unwrap().push((iova, size));
    }
}

fn serve_recorder(
    device: &Arc<MapRecorder>,
    config: ServerConfig,
) -> (TestClient, JoinHandle<Result<ConnectionStats, ServerError>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let dev: Arc<dyn VfioUserDevice> = device.clone();
    let server = std::thread::spawn(move || serve_stream(b, dev, config, None));
    let mut client = TestClient::new(a);
    client.version().unwrap();
    (client, server)
}

/// QEMU with a vIOMMU unmaps large ranges covering several earlier maps: VFIO type1 rules.
#[test]
fn dma_unmap_follows_vfio_type1_and_tells_the_device() {
    let device = MapRecorder::new();
    let (mut client, server) = serve_recorder(&device, ServerConfig::default());
    let ram = sealed_memfd(&unique("type1-ram"), 0x4000);
    client.dma_map(3, 0, 0x10000, 0x1000, None).unwrap();
    client.dma_map(3, 0, 0x11000, 0x1000, None).unwrap();
    client
        .dma_map(3, 0, 0x20000, 0x4000, Some(ram.as_fd()))
        .unwrap();
    client.dma_map(3, 0, 0x40000, 0x1000, None).unwrap();
    let live = |iova| device.map(iova).is_live();
    // A range that would split a map, at its start or at its end, or of size 0: EINVAL,
    // nothing removed, the device told nothing.
    for (address, size) in [
        (0x10800, 0x1000),
        (0x0, 0x22000),
        (0x20000, 0x2000),
        (0x10000, 0),
    ] {
        assert_eq!(errno_of(client.dma_unmap(0, address, size)), libc::EINVAL);
    }
    // A range covering no map succeeds.
    client.dma_unmap(0, 0x30000, 0x10000).unwrap();
    assert!(device.unmapped().is_empty());
    assert!([0x10000, 0x11000, 0x20000, 0x40000].into_iter().all(live));
    // One power-of-two range over three maps (and the holes between them).
    let echoed = client.dma_unmap(0, 0x0, 0x40000).unwrap();
    assert_eq!((echoed.address, echoed.size), (0x0, 0x40000));
    assert_eq!(
        device.unmapped(),
        [(0x10000, 0x1000), (0x11000, 0x1000), (0x20000, 0x4000)]
    );
    assert!(!live(0x10000) && !live(0x20000) && live(0x40000));
    let h = device.inner.handle();
    let mut b = [0u8; 4];
    assert_eq!(
        h.dma_read(0x20000, &mut b),
        Err(DmaError::Unmapped { iova: 0x20000 })
    );
    // An exact match, then UNMAP_ALL, as before.
    client.dma_map(3, 0, 0x50000, 0x1000, None).unwrap();
    client.dma_unmap(0, 0x50000, 0x1000).unwrap();
    // QEMU's last unmap with a vIOMMU runs up to the top of the address space (2^64).
    client.dma_map(3, 0, 0x1_0000_0000, 0x1000, None).unwrap();
    client
        .dma_unmap(0, 0xFEF0_0000, 0u64.wrapping_sub(0xFEF0_0000))
        .unwrap();
    client.dma_map(3, 0, 0x60000, 0x1000, None).unwrap();
    client.dma_unmap(dma_flags::UNMAP_ALL, 0, 0).unwrap();
    assert_eq!(
        device.unmapped()[3..],
        [
            (0x50000, 0x1000),
            (0x1_0000_0000, 0x1000),
            (0x40000, 0x1000),
            (0x60000, 0x1000)
        ]
    );
    drop(client);
    server.join().unwrap().unwrap();
    assert_eq!(
        device.unmapped().len(),
        7,
        "nothing left to unmap on disconnect"
    );
}

#[test]
fn the_device_reaches_each_map_until_it_is_removed() {
    let device = MapRecorder::new();
    let (mut client, server) = serve_recorder(&device, ServerConfig::default());
    // An fd-backed map: copied through the server's mapping, no message to the client.
    let ram = sealed_memfd(&unique("lent-ram"), 0x2000);
    pwrite(&ram, 0x1010, b"guest bytes");
    client
        .dma_map(3, 0x1000, 0x100000, 0x1000, Some(ram.as_fd()))
        .unwrap();
    let direct = device.map(0x100000);
    assert_eq!(
        (direct.size(), direct.readable(), direct.writable()),
        (0x1000, true, true)
    );
    let mut buf = [0u8; 11];
    direct.read(0x10, &mut buf).unwrap();
    assert_eq!(&buf, b"guest bytes");
    direct.write(0x800, b"device").unwrap();
    let mut back = [0u8; 6];
    pread(&ram, 0x1800, &mut back);
    assert_eq!(&back, b"device");
    let ptr = direct
        .host_address()
        .expect("an mmapped map has a host address");
    // SAFETY: the map is live and 0x1000 bytes long; the test reads one byte inside it.
    assert_eq!(unsafe { ptr.as_ptr().add(0x800).read_volatile() }, b'd');
    assert_eq!(
        direct.read(0xFF8, &mut buf),
        Err(DmaError::Unmapped { iova: 0x101000 })
    );
    assert!(matches!(
        direct.read(u64::MAX, &mut buf),
        Err(DmaError::Overflow { .. })
    ));
    // A read-only map refuses device writes.
    let ro = sealed_memfd(&unique("lent-ro"), 0x1000);
    client
        .dma_map(dma_flags::MAP_READ, 0, 0x200000, 0x1000, Some(ro.as_fd()))
        .unwrap();
    assert!(matches!(
        device.map(0x200000).write(0, &[1]),
        Err(DmaError::Permission { .. })
    ));
    // An fd-less map: socket DMA from a worker thread, answered by the client.
    let memory = Arc::new(Mutex::new(vec![0x33u8; 0x1000]));
    client.set_dma_backing(
        DmaBacking {
            base: 0x300000,
            memory: Arc::clone(&memory),
        },
        DmaMessageLayout::Spec,
    );
    client.dma_map(3, 0, 0x300000, 0x1000, None).unwrap();
    let socket = device.map(0x300000);
    assert!(socket.host_address().is_none());
    let worker = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 4];
            let r = socket.read(0x20, &mut b);
            (r, socket.write(0x40, b"sock"), b)
        })
    };
    serve_dma_until_done(&mut client, &worker);
    let (r, w, b) = worker.join().unwrap();
    r.unwrap();
    w.unwrap();
    assert_eq!(b, [0x33; 4]);
    assert_eq!(&memory.lock().unwrap()[0x40..0x44], b"sock");
    // A map the device refuses fails with the device's errno and is undone.
    *device.refuse_next.lock().unwrap() = Some(Errno(libc::ENOMEM));
    assert_eq!(
        errno_of(client.dma_map(3, 0, 0x400000, 0x1000, None)),
        libc::ENOMEM
    );
    let refused = device.map(0x400000);
    assert!(!refused.is_live());
    client.dma_map(3, 0, 0x400000, 0x1000, None).unwrap();
    assert!(device.map(0x400000).is_live());
    assert!(
        device.unmapped().is_empty(),
        "a refused map is not unmapped"
    );
    // The client leaves: every accepted map is unmapped once, and its handle reaches nothing.
    drop(client);
    server.join().unwrap().unwrap();
    let mut unmapped = device.unmapped();
    unmapped.sort_unstable();
    assert_eq!(
        unmapped,
        [
            (0x100000, 0x1000),
            (0x200000, 0x1000),
            (0x300000, 0x1000),
            (0x400000, 0x1000)
        ]
    );
    assert!(direct.host_address().is_none());
    assert_eq!(
        direct.read(0, &mut buf),
        Err(DmaError::Unmapped { iova: 0x100000 })
    );
    assert_eq!(
        socket.write(0, b"x"),
        Err(DmaError::Unmapped { iova: 0x300000 })
    );
}

/// A removal fails socket DMA in flight to the map instead of waiting for a reply only the
/// connection thread (busy removing the map) could read.
#[test]
fn unmap_fails_socket_dma_in_flight_to_the_map() {
    use std::io::Read;
    let device = MapRecorder::new();
    let config = ServerConfig {
        msg_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let (mut client, server) = serve_recorder(&device, config);
    client.dma_map(3, 0, 0x8000, 0x1000, None).unwrap();
    let map = device.map(0x8000);
    let (tx, rx) = mpsc::channel();
    *device.wait_in_unmap.lock().unwrap() = Some(rx);
    let worker = std::thread::spawn(move || {
        let mut b = [0u8; 8];
        let _ = tx.send(map.read(0x100, &mut b));
    });
    // Take the DMA_READ off the socket without answering it.
    let mut header = [0u8; HEADER_SIZE];
    client.stream().read_exact(&mut header).unwrap();
    let header = Header::decode(&header).unwrap();
    assert_eq!(header.command, Command::DmaRead as u16);
    let mut payload = vec![0u8; header.size as usize - HEADER_SIZE];
    client.stream().read_exact(&mut payload).unwrap();
    let started = Instant::now();
    client.dma_unmap(0, 0x8000, 0x1000).unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    worker.join().unwrap();
    assert_eq!(
        *device.waited.lock().unwrap(),
        Some(Err(DmaError::Unmapped { iova: 0x8100 })),
        "the device saw its DMA end before the map went"
    );
    assert_eq!(device.unmapped(), [(0x8000, 0x1000)]);
    drop(client);
    server.join().unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Interrupts

#[test]
fn msix_eventfds_in_batches_and_trigger() {
    let mut s = Session::negotiated();
    let fds: Vec<OwnedFd> = (0..4).map(|_| eventfd()).collect();
    let trig = irq_flags::DATA_EVENTFD | irq_flags::ACTION_TRIGGER;
    // As QEMU splits them: valid fds in one message, a run of -1 as count with no fds.
    s.client
        .set_irqs(
            pci::MSIX_IRQ_INDEX,
            trig,
            0,
            2,
            &[],
            &[fds[0].as_fd(), fds[1].as_fd()],
        )
        .unwrap();
    s.client
        .set_irqs(pci::MSIX_IRQ_INDEX, trig, 2, 3, &[], &[])
        .unwrap();
    s.client
        .set_irqs(
            pci::MSIX_IRQ_INDEX,
            trig,
            5,
            2,
            &[],
            &[fds[2].as_fd(), fds[3].as_fd()],
        )
        .unwrap();
    let h = s.device.handle();
    h.trigger_irq(pci::MSIX_IRQ_INDEX, 1).unwrap();
    h.trigger_irq(pci::MSIX_IRQ_INDEX, 6).unwrap();
    h.trigger_irq(pci::MSIX_IRQ_INDEX, 6).unwrap();
    assert_eq!(eventfd_count(&fds[1]), 1);
    assert_eq!(eventfd_count(&fds[3]), 2);
    assert_eq!(eventfd_count(&fds[0]), 0);
    assert_eq!(
        h.trigger_irq(pci::MSIX_IRQ_INDEX, 3),
        Err(IrqError::NotConfigured {
            index: 2,
            vector: 3
        })
    );
    assert_eq!(
        h.trigger_irq(pci::MSIX_IRQ_INDEX, 16),
        Err(IrqError::InvalidVector {
            index: 2,
            vector: 16
        })
    );
    assert_eq!(h.trigger_irq(9, 0), Err(IrqError::InvalidIndex(9)));
    // Deassign vector 1.
    s.client
        .set_irqs(pci::MSIX_IRQ_INDEX, trig, 1, 1, &[], &[])
        .unwrap();
    assert!(!h.irq_configured(pci::MSIX_IRQ_INDEX, 1));
    // The client triggers vector 5 itself.
    s.client
        .set_irqs(
            pci::MSIX_IRQ_INDEX,
            irq_flags::DATA_NONE | irq_flags::ACTION_TRIGGER,
            5,
            1,
            &[],
            &[],
        )
        .unwrap();
    assert_eq!(eventfd_count(&fds[2]), 1);
    // Count 0 + DATA_NONE + TRIGGER disables everything.
    s.client
        .set_irqs(
            pci::MSIX_IRQ_INDEX,
            irq_flags::DATA_NONE | irq_flags::ACTION_TRIGGER,
            0,
            0,
            &[],
            &[],
        )
        .unwrap();
    assert!(!h.irq_configured(pci::MSIX_IRQ_INDEX, 6));
    // Malformed requests.
    let e = eventfd();
    assert_eq!(
        errno_of(s.client.set_irqs(
            pci::MSIX_IRQ_INDEX,
            trig,
            15,
            2,
            &[],
            &[e.as_fd(), e.as_fd()]
        )),
        libc::EINVAL
    );
    assert_eq!(
        errno_of(
            s.client
                .set_irqs(pci::MSIX_IRQ_INDEX, trig, 0, 2, &[], &[e.as_fd()])
        ),
        libc::EINVAL
    );
    assert_eq!(
        errno_of(s.client.set_irqs(
            pci::MSIX_IRQ_INDEX,
            trig | irq_flags::DATA_NONE,
            0,
            1,
            &[],
            &[]
        )),
        libc::EINVAL
    );
    assert_eq!(
        errno_of(s.client.set_irqs(
            pci::MSIX_IRQ_INDEX,
            irq_flags::DATA_NONE | irq_flags::ACTION_TRIGGER,
            u32::MAX,
            2,
            &[],
            &[]
        )),
        libc::EINVAL
    );
    assert_eq!(
        errno_of(s.client.set_irqs(7, trig, 0, 1, &[], &[e.as_fd()])),
        libc::EINVAL
    );
    // MSI is not maskable.
    assert_eq!(
        errno_of(s.client.set_irqs(
            pci::MSI_IRQ_INDEX,
            irq_flags::DATA_NONE | irq_flags::ACTION_MASK,
            0,
            1,
            &[],
            &[]
        )),
        libc::EINVAL
    );
    s.close();
}

#[test]
fn masked_vectors_become_pending_and_fire_on_unmask() {
    let mut s = Session::negotiated();
    let fds: Vec<OwnedFd> = (0..3).map(|_| eventfd()).collect();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    s.client
        .set_irqs(
            pci::MSIX_IRQ_INDEX,
            irq_flags::DATA_EVENTFD | irq_flags::ACTION_TRIGGER,
            0,
            3,
            &[],
            &borrowed,
        )
        .unwrap();
    let h = s.device.handle();
    // Mask vectors 0 and 2 with DATA_BOOL.
    s.client
        .set_irqs(
            pci::MSIX_IRQ_INDEX,
            irq_flags::DATA_BOOL | irq_flags::ACTION_MASK,
            0,
            3,
            &[1, 0, 1],
            &[],
        )
        .unwrap();
    assert!(h.irq_masked(pci::MSIX_IRQ_INDEX, 0) && !h.irq_masked(pci::MSIX_IRQ_INDEX, 1));
    for v in 0..3 {
        h.trigger_irq(pci::MSIX_IRQ_INDEX, v).unwrap();
    }
    assert_eq!(
        fds.iter().map(eventfd_count).collect::<Vec<_>>(),
        vec![0, 1, 0]
    );
    s.client
        .set_irqs(
            pci::MSIX_IRQ_INDEX,
            irq_flags::DATA_NONE | irq_flags::ACTION_UNMASK,
            0,
            1,
            &[],
            &[],
        )
        .unwrap();
    assert_eq!(
        fds.iter().map(eventfd_count).collect::<Vec<_>>(),
        vec![1, 0, 0]
    );
    // Unmasking a vector with nothing pending fires nothing.
    s.client
        .set_irqs(
            pci::MSIX_IRQ_INDEX,
            irq_flags::DATA_NONE | irq_flags::ACTION_UNMASK,
            0,
            1,
            &[],
            &[],
        )
        .unwrap();
    assert_eq!(eventfd_count(&fds[0]), 0);
    s.client
        .set_irqs(
            pci::MSIX_IRQ_INDEX,
            irq_flags::DATA_BOOL | irq_flags::ACTION_UNMASK,
            0,
            3,
            &[0, 0, 1],
            &[],
        )
        .unwrap();
    assert_eq!(eventfd_count(&fds[2]), 1);
    // DATA_BOOL needs its data; mask/unmask notification eventfds are not supported.
    assert_eq!(
        errno_of(s.client.set_irqs(
            pci::MSIX_IRQ_INDEX,
            irq_flags::DATA_BOOL | irq_flags::ACTION_MASK,
            0,
            3,
            &[1],
            &[]
        )),
        libc::EINVAL
    );
    let e = eventfd();
    assert_eq!(
        errno_of(s.client.set_irqs(
            pci::INTX_IRQ_INDEX,
            irq_flags::DATA_EVENTFD | irq_flags::ACTION_UNMASK,
            0,
            1,
            &[],
            &[e.as_fd()]
        )),
        libc::ENOTSUP
    );

    // INTx is automasked: one delivery until the client unmasks.
    let intx = eventfd();
    s.client
        .set_irqs(
            pci::INTX_IRQ_INDEX,
            irq_flags::DATA_EVENTFD | irq_flags::ACTION_TRIGGER,
            0,
            1,
            &[],
            &[intx.as_fd()],
        )
        .unwrap();
    h.trigger_irq(pci::INTX_IRQ_INDEX, 0).unwrap();
    h.trigger_irq(pci::INTX_IRQ_INDEX, 0).unwrap();
    assert_eq!(eventfd_count(&intx), 1);
    s.client
        .set_irqs(
            pci::INTX_IRQ_INDEX,
            irq_flags::DATA_NONE | irq_flags::ACTION_UNMASK,
            0,
            1,
            &[],
            &[],
        )
        .unwrap();
    assert_eq!(eventfd_count(&intx), 1, "pending INTx fires on unmask");
    s.close();
}

// ---------------------------------------------------------------------------------------------
// Disconnect, reconnect, the socket file

struct Running {
    shutdown: ShutdownSignal,
    thread: JoinHandle<Result<(), ServerError>>,
}

impl Running {
    fn start(server: Server, device: Arc<dyn VfioUserDevice>) -> Running {
        let shutdown = ShutdownSignal::new().unwrap();
        let s = shutdown.clone();
        let thread = std::thread::spawn(move || server.serve(device, s));
        Running { shutdown, thread }
    }
    fn stop(self) {
        self.shutdown.trigger();
        let start = Instant::now();
        while !self.thread.is_finished() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "serve() did not stop"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.thread.join().unwrap().unwrap();
    }
}

#[test]
fn disconnect_drops_maps_and_fds_and_reconnect_keeps_device_state() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vfio-user-test").unwrap();
    let path = dir.as_path().join("gpu.sock");
    let device = FakeDevice::new();
    let running = Running::start(
        Server::bind(&path, DEFAULT_SOCKET_MODE).unwrap(),
        device.clone(),
    );

    let mut c1 = TestClient::connect(&path).unwrap();
    c1.version().unwrap();
    c1.region_write(BAR0, 0x40, &[0x11, 0x22], false).unwrap();
    let name = unique("reconnect-ram");
    let ram = sealed_memfd(&name, 0x10000);
    c1.dma_map(3, 0, 0x0, 0x10000, Some(ram.as_fd())).unwrap();
    assert!(proc_maps_contains(&name), "DMA map is mmapped");
    let efd = eventfd();
    c1.set_irqs(
        pci::MSIX_IRQ_INDEX,
        irq_flags::DATA_EVENTFD | irq_flags::ACTION_TRIGGER,
        0,
        1,
        &[],
        &[efd.as_fd()],
    )
    .unwrap();
    let h1 = device.handle();
    h1.trigger_irq(pci::MSIX_IRQ_INDEX, 0).unwrap();
    assert_eq!(eventfd_count(&efd), 1);
    drop(c1);

    // Reconnect at once: the server lets the old connection finish, then serves the new one.
    let mut c2 = TestClient::connect(&path).unwrap();
    c2.version().unwrap();
    assert_eq!(device.disconnects.load(Ordering::SeqCst), 1);
    assert_eq!(device.connects.load(Ordering::SeqCst), 2);
    assert!(
        !proc_maps_contains(&name),
        "the old client's DMA map is unmapped"
    );
    assert!(!h1.is_connected());
    assert_eq!(
        h1.trigger_irq(pci::MSIX_IRQ_INDEX, 0),
        Err(IrqError::NotConnected)
    );
    let mut b = [0u8; 2];
    assert_eq!(h1.dma_read(0, &mut b), Err(DmaError::NotConnected));
    // The new client starts with no maps and no irq fds, and sees the device state.
    let h2 = device.handle();
    assert!(h2.is_connected());
    assert_eq!(h2.dma_read(0, &mut b), Err(DmaError::Unmapped { iova: 0 }));
    assert!(!h2.irq_configured(pci::MSIX_IRQ_INDEX, 0));
    assert_eq!(c2.region_read(BAR0, 0x40, 2).unwrap(), vec![0x11, 0x22]);
    drop(c2);
    running.stop();
}

#[test]
fn second_concurrent_client_is_refused() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vfio-user-test").unwrap();
    let path = dir.as_path().join("one.sock");
    let device = FakeDevice::new();
    let running = Running::start(
        Server::bind(&path, DEFAULT_SOCKET_MODE).unwrap(),
        device.clone(),
    );
    let mut c1 = TestClient::connect(&path).unwrap();
    c1.version().unwrap();
    let mut c2 = TestClient::connect(&path).unwrap();
    assert!(matches!(c2.version(), Err(ClientError::Socket(_))));
    // The first client is unaffected.
    assert_eq!(c1.device_info().unwrap().num_regions, 9);
    assert_eq!(device.connects.load(Ordering::SeqCst), 1);
    drop(c1);
    running.stop();
}

#[test]
fn socket_file_mode_stale_live_and_cleanup() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vfio-user-test").unwrap();
    let path = dir.as_path().join("dev.sock");
    // A stale socket: bound, then its listener dropped (connect is refused).
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = Server::bind(&path, DEFAULT_SOCKET_MODE).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(server.path(), Some(path.as_path()));
    // A live one is refused and left alone.
    assert!(matches!(
        Server::bind(&path, DEFAULT_SOCKET_MODE),
        Err(ServerError::Bind(BindError::InUse(_)))
    ));
    assert!(path.exists());
    drop(server);
    assert!(!path.exists(), "socket file removed on drop");
    // Something that is not a socket is never removed.
    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(
        Server::bind(&path, DEFAULT_SOCKET_MODE),
        Err(ServerError::Bind(BindError::NotASocket(_)))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    // Another mode.
    let other = dir.as_path().join("group.sock");
    let _s = Server::bind(&other, 0o660).unwrap();
    assert_eq!(
        std::fs::metadata(&other).unwrap().permissions().mode() & 0o777,
        0o660
    );
}

#[test]
fn several_servers_in_one_process_and_shutdown() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vfio-user-test").unwrap();
    let mut running = Vec::new();
    for i in 0..2 {
        let path = dir.as_path().join(format!("gpu{i}.sock"));
        running.push((
            path.clone(),
            Running::start(
                Server::bind(&path, DEFAULT_SOCKET_MODE).unwrap(),
                FakeDevice::new(),
            ),
        ));
    }
    let mut clients: Vec<TestClient> = running
        .iter()
        .map(|(p, _)| TestClient::connect(p).unwrap())
        .collect();
    for c in &mut clients {
        c.version().unwrap();
        c.region_write(BAR0, 0, &[1], false).unwrap();
    }
    // Shutdown ends serve() even with a client still connected.
    for (_, r) in running {
        r.stop();
    }
    for c in &mut clients {
        assert!(c.device_info().is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzzing

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// The header's size field: right, off by a little, or anything.
    #[derive(Debug, Clone, Copy)]
    enum SizeSpec {
        Exact,
        Delta(i64),
        Absolute(u32),
    }

    #[derive(Debug, Clone)]
    enum Chunk {
        Raw(Vec<u8>),
        Msg {
            id: u16,
            command: u16,
            flags: u32,
            size: SizeSpec,
            payload: Vec<u8>,
            fds: u8,
        },
    }

    fn command() -> impl Strategy<Value = u16> {
        prop_oneof![8 => 1u16..=18, 1 => any::<u16>()]
    }

    fn msg_flags() -> impl Strategy<Value = u32> {
        prop_oneof![
            8 => Just(0u32),
            3 => Just(flags::NO_REPLY),
            1 => Just(flags::TYPE_REPLY),
            1 => Just(flags::TYPE_REPLY | flags::ERROR),
            1 => any::<u32>(),
        ]
    }

    /// Payloads built from small numbers, so indexes, counts, offsets and sizes are often
    /// plausible (a u64 field is two words, often with a zero high half).
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        let word =
            prop_oneof![4 => Just(0u32), 3 => 0u32..16, 2 => 0u32..0x2000, 1 => any::<u32>()];
        prop_oneof![
            6 => prop::collection::vec(word, 0..14)
                .prop_map(|words| words.iter().flat_map(|w| w.to_ne_bytes()).collect()),
            1 => prop::collection::vec(any::<u8>(), 0..200),
        ]
    }

    fn size() -> impl Strategy<Value = SizeSpec> {
        prop_oneof![
            100 => Just(SizeSpec::Exact),
            2 => (-24i64..24).prop_map(SizeSpec::Delta),
            1 => any::<u32>().prop_map(SizeSpec::Absolute),
        ]
    }

    fn fd_count() -> impl Strategy<Value = u8> {
        prop_oneof![6 => Just(0u8), 1 => 1u8..4, 1 => 17u8..20]
    }

    fn chunk() -> impl Strategy<Value = Chunk> {
        prop_oneof![
            1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Chunk::Raw),
            60 => (any::<u16>(), command(), msg_flags(), size(), payload(), fd_count()).prop_map(
                |(id, command, flags, size, payload, fds)| Chunk::Msg {
                    id,
                    command,
                    flags,
                    size,
                    payload,
                    fds
                }
            ),
        ]
    }

    fn encode(chunk: &Chunk) -> (Vec<u8>, u8) {
        match chunk {
            Chunk::Raw(b) => (b.clone(), 0),
            Chunk::Msg {
                id,
                command,
                flags,
                size,
                payload,
                fds,
            } => {
                let real = (HEADER_SIZE + payload.len()) as i64;
                let size = match size {
                    SizeSpec::Exact => real as u32,
                    SizeSpec::Delta(d) => (real + d).clamp(0, i64::from(u32::MAX)) as u32,
                    SizeSpec::Absolute(v) => *v,
                };
                let mut out = vec![0u8; HEADER_SIZE];
                Header {
                    id: *id,
                    command: *command,
                    size,
                    flags: *flags,
                    error: 0,
                }
                .encode(&mut out)
                .unwrap();
                out.extend_from_slice(payload);
                (out, *fds)
            }
        }
    }

    /// Feed `chunks` to a fresh connection, hang up, and check it ended cleanly and in time.
    /// Returns its statistics.
    fn run_stream(version_first: bool, chunks: &[Chunk]) -> Result<ConnectionStats, TestCaseError> {
        let config = ServerConfig {
            max_data_xfer_size: 64 << 10,
            max_dma_maps: 32,
            msg_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let device = FakeDevice::new();
        let (a, b) = UnixStream::pair().unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let dev: Arc<dyn VfioUserDevice> = device.clone();
        let server = std::thread::spawn(move || {
            let r = serve_stream(b, dev, config, None);
            let _ = done_tx.send(());
            r
        });
        // Drain replies so the server never blocks on a full socket.
        let reader = a.try_clone().unwrap();
        let drain = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut cmsg = crate::vfio_user::socket::cmsg_buffer(4);
            while let Ok(r) =
                crate::vfio_user::socket::recv_with_fds(reader.as_fd(), &mut buf, &mut cmsg, 0)
            {
                if r.bytes == 0 {
                    break;
                }
            }
        });
        let send = |bytes: &[u8], fds: &[BorrowedFd<'_>]| {
            let _ = crate::vfio_user::socket::send_all(a.as_fd(), &[bytes], fds);
        };
        if version_first {
            let mut payload = vec![0u8; 4];
            payload
                .extend_from_slice(br#"{"capabilities":{"max_msg_fds":4,"write_multiple":true}}"#);
            payload.push(0);
            let (v, _) = encode(&Chunk::Msg {
                id: 0,
                command: 1,
                flags: 0,
                size: SizeSpec::Exact,
                payload,
                fds: 0,
            });
            send(&v, &[]);
        }
        for c in chunks {
            let (bytes, nfds) = encode(c);
            let owned: Vec<OwnedFd> = (0..nfds)
                .map(|i| match i % 3 {
                    0 => memfd("fuzz", 0x2000),
                    1 => sealed_memfd("fuzz-sealed", 0x2000),
                    _ => eventfd(),
                })
                .collect();
            let fds: Vec<BorrowedFd<'_>> = owned.iter().map(|f| f.as_fd()).collect();
            send(&bytes, &fds[..fds.len().min(16)]);
        }
        // The test side hangs up: the connection must end promptly.
        let _ = a.shutdown(std::net::Shutdown::Both);
        let ended = done_rx.recv_timeout(Duration::from_secs(10)).is_ok();
        prop_assert!(ended, "connection thread did not exit");
        let stats = server
            .join()
            .map_err(|_| TestCaseError::fail("server panicked"))?;
        let stats = stats.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(stats.buffer_capacity <= config.max_message_size());
        drain
            .join()
            .map_err(|_| TestCaseError::fail("drain panicked"))?;
        prop_assert_eq!(device.disconnects.load(Ordering::SeqCst), 1);
        Ok(stats)
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_message_streams_never_panic_or_hang(
            version_first in prop::bool::weighted(0.9),
            chunks in prop::collection::vec(chunk(), 0..60),
        ) {
            let stats = run_stream(version_first, &chunks)?;
            if std::env::var_os("VFIO_USER_FUZZ_STATS").is_some() {
                eprintln!("FUZZSTAT msgs={} errs={} end={}", stats.messages, stats.errors, stats.end);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Against a real QEMU (the lab from `qemu-configs/install.sh`; no QEMU is a failure, not a skip)

/// The lab's `qemu-system-x86_64`: runs the project's installer (idempotent, locked, quick when
/// the lab is cached) once per test binary and reads `QEMU_BIN` from the `env.sh` it writes
/// (under `$GPU_BACKEND_CACHE/qemu-lab`, default `<workspace>/.cache/qemu-lab`). Panics with
/// the reason when that fails: a test that needs QEMU fails without it, it never skips.
fn lab_qemu() -> std::path::PathBuf {
    static QEMU: std::sync::OnceLock<Result<std::path::PathBuf, String>> =
        std::sync::OnceLock::new();
    QEMU.get_or_init(install_lab_qemu)
        .clone()
        .unwrap_or_else(|e| panic!("this test needs QEMU and could not get it: {e}"))
}

fn install_lab_qemu() -> Result<std::path::PathBuf, String> {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("qemu-configs").join("install.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run bash {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} exited with {}:\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // The cache root as the script computes it (an empty variable means the default).
    let cache = std::env::var_os("GPU_BACKEND_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(|| root.join(".cache"), PathBuf::from);
    let env_sh = cache.join("qemu-lab").join("env.sh");
    // env.sh uses shell quoting: let bash evaluate it.
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#". "$1" && printf '%s' "$QEMU_BIN""#)
        .arg("bash")
        .arg(&env_sh)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run bash to read {}: {e}", env_sh.display()))?;
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).into_owned());
    if !out.status.success() || bin.as_os_str().is_empty() {
        return Err(format!(
            "{} did not yield QEMU_BIN ({}): {}",
            env_sh.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if !bin.is_file() {
        return Err(format!(
            "QEMU_BIN from {} is not a file: {}",
            env_sh.display(),
            bin.display()
        ));
    }
    Ok(bin)
}

/// QEMU under the qtest accelerator: a `vfio-user-pci` client whose guest memory, port I/O and
/// MMIO the test drives line by line.
struct Qtest {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Qtest {
    /// Start QEMU with the device on `socket`, plus `extra` arguments.
    fn start(qemu: &std::path::Path, socket: &std::path::Path, extra: &[&str]) -> Qtest {
        let device = format!(
            r#"{{"driver":"vfio-user-pci","socket":{{"type":"unix","path":"{}"}},"addr":"0x5"}}"#,
            socket.display()
        );
        let mut child = std::process::Command::new(qemu)
            .args([
                "-machine", "q35", "-accel", "qtest", "-qtest", "stdio", "-m", "64",
            ])
            .args([
                "-nographic",
                "-nodefaults",
                "-serial",
                "none",
                "-monitor",
                "none",
            ])
            .args(["-device", &device])
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Qtest {
            child,
            stdin,
            stdout,
        }
    }

    /// Run one qtest command and return its `OK ...` answer.
    fn cmd(&mut self, command: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{command}").unwrap();
        loop {
            let mut line = String::new();
            assert!(
                self.stdout.read_line(&mut line).unwrap() > 0,
                "QEMU exited during '{command}'"
            );
            let line = line.trim();
            if line.starts_with("OK") {
                return line.to_string();
            }
            assert!(
                !line.starts_with("FAIL") && !line.starts_with("ERR"),
                "'{command}': {line}"
            );
        }
    }

    /// Run a command that answers `OK <hex>` and return the value.
    fn value(&mut self, command: &str) -> u64 {
        let answer = self.cmd(command);
        let hex = answer
            .trim_start_matches("OK")
            .trim()
            .trim_start_matches("0x");
        u64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("'{command}': {answer}"))
    }

    /// Write a config register of device 00:05.0 through ports 0xcf8/0xcfc.
    fn config_write(&mut self, reg: u32, value: u32) {
        self.cmd(&format!(
            "outl 0xcf8 {:#x}",
            0x8000_0000u32 | (5 << 11) | reg
        ));
        self.cmd(&format!("outl 0xcfc {value:#x}"));
    }
}

impl Drop for Qtest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn real_qemu_trapped_and_mmapped_bars_and_socket_dma() {
    let qemu = lab_qemu();
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vfio-user-qemu").unwrap();
    let path = dir.as_path().join("dev.sock");
    let device = FakeDevice::new();
    let running = Running::start(
        Server::bind(&path, DEFAULT_SOCKET_MODE).unwrap(),
        device.clone(),
    );
    let mut q = Qtest::start(&qemu, &path, &[]);

    // Place BAR0 (trapped), BAR1 (sparse mmap) and enable memory decoding and bus mastering.
    q.config_write(0x10, 0xfe00_0000);
    q.config_write(0x14, 0xfd00_0000);
    q.config_write(0x04, 0x0006);
    // Trapped: REGION_READ / posted REGION_WRITE then a read behind it.
    device.bar0.lock().unwrap()[0x10..0x14].copy_from_slice(&0x1122_3344u32.to_le_bytes());
    assert_eq!(q.value("readl 0xfe000010"), 0x1122_3344);
    q.cmd("writel 0xfe000020 0xcafef00d");
    assert_eq!(q.value("readl 0xfe000020"), 0xcafe_f00d);
    // BAR1: inside a sparse area QEMU reads its own mapping of our fd; outside, it traps.
    pwrite(
        &device.bar1,
        BAR1_FILE_OFFSET + 0x1010,
        &0xdead_beefu32.to_le_bytes(),
    );
    pwrite(
        &device.bar1,
        BAR1_FILE_OFFSET + 0x4000,
        &0x0bad_f00du32.to_le_bytes(),
    );
    let writes = device.writes.load(Ordering::SeqCst);
    assert_eq!(q.value("readl 0xfd001010"), 0xdead_beef);
    assert_eq!(q.value("readl 0xfd004000"), 0x0bad_f00d);
    q.cmd("writel 0xfd001020 0x600df00d");
    assert_eq!(
        device.writes.load(Ordering::SeqCst),
        writes,
        "mmapped write never reached the socket"
    );
    let mut word = [0u8; 4];
    pread(&device.bar1, BAR1_FILE_OFFSET + 0x1020, &mut word);
    assert_eq!(u32::from_le_bytes(word), 0x600d_f00d);

    // Guest RAM is not shared (no memfd backend): DMA goes through DMA_READ/DMA_WRITE messages.
    q.cmd("write 0x100000 0x8 0x0807060504030201");
    let h = device.handle();
    let mut b = [0u8; 8];
    h.dma_read(0x100000, &mut b).unwrap();
    assert_eq!(b, [8, 7, 6, 5, 4, 3, 2, 1]);
    let pattern: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 256) as u8).collect();
    h.dma_write(0x200003, &pattern).unwrap();
    assert_eq!(q.value("read 0x200003 0x4"), 0x0007_0e15);
    // Larger than QEMU can reply to in one piece: split into 64 KiB requests.
    let mut big = vec![0u8; 512 << 10];
    h.dma_read(0x200000, &mut big).unwrap();
    assert_eq!(&big[3..5003], &pattern[..]);
    drop(q);
    running.stop();
    assert_eq!(device.disconnects.load(Ordering::SeqCst), 1);
}

/// The seals of QEMU's `memory-backend-memfd` file, read through `/proc/<pid>/fd` (the same
/// file the server received with DMA_MAP), if QEMU holds one.
fn qemu_memfd_seals(pid: u32) -> Option<libc::c_int> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if !target
            .to_string_lossy()
            .starts_with("/memfd:memory-backend-memfd")
        {
            continue;
        }
        let file = std::fs::File::open(entry.path()).ok()?;
        // SAFETY: F_GET_SEALS on a valid fd we own; no argument.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        return (seals >= 0).then_some(seals);
    }
    None
}

/// One QEMU run with guest RAM in a shared memfd (`seal=on|off`): checks the memfd's seals
/// and that the server maps it directly only when it is sealed against shrinking; device DMA
/// works either way.
fn qemu_memfd_guest_ram(qemu: &std::path::Path, seal: bool) {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vfio-user-qemu").unwrap();
    let path = dir.as_path().join("dev.sock");
    let device = FakeDevice::new();
    let running = Running::start(
        Server::bind(&path, DEFAULT_SOCKET_MODE).unwrap(),
        device.clone(),
    );
    let backend = format!(
        "memory-backend-memfd,id=mem,size=64M,share=on,seal={}",
        if seal { "on" } else { "off" }
    );
    let mut q = Qtest::start(
        qemu,
        &path,
        &["-object", &backend, "-machine", "memory-backend=mem"],
    );
    q.config_write(0x04, 0x0006);
    let seals = qemu_memfd_seals(q.child.id()).expect("QEMU holds a memory-backend-memfd fd");
    eprintln!(
        "QEMU memory-backend-memfd seal={seal}: seals {seals:#x} (shrink {}, grow {}, seal {}, \
         write {})",
        seals & libc::F_SEAL_SHRINK != 0,
        seals & libc::F_SEAL_GROW != 0,
        seals & libc::F_SEAL_SEAL != 0,
        seals & libc::F_SEAL_WRITE != 0
    );
    // seal=off: a memfd created without MFD_ALLOW_SEALING, which the kernel marks with
    // F_SEAL_SEAL alone (no further seals can be added; it can still shrink).
    let expected = if seal {
        libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL
    } else {
        libc::F_SEAL_SEAL
    };
    assert_eq!(seals, expected, "QEMU's memfd seals changed");
    // The first qtest answer came after realize, whose DMA maps QEMU waits for.
    let mapped = || proc_maps_contains("/memfd:memory-backend-memfd");
    if seal {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !mapped() {
            assert!(
                Instant::now() < deadline,
                "sealed guest RAM was never mmapped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    q.cmd("write 0x100000 0x8 0x0807060504030201");
    let h = device.handle();
    let mut b = [0u8; 8];
    h.dma_read(0x100000, &mut b).unwrap();
    assert_eq!(b, [8, 7, 6, 5, 4, 3, 2, 1]);
    h.dma_write(0x200003, &[0x00, 0x07, 0x0e, 0x15]).unwrap();
    assert_eq!(q.value("read 0x200003 0x4"), 0x0007_0e15);
    assert_eq!(mapped(), seal, "mapped directly only when sealed");
    drop(q);
    running.stop();
    assert!(!mapped(), "guest RAM unmapped on disconnect");
}

#[test]
fn real_qemu_memfd_guest_ram_is_mapped_only_when_sealed() {
    let qemu = lab_qemu();
    // One after the other: both look for QEMU's memfd in this process's mappings.
    qemu_memfd_guest_ram(&qemu, true);
    qemu_memfd_guest_ram(&qemu, false);
}

// ---------------------------------------------------------------------------------------------
// Benchmark smoke run

#[test]
fn region_read_latency_benchmark_runs() {
    for mode in [
        BenchMode::Dispatch,
        BenchMode::ServerStep,
        BenchMode::Inline,
        BenchMode::Threaded,
    ] {
        let stats = bench_region_read(FakeDevice::new(), BAR0, 0x10, 4, 2000, mode).unwrap();
        eprintln!("REGION_READ 4 bytes, {mode:?}: {stats:?}");
        assert_eq!(stats.samples, 2000);
        assert!(stats.p50 < Duration::from_millis(5), "{stats:?}");
    }
    let per_write = super::bench_posted_writes(FakeDevice::new(), BAR0, 0x10, 20_000).unwrap();
    eprintln!("posted REGION_WRITE 4 bytes: {per_write:?} per write (drained)");
    assert!(per_write < Duration::from_millis(1));
}
