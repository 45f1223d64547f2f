//! [`ClientHandle`]: what a device keeps of a connected client, usable from any thread:
//! raise interrupts, and DMA to/from client memory (through mmapped maps, or with
//! server-to-client `DMA_READ`/`DMA_WRITE` messages for maps that came without an fd, with
//! one that could shrink, or to a device that does not map DMA).
//!
//! Server-to-client requests are written on the shared socket; the connection thread, which
//! reads everything, hands their replies back through [`Requests`].

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use super::device::Errno;
use super::dma::{DmaError, DmaSpace, MapEntry, MapGate, Segment};
use super::irq::{IrqError, IrqTable};
use super::protocol::{
    flags, Command, DmaAccessMsg, DmaMessageLayout, Header, QemuDmaAccessMsg, HEADER_SIZE,
};
use super::socket::{SocketError, SocketWriter};

/// Most server-to-client requests waiting for a reply at once.
const MAX_PENDING: usize = 64;

/// Largest piece of one server-to-client DMA request. QEMU 11.1.3 sends a DMA_READ reply with
/// one non-blocking write and drops whatever did not fit in the socket buffer (about 200 KiB by
/// default), which breaks the stream: measured, 256 KiB replies sometimes and 512 KiB replies
/// always were cut short. 64 KiB pieces stay well clear of that.
pub const MAX_SOCKET_DMA_CHUNK: usize = 64 << 10;

#[derive(Debug, Default)]
struct Waiter {
    result: Mutex<Option<Result<Vec<u8>, Errno>>>,
    ready: Condvar,
}

#[derive(Debug)]
struct Pending {
    id: u16,
    command: u16,
    /// Data bytes expected in a DMA_READ reply.
    expect: usize,
    /// The client memory `[start, end)` the request touches.
    range: (u64, u64),
    waiter: Arc<Waiter>,
}

#[derive(Debug)]
struct Table {
    open: bool,
    next_id: u16,
    pending: Vec<Pending>,
}

/// Server-to-client requests waiting for their reply.
#[derive(Debug)]
pub struct Requests {
    table: Mutex<Table>,
}

impl Requests {
    fn new() -> Requests {
        Requests {
            table: Mutex::new(Table {
                open: true,
                next_id: 0,
                pending: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(
        &self,
        command: Command,
        iova: u64,
        len: usize,
        expect: usize,
    ) -> Result<(u16, Arc<Waiter>), DmaError> {
        let mut table = self.lock();
        if !table.open {
            return Err(DmaError::NotConnected);
        }
        if table.pending.len() >= MAX_PENDING {
            return Err(DmaError::Io(Errno::EAGAIN));
        }
        let mut id = table.next_id;
        while table.pending.iter().any(|p| p.id == id) {
            id = id.wrapping_add(1);
        }
        table.next_id = id.wrapping_add(1);
        let waiter = Arc::new(Waiter::default());
        table.pending.push(Pending {
            id,
            command: command as u16,
            expect,
            range: (iova, iova.saturating_add(len as u64)),
            waiter: Arc::clone(&waiter),
        });
        Ok((id, waiter))
    }

    fn cancel(&self, id: u16) {
        self.lock().pending.retain(|p| p.id != id);
    }

    /// Deliver a reply read by the connection thread. Replies nobody waits for are dropped.
    pub fn complete(&self, header: &Header, payload: &[u8], layout: DmaMessageLayout) {
        let pending = {
            let mut table = self.lock();
            let Some(pos) = table.pending.iter().position(|p| p.id == header.id) else {
                log::debug!(
                    "vfio-user: dropping unexpected reply id {} (command {})",
                    header.id,
                    header.command
                );
                return;
            };
            table.pending.swap_remove(pos)
        };
        let result = if header.flags & flags::ERROR != 0 {
            Err(Errno(if header.error == 0 {
                libc::EIO
            } else {
                header.error as i32
            }))
        } else if header.command != pending.command {
            Err(Errno::EPROTO)
        } else if pending.command == Command::DmaRead as u16 {
            parse_dma_read_reply(payload, pending.expect, layout)
        } else {
            Ok(Vec::new())
        };
        let mut slot = pending
            .waiter
            .result
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *slot = Some(result);
        pending.waiter.ready.notify_all();
    }

    /// Fail every waiter (the connection ended) and refuse new requests.
    pub fn close(&self) {
        let pending = {
            let mut table = self.lock();
            table.open = false;
            std::mem::take(&mut table.pending)
        };
        Self::fail(pending, Errno::ENOTCONN);
    }

    /// Fail the requests touching client memory `[start, end)` with `EFAULT` (the range is
    /// being unmapped); their replies, if they still come, are dropped.
    pub fn fail_overlapping(&self, start: u64, end: u64) {
        let failed = {
            let mut table = self.lock();
            let (failed, kept) = std::mem::take(&mut table.pending)
                .into_iter()
                .partition(|p| p.range.0 < end && start < p.range.1);
            table.pending = kept;
            failed
        };
        Self::fail(failed, Errno::EFAULT);
    }

    fn fail(pending: Vec<Pending>, errno: Errno) {
        for p in pending {
            let mut slot = p
                .waiter
                .result
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *slot = Some(Err(errno));
            p.waiter.ready.notify_all();
        }
    }

    fn wait(&self, id: u16, waiter: &Waiter, timeout: Duration) -> Result<Vec<u8>, DmaError> {
        let deadline = Instant::now() + timeout;
        let mut slot = waiter.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(result) = slot.take() {
                return result.map_err(|e| {
                    if e == Errno::ENOTCONN {
                        DmaError::NotConnected
                    } else {
                        DmaError::Remote(e)
                    }
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(slot);
                self.cancel(id);
                // A reply may have landed between the timeout and the cancel.
                let late = waiter
                    .result
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                return match late {
                    Some(Ok(data)) => Ok(data),
                    _ => Err(DmaError::Timeout),
                };
            }
            slot = waiter
                .ready
                .wait_timeout(slot, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

fn parse_dma_read_reply(
    payload: &[u8],
    expect: usize,
    layout: DmaMessageLayout,
) -> Result<Vec<u8>, Errno> {
    let count = match layout {
        DmaMessageLayout::LegacyQemu => QemuDmaAccessMsg::decode(payload).map(|m| m.count as usize),
        DmaMessageLayout::Spec => {
            DmaAccessMsg::decode(payload).and_then(|m| usize::try_from(m.count).ok())
        }
    };
    if count != Some(expect) {
        return Err(Errno::EPROTO);
    }
    let start = layout.data_offset();
    payload
        .get(start..start + expect)
        .map(<[u8]>::to_vec)
        .ok_or(Errno::EPROTO)
}

/// State shared between a connection and the handles its device holds.
pub struct ClientShared {
    connected: AtomicBool,
    pub(crate) irqs: IrqTable,
    pub(crate) dma: DmaSpace,
    pub(crate) requests: Requests,
    pub(crate) writer: SocketWriter,
    conn_thread: OnceLock<ThreadId>,
    layout: DmaMessageLayout,
    timeout: Duration,
    max_xfer: AtomicU32,
}

impl ClientShared {
    pub(crate) fn new(
        writer: SocketWriter,
        irqs: IrqTable,
        dma: DmaSpace,
        layout: DmaMessageLayout,
        timeout: Duration,
        max_xfer: u32,
    ) -> ClientShared {
        ClientShared {
            connected: AtomicBool::new(true),
            irqs,
            dma,
            requests: Requests::new(),
            writer,
            conn_thread: OnceLock::new(),
            layout,
            timeout,
            max_xfer: AtomicU32::new(max_xfer.max(1)),
        }
    }

    /// Record the thread that reads the socket (socket DMA from it would deadlock).
    pub(crate) fn set_connection_thread(&self) {
        let _ = self.conn_thread.set(std::thread::current().id());
    }

    /// The negotiated transfer limit for server-to-client requests.
    pub(crate) fn set_max_xfer(&self, max: u32) {
        self.max_xfer.store(max.max(1), Ordering::Relaxed);
    }

    /// The DMA message layout in use.
    pub(crate) fn layout(&self) -> DmaMessageLayout {
        self.layout
    }

    /// Disconnect: fail new and pending requests, drop irq fds, revoke every DMA map's
    /// gate. The maps stay in the table until [`DmaSpace::unmap_all`], so the device can be
    /// told about each before its memory goes away.
    pub(crate) fn disconnect(&self) {
        self.connected.store(false, Ordering::SeqCst);
        self.writer.close();
        self.requests.close();
        self.irqs.clear();
        self.dma.revoke_all();
    }

    /// Stop device access to the map `entry` before it is removed: revoke its gate (waiting
    /// for copies in flight through it) and fail socket DMA in flight to its range, so no
    /// thread still waits on a reply that only the connection thread could read.
    pub(crate) fn revoke_map(&self, entry: &MapEntry) {
        entry.gate.revoke();
        self.requests
            .fail_overlapping(entry.iova, entry.iova.saturating_add(entry.size));
    }

    /// Bytes per server-to-client request: the negotiated transfer size, capped at
    /// [`MAX_SOCKET_DMA_CHUNK`].
    fn chunk_size(&self) -> usize {
        (self.max_xfer.load(Ordering::Relaxed) as usize).clamp(1, MAX_SOCKET_DMA_CHUNK)
    }

    fn check_socket_dma(&self) -> Result<(), DmaError> {
        if !self.connected.load(Ordering::SeqCst) {
            return Err(DmaError::NotConnected);
        }
        if self.conn_thread.get() == Some(&std::thread::current().id()) {
            return Err(DmaError::WouldDeadlock);
        }
        Ok(())
    }

    fn send_error(e: SocketError) -> DmaError {
        match e {
            SocketError::Closed | SocketError::Eof => DmaError::NotConnected,
            SocketError::Timeout => DmaError::Timeout,
            SocketError::Io(e) => DmaError::Io(Errno::from_io(&e)),
            _ => DmaError::Io(Errno::EIO),
        }
    }

    /// Registers a request for `[iova, iova + len)`; with a `gate`, only while its map is
    /// live, and under the gate's lock, so a revocation that follows finds the request and
    /// fails it.
    fn register(
        &self,
        command: Command,
        iova: u64,
        len: usize,
        expect: usize,
        gate: Option<&MapGate>,
    ) -> Result<(u16, Arc<Waiter>), DmaError> {
        match gate {
            None => self.requests.register(command, iova, len, expect),
            Some(gate) => gate
                .with_live(|_| self.requests.register(command, iova, len, expect))
                .unwrap_or(Err(DmaError::Unmapped { iova })),
        }
    }

    /// Reads client memory with `DMA_READ` messages (`gate`: the one map it lies in, if the
    /// caller holds one).
    pub(crate) fn socket_read(
        &self,
        iova: u64,
        buf: &mut [u8],
        gate: Option<&MapGate>,
    ) -> Result<(), DmaError> {
        self.check_socket_dma()?;
        let max = self.chunk_size();
        let mut addr = iova;
        for chunk in buf.chunks_mut(max) {
            let (id, waiter) =
                self.register(Command::DmaRead, addr, chunk.len(), chunk.len(), gate)?;
            let mut msg = [0u8; HEADER_SIZE + DmaAccessMsg::SIZE];
            let header = Header {
                id,
                command: Command::DmaRead as u16,
                size: msg.len() as u32,
                flags: flags::TYPE_COMMAND,
                error: 0,
            };
            let fixed = DmaAccessMsg {
                address: addr,
                count: chunk.len() as u64,
            };
            let _ = header.encode(&mut msg);
            let _ = fixed.encode(&mut msg[HEADER_SIZE..]);
            if let Err(e) = self.writer.send(&[&msg], &[]) {
                self.requests.cancel(id);
                return Err(Self::send_error(e));
            }
            let data = self.requests.wait(id, &waiter, self.timeout)?;
            chunk.copy_from_slice(&data);
            addr += chunk.len() as u64;
        }
        Ok(())
    }

    /// Writes client memory with `DMA_WRITE` messages (see [`ClientShared::socket_read`]).
    pub(crate) fn socket_write(
        &self,
        iova: u64,
        data: &[u8],
        gate: Option<&MapGate>,
    ) -> Result<(), DmaError> {
        self.check_socket_dma()?;
        let max = self.chunk_size();
        let mut addr = iova;
        for chunk in data.chunks(max) {
            let (id, waiter) = self.register(Command::DmaWrite, addr, chunk.len(), 0, gate)?;
            let size = self.layout.message_size(chunk.len());
            let mut fixed = [0u8; HEADER_SIZE + DmaAccessMsg::SIZE];
            let header = Header {
                id,
                command: Command::DmaWrite as u16,
                size: size as u32,
                flags: flags::TYPE_COMMAND,
                error: 0,
            };
            let _ = header.encode(&mut fixed);
            let fixed_len = HEADER_SIZE + self.layout.data_offset();
            match self.layout {
                DmaMessageLayout::LegacyQemu => QemuDmaAccessMsg {
                    address: addr,
                    count: chunk.len() as u32,
                }
                .encode(&mut fixed[HEADER_SIZE..]),
                DmaMessageLayout::Spec => DmaAccessMsg {
                    address: addr,
                    count: chunk.len() as u64,
                }
                .encode(&mut fixed[HEADER_SIZE..]),
            };
            // The legacy layout ends with 4 bytes of struct padding after the data.
            let pad = [0u8; 4];
            let pad_len = size - fixed_len - chunk.len();
            if let Err(e) = self
                .writer
                .send(&[&fixed[..fixed_len], chunk, &pad[..pad_len]], &[])
            {
                self.requests.cancel(id);
                return Err(Self::send_error(e));
            }
            self.requests.wait(id, &waiter, self.timeout)?;
            addr += chunk.len() as u64;
        }
        Ok(())
    }
}

/// A device's handle on a connected client. Cheap to clone; usable from any thread. Once the
/// client is gone every operation fails with a "not connected" error (`ENOTCONN`).
#[derive(Clone)]
pub struct ClientHandle {
    shared: Arc<ClientShared>,
}

impl fmt::Debug for ClientHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientHandle")
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl ClientHandle {
    pub(crate) fn new(shared: Arc<ClientShared>) -> ClientHandle {
        ClientHandle { shared }
    }

    /// Whether the client is still connected.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Raise vector `vector` of interrupt type `index` by writing 1 to the client's eventfd.
    /// A masked vector is recorded as pending and fires when unmasked.
    pub fn trigger_irq(&self, index: u32, vector: u32) -> Result<(), IrqError> {
        if !self.is_connected() {
            return Err(IrqError::NotConnected);
        }
        self.shared.irqs.trigger(index, vector)
    }

    /// Whether the client gave an eventfd for this vector.
    pub fn irq_configured(&self, index: u32, vector: u32) -> bool {
        self.is_connected() && self.shared.irqs.is_configured(index, vector)
    }

    /// Whether this vector is masked.
    pub fn irq_masked(&self, index: u32, vector: u32) -> bool {
        self.shared.irqs.is_masked(index, vector)
    }

    /// Read client memory at `iova` into `buf`. Fd-less maps are read with `DMA_READ` messages
    /// (in pieces of at most the negotiated transfer size, each waiting up to the message
    /// timeout), which must not be done from the connection thread (region callbacks).
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.dma_read_inner(iova, buf)
            .map_err(|e| self.after_disconnect(e))
    }

    /// Errors caused by a disconnect racing with the access read as "not connected".
    fn after_disconnect(&self, err: DmaError) -> DmaError {
        if self.is_connected() {
            err
        } else {
            DmaError::NotConnected
        }
    }

    fn dma_read_inner(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        if !self.is_connected() {
            return Err(DmaError::NotConnected);
        }
        iova.checked_add(buf.len() as u64)
            .ok_or(DmaError::Overflow {
                iova,
                len: buf.len(),
            })?;
        let mut pos = 0;
        while pos < buf.len() {
            let addr = iova + pos as u64;
            match self.shared.dma.read_step(addr, &mut buf[pos..])? {
                Segment::Done(n) => pos += n,
                Segment::Socket(n) => {
                    self.shared
                        .socket_read(addr, &mut buf[pos..pos + n], None)?;
                    pos += n;
                }
            }
        }
        Ok(())
    }

    /// Write `data` to client memory at `iova` (see [`ClientHandle::dma_read`]).
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.dma_write_inner(iova, data)
            .map_err(|e| self.after_disconnect(e))
    }

    fn dma_write_inner(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        if !self.is_connected() {
            return Err(DmaError::NotConnected);
        }
        iova.checked_add(data.len() as u64)
            .ok_or(DmaError::Overflow {
                iova,
                len: data.len(),
            })?;
        let mut pos = 0;
        while pos < data.len() {
            let addr = iova + pos as u64;
            match self.shared.dma.write_step(addr, &data[pos..])? {
                Segment::Done(n) => pos += n,
                Segment::Socket(n) => {
                    self.shared.socket_write(addr, &data[pos..pos + n], None)?;
                    pos += n;
                }
            }
        }
        Ok(())
    }
}
