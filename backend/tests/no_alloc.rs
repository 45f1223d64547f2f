//! The server's REGION_READ / REGION_WRITE path does not allocate.
//!
//! A counting global allocator (which is why this check has a test binary of its own) counts
//! allocations made on the measuring thread while a flag is set. The connection is stepped on
//! that thread, as in `BenchMode::ServerStep`: the test client queues a request (not counted),
//! then one `Connection::step()` (counted) reads it, lets the device serve it and replies; the
//! client reads the reply (not counted). After a warm-up, every access must allocate nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use gpu_backend::vfio_user::connection::Connection;
use gpu_backend::vfio_user::protocol::{flags, Command, RegionAccessMsg};
use gpu_backend::vfio_user::test_client::{TestClient, QEMU_CAPS_JSON};
use gpu_backend::vfio_user::{
    DeviceInfo, Errno, IrqInfo, RegionInfo, ServerConfig, VfioUserDevice,
};

/// Counts allocations (not frees) made while the calling thread's `MEASURING` flag is set.
struct CountingAllocator;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    /// Per thread, so two tests measuring at once never see each other's allocations.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    // `try_with`: the flag may already be gone while the thread's locals are destroyed.
    if MEASURING.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; counting
// touches only an atomic and a const-initialized thread-local (no allocation, no reentry).
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded as is; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Run `f` with allocation counting on for this thread; returns its result and the count.
fn count_allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCATIONS.with(Cell::get);
    MEASURING.with(|m| m.set(true));
    let result = f();
    MEASURING.with(|m| m.set(false));
    (result, ALLOCATIONS.with(Cell::get) - before)
}

const BAR0: u32 = 0;
const BAR0_SIZE: usize = 4096;

/// One read-write BAR of plain memory.
struct ScratchDevice {
    bar0: Mutex<[u8; BAR0_SIZE]>,
}

impl VfioUserDevice for ScratchDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            num_regions: 1,
            num_irqs: 0,
            resettable: false,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        (index == BAR0).then(|| RegionInfo {
            size: BAR0_SIZE as u64,
            readable: true,
            writable: true,
            mmap: None,
        })
    }

    fn irq_info(&self, _index: u32) -> Option<IrqInfo> {
        None
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        if index != BAR0 {
            return Err(Errno::EINVAL);
        }
        let o = offset as usize;
        buf.copy_from_slice(&self.bar0.lock().unwrap()[o..o + buf.len()]);
        Ok(buf.len())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        if index != BAR0 {
            return Err(Errno::EINVAL);
        }
        let o = offset as usize;
        self.bar0.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        Ok(data.len())
    }

    fn reset(&self) -> Result<(), Errno> {
        Ok(())
    }
}

/// A connection stepped on this thread and a client on the other end of a socketpair.
struct Stepped {
    conn: Connection,
    client: TestClient,
}

impl Stepped {
    fn new() -> Stepped {
        let (client_end, server_end) = UnixStream::pair().unwrap();
        let device = Arc::new(ScratchDevice {
            bar0: Mutex::new([0; BAR0_SIZE]),
        });
        let mut conn = Connection::new(server_end, device, ServerConfig::default(), None).unwrap();
        conn.start();
        let mut client = TestClient::new(client_end);
        // VERSION with QEMU's capabilities (NUL-terminated JSON).
        let mut json = QEMU_CAPS_JSON.as_bytes().to_vec();
        json.push(0);
        let id = client
            .send(Command::Version as u16, 0, &[&[0, 0, 0, 0], &json], &[])
            .unwrap();
        conn.step().unwrap();
        client.reply_to(id).unwrap();
        Stepped { conn, client }
    }

    /// Allocations of the server step that handles one REGION_READ of `count` bytes.
    fn read(&mut self, offset: u64, count: u32, buf: &mut [u8]) -> u64 {
        let id = self.client.send_region_read(BAR0, offset, count).unwrap();
        let (stepped, allocations) = count_allocations(|| self.conn.step());
        stepped.unwrap();
        let n = self.client.recv_region_read(id, buf).unwrap();
        assert_eq!(n, count as usize);
        allocations
    }

    /// Allocations of the server step that handles one REGION_WRITE of `data` (`posted`:
    /// `NO_REPLY`).
    fn write(&mut self, offset: u64, data: &[u8], posted: bool) -> u64 {
        let mut req = [0u8; RegionAccessMsg::SIZE];
        RegionAccessMsg {
            offset,
            region: BAR0,
            count: data.len() as u32,
        }
        .encode(&mut req)
        .unwrap();
        let msg_flags = if posted { flags::NO_REPLY } else { 0 };
        let id = self
            .client
            .send(Command::RegionWrite as u16, msg_flags, &[&req, data], &[])
            .unwrap();
        let (stepped, allocations) = count_allocations(|| self.conn.step());
        stepped.unwrap();
        if !posted {
            let reply = self.client.reply_to(id).unwrap();
            let echoed = RegionAccessMsg::decode(&reply.payload).unwrap();
            assert_eq!(echoed.count as usize, data.len());
        }
        allocations
    }
}

#[test]
fn counting_allocator_sees_allocations_on_the_measuring_thread_only() {
    let (v, n) = count_allocations(|| Vec::<u8>::with_capacity(64));
    assert_eq!((v.capacity() >= 64, n), (true, 1));
    let (_, n) = count_allocations(|| {
        std::thread::spawn(|| Vec::<u8>::with_capacity(64).capacity())
            .join()
            .unwrap()
    });
    // Spawning allocates on this thread; the child's own allocation is not counted.
    assert!(n >= 1);
    let (_, n) = count_allocations(|| 1 + 1);
    assert_eq!(n, 0);
}

/// The accesses measured.
#[derive(Debug, Clone, Copy)]
enum Access {
    Read4,
    ReadPage,
    Write8,
    PostedWrite4,
}

impl Access {
    /// Allocations of the server step for access number `i` of this kind.
    fn run(self, s: &mut Stepped, i: usize, buf: &mut [u8]) -> u64 {
        match self {
            Access::Read4 => s.read((i % 1024 * 4) as u64, 4, buf),
            Access::ReadPage => s.read(0, BAR0_SIZE as u32, buf),
            Access::Write8 => s.write((i % 512 * 8) as u64, &(i as u64).to_le_bytes(), false),
            Access::PostedWrite4 => s.write((i % 1024 * 4) as u64, &(i as u32).to_le_bytes(), true),
        }
    }
}

#[test]
fn region_read_and_write_steps_do_not_allocate() {
    const WARMUP: usize = 100;
    const ACCESSES: usize = 2000;
    let mut s = Stepped::new();
    let mut buf = [0u8; BAR0_SIZE];
    let mut results = Vec::new();
    for access in [
        Access::Read4,
        Access::ReadPage,
        Access::Write8,
        Access::PostedWrite4,
    ] {
        let warmup: u64 = (0..WARMUP).map(|i| access.run(&mut s, i, &mut buf)).sum();
        let measured: u64 = (0..ACCESSES).map(|i| access.run(&mut s, i, &mut buf)).sum();
        results.push((access, warmup, measured));
    }
    // The posted writes landed: the last one is read back.
    let last = ACCESSES - 1;
    s.read((last % 1024 * 4) as u64, 4, &mut buf);
    assert_eq!(buf[..4], (last as u32).to_le_bytes());
    eprintln!("(access, allocations in {WARMUP} warm-up steps, in {ACCESSES} measured steps): {results:?}");
    assert!(
        results.iter().all(|&(_, _, n)| n == 0),
        "the access path allocated: {results:?}"
    );
    s.conn.finish();
}
