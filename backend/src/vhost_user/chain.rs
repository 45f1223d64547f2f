//! One descriptor chain of a virtqueue as the GPU model sees it: the bytes of its
//! device-readable descriptors joined (up to a cap), and a response written into its
//! device-writable ones. Nothing the guest put in the chain is trusted: descriptors outside
//! guest memory, chains longer than any request, and writable space shorter than the
//! response are all handled without touching memory outside the chain.

use std::io::{Read, Write};
use std::ops::Deref;

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::gpu::wire::{HDR_SIZE, MAX_BACKING_ENTRIES, MEM_ENTRY_SIZE};

/// The largest request the device accepts: RESOURCE_ATTACH_BACKING with
/// [`MAX_BACKING_ENTRIES`] entries. One more byte is read, so a longer request reaches the
/// decoder as oversized instead of being cut to a valid one.
pub const MAX_REQUEST: usize = HDR_SIZE + 8 + MAX_BACKING_ENTRIES as usize * MEM_ENTRY_SIZE;

/// Errors of reading or answering a chain.
#[derive(Debug, Error)]
pub enum ChainError {
    /// The chain's descriptors do not lie in guest memory (or loop, or overflow).
    #[error("descriptor chain is invalid: {0}")]
    Invalid(#[from] virtio_queue::Error),
    /// Copying from or to guest memory failed.
    #[error("guest memory access failed: {0}")]
    Memory(#[from] std::io::Error),
}

/// Joins the device-readable bytes of `chain`: at most [`MAX_REQUEST`] + 1 of them.
pub fn read_request<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
) -> Result<Vec<u8>, ChainError>
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    let reader = chain.reader(mem)?;
    let mut bytes = Vec::with_capacity(reader.available_bytes().min(MAX_REQUEST + 1));
    reader
        .take(MAX_REQUEST as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Writes `response` into the device-writable part of `chain`, cut to the space the driver
/// gave; returns the bytes written (the used length).
pub fn write_response<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    response: &[u8],
) -> Result<u32, ChainError>
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    let mut writer = chain.writer(mem)?;
    let n = response.len().min(writer.available_bytes());
    writer.write_all(&response[..n])?;
    // At most the response's length, a few KiB.
    Ok(writer.bytes_written() as u32)
}
