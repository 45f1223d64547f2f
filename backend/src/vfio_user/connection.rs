//! One client connection: reads messages in order, dispatches each command to its handler,
//! answers it (or not, for `NO_REPLY`), and on the way out drops the client's DMA maps and
//! interrupt fds while keeping the device.
//!
//! Every handler validates sizes, counts, indexes and ranges before touching the device and
//! answers bad input with an errno; only a stream that cannot be followed any more (a header
//! size below 16, fds without messages, a stalled message, a failed send) ends the connection.
//! The read path does not allocate: requests are parsed in place in the reader's buffer and
//! replies are built in one reused buffer.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use super::budget::Account;
use super::client::{ClientHandle, ClientShared};
use super::config::{ServerConfig, DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_MAX_DMA_MAPS};
use super::device::{DeviceInfo, Errno, IrqInfo, RegionInfo, SparseArea, VfioUserDevice};
use super::dma::{DmaMapRequest, DmaSpace, MapEntry, DMA_PAGE_SIZE};
use super::dma_map::ClientDmaMap;
use super::irq::{IrqTable, Selection};
use super::protocol::{
    device_flags, dma_flags, flags, irq_flags, region_flags, CapHeader, Command, DeviceInfoMsg,
    DmaMapMsg, DmaUnmapMsg, Header, IrqInfoMsg, IrqSetMsg, PeerCapabilities, RegionAccessMsg,
    RegionInfoMsg, RegionIoFdsMsg, ServerCapabilities, SparseAreaMsg, SparseMmapMsg, VersionMsg,
    WriteMultiEntry, WriteMultiMsg, HEADER_SIZE, VERSION_MAJOR, VERSION_MINOR,
    WRITE_MULTI_MAX_DATA,
};
use super::shutdown::{ShutdownSignal, ShutdownWaker};
use super::socket::{Incoming, MessageReader, SocketError, SocketWriter};

/// Most regions / interrupt types the server takes from a device.
const MAX_TABLE: u32 = 1024;

/// Counters of one connection, returned when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Messages received.
    pub messages: u64,
    /// Commands that failed (replied or logged).
    pub errors: u64,
    /// Size of the receive buffer (it never grows).
    pub buffer_capacity: usize,
    /// Why the connection ended.
    pub end: String,
}

/// Limits agreed in VERSION.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    max_xfer: u32,
    client_max_fds: u64,
    max_dma_maps: usize,
}

/// The bits of a region the access path needs.
#[derive(Debug, Clone, Copy, Default)]
struct RegionAccess {
    size: u64,
    readable: bool,
    writable: bool,
}

/// A successful reply: `len` payload bytes are in `reply[HEADER_SIZE..]`, plus an optional fd.
struct Reply {
    len: usize,
    fd: Option<Arc<OwnedFd>>,
}

impl Reply {
    fn empty() -> Reply {
        Reply { len: 0, fd: None }
    }
    fn bytes(len: usize) -> Reply {
        Reply { len, fd: None }
    }
}

/// Per-connection protocol state (everything but the reader).
struct State {
    config: ServerConfig,
    device: Arc<dyn VfioUserDevice>,
    shared: Arc<ClientShared>,
    info: DeviceInfo,
    regions: Vec<Option<RegionInfo>>,
    access: Vec<RegionAccess>,
    irq_infos: Vec<Option<IrqInfo>>,
    negotiated: Option<Negotiated>,
    reply: Box<[u8]>,
    stats: ConnectionStats,
}

/// Drop sparse areas that fall outside the region; a region whose every area was invalid is
/// not offered for mmap at all (an empty list would mean "map it all").
fn sanitize_region(index: u32, mut info: RegionInfo) -> RegionInfo {
    if let Some(mmap) = info.mmap.as_mut() {
        let listed = mmap.sparse_areas.len();
        let size = info.size;
        mmap.sparse_areas.retain(|a: &SparseArea| {
            a.size > 0 && a.offset.checked_add(a.size).is_some_and(|end| end <= size)
        });
        if mmap.sparse_areas.len() != listed {
            log::warn!(
                "vfio-user: region {index}: dropped {} sparse area(s) outside the region",
                listed - mmap.sparse_areas.len()
            );
            if mmap.sparse_areas.is_empty() {
                info.mmap = None;
            }
        }
    }
    info
}

fn region_info_len(info: &RegionInfo) -> usize {
    let areas = info.mmap.as_ref().map_or(0, |m| m.sparse_areas.len());
    RegionInfoMsg::SIZE
        + if areas == 0 {
            0
        } else {
            CapHeader::SIZE + SparseMmapMsg::SIZE + areas * SparseAreaMsg::SIZE
        }
}

impl State {
    fn region_access(
        &self,
        region: u32,
        offset: u64,
        count: usize,
        write: bool,
    ) -> Result<(), Errno> {
        let r = self.access.get(region as usize).ok_or(Errno::EINVAL)?;
        let end = offset.checked_add(count as u64).ok_or(Errno::EINVAL)?;
        if end > r.size {
            return Err(Errno::EINVAL);
        }
        if (write && !r.writable) || (!write && !r.readable) {
            return Err(Errno::EPERM);
        }
        Ok(())
    }

    fn max_xfer(&self) -> u32 {
        self.negotiated
            .map_or(self.config.max_data_xfer_size, |n| n.max_xfer)
    }

    fn dispatch(
        &mut self,
        header: &Header,
        payload: &[u8],
        fds: &mut Vec<OwnedFd>,
    ) -> Result<Reply, Errno> {
        let Some(command) = Command::from_u16(header.command) else {
            return Err(Errno::ENOSYS);
        };
        let fd_limit = match command {
            Command::DmaMap => 1,
            Command::DeviceSetIrqs => usize::MAX,
            _ => 0,
        };
        if fds.len() > fd_limit {
            return Err(Errno::EINVAL);
        }
        if command != Command::Version && self.negotiated.is_none() {
            return Err(Errno::EINVAL);
        }
        match command {
            Command::Version => self.version(payload),
            Command::DmaMap => self.dma_map(payload, fds),
            Command::DmaUnmap => self.dma_unmap(payload),
            Command::DeviceGetInfo => self.device_get_info(payload),
            Command::DeviceGetRegionInfo => self.region_info(payload),
            Command::DeviceGetRegionIoFds => self.region_io_fds(payload),
            Command::DeviceGetIrqInfo => self.irq_info(payload),
            Command::DeviceSetIrqs => self.set_irqs(payload, fds),
            Command::RegionRead => self.region_read(payload),
            Command::RegionWrite => self.region_write(payload),
            Command::RegionWriteMulti => self.region_write_multi(payload),
            Command::DeviceReset => self.reset(),
            // Server-to-client commands are not valid from the client.
            Command::DmaRead | Command::DmaWrite => Err(Errno::EINVAL),
            Command::DirtyPages
            | Command::DeviceFeature
            | Command::MigDataRead
            | Command::MigDataWrite => Err(Errno::ENOTSUP),
        }
    }

    fn out(&mut self) -> &mut [u8] {
        &mut self.reply[HEADER_SIZE..]
    }

    fn version(&mut self, payload: &[u8]) -> Result<Reply, Errno> {
        let msg = VersionMsg::decode(payload).ok_or(Errno::EINVAL)?;
        if self.negotiated.is_some() {
            return Err(Errno::EINVAL);
        }
        if msg.major != VERSION_MAJOR {
            return Err(Errno::ENOTSUP);
        }
        let peer =
            PeerCapabilities::parse(&payload[VersionMsg::SIZE..]).map_err(|_| Errno::EINVAL)?;
        let client_xfer = peer
            .max_data_xfer_size
            .filter(|&v| v > 0)
            .unwrap_or(DEFAULT_MAX_DATA_XFER_SIZE as u64);
        let max_xfer = (self.config.max_data_xfer_size as u64).min(client_xfer) as u32;
        let client_maps = peer
            .max_dma_maps
            .filter(|&v| v > 0)
            .unwrap_or(DEFAULT_MAX_DMA_MAPS as u64);
        let max_dma_maps = (self.config.max_dma_maps as u64)
            .min(client_maps)
            .min(self.config.connection_budget.dma_maps)
            .max(1) as u32;
        let caps = ServerCapabilities {
            max_msg_fds: self.config.max_msg_fds,
            max_data_xfer_size: max_xfer,
            pgsizes: DMA_PAGE_SIZE,
            max_dma_maps,
            write_multiple: peer.write_multiple == Some(true),
        };
        let json = caps.to_json();
        let len = VersionMsg::SIZE + json.len();
        let out = self.out();
        if out.len() < len {
            return Err(Errno::EINVAL);
        }
        VersionMsg {
            major: VERSION_MAJOR,
            minor: msg.minor.min(VERSION_MINOR),
        }
        .encode(out)
        .ok_or(Errno::EINVAL)?;
        out[VersionMsg::SIZE..len].copy_from_slice(&json);
        self.negotiated = Some(Negotiated {
            max_xfer,
            client_max_fds: peer.max_msg_fds.unwrap_or(1),
            max_dma_maps: max_dma_maps as usize,
        });
        self.shared.set_max_xfer(max_xfer);
        log::debug!(
            "vfio-user: version {}.{} negotiated, max_data_xfer_size {max_xfer}, max_dma_maps {max_dma_maps}",
            VERSION_MAJOR,
            msg.minor.min(VERSION_MINOR)
        );
        Ok(Reply::bytes(len))
    }

    fn dma_map(&mut self, payload: &[u8], fds: &mut Vec<OwnedFd>) -> Result<Reply, Errno> {
        let msg = DmaMapMsg::decode(payload).ok_or(Errno::EINVAL)?;
        if (msg.argsz as usize) < DmaMapMsg::SIZE
            || msg.flags & !(dma_flags::MAP_READ | dma_flags::MAP_WRITE) != 0
        {
            return Err(Errno::EINVAL);
        }
        let max_maps = self.negotiated.map_or(1, |n| n.max_dma_maps);
        let request = DmaMapRequest {
            iova: msg.address,
            size: msg.size,
            offset: msg.offset,
            readable: msg.flags & dma_flags::MAP_READ != 0,
            writable: msg.flags & dma_flags::MAP_WRITE != 0,
        };
        self.shared.dma.map(request, fds.pop(), max_maps)?;
        // The map was just added: the table holds it under this IOVA.
        if let Some(entry) = self.shared.dma.entry(msg.address) {
            let map = ClientDmaMap::new(&entry, Arc::clone(&self.shared));
            if let Err(errno) = self.device.dma_mapped(map) {
                self.shared.revoke_map(&entry);
                self.shared.dma.remove(std::slice::from_ref(&entry));
                log::debug!(
                    "vfio-user: DMA map [{:#x}, +{:#x}) refused by the device: {errno}",
                    msg.address,
                    msg.size
                );
                return Err(errno);
            }
        }
        log::debug!(
            "vfio-user: DMA map [{:#x}, +{:#x}) flags {:#x}",
            msg.address,
            msg.size,
            msg.flags
        );
        Ok(Reply::empty())
    }

    fn dma_unmap(&mut self, payload: &[u8]) -> Result<Reply, Errno> {
        let msg = DmaUnmapMsg::decode(payload).ok_or(Errno::EINVAL)?;
        if (msg.argsz as usize) < DmaUnmapMsg::SIZE {
            return Err(Errno::EINVAL);
        }
        if msg.flags & dma_flags::UNMAP_GET_DIRTY_BITMAP != 0 {
            return Err(Errno::ENOTSUP);
        }
        if msg.flags & !dma_flags::UNMAP_ALL != 0 {
            return Err(Errno::EINVAL);
        }
        let removed = if msg.flags & dma_flags::UNMAP_ALL != 0 {
            if msg.address != 0 || msg.size != 0 {
                return Err(Errno::EINVAL);
            }
            self.shared.dma.entries()
        } else {
            self.shared
                .dma
                .covered(msg.address, msg.size)
                .inspect_err(|_| {
                    log::debug!(
                        "vfio-user: DMA unmap [{:#x}, +{:#x}) refused: it splits a map, is empty or wraps",
                        msg.address,
                        msg.size
                    )
                })?
        };
        log::debug!(
            "vfio-user: DMA unmap [{:#x}, +{:#x}) flags {:#x}: {} map(s)",
            msg.address,
            msg.size,
            msg.flags,
            removed.len()
        );
        self.release_maps(&removed);
        self.shared.dma.remove(&removed);
        msg.encode(self.out()).ok_or(Errno::EINVAL)?;
        Ok(Reply::bytes(DmaUnmapMsg::SIZE))
    }

    /// Stop every access to `maps` and tell the device, before they are removed: revoke
    /// their gates (failing socket DMA in flight to them), then [`VfioUserDevice::dma_unmapped`]
    /// for each.
    fn release_maps(&self, maps: &[MapEntry]) {
        for entry in maps {
            self.shared.revoke_map(entry);
        }
        for entry in maps {
            self.device.dma_unmapped(entry.iova, entry.size);
        }
    }

    fn device_get_info(&mut self, payload: &[u8]) -> Result<Reply, Errno> {
        let msg = DeviceInfoMsg::decode(payload).ok_or(Errno::EINVAL)?;
        if (msg.argsz as usize) < DeviceInfoMsg::SIZE {
            return Err(Errno::EINVAL);
        }
        let mut dev_flags = device_flags::PCI;
        if self.info.resettable {
            dev_flags |= device_flags::RESET;
        }
        let reply = DeviceInfoMsg {
            argsz: DeviceInfoMsg::SIZE as u32,
            flags: dev_flags,
            num_regions: self.regions.len() as u32,
            num_irqs: self.irq_infos.len() as u32,
        };
        reply.encode(self.out()).ok_or(Errno::EINVAL)?;
        Ok(Reply::bytes(DeviceInfoMsg::SIZE))
    }

    fn region_info(&mut self, payload: &[u8]) -> Result<Reply, Errno> {
        let msg = RegionInfoMsg::decode(payload).ok_or(Errno::EINVAL)?;
        if (msg.argsz as usize) < RegionInfoMsg::SIZE {
            return Err(Errno::EINVAL);
        }
        let slot = self.regions.get(msg.index as usize).ok_or(Errno::EINVAL)?;
        let empty = RegionInfo::default();
        let info = slot.as_ref().unwrap_or(&empty);
        let can_send_fd = self.negotiated.is_some_and(|n| n.client_max_fds > 0);
        let mmap = info.mmap.as_ref().filter(|_| can_send_fd);
        let areas: &[SparseArea] = mmap.map_or(&[], |m| &m.sparse_areas);
        let mut reg_flags = 0;
        if info.readable {
            reg_flags |= region_flags::READ;
        }
        if info.writable {
            reg_flags |= region_flags::WRITE;
        }
        if mmap.is_some() {
            reg_flags |= region_flags::MMAP;
        }
        let caps_len = if areas.is_empty() {
            0
        } else {
            CapHeader::SIZE + SparseMmapMsg::SIZE + areas.len() * SparseAreaMsg::SIZE
        };
        let needed = RegionInfoMsg::SIZE + caps_len;
        // Too small for the capabilities: report the needed argsz only (no caps, no fd), so
        // the client retries with a bigger buffer (what QEMU does).
        let full = msg.argsz as usize >= needed;
        let mut reply = RegionInfoMsg {
            argsz: needed as u32,
            flags: reg_flags,
            index: msg.index,
            cap_offset: 0,
            size: info.size,
            offset: mmap.map_or(0, |m| m.file_offset),
        };
        let fd = if full {
            mmap.map(|m| Arc::clone(&m.fd))
        } else {
            None
        };
        let len = if full { needed } else { RegionInfoMsg::SIZE };
        // `info` borrows `self.regions`; the reply buffer is a separate field.
        let out = &mut self.reply[HEADER_SIZE..];
        if out.len() < len {
            return Err(Errno::EINVAL);
        }
        if full && caps_len > 0 {
            reply.flags |= region_flags::CAPS;
            reply.cap_offset = RegionInfoMsg::SIZE as u32;
            let mut pos = RegionInfoMsg::SIZE;
            CapHeader {
                id: region_flags::CAP_SPARSE_MMAP,
                version: region_flags::CAP_SPARSE_MMAP_VERSION,
                next: 0,
            }
            .encode(&mut out[pos..])
            .ok_or(Errno::EINVAL)?;
            pos += CapHeader::SIZE;
            SparseMmapMsg {
                nr_areas: areas.len() as u32,
                reserved: 0,
            }
            .encode(&mut out[pos..])
            .ok_or(Errno::EINVAL)?;
            pos += SparseMmapMsg::SIZE;
            for area in areas {
                SparseAreaMsg {
                    offset: area.offset,
                    size: area.size,
                }
                .encode(&mut out[pos..])
                .ok_or(Errno::EINVAL)?;
                pos += SparseAreaMsg::SIZE;
            }
        }
        reply.encode(out).ok_or(Errno::EINVAL)?;
        Ok(Reply { len, fd })
    }

    fn region_io_fds(&mut self, payload: &[u8]) -> Result<Reply, Errno> {
        let msg = RegionIoFdsMsg::decode(payload).ok_or(Errno::EINVAL)?;
        if (msg.argsz as usize) < RegionIoFdsMsg::SIZE
            || msg.flags != 0
            || msg.count != 0
            || msg.index as usize >= self.regions.len()
        {
            return Err(Errno::EINVAL);
        }
        // No ioeventfd/ioregionfd sub-regions: a reply with count 0 and no fds.
        RegionIoFdsMsg {
            argsz: RegionIoFdsMsg::SIZE as u32,
            flags: 0,
            index: msg.index,
            count: 0,
        }
        .encode(self.out())
        .ok_or(Errno::EINVAL)?;
        Ok(Reply::bytes(RegionIoFdsMsg::SIZE))
    }

    fn irq_info(&mut self, payload: &[u8]) -> Result<Reply, Errno> {
        let msg = IrqInfoMsg::decode(payload).ok_or(Errno::EINVAL)?;
        if (msg.argsz as usize) < IrqInfoMsg::SIZE {
            return Err(Errno::EINVAL);
        }
        let info = self
            .irq_infos
            .get(msg.index as usize)
            .ok_or(Errno::EINVAL)?
            .unwrap_or_default();
        let mut f = 0;
        if info.eventfd {
            f |= irq_flags::INFO_EVENTFD;
        }
        if info.maskable {
            f |= irq_flags::INFO_MASKABLE;
        }
        if info.automasked {
            f |= irq_flags::INFO_AUTOMASKED;
        }
        if info.noresize {
            f |= irq_flags::INFO_NORESIZE;
        }
        IrqInfoMsg {
            argsz: IrqInfoMsg::SIZE as u32,
            flags: f,
            index: msg.index,
            count: info.count.min(super::irq::MAX_VECTORS),
        }
        .encode(self.out())
        .ok_or(Errno::EINVAL)?;
        Ok(Reply::bytes(IrqInfoMsg::SIZE))
    }

    fn set_irqs(&mut self, payload: &[u8], fds: &mut Vec<OwnedFd>) -> Result<Reply, Errno> {
        let msg = IrqSetMsg::decode(payload).ok_or(Errno::EINVAL)?;
        if (msg.argsz as usize) < IrqSetMsg::SIZE {
            return Err(Errno::EINVAL);
        }
        let info = self
            .irq_infos
            .get(msg.index as usize)
            .ok_or(Errno::EINVAL)?
            .unwrap_or_default();
        let data = msg.flags & irq_flags::DATA_MASK;
        let action = msg.flags & irq_flags::ACTION_MASK_ALL;
        if msg.flags & !(irq_flags::DATA_MASK | irq_flags::ACTION_MASK_ALL) != 0
            || data.count_ones() != 1
            || action.count_ones() != 1
        {
            return Err(Errno::EINVAL);
        }
        if action != irq_flags::ACTION_TRIGGER && !info.maskable {
            return Err(Errno::EINVAL);
        }
        if data != irq_flags::DATA_EVENTFD && !fds.is_empty() {
            return Err(Errno::EINVAL);
        }
        let irqs = &self.shared.irqs;
        let (index, start, count) = (msg.index, msg.start, msg.count);
        let selection = match data {
            irq_flags::DATA_NONE => {
                if count == 0 {
                    if start != 0 {
                        return Err(Errno::EINVAL);
                    }
                    if action == irq_flags::ACTION_TRIGGER {
                        irqs.disable_all(index)?;
                    }
                    return Ok(Reply::empty());
                }
                Selection::All
            }
            irq_flags::DATA_BOOL => {
                let bools = payload
                    .get(IrqSetMsg::SIZE..IrqSetMsg::SIZE + count as usize)
                    .ok_or(Errno::EINVAL)?;
                if count == 0 {
                    return Err(Errno::EINVAL);
                }
                Selection::Bools(bools)
            }
            _ => {
                // DATA_EVENTFD: only trigger eventfds are supported (mask/unmask notification
                // fds are not), and QEMU falls back when they are refused.
                if action != irq_flags::ACTION_TRIGGER {
                    return Err(Errno::ENOTSUP);
                }
                if count == 0 {
                    return Err(Errno::EINVAL);
                }
                if fds.is_empty() {
                    irqs.deassign(index, start, count)?;
                } else if fds.len() == count as usize {
                    irqs.assign(index, start, std::mem::take(fds))?;
                } else {
                    return Err(Errno::EINVAL);
                }
                return Ok(Reply::empty());
            }
        };
        match action {
            irq_flags::ACTION_MASK => irqs.mask(index, start, count, selection)?,
            irq_flags::ACTION_UNMASK => irqs.unmask(index, start, count, selection)?,
            _ => irqs.trigger_range(index, start, count, selection)?,
        }
        Ok(Reply::empty())
    }

    fn region_read(&mut self, payload: &[u8]) -> Result<Reply, Errno> {
        let msg = RegionAccessMsg::decode(payload).ok_or(Errno::EINVAL)?;
        if msg.count > self.max_xfer() {
            return Err(Errno::E2BIG);
        }
        let count = msg.count as usize;
        self.region_access(msg.region, msg.offset, count, false)?;
        let data_at = HEADER_SIZE + RegionAccessMsg::SIZE;
        let buf = self
            .reply
            .get_mut(data_at..data_at + count)
            .ok_or(Errno::E2BIG)?;
        let served = self.device.region_read(msg.region, msg.offset, buf)?;
        if served > count {
            return Err(Errno::EIO);
        }
        RegionAccessMsg {
            count: served as u32,
            ..msg
        }
        .encode(self.out())
        .ok_or(Errno::EINVAL)?;
        log::trace!(
            "vfio-user: read region {} @{:#x} +{}",
            msg.region,
            msg.offset,
            served
        );
        Ok(Reply::bytes(RegionAccessMsg::SIZE + served))
    }

    fn region_write(&mut self, payload: &[u8]) -> Result<Reply, Errno> {
        let msg = RegionAccessMsg::decode(payload).ok_or(Errno::EINVAL)?;
        if msg.count > self.max_xfer() {
            return Err(Errno::E2BIG);
        }
        let count = msg.count as usize;
        let data = payload
            .get(RegionAccessMsg::SIZE..RegionAccessMsg::SIZE + count)
            .ok_or(Errno::EINVAL)?;
        self.region_access(msg.region, msg.offset, count, true)?;
        let accepted = self.device.region_write(msg.region, msg.offset, data)?;
        log::trace!(
            "vfio-user: write region {} @{:#x} +{}",
            msg.region,
            msg.offset,
            accepted
        );
        RegionAccessMsg {
            count: accepted.min(count) as u32,
            ..msg
        }
        .encode(self.out())
        .ok_or(Errno::EINVAL)?;
        Ok(Reply::bytes(RegionAccessMsg::SIZE))
    }

    fn region_write_multi(&mut self, payload: &[u8]) -> Result<Reply, Errno> {
        let msg = WriteMultiMsg::decode(payload).ok_or(Errno::EINVAL)?;
        let entries = &payload[WriteMultiMsg::SIZE..];
        let max = (entries.len() / WriteMultiEntry::SIZE) as u64;
        if msg.wr_cnt > max {
            return Err(Errno::EINVAL);
        }
        for chunk in entries
            .chunks_exact(WriteMultiEntry::SIZE)
            .take(msg.wr_cnt as usize)
        {
            let w = WriteMultiEntry::decode(chunk).ok_or(Errno::EINVAL)?;
            if w.count > WRITE_MULTI_MAX_DATA {
                return Err(Errno::EINVAL);
            }
            let count = w.count as usize;
            self.region_access(w.region, w.offset, count, true)?;
            self.device
                .region_write(w.region, w.offset, &w.data[..count])?;
        }
        WriteMultiMsg { wr_cnt: msg.wr_cnt }
            .encode(self.out())
            .ok_or(Errno::EINVAL)?;
        Ok(Reply::bytes(WriteMultiMsg::SIZE))
    }

    fn reset(&mut self) -> Result<Reply, Errno> {
        if !self.info.resettable {
            return Err(Errno::ENOTSUP);
        }
        self.device.reset()?;
        Ok(Reply::empty())
    }

    /// Send the reply for `header` (nothing for `NO_REPLY`; failures there are only logged).
    fn respond(
        &mut self,
        header: &Header,
        result: Result<Reply, Errno>,
    ) -> Result<(), SocketError> {
        if let Err(e) = result {
            self.stats.errors += 1;
            if self.stats.errors <= 16 || self.stats.errors % 1024 == 0 {
                let level = if header.no_reply() {
                    log::Level::Warn
                } else {
                    log::Level::Debug
                };
                log::log!(
                    level,
                    "vfio-user: command {} (id {}) failed: {e} ({} failures so far)",
                    header.command,
                    header.id,
                    self.stats.errors
                );
            }
        }
        if header.no_reply() {
            return Ok(());
        }
        match result {
            Ok(reply) => {
                let size = HEADER_SIZE + reply.len;
                let _ = Header::reply_to(header, size as u32).encode(&mut self.reply[..]);
                match &reply.fd {
                    Some(fd) => self
                        .shared
                        .writer
                        .send(&[&self.reply[..size]], &[fd.as_fd()]),
                    None => self.shared.writer.send(&[&self.reply[..size]], &[]),
                }
            }
            Err(e) => {
                let mut buf = [0u8; HEADER_SIZE];
                let _ = Header::error_reply_to(header, e.wire_value()).encode(&mut buf);
                self.shared.writer.send(&[&buf], &[])
            }
        }
    }

    fn handle(&mut self, msg: &mut Incoming<'_>) -> Result<(), SocketError> {
        self.stats.messages += 1;
        let header = msg.header;
        match header.msg_type() {
            flags::TYPE_COMMAND => {}
            flags::TYPE_REPLY => {
                self.shared
                    .requests
                    .complete(&header, msg.payload, self.shared.layout());
                return Ok(());
            }
            _ => return self.respond(&header, Err(Errno::EINVAL)),
        }
        let result = if msg.oversized {
            Err(Errno::E2BIG)
        } else if msg.fds.truncated {
            Err(Errno::EINVAL)
        } else {
            self.dispatch(&header, msg.payload, &mut msg.fds.fds)
        };
        self.respond(&header, result)
    }
}

/// A client connection being served.
pub struct Connection {
    stream: UnixStream,
    reader: MessageReader,
    state: State,
    shutdown: Option<ShutdownSignal>,
    /// Ends the blocking wait for the next message when `shutdown` fires.
    waker: Option<ShutdownWaker>,
    started: bool,
    finished: bool,
}

impl Connection {
    /// Prepare to serve `stream` for `device`. Snapshots the device's region and interrupt
    /// tables. Between messages the connection waits blocked in `recvmsg()`; with a `shutdown`
    /// signal, a small waker thread ends that wait when it fires.
    pub fn new(
        stream: UnixStream,
        device: Arc<dyn VfioUserDevice>,
        config: ServerConfig,
        shutdown: Option<ShutdownSignal>,
    ) -> std::io::Result<Connection> {
        let config = config.sanitized();
        stream.set_nonblocking(false)?;
        stream.set_write_timeout(Some(config.msg_timeout))?;
        let writer = SocketWriter::new(stream.try_clone()?);
        let info = device.device_info();
        let regions: Vec<Option<RegionInfo>> = (0..info.num_regions.min(MAX_TABLE))
            .map(|i| device.region_info(i).map(|r| sanitize_region(i, r)))
            .collect();
        let access = regions
            .iter()
            .map(|r| {
                r.as_ref()
                    .map_or(RegionAccess::default(), |r| RegionAccess {
                        size: r.size,
                        readable: r.readable,
                        writable: r.writable,
                    })
            })
            .collect();
        let irq_infos: Vec<Option<IrqInfo>> = (0..info.num_irqs.min(MAX_TABLE))
            .map(|i| device.irq_info(i))
            .collect();
        let account = Account::new(config.connection_budget, config.process_budget);
        let irqs = IrqTable::new(&irq_infos, Arc::clone(&account));
        let dma = DmaSpace::new(account, device.maps_dma());
        let max_message = config.max_message_size();
        let reply_len = regions
            .iter()
            .flatten()
            .map(region_info_len)
            .max()
            .unwrap_or(0)
            .max(max_message)
            + HEADER_SIZE;
        let shared = Arc::new(ClientShared::new(
            writer,
            irqs,
            dma,
            config.dma_layout,
            config.msg_timeout,
            config.max_data_xfer_size,
        ));
        let mut reader =
            MessageReader::new(max_message, config.max_msg_fds as usize, config.msg_timeout);
        reader.set_spin(config.poll_spin);
        reader.set_block_when_idle(true);
        let waker = match &shutdown {
            Some(signal) => Some(ShutdownWaker::spawn(signal, stream.try_clone()?)?),
            None => None,
        };
        Ok(Connection {
            reader,
            stream,
            state: State {
                config,
                device,
                shared,
                info,
                regions,
                access,
                irq_infos,
                negotiated: None,
                reply: vec![0u8; reply_len].into_boxed_slice(),
                stats: ConnectionStats::default(),
            },
            shutdown,
            waker,
            started: false,
            finished: false,
        })
    }

    /// The handle the device gets for this client.
    pub fn handle(&self) -> ClientHandle {
        ClientHandle::new(Arc::clone(&self.state.shared))
    }

    /// Tell the device a client connected; the calling thread becomes the connection thread.
    pub fn start(&mut self) {
        if !self.started {
            self.started = true;
            self.state.shared.set_connection_thread();
            self.state.device.client_connected(self.handle());
        }
    }

    /// Read and handle one message.
    pub fn step(&mut self) -> Result<(), SocketError> {
        let shutdown = self.shutdown.as_ref();
        match self.reader.next(self.stream.as_fd(), shutdown) {
            Ok(mut msg) => self.state.handle(&mut msg),
            Err(SocketError::BadSize { id, command, size }) => {
                // Answer before hanging up so the client learns why.
                let header = Header {
                    id,
                    command,
                    size,
                    flags: flags::TYPE_COMMAND,
                    error: 0,
                };
                let _ = self.state.respond(&header, Err(Errno::EINVAL));
                Err(SocketError::BadSize { id, command, size })
            }
            Err(e) => Err(e),
        }
    }

    /// Handle messages until the client leaves, the stream breaks, or shutdown; then drop the
    /// client's maps and fds and tell the device.
    pub fn run(mut self) -> ConnectionStats {
        self.start();
        let end = loop {
            if let Err(e) = self.step() {
                break e;
            }
        };
        match &end {
            SocketError::Eof | SocketError::Shutdown => {
                log::debug!("vfio-user: connection ended: {end}")
            }
            _ => log::warn!("vfio-user: dropping client: {end}"),
        }
        self.state.stats.end = end.to_string();
        self.finish()
    }

    /// Disconnect the client and notify the device (also done by [`Connection::run`], and on
    /// drop, e.g. if a device callback panicked).
    pub fn finish(mut self) -> ConnectionStats {
        self.teardown();
        self.state.stats.buffer_capacity = self.reader.capacity();
        std::mem::take(&mut self.state.stats)
    }

    fn teardown(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        drop(self.waker.take());
        self.state.shared.disconnect();
        let maps = self.state.shared.dma.entries();
        self.state.release_maps(&maps);
        self.state.shared.dma.unmap_all();
        if self.started {
            self.state.device.client_disconnected();
        }
    }

    /// Handle one complete message given as bytes, without socket I/O (for measuring the
    /// processing cost): returns the size of the reply left in the reply buffer, or the errno
    /// an error reply would carry.
    pub fn dispatch_in_memory(&mut self, message: &[u8]) -> Result<usize, Errno> {
        let header = Header::decode(message).ok_or(Errno::EINVAL)?;
        let payload = message
            .get(HEADER_SIZE..header.size as usize)
            .ok_or(Errno::EINVAL)?;
        let mut fds = Vec::new();
        let reply = self.state.dispatch(&header, payload, &mut fds)?;
        let size = HEADER_SIZE + reply.len;
        let _ = Header::reply_to(&header, size as u32).encode(&mut self.state.reply[..]);
        Ok(size)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.teardown();
    }
}
