//! A booted GSP: its static information and the RM object requests the backend makes
//! (video memory objects, address spaces and their page directories). Payload layouts
//! are project-defined (see [`super::rpc`]).
//!
//! The session owns the GSP's DMA buffers; dropping it stops the GSP (ENGINE reset) before
//! they are freed ([`RunningGsp`]). Hold one session per GPU at a time: a second boot
//! resets the GSP the first one talks to.

use super::boot::BootTrace;
use super::client::{ClientError, GspClient};
use super::falcon::RunningGsp;
use super::rpc::{
    AllocMemory, AllocVaSpace, BindPageDirectory, FreeObject, Function, Handle, MemoryObject,
    PayloadError, StaticInfo,
};
use crate::host_driver::addr::{GpuVa, VramAddr};

/// First handle the backend gives its objects (project-chosen).
pub const FIRST_HANDLE: u32 = 0x5C00_0001;

/// Errors of object requests.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The RPC failed (including an error status from the GSP).
    #[error(transparent)]
    Rpc(#[from] ClientError),
    /// The reply could not be decoded.
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

/// A booted GSP. Dropping the session stops the GSP.
#[derive(Debug)]
pub struct GspSession<'a> {
    client: GspClient<'a>,
    info: StaticInfo,
    trace: BootTrace,
    next_handle: u32,
    /// Stops the GSP when the session goes, before the DMA buffers are let go.
    _running: RunningGsp<'a>,
}

impl<'a> GspSession<'a> {
    pub(crate) fn new(
        client: GspClient<'a>,
        info: StaticInfo,
        trace: BootTrace,
        running: RunningGsp<'a>,
    ) -> GspSession<'a> {
        GspSession {
            client,
            info,
            trace,
            next_handle: FIRST_HANDLE,
            _running: running,
        }
    }

    /// What GET_GSP_STATIC_INFO returned: framebuffer regions and internal handles.
    pub fn static_info(&self) -> &StaticInfo {
        &self.info
    }

    /// What happened during boot.
    pub fn boot_trace(&self) -> &BootTrace {
        &self.trace
    }

    /// The RPC client.
    pub fn client(&self) -> &GspClient<'a> {
        &self.client
    }

    /// The RPC client, for requests not wrapped here.
    pub fn client_mut(&mut self) -> &mut GspClient<'a> {
        &mut self.client
    }

    fn new_handle(&mut self) -> Handle {
        let h = Handle(self.next_handle);
        self.next_handle = self.next_handle.wrapping_add(1);
        h
    }

    /// Allocates `size` bytes of usable VRAM aligned to `alignment` (a power of two; 0
    /// means 4 KiB) as a memory object under the device.
    pub fn alloc_memory(
        &mut self,
        size: u64,
        alignment: u64,
    ) -> Result<MemoryObject, SessionError> {
        let request = AllocMemory {
            client: self.info.handles.client,
            parent: self.info.handles.device,
            object: self.new_handle(),
            size,
            alignment,
        };
        let reply = self
            .client
            .call(Function::GSP_RM_ALLOC, &request.encode())?;
        Ok(request.decode_reply(&reply.payload)?)
    }

    /// Frees an object the backend allocated under the device.
    pub fn free(&mut self, object: Handle) -> Result<(), SessionError> {
        let request = FreeObject {
            client: self.info.handles.client,
            parent: self.info.handles.device,
            object,
        };
        self.client.call(Function::FREE, &request.encode())?;
        Ok(())
    }

    /// Creates a GPU virtual address space `[va_base, va_base + va_size)` with big pages of
    /// `big_page_size` bytes (64 KiB or 128 KiB).
    pub fn create_address_space(
        &mut self,
        va_base: GpuVa,
        va_size: u64,
        big_page_size: u32,
    ) -> Result<Handle, SessionError> {
        let request = AllocVaSpace {
            client: self.info.handles.client,
            parent: self.info.handles.device,
            object: self.new_handle(),
            va_base,
            va_size,
            big_page_size,
        };
        self.client
            .call(Function::GSP_RM_ALLOC, &request.encode())?;
        Ok(request.object)
    }

    /// Binds the root page directory at `page_directory` (in VRAM, 4 KiB aligned, built
    /// by the host driver) to address space `vaspace`.
    pub fn bind_page_directory(
        &mut self,
        vaspace: Handle,
        page_directory: VramAddr,
    ) -> Result<(), SessionError> {
        let request = BindPageDirectory {
            client: self.info.handles.client,
            vaspace,
            page_directory,
        };
        self.client
            .call(Function::GSP_RM_CONTROL, &request.encode())?;
        Ok(())
    }
}
