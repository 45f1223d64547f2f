//! The emulated GPU served over vfio-user, driven by the project's protocol test client over
//! a socketpair: what QEMU would see, without QEMU.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gpu_backend::gpu_device::{irq_index, GpuDevice};
use gpu_backend::host_gpu::emulated::EmulatedHostGpu;
use gpu_backend::presentation::PresentedFunction;
use gpu_backend::vfio_user::protocol::irq_flags;
use gpu_backend::vfio_user::test_client::TestClient;
use gpu_backend::vfio_user::{serve_stream, ConnectionStats, ServerConfig, ServerError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[allow(dead_code)]
#[path = "support/mod.rs"]
mod support;
use support::mapping::Mapping;

const GIB: u64 = 1 << 30;

type ServerThread = JoinHandle<Result<ConnectionStats, ServerError>>;

fn connect(device: &Arc<GpuDevice>) -> (TestClient, ServerThread) {
    let (client_end, server_end) = UnixStream::pair().unwrap();
    let dev: Arc<GpuDevice> = Arc::clone(device);
    let server =
        std::thread::spawn(move || serve_stream(server_end, dev, ServerConfig::default(), None));
    let mut client = TestClient::new(client_end);
    client.version().unwrap();
    (client, server)
}

fn gpu(profile: &str) -> Arc<GpuDevice> {
    let host = Arc::new(EmulatedHostGpu::by_name(profile).unwrap());
    Arc::new(GpuDevice::new(PresentedFunction::new(host).unwrap()))
}

fn disconnect(client: TestClient, server: ServerThread) {
    drop(client);
    server.join().unwrap().unwrap();
}

#[test]
fn vram_written_through_the_mapping_reads_back_over_the_socket_and_padding_is_ff() {
    let device = gpu("gh200-96g");
    let (mut client, server) = connect(&device);
    // First ask with a too-small argsz (as QEMU does), then with the size the server wants.
    let (small, _, no_fd) = client.region_info(4, 32).unwrap();
    assert!(no_fd.is_none());
    assert!(small.argsz > 32);
    let (info, _, fd) = client.region_info(4, small.argsz).unwrap();
    assert_eq!(info.size, 128 * GIB);
    let fd = fd.expect("VRAM fd passed with the region info");
    // Write through the mapping at the very end of the real memory.
    let page = 4096u64;
    let at = 95 * GIB - page;
    let mapping = Mapping::new(&fd, info.offset + at, page).unwrap();
    mapping.write(page - 4, &0x1234_5678u32.to_le_bytes());
    let data = client.region_read(4, 95 * GIB - 4, 8).unwrap();
    assert_eq!(data, [0x78, 0x56, 0x34, 0x12, 0xFF, 0xFF, 0xFF, 0xFF]);
    // A padding write succeeds and is dropped.
    client.region_write(4, 100 * GIB, &[0; 4], false).unwrap();
    assert_eq!(client.region_read(4, 100 * GIB, 4).unwrap(), [0xFF; 4]);
    drop(mapping);
    disconnect(client, server);
}

#[test]
fn a_posted_window_write_is_ordered_before_the_next_read() {
    let device = gpu("tu102-24g");
    let (mut client, server) = connect(&device);
    for base in 0..200u32 {
        client
            .region_write(0, 0x1700, &base.to_le_bytes(), true)
            .unwrap();
    }
    assert_eq!(
        client.region_read(0, 0x1700, 4).unwrap(),
        199u32.to_le_bytes()
    );
    disconnect(client, server);
}

#[test]
fn the_device_raises_an_msix_vector_through_the_eventfd_the_client_gave() {
    let device = gpu("gb202-32g");
    let (mut client, server) = connect(&device);
    let info = client.irq_info(irq_index::MSIX).unwrap();
    assert_eq!(info.count, 16);
    let vectors: Vec<EventFd> = (0..4)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    // One message per vector, as QEMU sends them with max_msg_fds negotiated low.
    for (i, efd) in vectors.iter().enumerate() {
        client
            .set_irqs(
                irq_index::MSIX,
                irq_flags::DATA_EVENTFD | irq_flags::ACTION_TRIGGER,
                i as u32,
                1,
                &[],
                // SAFETY: the eventfd outlives this call.
                &[unsafe { BorrowedFd::borrow_raw(efd.as_raw_fd()) }],
            )
            .unwrap();
    }
    let handle = device.client().expect("client handle");
    handle.trigger_irq(irq_index::MSIX, 2).unwrap();
    assert_eq!(vectors[2].read().unwrap(), 1);
    assert!(vectors[1].read().is_err(), "only vector 2 fired");
    // A vector that does not exist is an error, not a panic.
    assert!(handle.trigger_irq(irq_index::MSIX, 16).is_err());
    disconnect(client, server);
    // After the client left, the handle reports it instead of writing a stale fd.
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.is_connected() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(handle.trigger_irq(irq_index::MSIX, 2).is_err());
    assert!(device.client().is_none());
}

#[test]
fn vram_survives_a_reconnect_and_reset_keeps_it() {
    let device = gpu("ga100-80g");
    let (mut client, server) = connect(&device);
    client.region_write(1, 0x1000, b"persist!", false).unwrap();
    disconnect(client, server);
    let (mut client, server) = connect(&device);
    assert_eq!(client.region_read(1, 0x1000, 8).unwrap(), b"persist!");
    client.reset().unwrap();
    assert_eq!(client.region_read(1, 0x1000, 8).unwrap(), b"persist!");
    disconnect(client, server);
}
