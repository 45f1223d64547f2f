//! The emulated GSP-RM: answers each command with the messages it causes.
//!
//! Boot: GSP_SET_SYSTEM_INFO and SET_REGISTRY (both queued before the GSP starts, neither
//! answered) must both arrive and be valid; then the firmware posts a UCODE_LIBOS_PRINT
//! banner and GSP_INIT_DONE. Before that, any other command is answered with
//! NV_ERR_NOT_READY. After it: NOP (payload echoed), GET_GSP_STATIC_INFO, GSP_RM_ALLOC,
//! FREE and GSP_RM_CONTROL; anything else gets NV_ERR_NOT_SUPPORTED.

use super::fb::{fb_regions, FbRegion};
use super::objects::{Object, Objects, INTERNAL_CLIENT, INTERNAL_DEVICE, INTERNAL_SUBDEVICE};
use super::rm::{self, class, control, event, function, status, RegistryEntry, SystemInfo};
use super::wire::WireMessage;
use crate::chip::PciIdentity;
use crate::profile::ChipProfile;

/// A message the firmware wants posted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outgoing {
    /// The message.
    pub msg: WireMessage,
    /// Whether it answers a command (subject to "drop reply" faults) or is an event.
    pub is_reply: bool,
}

impl Outgoing {
    fn reply(cmd: &WireMessage, status: u32, payload: Vec<u8>) -> Outgoing {
        Outgoing {
            msg: WireMessage::from_gsp(cmd.function, status, cmd.sequence, payload),
            is_reply: true,
        }
    }

    /// An unsolicited event.
    pub(crate) fn event(function: u32, payload: Vec<u8>) -> Outgoing {
        Outgoing {
            msg: WireMessage::from_gsp(function, status::OK, 0, payload),
            is_reply: false,
        }
    }
}

/// A snapshot of the firmware's state, for tests and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareState {
    /// GSP_INIT_DONE has been posted.
    pub init_done: bool,
    /// Why boot failed, if it did.
    pub boot_error: Option<String>,
    /// The system info received.
    pub system_info: Option<SystemInfo>,
    /// The registry received.
    pub registry: Vec<RegistryEntry>,
    /// Every RM object.
    pub objects: Vec<Object>,
    /// Usable VRAM not held by memory objects.
    pub free_vram: u64,
}

/// The firmware of one GSP boot.
#[derive(Debug)]
pub(crate) struct Firmware {
    pci: PciIdentity,
    fb_size: u64,
    regions: Vec<FbRegion>,
    profile_name: &'static str,
    system_info: Option<SystemInfo>,
    registry: Option<Vec<RegistryEntry>>,
    init_done: bool,
    boot_error: Option<String>,
    objects: Objects,
}

impl Firmware {
    pub(crate) fn new(profile: &'static ChipProfile) -> Firmware {
        let regions = fb_regions(profile);
        // The physical framebuffer ends where the last region (the firmware carve-out) ends.
        let fb_size = regions.last().map_or(profile.vram_size(), |r| r.limit + 1);
        Firmware {
            pci: *profile.pci(),
            fb_size,
            objects: Objects::new(&regions),
            regions,
            profile_name: profile.name(),
            system_info: None,
            registry: None,
            init_done: false,
            boot_error: None,
        }
    }

    pub(crate) fn state(&self) -> FirmwareState {
        FirmwareState {
            init_done: self.init_done,
            boot_error: self.boot_error.clone(),
            system_info: self.system_info,
            registry: self.registry.clone().unwrap_or_default(),
            objects: self.objects.list(),
            free_vram: self.objects.free_vram(),
        }
    }

    /// Handles one command; returns what to post, in order.
    pub(crate) fn handle(&mut self, cmd: &WireMessage) -> Vec<Outgoing> {
        match cmd.function {
            function::GSP_SET_SYSTEM_INFO => self.set_system_info(cmd),
            function::SET_REGISTRY => self.set_registry(cmd),
            _ if !self.init_done => vec![Outgoing::reply(cmd, status::NOT_READY, Vec::new())],
            function::NOP => vec![Outgoing::reply(cmd, status::OK, cmd.payload.clone())],
            function::GET_GSP_STATIC_INFO => {
                let handles = [INTERNAL_CLIENT, INTERNAL_DEVICE, INTERNAL_SUBDEVICE];
                let info = rm::encode_static_info(self.fb_size, handles, &self.regions);
                vec![Outgoing::reply(cmd, status::OK, info)]
            }
            function::GSP_RM_ALLOC => {
                let mut payload = cmd.payload.clone();
                let st = self.alloc(&mut payload);
                vec![Outgoing::reply(cmd, st, payload)]
            }
            function::FREE => {
                let st = match rm::parse_free(&cmd.payload) {
                    Ok((c, p, o)) => result(self.objects.free(c, p, o)),
                    Err(_) => status::INVALID_ARGUMENT,
                };
                vec![Outgoing::reply(cmd, st, cmd.payload.clone())]
            }
            function::GSP_RM_CONTROL => {
                let st = self.control(&cmd.payload);
                vec![Outgoing::reply(cmd, st, cmd.payload.clone())]
            }
            _ => vec![Outgoing::reply(cmd, status::NOT_SUPPORTED, Vec::new())],
        }
    }

    fn set_system_info(&mut self, cmd: &WireMessage) -> Vec<Outgoing> {
        match SystemInfo::parse(&cmd.payload) {
            Ok(info)
                if info.vendor_id == self.pci.vendor_id && info.device_id == self.pci.device_id =>
            {
                self.system_info = Some(info);
            }
            Ok(info) => {
                self.boot_error = Some(format!(
                    "system info names PCI {:04x}:{:04x}, this GPU is {:04x}:{:04x}",
                    info.vendor_id, info.device_id, self.pci.vendor_id, self.pci.device_id
                ));
            }
            Err(e) => self.boot_error = Some(format!("GSP_SET_SYSTEM_INFO: {e}")),
        }
        self.maybe_init_done()
    }

    fn set_registry(&mut self, cmd: &WireMessage) -> Vec<Outgoing> {
        match rm::parse_registry(&cmd.payload) {
            Ok(entries) => self.registry = Some(entries),
            Err(e) => self.boot_error = Some(format!("SET_REGISTRY: {e}")),
        }
        self.maybe_init_done()
    }

    fn maybe_init_done(&mut self) -> Vec<Outgoing> {
        if self.init_done
            || self.boot_error.is_some()
            || self.system_info.is_none()
            || self.registry.is_none()
        {
            return Vec::new();
        }
        self.init_done = true;
        let banner = format!("GSP-RM (emulated, {}) initialised\0", self.profile_name);
        vec![
            Outgoing::event(event::UCODE_LIBOS_PRINT, banner.into_bytes()),
            Outgoing::event(event::GSP_INIT_DONE, Vec::new()),
        ]
    }

    fn alloc(&mut self, payload: &mut [u8]) -> u32 {
        let Ok(req) = rm::AllocRequest::parse(payload) else {
            return status::INVALID_ARGUMENT;
        };
        let params = &mut payload[rm::AllocRequest::HEAD..][..req.params_size as usize];
        match req.class {
            class::NV01_MEMORY_LOCAL_USER => {
                let Ok((size, align)) = rm::parse_memory_params(params) else {
                    return status::INVALID_ARGUMENT;
                };
                match self
                    .objects
                    .alloc_memory(req.client, req.parent, req.object, size, align)
                {
                    Ok((addr, size)) => {
                        rm::set_memory_outputs(params, addr, size);
                        status::OK
                    }
                    Err(st) => st,
                }
            }
            class::FERMI_VASPACE_A => {
                let Ok((base, size, big)) = rm::parse_vaspace_params(params) else {
                    return status::INVALID_ARGUMENT;
                };
                result(
                    self.objects
                        .alloc_vaspace(req.client, req.parent, req.object, base, size, big),
                )
            }
            _ => status::NOT_SUPPORTED,
        }
    }

    fn control(&mut self, payload: &[u8]) -> u32 {
        let Ok((client, object, cmd, params)) = rm::parse_control(payload) else {
            return status::INVALID_ARGUMENT;
        };
        match cmd {
            control::VASPACE_BIND_PAGE_DIRECTORY => match rm::parse_bind_params(params) {
                Ok((pdb, aperture)) => result(
                    self.objects
                        .bind_page_directory(client, object, pdb, aperture),
                ),
                Err(_) => status::INVALID_ARGUMENT,
            },
            _ => status::NOT_SUPPORTED,
        }
    }
}

fn result(r: Result<(), u32>) -> u32 {
    match r {
        Ok(()) => status::OK,
        Err(st) => st,
    }
}
