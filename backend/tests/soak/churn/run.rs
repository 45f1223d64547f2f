//! Running a guest's operation and checking everything that comes back: counts and errnos
//! against what the region and the vfio-user rules say, every byte read against the
//! guest's model, and no byte of another guest or of host VRAM ever.

use gpu_backend::presentation::config_space::CONFIG_SPACE_SIZE;
use gpu_backend::presentation::function::CONFIG_REGION_INDEX;
use gpu_backend::vfio_user::test_client::ClientError;

use super::guest::{errno_of, Guest};
use super::model::{foreign_byte, GuestModel, APERTURE, APERTURE_SIZE, BAR0_SIZE};
use super::ops::{Access, Via, PMCSR};

/// Reads `len` bytes of `region` at `at` through `via`: the bytes served, or the errno.
fn read(
    guest: &mut Guest,
    region: u32,
    at: u64,
    len: usize,
    via: Via,
) -> Result<Result<Vec<u8>, i32>, String> {
    Ok(match via {
        Via::Direct => {
            let mut buf = vec![0u8; len];
            match guest.function().region_read(region, at, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    Ok(buf)
                }
                Err(e) => Err(e.errno()),
            }
        }
        _ => match guest.client()?.region_read(region, at, len as u32) {
            Ok(data) => Ok(data),
            Err(e) => Err(socket_errno(e)?),
        },
    })
}

/// Writes `data` to `region` at `at` through `via`: the count taken (`None` if posted), or
/// the errno.
fn write(
    guest: &mut Guest,
    region: u32,
    at: u64,
    data: &[u8],
    via: Via,
) -> Result<Result<Option<usize>, i32>, String> {
    Ok(match via {
        Via::Direct => guest
            .function()
            .region_write(region, at, data)
            .map(Some)
            .map_err(|e| e.errno()),
        _ => match guest
            .client()?
            .region_write(region, at, data, via == Via::Posted)
        {
            Ok(reply) => Ok(reply.map(|r| r.count as usize)),
            Err(e) => Err(socket_errno(e)?),
        },
    })
}

/// The errno of an error reply; any other client error (a dropped or confused connection)
/// is a failure.
fn socket_errno(error: ClientError) -> Result<i32, String> {
    errno_of(&error).ok_or_else(|| format!("the connection failed: {error}"))
}

/// How many bytes of an access of `len` at `at` a region of `size` serves (`None` if
/// refused): a call on the function clips at the end of the (padded) region, a vfio-user
/// message must lie inside it.
fn served(at: u64, len: usize, size: u64, via: Via) -> Option<usize> {
    match via {
        Via::Direct => (at < size).then(|| len.min((size - at) as usize)),
        _ => at
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
            .then_some(len),
    }
}

fn expect_count(what: &str, got: Result<usize, i32>, want: Option<usize>) -> Result<(), String> {
    match (got, want) {
        (Ok(n), Some(w)) if n == w => Ok(()),
        (Err(_), None) => Ok(()),
        (got, want) => Err(format!("{what}: got {got:?}, expected {want:?} bytes")),
    }
}

/// A write's outcome against the count expected (nothing to check for a posted write).
fn expect_written(
    what: &str,
    got: Result<Option<usize>, i32>,
    want: Option<usize>,
) -> Result<(), String> {
    match got {
        Ok(None) => Ok(()),
        Ok(Some(n)) => expect_count(what, Ok(n), want),
        Err(e) => expect_count(what, Err(e), want),
    }
}

/// Checks bytes read from BAR0 at `at` against the model (where it knows them), and the
/// aperture's bytes for foreign markers and canaries.
fn check_bar0(m: &GuestModel, marker: u8, at: u64, data: &[u8]) -> Result<(), String> {
    for (i, &b) in data.iter().enumerate() {
        let a = at + i as u64;
        if (APERTURE..APERTURE + APERTURE_SIZE).contains(&a) {
            if let Some(e) = foreign_byte(&[b], marker, a) {
                return Err(format!("aperture: {e}"));
            }
        }
        if let Some(want) = m.bar0_byte(a) {
            if b != want {
                return Err(format!(
                    "BAR0 byte {a:#x} reads {b:#04x}, expected {want:#04x}"
                ));
            }
        }
    }
    Ok(())
}

/// PMCSR reads back the power state the model has.
fn check_power(guest: &mut Guest, via: Via) -> Result<(), String> {
    let back = read(guest, CONFIG_REGION_INDEX, PMCSR, 2, via)?
        .map_err(|e| format!("PMCSR read refused with errno {e}"))?;
    let state = u16::from_le_bytes([back[0], back[1]]) & 3;
    let want = if guest.model.powered_off { 3 } else { 0 };
    if state != want {
        return Err(format!("PMCSR power state {state}, expected {want}"));
    }
    Ok(())
}

/// Runs `access` on `guest` and checks what comes back.
pub fn run(guest: &mut Guest, access: &Access) -> Result<(), String> {
    let marker = guest.marker;
    if !access.through_connection() {
        guest.sync()?;
    }
    match access {
        Access::Bar0Read { at, len, via } => {
            let got = read(guest, 0, *at, *len, *via)?;
            expect_count(
                "BAR0 read",
                got.as_ref().map(Vec::len).map_err(|&e| e),
                served(*at, *len, BAR0_SIZE, *via),
            )?;
            if let Ok(data) = got {
                check_bar0(&guest.model, marker, *at, &data)?;
            }
        }
        Access::Bar0Write { at, data, via } => {
            let got = write(guest, 0, *at, data, *via)?;
            let want = served(*at, data.len(), BAR0_SIZE, *via);
            expect_written("BAR0 write", got, want)?;
            if let Some(n) = want {
                guest.model.write_bar0(*at, &data[..n]);
            }
        }
        Access::VramRead { at, len, via } => {
            let bar = guest.vram_bar;
            let got = read(guest, bar, *at, *len, *via)?;
            let want = served(*at, *len, guest.presented, *via);
            expect_count(
                "VRAM BAR read",
                got.as_ref().map(Vec::len).map_err(|&e| e),
                want,
            )?;
            if let Ok(data) = got {
                if let Some(e) = foreign_byte(&data, marker, *at) {
                    return Err(format!("VRAM BAR: {e}"));
                }
                for (i, &b) in data.iter().enumerate() {
                    let o = at + i as u64;
                    let e = guest.model.vram_bar_byte(o);
                    if b != e {
                        return Err(format!(
                            "VRAM BAR byte {o:#x} reads {b:#04x}, expected {e:#04x}"
                        ));
                    }
                }
            }
        }
        Access::VramWrite { at, data, via } => {
            let bar = guest.vram_bar;
            let got = write(guest, bar, *at, data, *via)?;
            let want = served(*at, data.len(), guest.presented, *via);
            expect_written("VRAM BAR write", got, want)?;
            if let Some(n) = want {
                guest.model.write_vram_bar(*at, &data[..n]);
            }
        }
        Access::MappedRead { at, len } => {
            let mut buf = vec![0u8; *len];
            guest.mapping.read(*at, &mut buf);
            if let Some(e) = foreign_byte(&buf, marker, *at) {
                return Err(format!("mapped VRAM BAR: {e}"));
            }
            if guest.model.live {
                let want = &guest.model.vram[*at as usize..*at as usize + len];
                if let Some(i) = buf.iter().zip(want).position(|(a, b)| a != b) {
                    return Err(format!(
                        "mapped VRAM BAR byte {:#x} reads {:#04x}, expected {:#04x}",
                        at + i as u64,
                        buf[i],
                        want[i]
                    ));
                }
            }
        }
        Access::MappedWrite { at, data } => {
            guest.mapping.write(*at, data);
            guest.model.write_mapped(*at, data);
        }
        Access::WriteMulti { writes, posted } => {
            let entries: Vec<(u32, u64, &[u8])> = writes
                .iter()
                .map(|(r, o, d)| (*r, *o, d.as_slice()))
                .collect();
            match guest.client()?.region_write_multi(&entries, *posted) {
                Ok(Some(n)) if n != writes.len() as u64 => {
                    return Err(format!("WRITE_MULTI of {} took {n}", writes.len()))
                }
                Ok(_) => {}
                Err(e) => return Err(format!("WRITE_MULTI failed: {e}")),
            }
            for (region, o, d) in writes {
                if *region == 0 {
                    guest.model.write_bar0(*o, d);
                } else {
                    guest.model.write_vram_bar(*o, d);
                }
            }
        }
        Access::DmaMap(req) => {
            let want = guest.dma.map(req);
            let fd = guest.dma.memfd().try_clone().map_err(|e| e.to_string())?;
            let got = guest.client()?.dma_map(
                req.flags,
                req.offset,
                req.iova,
                req.size,
                req.with_fd.then(|| std::os::fd::AsFd::as_fd(&fd)),
            );
            let got = match got {
                Ok(()) => Ok(()),
                Err(e) => Err(socket_errno(e)?),
            };
            if got != want {
                return Err(format!("DMA_MAP {req:x?}: got {got:?}, expected {want:?}"));
            }
        }
        Access::DmaUnmap(req) => {
            let want = guest.dma.unmap(req);
            let got = match guest.client()?.dma_unmap(req.flags, req.iova, req.size) {
                Ok(_) => Ok(()),
                Err(e) => Err(socket_errno(e)?),
            };
            if got != want {
                return Err(format!(
                    "DMA_UNMAP {req:x?}: got {got:?}, expected {want:?}"
                ));
            }
        }
        Access::Power { value, via } => {
            if let Err(e) = write(
                guest,
                CONFIG_REGION_INDEX,
                PMCSR,
                &value.to_le_bytes(),
                *via,
            )? {
                return Err(format!("PMCSR write refused with errno {e}"));
            }
            guest.model.write_pmcsr(*value);
            check_power(guest, *via)?;
        }
        Access::Config { at, data, via } => {
            let got = write(guest, CONFIG_REGION_INDEX, *at, data, *via)?;
            let inside = at + data.len() as u64 <= CONFIG_SPACE_SIZE as u64;
            expect_written("config write", got, inside.then_some(data.len()))?;
            if let Some(&byte) = data
                .get(PMCSR.wrapping_sub(*at) as usize)
                .filter(|_| inside)
            {
                guest.model.write_pmcsr(u16::from(byte));
            }
            check_power(guest, *via)?;
        }
        Access::Reset { via } => {
            match via {
                Via::Direct => guest
                    .function()
                    .reset()
                    .map_err(|e| format!("reset: {e}"))?,
                _ => guest
                    .client()?
                    .reset()
                    .map_err(|e| format!("DEVICE_RESET: {e}"))?,
            }
            guest.model.reset();
        }
        Access::Reconnect => guest.reconnect()?,
    }
    if access.posted() {
        guest.posted();
    }
    Ok(())
}
