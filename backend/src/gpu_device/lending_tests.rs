//! A whole-GPU guest lends its DMA maps to the GPU; a sliced one does not. The GPU here is
//! the emulated one behind a wrapper that records `map_guest_dma`/`unmap_guest_dma`.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::GpuDevice;
use crate::host_driver::addr::{VramAddr, MIB};
use crate::host_gpu::dma::DmaBuffer;
use crate::host_gpu::emulated::EmulatedHostGpu;
use crate::host_gpu::guest_dma::GuestDmaMemory;
use crate::host_gpu::{AccessWidth, ChipIdentity, HostGpu, HostGpuError, HostMemory, MmapSource};
use crate::presentation::PresentedFunction;
use crate::slice::SlicedGpu;
use crate::vfio_user::test_client::{ClientError, DmaBacking, TestClient};
use crate::vfio_user::DmaMessageLayout;
use crate::vfio_user::{serve_stream, ConnectionStats, ServerConfig, ServerError, VfioUserDevice};

/// A map the GPU holds: the memory, and its host address when it was lent.
struct Held {
    iova: u64,
    memory: Arc<dyn GuestDmaMemory>,
    mapping: Option<NonNull<u8>>,
}

// SAFETY: `mapping` is only an address recorded for the test; it is dereferenced only in
// `unmap_guest_dma`, while the map is still mapped (the contract under test).
unsafe impl Send for Held {}

/// The emulated GPU, recording what it is lent.
struct LendingHost {
    inner: Arc<EmulatedHostGpu>,
    held: Mutex<Vec<Held>>,
    /// `(iova, first byte through the host mapping at the time it was taken back)`.
    taken_back: Mutex<Vec<(u64, Option<u8>)>>,
    /// The errno the next `map_guest_dma` fails with.
    refuse_next: Mutex<Option<i32>>,
}

impl LendingHost {
    fn new(profile: &str) -> Arc<LendingHost> {
        Arc::new(LendingHost {
            inner: Arc::new(EmulatedHostGpu::by_name(profile).unwrap()),
            held: Mutex::new(Vec::new()),
            taken_back: Mutex::new(Vec::new()),
            refuse_next: Mutex::new(None),
        })
    }

    fn held(&self, iova: u64) -> Option<Arc<dyn GuestDmaMemory>> {
        let held = self.held.lock().unwrap();
        held.iter()
            .find(|h| h.iova == iova)
            .map(|h| Arc::clone(&h.memory))
    }

    fn held_iovas(&self) -> Vec<u64> {
        self.held.lock().unwrap().iter().map(|h| h.iova).collect()
    }

    fn taken_back(&self) -> Vec<(u64, Option<u8>)> {
        self.taken_back.lock().unwrap().clone()
    }
}

impl HostGpu for LendingHost {
    fn identity(&self) -> &ChipIdentity {
        self.inner.identity()
    }
    fn bar0_read(&self, offset: u64, width: AccessWidth) -> Result<u64, HostGpuError> {
        self.inner.bar0_read(offset, width)
    }
    fn bar0_write(&self, offset: u64, width: AccessWidth, value: u64) -> Result<(), HostGpuError> {
        self.inner.bar0_write(offset, width, value)
    }
    fn memory_bar(&self, index: u8) -> Option<Arc<dyn HostMemory>> {
        self.inner.memory_bar(index)
    }
    fn reset(&self) -> Result<(), HostGpuError> {
        self.inner.reset()
    }
    fn scrub_vram(&self, addr: VramAddr, len: u64) -> Result<(), HostGpuError> {
        self.inner.scrub_vram(addr, len)
    }
    fn bar1_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
        self.inner.bar1_read(offset, buf)
    }
    fn bar1_write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
        self.inner.bar1_write(offset, data)
    }
    fn vram_mmap_source(&self, addr: VramAddr, len: u64) -> Option<MmapSource> {
        self.inner.vram_mmap_source(addr, len)
    }
    fn release_vram_mmap_source(&self, addr: VramAddr, len: u64) -> Result<(), HostGpuError> {
        self.inner.release_vram_mmap_source(addr, len)
    }
    fn dma_alloc(&self, len: u64) -> Result<Arc<dyn DmaBuffer>, HostGpuError> {
        self.inner.dma_alloc(len)
    }
    fn map_guest_dma(
        &self,
        iova: u64,
        memory: Arc<dyn GuestDmaMemory>,
    ) -> Result<(), HostGpuError> {
        if let Some(errno) = self.refuse_next.lock().unwrap().take() {
            return Err(HostGpuError::Io(std::io::Error::from_raw_os_error(errno)));
        }
        let mapping = memory.host_mapping();
        self.held.lock().unwrap().push(Held {
            iova,
            memory,
            mapping,
        });
        Ok(())
    }
    fn unmap_guest_dma(&self, iova: u64) {
        let mut held = self.held.lock().unwrap();
        let Some(at) = held.iter().position(|h| h.iova == iova) else {
            panic!("unmap_guest_dma({iova:#x}) of a map the GPU does not hold");
        };
        let gone = held.remove(at);
        // SAFETY: the contract under test: the map's memory stays mapped until this
        // returns, so its first byte is readable.
        let first = gone.mapping.map(|p| unsafe { p.as_ptr().read_volatile() });
        self.taken_back.lock().unwrap().push((iova, first));
    }
}

fn sealed_memfd(size: u64) -> OwnedFd {
    // SAFETY: memfd_create with a static NUL-terminated name.
    let fd = unsafe {
        libc::memfd_create(
            c"lent-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: valid fd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
    // SAFETY: F_ADD_SEALS with an int argument on a valid memfd.
    let sealed = unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert_eq!(sealed, 0);
    fd
}

fn pwrite(fd: &OwnedFd, offset: u64, data: &[u8]) {
    // SAFETY: writes from a valid buffer of data.len() bytes.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            offset as i64,
        )
    };
    assert_eq!(n, data.len() as isize);
}

fn pread(fd: &OwnedFd, offset: u64, buf: &mut [u8]) {
    // SAFETY: reads into a valid buffer of buf.len() bytes.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as i64,
        )
    };
    assert_eq!(n, buf.len() as isize);
}

type ServerThread = JoinHandle<Result<ConnectionStats, ServerError>>;

fn connect(device: &Arc<GpuDevice>) -> (TestClient, ServerThread) {
    let (a, b) = UnixStream::pair().unwrap();
    let dev: Arc<dyn VfioUserDevice> = device.clone();
    let server = std::thread::spawn(move || serve_stream(b, dev, ServerConfig::default(), None));
    let mut client = TestClient::new(a);
    client.version().unwrap();
    (client, server)
}

fn errno_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> i32 {
    match r {
        Err(ClientError::Errno(e)) => e.0,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
fn a_whole_gpu_guest_lends_each_dma_map_until_it_is_unmapped() {
    let host = LendingHost::new("tu102-24g");
    let device = Arc::new(GpuDevice::new(
        PresentedFunction::new(host.clone()).unwrap(),
    ));
    let (mut client, server) = connect(&device);
    // An mmapped map: the GPU reads and writes guest memory through it, and gets its address.
    let ram = sealed_memfd(0x3000);
    pwrite(&ram, 0x1000, b"queue");
    client
        .dma_map(3, 0x1000, 0x10_0000, 0x2000, Some(ram.as_fd()))
        .unwrap();
    let lent = host.held(0x10_0000).expect("lent to the GPU");
    assert_eq!(
        (lent.len(), lent.readable(), lent.writable()),
        (0x2000, true, true)
    );
    assert!(lent.host_mapping().is_some());
    let mut buf = [0u8; 5];
    lent.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"queue");
    lent.write(0x10, b"reply").unwrap();
    pread(&ram, 0x1010, &mut buf);
    assert_eq!(&buf, b"reply");
    assert!(lent.read(0x1FFF, &mut buf).is_err(), "past the map");
    // An fd-less map is lent too, reached over the socket (no host address).
    client.dma_map(1, 0, 0x20_0000, 0x1000, None).unwrap();
    let socket = host.held(0x20_0000).unwrap();
    assert!(socket.host_mapping().is_none());
    assert!(socket.readable() && !socket.writable());
    // The GPU's own thread (not the connection thread) reads it with DMA_READ messages.
    client.set_dma_backing(
        DmaBacking {
            base: 0x20_0000,
            memory: Arc::new(Mutex::new(b"over the socket".to_vec())),
        },
        DmaMessageLayout::Spec,
    );
    let worker = {
        let socket = Arc::clone(&socket);
        std::thread::spawn(move || {
            let mut b = [0u8; 15];
            socket.read(0, &mut b).map(|()| b)
        })
    };
    while !worker.is_finished() {
        client.device_info().unwrap(); // keeps the client reading (and answering DMA)
    }
    assert_eq!(&worker.join().unwrap().unwrap(), b"over the socket");
    assert!(socket.write(0, b"x").is_err(), "read-only map");
    assert_eq!(
        device.lent_dma_maps(),
        [(0x10_0000, 0x2000), (0x20_0000, 0x1000)]
    );
    // A map the GPU refuses fails the DMA_MAP with its errno and is undone on the
    // connection, so the same range maps afterwards.
    *host.refuse_next.lock().unwrap() = Some(libc::ENOMEM);
    assert_eq!(
        errno_of(client.dma_map(3, 0, 0x30_0000, 0x1000, None)),
        libc::ENOMEM
    );
    assert!(host.held(0x30_0000).is_none());
    client.dma_map(3, 0, 0x30_0000, 0x1000, None).unwrap();
    // A host that cannot lend at all (ENOTSUP): the map stays with the connection.
    *host.refuse_next.lock().unwrap() = Some(libc::ENOTSUP);
    client.dma_map(3, 0, 0x40_0000, 0x1000, None).unwrap();
    assert!(host.held(0x40_0000).is_none());
    // One unmap over two maps (type1): both taken back, while their memory is still there.
    client.dma_unmap(0, 0x0, 0x28_0000).unwrap();
    assert_eq!(
        host.taken_back(),
        [(0x10_0000, Some(b'q')), (0x20_0000, None)]
    );
    assert!(lent.read(0, &mut buf).is_err(), "no access after the unmap");
    assert_eq!(host.held_iovas(), [0x30_0000]);
    // The client leaves: what is left is taken back.
    drop(client);
    server.join().unwrap().unwrap();
    assert_eq!(host.held_iovas(), Vec::<u64>::new());
    assert_eq!(host.taken_back().len(), 3);
    assert!(device.lent_dma_maps().is_empty());
}

#[test]
fn a_sliced_guest_lends_nothing() {
    let host = LendingHost::new("tu102-24g");
    let gpu: Arc<dyn HostGpu> = host.clone();
    let mut sliced = SlicedGpu::new(gpu).unwrap();
    let guest = sliced.add_guest(4 * MIB).unwrap();
    let device = Arc::new(GpuDevice::new(PresentedFunction::for_guest(guest).unwrap()));
    let (mut client, server) = connect(&device);
    let ram = sealed_memfd(0x1000);
    client
        .dma_map(3, 0, 0x10_0000, 0x1000, Some(ram.as_fd()))
        .unwrap();
    client.dma_map(3, 0, 0x20_0000, 0x1000, None).unwrap();
    assert!(host.held_iovas().is_empty());
    assert!(device.lent_dma_maps().is_empty());
    // The maps are the connection's, recorded without being mapped (nothing reaches a
    // sliced guest's memory from here): a device access goes over the socket, answered by
    // the client from its own memory, even for the fd-backed map.
    assert!(!device.maps_dma());
    pwrite(&ram, 0, b"fd!");
    let mut answered = b"own".to_vec();
    answered.resize(0x1000, 0);
    client.set_dma_backing(
        DmaBacking {
            base: 0x10_0000,
            memory: Arc::new(Mutex::new(answered)),
        },
        DmaMessageLayout::Spec,
    );
    let handle = device.client().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 3];
        handle.dma_read(0x10_0000, &mut buf).map(|()| buf)
    });
    while !reader.is_finished() {
        client.device_info().unwrap();
    }
    assert_eq!(&reader.join().unwrap().unwrap(), b"own");
    assert_eq!(client.dma_requests_served(), 1);
    client.dma_unmap(0, 0x10_0000, 0x1000).unwrap();
    drop(client);
    server.join().unwrap().unwrap();
    assert!(host.taken_back().is_empty());
}

/// Guest memory reached only with DMA_READ/DMA_WRITE messages, seen as a [`DmaBuffer`] so
/// the backend's own encoders can lay out the GSP's queue block and arguments in it.
#[derive(Debug)]
struct ClientMemory {
    backing: DmaBacking,
    offset: u64,
    len: u64,
}

impl ClientMemory {
    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, HostGpuError> {
        let start = self.offset + offset;
        if offset + len as u64 > self.len {
            return Err(HostGpuError::MemoryOutOfRange {
                offset,
                len: len as u64,
                size: self.len,
            });
        }
        Ok(start as usize..start as usize + len)
    }
}

impl DmaBuffer for ClientMemory {
    fn len(&self) -> u64 {
        self.len
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.backing.memory.lock().unwrap()[r]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
        let r = self.range(offset, data.len())?;
        self.backing.memory.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn load_u32(&self, offset: u64) -> Result<u32, HostGpuError> {
        let mut b = [0u8; 4];
        self.read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn store_u32(&self, offset: u64, value: u32) -> Result<(), HostGpuError> {
        self.write(offset, &value.to_le_bytes())
    }
    fn dma_addr(&self, page: u64) -> Result<u64, HostGpuError> {
        Ok(self.backing.base + self.offset + page * crate::host_gpu::dma::DMA_PAGE)
    }
}

/// A guest given the whole GPU boots its GSP the way a driver does, with its queue block
/// and arguments in guest memory that has no fd (reached only with DMA_READ/DMA_WRITE):
/// the GSP reads its arguments and initialises its message queue over the socket, from its
/// own thread, while the connection thread keeps serving the guest.
#[test]
fn a_whole_gpu_guest_boots_the_gsp_in_socket_only_memory() {
    use crate::gsp::libos::{LibosArgs, LIBOS_BUFFER_SIZE};
    use crate::gsp::shmem::{GspMem, MSGQ_OFFSET, SHARED_SIZE};
    use crate::host_driver::regs::{GspCpuCtl, GspMailbox0, GspMailbox1, Register32};

    let host = Arc::new(EmulatedHostGpu::by_name("gh100-80g").unwrap());
    let device = Arc::new(GpuDevice::new(
        PresentedFunction::new(host.clone()).unwrap(),
    ));
    let (mut client, server) = connect(&device);
    const BASE: u64 = 0x8000_0000;
    let size = SHARED_SIZE + LIBOS_BUFFER_SIZE;
    let backing = DmaBacking {
        base: BASE,
        memory: Arc::new(Mutex::new(vec![0u8; size as usize])),
    };
    client.set_dma_backing(backing.clone(), DmaMessageLayout::Spec);
    client.dma_map(3, 0, BASE, size, None).unwrap();
    let shared = Arc::new(ClientMemory {
        backing: backing.clone(),
        offset: 0,
        len: SHARED_SIZE,
    });
    let mem = GspMem::new(shared).unwrap();
    let libos = LibosArgs::new(
        Arc::new(ClientMemory {
            backing: backing.clone(),
            offset: SHARED_SIZE,
            len: LIBOS_BUFFER_SIZE,
        }),
        mem.init_args().unwrap(),
    )
    .unwrap();
    let array = libos.array_addr().unwrap();
    let write = |client: &mut TestClient, offset: u64, value: u32| {
        client
            .region_write(0, offset, &value.to_le_bytes(), false)
            .unwrap();
    };
    write(&mut client, GspMailbox0::OFFSET, array as u32);
    write(&mut client, GspMailbox1::OFFSET, (array >> 32) as u32);
    write(&mut client, GspCpuCtl::OFFSET, 0x2);
    // Keep the client busy (it answers DMA requests while it waits for replies) until the
    // GSP has initialised its message queue header in guest memory: msgCount = 63.
    let msg_count = |b: &DmaBacking| {
        let m = b.memory.lock().unwrap();
        let at = (MSGQ_OFFSET + 0x0C) as usize;
        u32::from_le_bytes(m[at..at + 4].try_into().unwrap())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mailbox0 = || {
        host.bar0_read(GspMailbox0::OFFSET, AccessWidth::Dword)
            .unwrap()
    };
    // The GSP thread keeps polling its queue over the socket, so a register read reply may
    // queue behind a DMA request: MAILBOX0 (cleared once the GSP started) is looked at
    // behind the boundary instead.
    while msg_count(&backing) != 63 || mailbox0() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "GSP never set up its queue: {:?}",
            host.emulated().gsp().stats()
        );
        // Any request keeps the client reading; its receive loop answers DMA requests.
        client.device_info().unwrap();
    }
    assert!(host.emulated().gsp().is_running());
    assert!(
        client.dma_requests_served() >= 3,
        "arguments and queue read over the socket: {}",
        client.dma_requests_served()
    );
    drop(client);
    server.join().unwrap().unwrap();
}
