//! A minimal vfio-user client for tests and benchmarks (not a VMM client): typed helpers for
//! each command, raw sends for malformed input, and answers to the server's `DMA_READ`/
//! `DMA_WRITE` requests from a byte vector standing in for guest memory.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::device::Errno;
use super::protocol::{
    flags, Command, DeviceInfoMsg, DmaAccessMsg, DmaMapMsg, DmaMessageLayout, DmaUnmapMsg, Header,
    IrqInfoMsg, IrqSetMsg, PeerCapabilities, QemuDmaAccessMsg, RegionAccessMsg, RegionInfoMsg,
    VersionMsg, WriteMultiEntry, WriteMultiMsg, HEADER_SIZE,
};
use super::socket::{send_all, MessageReader, SocketError};

/// QEMU's VERSION capabilities (hw/vfio-user/proxy.c `caps_json`), for realistic tests.
pub const QEMU_CAPS_JSON: &str = r#"{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#;

/// Errors of the test client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket failure.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The server answered with an error reply.
    #[error("server replied with error {0}")]
    Errno(Errno),
    /// The server's reply did not make sense.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// A message received by the client.
#[derive(Debug)]
pub struct Message {
    /// Header.
    pub header: Header,
    /// Payload.
    pub payload: Vec<u8>,
    /// Fds that came with it.
    pub fds: Vec<OwnedFd>,
}

/// Client memory the server reaches with `DMA_READ`/`DMA_WRITE`: `memory[0]` is at `base`.
#[derive(Debug, Clone)]
pub struct DmaBacking {
    /// DMA address of the first byte.
    pub base: u64,
    /// The bytes.
    pub memory: Arc<Mutex<Vec<u8>>>,
}

/// The test client.
pub struct TestClient {
    stream: UnixStream,
    reader: MessageReader,
    next_id: u16,
    dma: Option<DmaBacking>,
    layout: DmaMessageLayout,
    dma_requests: u64,
}

fn decode<T>(value: Option<T>) -> Result<T, ClientError> {
    value.ok_or(ClientError::Protocol("short reply"))
}

impl TestClient {
    /// A client on a connected stream; replies must arrive within 10 s.
    ///
    /// It waits for a reply blocked in `recvmsg()` with the socket's receive timeout
    /// (`SO_RCVTIMEO`) as the reply timeout, like a plain socket client: two syscalls per
    /// request, so benchmarks measure the server rather than this client.
    pub fn new(stream: UnixStream) -> TestClient {
        let timeout = Duration::from_secs(10);
        let mut reader = MessageReader::new((1 << 20) + 4096, 16, timeout);
        // Without a blocking socket and its receive timeout, fall back to poll() waits.
        let blocking =
            stream.set_nonblocking(false).is_ok() && stream.set_read_timeout(Some(timeout)).is_ok();
        reader.set_idle_timeout(Some(timeout));
        reader.set_block_when_idle(blocking);
        TestClient {
            stream,
            reader,
            next_id: 1,
            dma: None,
            layout: DmaMessageLayout::Spec,
            dma_requests: 0,
        }
    }

    /// Connect to a server socket.
    pub fn connect(path: impl AsRef<Path>) -> std::io::Result<TestClient> {
        Ok(TestClient::new(UnixStream::connect(path)?))
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// How long to wait for a reply.
    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.reader.set_idle_timeout(Some(timeout));
        let blocking = self
            .stream
            .set_read_timeout(Some(timeout.max(Duration::from_micros(1))))
            .is_ok();
        self.reader.set_block_when_idle(blocking);
    }

    /// Answer server DMA requests from `backing`, using `layout`.
    pub fn set_dma_backing(&mut self, backing: DmaBacking, layout: DmaMessageLayout) {
        self.dma = Some(backing);
        self.layout = layout;
    }

    /// Server DMA requests answered so far.
    pub fn dma_requests_served(&self) -> u64 {
        self.dma_requests
    }

    /// Send a raw, possibly malformed, byte string.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        Ok(send_all(self.stream.as_fd(), &[bytes], fds)?)
    }

    /// Send a command made of `parts`; returns its id.
    pub fn send(
        &mut self,
        command: u16,
        msg_flags: u32,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<u16, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let size = HEADER_SIZE + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut header = [0u8; HEADER_SIZE];
        let _ = Header {
            id,
            command,
            size: size as u32,
            flags: msg_flags,
            error: 0,
        }
        .encode(&mut header);
        // A small message without fds: copied into one buffer for a plain send().
        let mut small = [0u8; 256];
        if fds.is_empty() && size <= small.len() {
            let mut at = HEADER_SIZE;
            small[..at].copy_from_slice(&header);
            for part in parts {
                small[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            send_all(self.stream.as_fd(), &[&small[..size]], &[])?;
            return Ok(id);
        }
        // Header plus up to 7 parts in one sendmsg, without allocating.
        let mut all: [&[u8]; 8] = [&[]; 8];
        if parts.len() >= all.len() {
            return Err(ClientError::Protocol("too many message parts"));
        }
        all[0] = &header;
        all[1..=parts.len()].copy_from_slice(parts);
        send_all(self.stream.as_fd(), &all[..=parts.len()], fds)?;
        Ok(id)
    }

    /// Receive the next message that is not a server DMA request (those are answered).
    pub fn recv(&mut self) -> Result<Message, ClientError> {
        loop {
            let mut msg = self.reader.next(self.stream.as_fd(), None)?;
            let header = msg.header;
            if header.msg_type() == flags::TYPE_COMMAND
                && (header.command == Command::DmaRead as u16
                    || header.command == Command::DmaWrite as u16)
            {
                serve_dma(
                    &self.stream,
                    self.dma.as_ref(),
                    self.layout,
                    &header,
                    msg.payload,
                )?;
                self.dma_requests += 1;
                continue;
            }
            return Ok(Message {
                header,
                payload: msg.payload.to_vec(),
                fds: std::mem::take(&mut msg.fds.fds),
            });
        }
    }

    /// Receive the reply to message `id` (error replies become [`ClientError::Errno`]).
    pub fn reply_to(&mut self, id: u16) -> Result<Message, ClientError> {
        let msg = self.recv()?;
        if msg.header.id != id || msg.header.msg_type() != flags::TYPE_REPLY {
            return Err(ClientError::Protocol("reply id or type mismatch"));
        }
        if msg.header.flags & flags::ERROR != 0 {
            if msg.header.size as usize != HEADER_SIZE {
                return Err(ClientError::Protocol("error reply with payload"));
            }
            return Err(ClientError::Errno(Errno(msg.header.error as i32)));
        }
        Ok(msg)
    }

    /// Send a command and wait for its reply.
    pub fn request(
        &mut self,
        command: Command,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Message, ClientError> {
        let id = self.send(command as u16, 0, parts, fds)?;
        self.reply_to(id)
    }

    /// `VFIO_USER_VERSION` with optional JSON (NUL-terminated on the wire).
    pub fn version_with(
        &mut self,
        major: u16,
        minor: u16,
        json: Option<&str>,
    ) -> Result<(VersionMsg, PeerCapabilities), ClientError> {
        let mut fixed = [0u8; VersionMsg::SIZE];
        let _ = VersionMsg { major, minor }.encode(&mut fixed);
        let mut data = json.map(|j| j.as_bytes().to_vec()).unwrap_or_default();
        if json.is_some() {
            data.push(0);
        }
        let reply = self.request(Command::Version, &[&fixed, &data], &[])?;
        let v = decode(VersionMsg::decode(&reply.payload))?;
        let caps = PeerCapabilities::parse(&reply.payload[VersionMsg::SIZE..])
            .map_err(|_| ClientError::Protocol("bad caps"))?;
        if reply.payload.last() != Some(&0) {
            return Err(ClientError::Protocol("caps not NUL-terminated"));
        }
        Ok((v, caps))
    }

    /// VERSION 0.0 with QEMU's capabilities.
    pub fn version(&mut self) -> Result<(VersionMsg, PeerCapabilities), ClientError> {
        self.version_with(0, 0, Some(QEMU_CAPS_JSON))
    }

    /// `VFIO_USER_DEVICE_GET_INFO`.
    pub fn device_info(&mut self) -> Result<DeviceInfoMsg, ClientError> {
        let mut req = [0u8; DeviceInfoMsg::SIZE];
        let _ = DeviceInfoMsg {
            argsz: DeviceInfoMsg::SIZE as u32,
            ..Default::default()
        }
        .encode(&mut req);
        let reply = self.request(Command::DeviceGetInfo, &[&req], &[])?;
        decode(DeviceInfoMsg::decode(&reply.payload))
    }

    /// `VFIO_USER_DEVICE_GET_REGION_INFO` with `argsz`; returns the info, the whole reply
    /// payload (for capabilities) and the fd, if one came.
    pub fn region_info(
        &mut self,
        index: u32,
        argsz: u32,
    ) -> Result<(RegionInfoMsg, Vec<u8>, Option<OwnedFd>), ClientError> {
        let mut req = [0u8; RegionInfoMsg::SIZE];
        let _ = RegionInfoMsg {
            argsz,
            index,
            ..Default::default()
        }
        .encode(&mut req);
        let mut reply = self.request(Command::DeviceGetRegionInfo, &[&req], &[])?;
        let info = decode(RegionInfoMsg::decode(&reply.payload))?;
        Ok((info, reply.payload, reply.fds.pop()))
    }

    /// `VFIO_USER_DEVICE_GET_IRQ_INFO`.
    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfoMsg, ClientError> {
        let mut req = [0u8; IrqInfoMsg::SIZE];
        let _ = IrqInfoMsg {
            argsz: IrqInfoMsg::SIZE as u32,
            index,
            ..Default::default()
        }
        .encode(&mut req);
        let reply = self.request(Command::DeviceGetIrqInfo, &[&req], &[])?;
        decode(IrqInfoMsg::decode(&reply.payload))
    }

    /// `VFIO_USER_DEVICE_SET_IRQS`.
    pub fn set_irqs(
        &mut self,
        index: u32,
        irq_flags: u32,
        start: u32,
        count: u32,
        data: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let mut req = [0u8; IrqSetMsg::SIZE];
        let _ = IrqSetMsg {
            argsz: (IrqSetMsg::SIZE + data.len()) as u32,
            flags: irq_flags,
            index,
            start,
            count,
        }
        .encode(&mut req);
        self.request(Command::DeviceSetIrqs, &[&req, data], fds)?;
        Ok(())
    }

    /// `VFIO_USER_DMA_MAP`.
    pub fn dma_map(
        &mut self,
        map_flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ClientError> {
        let mut req = [0u8; DmaMapMsg::SIZE];
        let _ = DmaMapMsg {
            argsz: DmaMapMsg::SIZE as u32,
            flags: map_flags,
            offset,
            address,
            size,
        }
        .encode(&mut req);
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.request(Command::DmaMap, &[&req], &fds)?;
        Ok(())
    }

    /// `VFIO_USER_DMA_UNMAP`; returns the echoed entry.
    pub fn dma_unmap(
        &mut self,
        unmap_flags: u32,
        address: u64,
        size: u64,
    ) -> Result<DmaUnmapMsg, ClientError> {
        let mut req = [0u8; DmaUnmapMsg::SIZE];
        let _ = DmaUnmapMsg {
            argsz: DmaUnmapMsg::SIZE as u32,
            flags: unmap_flags,
            address,
            size,
        }
        .encode(&mut req);
        let reply = self.request(Command::DmaUnmap, &[&req], &[])?;
        decode(DmaUnmapMsg::decode(&reply.payload))
    }

    /// `VFIO_USER_REGION_READ`; returns the data served.
    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        count: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let id = self.send_region_read(region, offset, count)?;
        let mut buf = vec![0u8; count as usize];
        let n = self.recv_region_read(id, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Send a `REGION_READ` without waiting (no allocation).
    pub fn send_region_read(
        &mut self,
        region: u32,
        offset: u64,
        count: u32,
    ) -> Result<u16, ClientError> {
        let mut req = [0u8; RegionAccessMsg::SIZE];
        let _ = RegionAccessMsg {
            offset,
            region,
            count,
        }
        .encode(&mut req);
        self.send(Command::RegionRead as u16, 0, &[&req], &[])
    }

    /// Receive the reply to `REGION_READ` `id` into `buf`; returns the count (no allocation).
    pub fn recv_region_read(&mut self, id: u16, buf: &mut [u8]) -> Result<usize, ClientError> {
        let msg = self.reader.next(self.stream.as_fd(), None)?;
        let header = msg.header;
        if header.id != id || header.msg_type() != flags::TYPE_REPLY {
            return Err(ClientError::Protocol("reply id or type mismatch"));
        }
        if header.flags & flags::ERROR != 0 {
            return Err(ClientError::Errno(Errno(header.error as i32)));
        }
        let access = decode(RegionAccessMsg::decode(msg.payload))?;
        let n = access.count as usize;
        let data = msg
            .payload
            .get(RegionAccessMsg::SIZE..RegionAccessMsg::SIZE + n)
            .ok_or(ClientError::Protocol("short read reply"))?;
        let dst = buf
            .get_mut(..n)
            .ok_or(ClientError::Protocol("read reply too long"))?;
        dst.copy_from_slice(data);
        Ok(n)
    }

    /// `VFIO_USER_REGION_WRITE`; `posted` sets `NO_REPLY` (nothing to wait for).
    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
        posted: bool,
    ) -> Result<Option<RegionAccessMsg>, ClientError> {
        let mut req = [0u8; RegionAccessMsg::SIZE];
        let _ = RegionAccessMsg {
            offset,
            region,
            count: data.len() as u32,
        }
        .encode(&mut req);
        if posted {
            self.send(
                Command::RegionWrite as u16,
                flags::NO_REPLY,
                &[&req, data],
                &[],
            )?;
            return Ok(None);
        }
        let reply = self.request(Command::RegionWrite, &[&req, data], &[])?;
        Ok(Some(decode(RegionAccessMsg::decode(&reply.payload))?))
    }

    /// `VFIO_USER_REGION_WRITE_MULTI` of `(region, offset, data)` writes of up to 8 bytes.
    pub fn region_write_multi(
        &mut self,
        writes: &[(u32, u64, &[u8])],
        posted: bool,
    ) -> Result<Option<u64>, ClientError> {
        let mut payload = vec![0u8; WriteMultiMsg::SIZE + writes.len() * WriteMultiEntry::SIZE];
        let _ = WriteMultiMsg {
            wr_cnt: writes.len() as u64,
        }
        .encode(&mut payload);
        for (i, (region, offset, data)) in writes.iter().enumerate() {
            let mut bytes = [0u8; 8];
            let n = data.len().min(8);
            bytes[..n].copy_from_slice(&data[..n]);
            let _ = WriteMultiEntry {
                offset: *offset,
                region: *region,
                count: data.len() as u32,
                data: bytes,
            }
            .encode(&mut payload[WriteMultiMsg::SIZE + i * WriteMultiEntry::SIZE..]);
        }
        if posted {
            self.send(
                Command::RegionWriteMulti as u16,
                flags::NO_REPLY,
                &[&payload],
                &[],
            )?;
            return Ok(None);
        }
        let reply = self.request(Command::RegionWriteMulti, &[&payload], &[])?;
        Ok(Some(decode(WriteMultiMsg::decode(&reply.payload))?.wr_cnt))
    }

    /// `VFIO_USER_DEVICE_RESET`.
    pub fn reset(&mut self) -> Result<(), ClientError> {
        self.request(Command::DeviceReset, &[], &[])?;
        Ok(())
    }
}

/// Answer one server `DMA_READ`/`DMA_WRITE` from `backing` (error reply if out of range).
fn serve_dma(
    stream: &UnixStream,
    backing: Option<&DmaBacking>,
    layout: DmaMessageLayout,
    header: &Header,
    payload: &[u8],
) -> Result<(), ClientError> {
    let (address, count) = match layout {
        DmaMessageLayout::LegacyQemu => {
            QemuDmaAccessMsg::decode(payload).map(|m| (m.address, m.count as u64))
        }
        DmaMessageLayout::Spec => DmaAccessMsg::decode(payload).map(|m| (m.address, m.count)),
    }
    .ok_or(ClientError::Protocol("short DMA request"))?;
    let range = backing.and_then(|b| {
        let start = usize::try_from(address.checked_sub(b.base)?).ok()?;
        let end = start.checked_add(usize::try_from(count).ok()?)?;
        Some((b, start..end))
    });
    let error = |errno: i32| -> Result<(), ClientError> {
        let mut buf = [0u8; HEADER_SIZE];
        let _ = Header::error_reply_to(header, errno as u32).encode(&mut buf);
        Ok(send_all(stream.as_fd(), &[&buf], &[])?)
    };
    let Some((backing, range)) = range else {
        return error(libc::EFAULT);
    };
    let mut memory = backing
        .memory
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if range.end > memory.len() {
        return error(libc::EFAULT);
    }
    let data_at = layout.data_offset();
    if header.command == Command::DmaRead as u16 {
        let size = layout.message_size(range.len());
        let mut reply = vec![0u8; size];
        let _ = Header::reply_to(header, size as u32).encode(&mut reply);
        let _ = match layout {
            DmaMessageLayout::LegacyQemu => QemuDmaAccessMsg {
                address,
                count: count as u32,
            }
            .encode(&mut reply[HEADER_SIZE..]),
            DmaMessageLayout::Spec => {
                DmaAccessMsg { address, count }.encode(&mut reply[HEADER_SIZE..])
            }
        };
        let len = range.len();
        reply[HEADER_SIZE + data_at..HEADER_SIZE + data_at + len].copy_from_slice(&memory[range]);
        send_all(stream.as_fd(), &[&reply], &[])?;
    } else {
        let data = payload
            .get(data_at..data_at + range.len())
            .ok_or(ClientError::Protocol("short DMA_WRITE"))?;
        memory[range].copy_from_slice(data);
        let mut reply = [0u8; HEADER_SIZE + QemuDmaAccessMsg::SIZE];
        let _ = Header::reply_to(header, reply.len() as u32).encode(&mut reply);
        let _ = QemuDmaAccessMsg {
            address,
            count: count as u32,
        }
        .encode(&mut reply[HEADER_SIZE..]);
        send_all(stream.as_fd(), &[&reply], &[])?;
    }
    Ok(())
}
