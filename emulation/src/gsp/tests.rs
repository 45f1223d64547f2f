//! Tests of the emulated GSP through a minimal host written here (the real host driver
//! lives in `gpu-backend` and has its own tests against this GSP). The host here boots the
//! GSP the way hardware is booted: LibOS arguments in DMA memory, their address in
//! MAILBOX0/1, STARTCPU.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::falcon::{
    GSP_CPUCTL, GSP_CPUCTL_ALIAS, GSP_ENGINE, GSP_IRQSCLR, GSP_IRQSTAT, GSP_MAILBOX0, GSP_MAILBOX1,
    GSP_QUEUE_HEAD0, GSP_RISCV_CPUCTL,
};
use super::libos::RMARGS_ID;
use super::objects::{INTERNAL_CLIENT, INTERNAL_DEVICE};
use super::queues::{ENTRY_OFFSET, QUEUE_SIZE, RX_HEADER_OFFSET, SLOT_COUNT};
use super::rm::{class, control, event, function, status};
use super::wire::{self, WireMessage, SLOT_SIZE};
use super::*;
use crate::bar0::AccessWidth::Dword;
use crate::gpu::EmulatedGpu;
use crate::profile::ChipProfile;

const PAGE: u64 = 0x1000;
const CMDQ: u64 = 0x1000;
const MSGQ: u64 = 0x41000;
const BLOCK: u64 = 0x81000;
/// Block offset of the LibOS argument array (right after the queue block).
const LIBOS: u64 = BLOCK;
/// Block offset of GSP_ARGUMENTS_CACHED.
const RMARGS: u64 = BLOCK + PAGE;
/// Everything the host lends the GSP: the block and the two argument pages.
const TOTAL: u64 = BLOCK + 2 * PAGE;
/// Pages of the block.
const BLOCK_PAGES: u64 = BLOCK / PAGE;
/// Where the split host puts its second part (ASSUMPTION: any free IOVA will do).
const SPLIT_IOVA: u64 = 0x7000_0000;

/// Memory that is not a memfd: a locked vector, as a guest's DMA map reached over a socket
/// would be.
#[derive(Debug)]
struct VecTarget(Mutex<Vec<u8>>);

impl VecTarget {
    fn new(len: u64) -> VecTarget {
        VecTarget(Mutex::new(vec![0; len as usize]))
    }

    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, DmaError> {
        let size = self.0.lock().unwrap().len() as u64;
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(DmaError::OutOfBounds {
                offset,
                len: len as u64,
                size,
            }),
        }
    }
}

impl DmaTarget for VecTarget {
    fn len(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        let r = self.range(offset, data.len())?;
        self.0.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }

    fn load_u32(&self, offset: u64) -> Result<u32, DmaError> {
        let mut b = [0u8; 4];
        self.read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn store_u32(&self, offset: u64, value: u32) -> Result<(), DmaError> {
        self.write(offset, &value.to_le_bytes())
    }
}

/// The host's view of memory lent in two parts: block offsets below `boundary` are in
/// `low`, the rest in `high` (at `offset - boundary`). Page-aligned accesses never span
/// the boundary in these tests.
#[derive(Debug)]
struct Split {
    low: Arc<dyn DmaTarget>,
    high: Arc<dyn DmaTarget>,
    boundary: u64,
}

impl Split {
    fn part(&self, offset: u64) -> (&dyn DmaTarget, u64) {
        if offset < self.boundary {
            (self.low.as_ref(), offset)
        } else {
            (self.high.as_ref(), offset - self.boundary)
        }
    }
}

impl DmaTarget for Split {
    fn len(&self) -> u64 {
        self.boundary + self.high.len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let (t, o) = self.part(offset);
        t.read(o, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        let (t, o) = self.part(offset);
        t.write(o, data)
    }

    fn load_u32(&self, offset: u64) -> Result<u32, DmaError> {
        let (t, o) = self.part(offset);
        t.load_u32(o)
    }

    fn store_u32(&self, offset: u64, value: u32) -> Result<(), DmaError> {
        let (t, o) = self.part(offset);
        t.store_u32(o, value)
    }
}

/// A bare-bones host: owns the block (and the LibOS argument pages after it) and drives
/// the queues by offsets.
struct TestHost {
    gpu: EmulatedGpu,
    /// The host's view of all `TOTAL` bytes, by block offset.
    mem: Arc<dyn DmaTarget>,
    /// DMA address of each page of `mem`.
    pages: Vec<u64>,
    /// Keeps the memfd the GPU mapped alive.
    _memfd: Option<SharedMemory>,
    tx: u32,
    rx: u32,
    seq: u32,
}

impl TestHost {
    /// Everything in one memfd the GPU maps with [`DmaSpace::map`].
    fn new(profile: &str) -> TestHost {
        let gpu = EmulatedGpu::new(ChipProfile::by_name(profile).unwrap()).unwrap();
        let memfd = SharedMemory::create(c"test-gsp-shm", TOTAL).unwrap();
        let dma = gpu.dma().map(memfd.as_fd(), TOTAL).unwrap();
        let mem: Arc<dyn DmaTarget> = Arc::new(SharedMemory::map(memfd.as_fd(), TOTAL).unwrap());
        let pages = (0..TOTAL / PAGE).map(|p| dma + p * PAGE).collect();
        TestHost::with_memory(gpu, mem, pages, Some(memfd))
    }

    /// The page table, the command queue and half the message queue in a memfd; the rest
    /// of the message queue and the argument pages in a [`VecTarget`] mapped with
    /// [`DmaSpace::map_at`].
    fn split(profile: &str) -> TestHost {
        let gpu = EmulatedGpu::new(ChipProfile::by_name(profile).unwrap()).unwrap();
        let boundary = MSGQ + 32 * PAGE;
        let memfd = SharedMemory::create(c"test-gsp-low", boundary).unwrap();
        let dma = gpu.dma().map(memfd.as_fd(), boundary).unwrap();
        let high = Arc::new(VecTarget::new(TOTAL - boundary));
        gpu.dma().map_at(SPLIT_IOVA, high.clone()).unwrap();
        let low: Arc<dyn DmaTarget> = Arc::new(SharedMemory::map(memfd.as_fd(), boundary).unwrap());
        let pages = (0..TOTAL / PAGE)
            .map(|p| match p * PAGE {
                o if o < boundary => dma + o,
                o => SPLIT_IOVA + o - boundary,
            })
            .collect();
        let mem = Arc::new(Split {
            low,
            high,
            boundary,
        });
        TestHost::with_memory(gpu, mem, pages, Some(memfd))
    }

    fn with_memory(
        gpu: EmulatedGpu,
        mem: Arc<dyn DmaTarget>,
        pages: Vec<u64>,
        memfd: Option<SharedMemory>,
    ) -> TestHost {
        let mut h = TestHost {
            gpu,
            mem,
            pages,
            _memfd: memfd,
            tx: 0,
            rx: 0,
            seq: 0,
        };
        h.init();
        h
    }

    /// Writes the page table, the command queue header and the LibOS arguments, and
    /// zeroes the host's queue state (as a host does before each boot).
    fn init(&mut self) {
        for page in 0..BLOCK_PAGES {
            self.mem
                .write(page * 8, &self.pages[page as usize].to_le_bytes())
                .unwrap();
        }
        let header = [0, QUEUE_SIZE as u32, 0x1000, SLOT_COUNT, 0, 1, 0x20, 0x1000];
        for (i, v) in header.into_iter().enumerate() {
            self.mem.store_u32(CMDQ + 4 * i as u64, v).unwrap();
        }
        self.mem.store_u32(CMDQ + RX_HEADER_OFFSET, 0).unwrap();
        self.write_rmargs_entry(RMARGS_ID, 0x48, 1, 1);
        let mut args = [0u8; 0x48];
        args[0..8].copy_from_slice(&self.pages[0].to_le_bytes());
        args[8..12].copy_from_slice(&(BLOCK_PAGES as u32).to_le_bytes());
        args[0x10..0x18].copy_from_slice(&CMDQ.to_le_bytes());
        args[0x18..0x20].copy_from_slice(&MSGQ.to_le_bytes());
        args[0x30] = 1;
        self.mem.write(RMARGS, &args).unwrap();
        (self.tx, self.rx, self.seq) = (0, 0, 0);
    }

    /// Makes the first (and only) entry of the LibOS array name `id8`, pointing at the
    /// GSP_ARGUMENTS_CACHED page.
    fn write_rmargs_entry(&self, id8: u64, size: u64, kind: u8, loc: u8) {
        let mut e = [0u8; 64];
        e[0..8].copy_from_slice(&id8.to_le_bytes());
        e[8..16].copy_from_slice(&self.pages[(RMARGS / PAGE) as usize].to_le_bytes());
        e[16..24].copy_from_slice(&size.to_le_bytes());
        e[24] = kind;
        e[25] = loc;
        self.mem.write(LIBOS, &e).unwrap();
    }

    fn reg(&self, offset: u64) -> u32 {
        self.gpu.bar0_read(offset, Dword).unwrap() as u32
    }

    /// MAILBOX1:MAILBOX0 = `array`, then CPUCTL.STARTCPU.
    fn start_at(&self, array: u64) {
        self.gpu
            .bar0_write(GSP_MAILBOX0, Dword, array & 0xFFFF_FFFF)
            .unwrap();
        self.gpu
            .bar0_write(GSP_MAILBOX1, Dword, array >> 32)
            .unwrap();
        self.gpu.bar0_write(GSP_CPUCTL, Dword, 0x2).unwrap();
    }

    /// Waits (bounded) until the GSP thread has read its arguments started at `array`:
    /// MAILBOX0 no longer holds the address the host wrote, and, if it refused, the
    /// thread has ended.
    fn settle(&self, array: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            let mailbox = self.reg(GSP_MAILBOX0);
            if mailbox != (array & 0xFFFF_FFFF) as u32
                && (mailbox == 0 || !self.gpu.gsp().is_running())
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }

    /// Starts the GSP on this host's LibOS arguments; it must start.
    fn start(&self) {
        let array = self.pages[(LIBOS / PAGE) as usize];
        self.start_at(array);
        self.settle(array);
        assert_eq!(self.reg(GSP_MAILBOX0), 0, "{:?}", self.gpu.gsp().stats());
        assert_eq!(self.reg(GSP_CPUCTL) & 0x10, 0);
        assert!(self.gpu.gsp().is_running());
    }

    /// Starts the GSP expecting it to refuse with `code`.
    fn start_refused(&self, array: u64, code: u32) {
        let errors = self.gpu.gsp().stats().errors.len();
        self.start_at(array);
        self.settle(array);
        assert_eq!(self.reg(GSP_MAILBOX0), code);
        assert_eq!(self.reg(GSP_CPUCTL), 0x10, "halted");
        assert_eq!(self.reg(GSP_RISCV_CPUCTL), 0x01, "RISC-V halted");
        assert!(!self.gpu.gsp().is_running());
        assert_eq!(self.gpu.gsp().stats().errors.len(), errors + 1);
    }

    fn send_raw(&mut self, mut bytes: Vec<u8>, ring: bool) {
        let slots = (bytes.len() / SLOT_SIZE) as u32;
        bytes.truncate(slots as usize * SLOT_SIZE);
        for i in 0..slots {
            let slot = (self.tx + i) % SLOT_COUNT;
            let off = CMDQ + ENTRY_OFFSET + u64::from(slot) * SLOT_SIZE as u64;
            self.mem
                .write(off, &bytes[i as usize * SLOT_SIZE..][..SLOT_SIZE])
                .unwrap();
        }
        self.tx = (self.tx + slots) % SLOT_COUNT;
        self.mem.store_u32(CMDQ + 0x10, self.tx).unwrap();
        if ring {
            self.gpu.bar0_write(GSP_QUEUE_HEAD0, Dword, 0).unwrap();
        }
    }

    fn send(&mut self, function: u32, sequence: u32, payload: Vec<u8>) {
        let msg = WireMessage {
            function,
            result: u32::MAX,
            result_private: u32::MAX,
            sequence,
            payload,
        };
        let b = wire::encode(&msg, self.seq).unwrap();
        self.seq += 1;
        self.send_raw(b, true);
    }

    /// Next message (or decode error), waiting up to 2 s; `None` on timeout.
    fn recv_within(&mut self, timeout: Duration) -> Option<Result<WireMessage, wire::WireError>> {
        let start = Instant::now();
        loop {
            let w = self.mem.load_u32(MSGQ + 0x10).unwrap();
            if w != self.rx {
                let avail = (w + SLOT_COUNT - self.rx) % SLOT_COUNT;
                let mut buf = vec![0u8; avail as usize * SLOT_SIZE];
                for i in 0..avail {
                    let slot = (self.rx + i) % SLOT_COUNT;
                    let off = MSGQ + ENTRY_OFFSET + u64::from(slot) * SLOT_SIZE as u64;
                    self.mem
                        .read(off, &mut buf[i as usize * SLOT_SIZE..][..SLOT_SIZE])
                        .unwrap();
                }
                let slots = match wire::claimed_slots(&buf) {
                    Ok(n) if n <= avail => n,
                    _ => avail,
                };
                self.rx = (self.rx + slots) % SLOT_COUNT;
                self.mem
                    .store_u32(CMDQ + RX_HEADER_OFFSET, self.rx)
                    .unwrap();
                return Some(wire::decode(&buf[..slots as usize * SLOT_SIZE]).map(|(_, m)| m));
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn recv(&mut self) -> WireMessage {
        self.recv_within(Duration::from_secs(5))
            .expect("a message within 5 s")
            .expect("an intact message")
    }

    fn system_info(&self) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        let pci = self.gpu.profile().pci();
        b[0x2C..0x2E].copy_from_slice(&pci.vendor_id.to_le_bytes());
        b[0x2E..0x30].copy_from_slice(&pci.device_id.to_le_bytes());
        b[0x38..0x3C].copy_from_slice(&4096u32.to_le_bytes());
        b
    }

    fn registry() -> Vec<u8> {
        let mut b = vec![0u8; 8 + 16];
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..12].copy_from_slice(&24u32.to_le_bytes());
        b[12] = 1;
        b[16..20].copy_from_slice(&1u32.to_le_bytes());
        b[20..24].copy_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(b"RMSecBusResetEnable\0");
        let n = b.len() as u32;
        b[0..4].copy_from_slice(&n.to_le_bytes());
        b
    }

    /// Queues the two boot commands, starts the GSP, and waits for INIT_DONE.
    fn boot(&mut self) {
        let info = self.system_info();
        self.send(function::GSP_SET_SYSTEM_INFO, 0, info);
        self.send(function::SET_REGISTRY, 0, Self::registry());
        self.start();
        assert_eq!(self.recv().function, event::UCODE_LIBOS_PRINT);
        assert_eq!(self.recv().function, event::GSP_INIT_DONE);
    }
}

fn alloc_payload(object: u32, class: u32, params: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [
        INTERNAL_CLIENT,
        INTERNAL_DEVICE,
        object,
        class,
        params.len() as u32,
        0,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(params);
    b
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

#[test]
fn boots_on_every_profile_and_reports_fb_regions() {
    for p in ChipProfile::all() {
        let mut h = TestHost::new(p.name());
        h.boot();
        // SWGEN0 is raised; IRQSCLR acks it.
        assert_eq!(h.gpu.bar0_read(GSP_IRQSTAT, Dword).unwrap() & 0x40, 0x40);
        h.gpu.bar0_write(GSP_IRQSCLR, Dword, 0x40).unwrap();
        assert_eq!(h.gpu.bar0_read(GSP_IRQSTAT, Dword).unwrap(), 0);
        h.send(function::GET_GSP_STATIC_INFO, 7, Vec::new());
        let r = h.recv();
        assert_eq!((r.function, r.result, r.sequence), (65, 0, 7));
        let count = u32::from_le_bytes(r.payload[0..4].try_into().unwrap()) as usize;
        assert_eq!(
            u64_at(&r.payload, 8),
            p.vram_size() + super::fb::FIRMWARE_RESERVED
        );
        assert_eq!(u64_at(&r.payload, 32), 0);
        assert_eq!(u64_at(&r.payload, 40) + 1, p.usable_vram_size(), "{p}");
        assert_eq!(count, if p.reserved_vram_size() > 0 { 3 } else { 2 });
        let state = h.gpu.gsp().state().unwrap();
        assert!(state.init_done);
        assert_eq!(state.registry[0].name, "RMSecBusResetEnable");
        assert_eq!(state.system_info.unwrap().device_id, p.pci().device_id);
    }
}

#[test]
fn commands_before_init_are_not_ready_and_unknown_ones_unsupported() {
    let mut h = TestHost::new("tu102-24g");
    h.start();
    h.send(function::NOP, 1, vec![1, 2, 3]);
    let r = h.recv();
    assert_eq!(
        (r.function, r.result, r.sequence),
        (0, status::NOT_READY, 1)
    );
    h.send(function::GSP_SET_SYSTEM_INFO, 0, h.system_info());
    h.send(function::SET_REGISTRY, 0, TestHost::registry());
    assert_eq!(h.recv().function, event::UCODE_LIBOS_PRINT);
    assert_eq!(h.recv().function, event::GSP_INIT_DONE);
    h.send(function::NOP, 2, vec![1, 2, 3]);
    let r = h.recv();
    assert_eq!((r.result, r.sequence, r.payload), (0, 2, vec![1, 2, 3]));
    h.send(200, 3, Vec::new());
    assert_eq!(h.recv().result, status::NOT_SUPPORTED);
}

#[test]
fn a_wrong_device_id_fails_the_boot() {
    let mut h = TestHost::new("gh100-80g");
    let mut info = h.system_info();
    info[0x2E] ^= 1;
    h.send(function::GSP_SET_SYSTEM_INFO, 0, info);
    h.send(function::SET_REGISTRY, 0, TestHost::registry());
    h.start();
    assert!(h.recv_within(Duration::from_millis(50)).is_none());
    let state = h.gpu.gsp().state().unwrap();
    assert!(!state.init_done);
    assert!(state.boot_error.unwrap().contains("PCI"));
}

#[test]
fn start_via_registers_reads_the_libos_arguments() {
    let mut h = TestHost::new("tu102-24g");
    assert_eq!(h.reg(GSP_CPUCTL), 0x10, "halted at power-on");
    assert_eq!(h.reg(GSP_CPUCTL_ALIAS), 0x10);
    h.boot();
    assert_eq!(h.reg(GSP_CPUCTL), 0);
    assert_eq!(h.reg(GSP_CPUCTL_ALIAS), 0);
    assert_eq!(h.reg(GSP_RISCV_CPUCTL), 0x80, "RISC-V active");
    assert!(h.gpu.gsp().stats().errors.is_empty());
    // STARTCPU while running is ignored: same thread, nothing recorded, still answering.
    h.start_at(0x1234_5000);
    assert!(h.gpu.gsp().is_running());
    assert!(h.gpu.gsp().stats().errors.is_empty());
    h.send(function::NOP, 9, vec![1]);
    assert_eq!(h.recv().sequence, 9);
}

#[test]
fn bad_libos_arguments_leave_the_gsp_halted_with_a_code() {
    let mut h = TestHost::new("gh100-80g");
    let array = h.pages[(LIBOS / PAGE) as usize];
    // Nothing mapped there.
    h.start_refused(0x1234_5000, START_ARGS_UNREACHABLE);
    // The array would run past the end of the mapping.
    h.start_refused(array + PAGE + 0x800, START_ARGS_UNREACHABLE);
    // No RMARGS entry.
    h.write_rmargs_entry(u64::from_be_bytes(*b"\0\0LOGRM\0"), 0x48, 1, 1);
    h.start_refused(array, START_NO_RMARGS);
    // RMARGS in FB, radix3, too small.
    h.write_rmargs_entry(RMARGS_ID, 0x48, 1, 2);
    h.start_refused(array, START_BAD_RMARGS_ENTRY);
    h.write_rmargs_entry(RMARGS_ID, 0x48, 2, 1);
    h.start_refused(array, START_BAD_RMARGS_ENTRY);
    h.write_rmargs_entry(RMARGS_ID, 0x47, 1, 1);
    h.start_refused(array, START_BAD_RMARGS_ENTRY);
    // RMARGS pointing nowhere.
    let mut e = [0u8; 32];
    e[0..8].copy_from_slice(&RMARGS_ID.to_le_bytes());
    e[8..16].copy_from_slice(&0x10u64.to_le_bytes());
    e[16..24].copy_from_slice(&0x48u64.to_le_bytes());
    e[24] = 1;
    e[25] = 1;
    h.mem.write(LIBOS, &e).unwrap();
    h.start_refused(array, START_RMARGS_UNREACHABLE);
    // Queues refused: a wrong command queue header, then a page table entry pointing
    // nowhere.
    h.init();
    h.mem.store_u32(CMDQ + 0x0C, 64).unwrap();
    h.start_refused(array, START_QUEUES_REFUSED);
    let errors = h.gpu.gsp().stats().errors;
    assert!(errors.last().unwrap().contains("msgCount"), "{errors:?}");
    h.init();
    h.mem.write(8 * 100, &0x4000u64.to_le_bytes()).unwrap();
    h.start_refused(array, START_QUEUES_REFUSED);
    // None of the codes looks like a PRI error.
    for code in [
        START_ARGS_UNREACHABLE,
        START_NO_RMARGS,
        START_BAD_RMARGS_ENTRY,
        START_RMARGS_UNREACHABLE,
        START_QUEUES_REFUSED,
        START_THREAD_FAILED,
    ] {
        assert_ne!(code >> 20, 0xBAD);
        assert_ne!(code, 0);
    }
    // Fixed, it starts, and MAILBOX0 is cleared.
    h.init();
    h.boot();
}

#[test]
fn engine_reset_halts_the_gsp_and_resets_the_falcon() {
    let mut h = TestHost::new("ga100-80g");
    h.boot();
    assert_ne!(h.reg(GSP_IRQSTAT), 0);
    h.gpu.bar0_write(GSP_ENGINE, Dword, 1).unwrap();
    assert!(!h.gpu.gsp().is_running());
    assert_eq!(h.reg(GSP_CPUCTL), 0x10);
    assert_eq!(h.reg(GSP_ENGINE), 1);
    for reg in [GSP_IRQSTAT, GSP_MAILBOX0, GSP_MAILBOX1, GSP_QUEUE_HEAD0] {
        assert_eq!(h.reg(reg), 0, "{reg:#x}");
    }
    // Halted: commands are not answered.
    h.send(function::NOP, 1, Vec::new());
    assert!(h.recv_within(Duration::from_millis(30)).is_none());
    // STARTCPU is ignored while the reset is held.
    h.init();
    h.start_at(h.pages[(LIBOS / PAGE) as usize]);
    assert!(!h.gpu.gsp().is_running());
    assert_eq!(h.reg(GSP_CPUCTL), 0x10);
    // Released, the GSP boots again on the re-initialised block.
    h.gpu.bar0_write(GSP_ENGINE, Dword, 0).unwrap();
    assert_eq!(h.reg(GSP_ENGINE), 0);
    h.boot();
    h.send(function::NOP, 2, vec![7]);
    assert_eq!(h.recv().payload, [7]);
    // Reset of a halted GSP is harmless.
    h.gpu.bar0_write(GSP_ENGINE, Dword, 1).unwrap();
    h.gpu.bar0_write(GSP_ENGINE, Dword, 1).unwrap();
    assert!(!h.gpu.gsp().is_running());
}

#[test]
fn queues_spanning_two_dma_targets_work() {
    let mut h = TestHost::split("gh200-96g");
    assert_eq!(h.gpu.dma().mapping_count(), 2);
    h.boot();
    // Messages big enough to use slots in both halves of the message queue.
    for i in 0..40u32 {
        let payload: Vec<u8> = (0..9000).map(|j| (j as u32 ^ i) as u8).collect();
        h.send(function::NOP, i, payload.clone());
        let r = h.recv();
        assert_eq!((r.sequence, r.payload), (i, payload));
    }
    assert!(h.gpu.gsp().stats().errors.is_empty());
}

#[test]
fn objects_are_allocated_bound_and_freed_with_handle_errors() {
    let mut h = TestHost::new("gh200-96g");
    h.boot();
    let mut mem_params = vec![0u8; 32];
    mem_params[0..8].copy_from_slice(&(3u64 << 20).to_le_bytes());
    mem_params[8..16].copy_from_slice(&(2u64 << 20).to_le_bytes());
    h.send(
        function::GSP_RM_ALLOC,
        10,
        alloc_payload(0x100, class::NV01_MEMORY_LOCAL_USER, &mem_params),
    );
    let r = h.recv();
    assert_eq!((r.result, r.sequence), (0, 10));
    assert_eq!(u64_at(&r.payload, 24), 3 << 20);
    assert_eq!(u64_at(&r.payload, 24 + 16) % (2 << 20), 0);
    // Same handle again: duplicate.
    h.send(
        function::GSP_RM_ALLOC,
        11,
        alloc_payload(0x100, class::NV01_MEMORY_LOCAL_USER, &mem_params),
    );
    assert_eq!(h.recv().result, status::INSERT_DUPLICATE_NAME);
    // Address space, then bind.
    let mut vas = vec![0u8; 32];
    vas[8..16].copy_from_slice(&(1u64 << 47).to_le_bytes());
    vas[16..20].copy_from_slice(&0x1_0000u32.to_le_bytes());
    h.send(
        function::GSP_RM_ALLOC,
        12,
        alloc_payload(0x200, class::FERMI_VASPACE_A, &vas),
    );
    assert_eq!(h.recv().result, status::OK);
    let mut ctl = Vec::new();
    for v in [
        INTERNAL_CLIENT,
        0x200,
        control::VASPACE_BIND_PAGE_DIRECTORY,
        16,
    ] {
        ctl.extend_from_slice(&v.to_le_bytes());
    }
    ctl.extend_from_slice(&0x20_0000u64.to_le_bytes());
    ctl.extend_from_slice(&[0; 8]);
    h.send(function::GSP_RM_CONTROL, 13, ctl.clone());
    assert_eq!(h.recv().result, status::OK);
    ctl[4..8].copy_from_slice(&0x300u32.to_le_bytes());
    h.send(function::GSP_RM_CONTROL, 14, ctl);
    assert_eq!(h.recv().result, status::OBJECT_NOT_FOUND);
    // Free: good, then the same again.
    let free = |o: u32| {
        let mut b = Vec::new();
        for v in [INTERNAL_CLIENT, INTERNAL_DEVICE, o, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    };
    h.send(function::FREE, 15, free(0x100));
    assert_eq!(h.recv().result, status::OK);
    h.send(function::FREE, 16, free(0x100));
    assert_eq!(h.recv().result, status::OBJECT_NOT_FOUND);
    let state = h.gpu.gsp().state().unwrap();
    assert_eq!(state.free_vram, 95 << 30);
    assert_eq!(state.objects.len(), 4);
}

#[test]
fn faults_drop_corrupt_stall_and_unknown_events() {
    let mut h = TestHost::new("gb202-32g");
    h.boot();
    let gsp = h.gpu.gsp();
    gsp.faults().drop_next_replies(1);
    h.send(function::NOP, 1, Vec::new());
    h.send(function::NOP, 2, Vec::new());
    assert_eq!(h.recv().sequence, 2);
    assert_eq!(h.gpu.gsp().stats().replies_dropped, 1);

    h.gpu
        .gsp()
        .faults()
        .corrupt_next_message(Corruption::Checksum);
    h.send(function::NOP, 3, Vec::new());
    assert!(matches!(
        h.recv_within(Duration::from_secs(5)),
        Some(Err(wire::WireError::Checksum(_)))
    ));
    h.send(function::NOP, 4, Vec::new());
    assert_eq!(h.recv().sequence, 4);

    h.gpu.gsp().faults().send_unknown_event(0x10FF);
    h.gpu.bar0_write(GSP_QUEUE_HEAD0, Dword, 0).unwrap();
    assert_eq!(h.recv().function, 0x10FF);

    h.gpu.gsp().faults().stall();
    h.send(function::NOP, 5, Vec::new());
    assert!(h.recv_within(Duration::from_millis(20)).is_none());
    h.gpu.gsp().faults().resume();
    assert_eq!(h.recv().sequence, 5);

    h.gpu.gsp().post_event(event::OS_ERROR_LOG, vec![9; 5000]);
    let e = h.recv();
    assert_eq!((e.function, e.payload.len()), (event::OS_ERROR_LOG, 5000));
}

#[test]
fn corrupt_commands_are_skipped_and_counted() {
    let mut h = TestHost::new("ga100-80g");
    h.boot();
    let msg = WireMessage::from_gsp(function::NOP, u32::MAX, 1, vec![0; 10_000]);
    let mut b = wire::encode(&msg, 2).unwrap();
    b[0x100] ^= 0xFF;
    h.send_raw(b, true);
    h.send(function::NOP, 2, Vec::new());
    assert_eq!(h.recv().sequence, 2);
    let stats = h.gpu.gsp().stats();
    assert_eq!(stats.endpoint.corrupt_commands, 1);
    assert!(stats.errors[0].contains("checksum"), "{:?}", stats.errors);
    // elemCount 0: the GSP jumps to the write pointer, dropping whatever the host had
    // published behind the bad element (NOP 3 may or may not be among it).
    let mut b = wire::encode(&msg, 3).unwrap();
    b[0x28..0x2C].fill(0);
    h.send_raw(b, false);
    h.send(function::NOP, 3, Vec::new());
    let start = Instant::now();
    while h.gpu.gsp().stats().endpoint.corrupt_commands < 2 {
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    h.send(function::NOP, 4, Vec::new());
    let mut r = h.recv();
    if r.sequence == 3 {
        r = h.recv();
    }
    assert_eq!(r.sequence, 4);
    assert_eq!(h.gpu.gsp().stats().endpoint.corrupt_commands, 2);
}

#[test]
fn many_messages_wrap_the_rings() {
    let mut h = TestHost::new("tu102-24g");
    h.boot();
    for i in 0..200u32 {
        let len = (i as usize * 977) % (3 * SLOT_SIZE);
        let payload: Vec<u8> = (0..len).map(|j| (j as u32 ^ i) as u8).collect();
        h.send(function::NOP, i, payload.clone());
        let r = h.recv();
        assert_eq!((r.sequence, r.payload), (i, payload));
    }
    assert_eq!(h.gpu.gsp().stats().endpoint.sequence_gaps, 0);
}

#[test]
fn reset_and_drop_halt_the_gsp() {
    let mut h = TestHost::new("tu102-24g");
    h.boot();
    assert!(h.gpu.gsp().is_running());
    h.gpu.reset();
    assert!(!h.gpu.gsp().is_running());
    assert_eq!(h.reg(GSP_CPUCTL), 0x10);
    h.send(function::NOP, 1, Vec::new());
    assert!(h.recv_within(Duration::from_millis(20)).is_none());
    // Restart on the same block after the host re-initialises it.
    h.init();
    h.boot();
    let mut h2 = TestHost::new("tu102-24g");
    h2.boot();
    drop(h2);
}
