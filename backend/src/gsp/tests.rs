//! Tests of the host side against the emulated GSP: queue behaviour at the edges (wrap,
//! full, 16-slot elements, corruption, timeouts), random interleavings of both sides, the
//! boot from cold on every profile through the falcon registers (also with the queues in
//! memory a guest lent the GPU), boot failures, and stopping the GSP before its memory is
//! freed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_emulation::gsp::wire::WireMessage;
use gpu_emulation::gsp::{self as emulated_gsp, Corruption, GspQueues};
use gpu_emulation::ChipProfile;
use proptest::prelude::*;

use super::boot::boot_on;
use super::client::{ClientError, GspTimeouts};
use super::cmdq::{Cmdq, CmdqError, Resync};
use super::element::{ElementError, Outgoing, MAX_PAYLOAD};
use super::falcon::{self, FalconStatus};
use super::libos::{LibosArgs, MessageQueueInitArgs, LIBOS_BUFFER_SIZE};
use super::queue::SLOT_COUNT;
use super::rpc::{FbRegionKind, Function, NvStatus};
use super::session::SessionError;
use super::shmem::{GspMem, SHARED_SIZE};
use super::*;
use crate::host_driver::addr::{GpuVa, VramAddr};
use crate::host_driver::test_support::StuckRegister;
use crate::host_gpu::dma::test_memory::{GuestView, VecGuestMemory};
use crate::host_gpu::dma::DmaBuffer;
use crate::host_gpu::emulated::EmulatedHostGpu;
use crate::host_gpu::guest_dma::GuestDmaMemory;
use crate::host_gpu::HostGpu;

const GIB: u64 = 1 << 30;

fn host(profile: &str) -> EmulatedHostGpu {
    EmulatedHostGpu::by_name(profile).unwrap()
}

/// Timeouts for calls expected to succeed: generous, for loaded test machines.
fn patient() -> GspTimeouts {
    GspTimeouts {
        send: Duration::from_secs(10),
        reply: Duration::from_secs(10),
        msgq_ready: Duration::from_secs(10),
        init_done: Duration::from_secs(10),
    }
}

/// Short send/reply timeouts so expected failures finish quickly.
fn quick() -> GspTimeouts {
    GspTimeouts {
        send: Duration::from_millis(200),
        reply: Duration::from_millis(300),
        ..patient()
    }
}

/// The host's queues and a hand-stepped GSP endpoint on the same block (no GSP thread).
fn manual(host: &EmulatedHostGpu) -> (Cmdq<'_>, GspQueues) {
    let mem = GspMem::allocate(host).unwrap();
    let args = mem.init_args().unwrap();
    let gsp = host
        .emulated()
        .gsp()
        .manual_endpoint(&emulated_gsp::MessageQueueInitArgs {
            shared_mem_phys_addr: args.shared_mem_phys_addr,
            page_table_entry_count: args.page_table_entry_count,
            cmd_queue_offset: args.cmd_queue_offset,
            stat_queue_offset: args.stat_queue_offset,
        })
        .unwrap();
    (Cmdq::new(host, mem), gsp)
}

/// A payload identifying message `i`.
fn payload(i: u32, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len)
        .map(|j| (j as u32).wrapping_mul(31).wrapping_add(i) as u8)
        .collect();
    let tag = i.to_le_bytes();
    let n = len.min(4);
    p[..n].copy_from_slice(&tag[..n]);
    p
}

fn nop(sequence: u32, payload: &[u8]) -> Outgoing<'_> {
    Outgoing {
        function: Function::NOP.raw(),
        sequence,
        payload,
    }
}

fn gsp_msg(sequence: u32, payload: Vec<u8>) -> WireMessage {
    WireMessage::from_gsp(Function::OS_ERROR_LOG.raw(), 0, sequence, payload)
}

#[test]
fn messages_wrap_around_the_ring_end_in_both_directions() {
    let h = host("tu102-24g");
    let (mut cmdq, mut gsp) = manual(&h);
    let mut pos = 0u32;
    let mut spanned = 0;
    for i in 0..40u32 {
        // 5 slots each: 63 is not a multiple of 5, so elements straddle the end.
        let p = payload(i, 5 * 4096 - 100);
        if pos + 5 > SLOT_COUNT {
            spanned += 1;
        }
        pos = (pos + 5) % SLOT_COUNT;
        cmdq.try_send(nop(i, &p)).unwrap();
        let got = gsp.receive().unwrap().unwrap();
        assert_eq!((got.sequence, &got.payload), (i, &p));
        assert!(gsp.send(&gsp_msg(i, p.clone()), None).unwrap());
        let back = cmdq.try_receive().unwrap().unwrap();
        assert_eq!((back.rpc.sequence, back.payload), (i, p));
    }
    assert!(spanned >= 3, "{spanned}");
    assert_eq!(cmdq.stats().sequence_gaps, 0);
    assert_eq!(gsp.stats().sequence_gaps, 0);
}

#[test]
fn multi_slot_messages_up_to_16_slots_round_trip() {
    let h = host("gh100-80g");
    let mut s = boot(&h, patient()).unwrap();
    for slots in 1..=16usize {
        for len in [slots * 4096 - 80, (slots - 1) * 4096 + 1] {
            let p = payload(slots as u32, len.min(MAX_PAYLOAD));
            let r = s.client_mut().call(Function::NOP, &p).unwrap();
            assert_eq!(r.payload, p, "{slots} slots, {len} bytes");
        }
    }
    let err = s
        .client_mut()
        .call(Function::NOP, &vec![0; MAX_PAYLOAD + 1])
        .unwrap_err();
    assert!(matches!(
        err,
        ClientError::Queue(CmdqError::Encode(ElementError::TooLarge(_)))
    ));
}

#[test]
fn a_full_queue_blocks_times_out_then_succeeds_once_the_gsp_drains() {
    let h = host("ga100-80g");
    let mut s = boot(&h, patient()).unwrap();
    let gsp = h.emulated().gsp();
    gsp.faults().stall();
    let cmdq = s.client_mut().cmdq_mut();
    let mut sent = 0;
    loop {
        match cmdq.try_send(nop(1000 + sent, &[])) {
            Ok(()) => sent += 1,
            Err(CmdqError::Full { needed: 1, free: 0 }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(sent, 62);
    let t = Instant::now();
    let err = cmdq
        .send(nop(2000, &[]), Duration::from_millis(50))
        .unwrap_err();
    assert!(
        matches!(
            err,
            CmdqError::SendTimeout {
                needed: 1,
                free: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(t.elapsed() >= Duration::from_millis(50));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(30));
            gsp.faults().resume();
        });
        cmdq.send(nop(2001, &[]), Duration::from_secs(5)).unwrap();
    });
    assert!(cmdq.stats().sends_waited >= 2);
    // Every command is answered, in order (the last reply waits for room in the
    // message queue until the ones before are taken).
    for i in (0..62).map(|k| 1000 + k).chain([2001]) {
        assert_eq!(
            cmdq.receive(Duration::from_secs(5)).unwrap().rpc.sequence,
            i
        );
    }
}

#[test]
fn a_corrupt_checksum_is_skipped_reported_and_the_next_message_is_fine() {
    let h = host("gb202-32g");
    let mut s = boot(&h, patient()).unwrap();
    s.client_mut().set_timeouts(quick());
    let gsp = h.emulated().gsp();
    gsp.faults().corrupt_next_message(Corruption::Checksum);
    gsp.post_event(Function::OS_ERROR_LOG.raw(), vec![1; 100]);
    gsp.post_event(Function::UCODE_LIBOS_PRINT.raw(), b"next".to_vec());
    let cmdq = s.client_mut().cmdq_mut();
    let err = cmdq.receive(Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(
            err,
            CmdqError::Corrupt {
                error: ElementError::Checksum(_),
                resync: Resync::SkippedElement { slots: 1 }
            }
        ),
        "{err}"
    );
    let next = cmdq.receive(Duration::from_secs(5)).unwrap();
    assert_eq!(
        (next.rpc.function, next.payload),
        (0x100C, b"next".to_vec())
    );
    assert_eq!(cmdq.stats().corrupt, 1);

    // Through the client: the corrupted reply is dropped, the call times out, the next
    // call is fine.
    gsp.faults().corrupt_next_message(Corruption::Checksum);
    let err = s.client_mut().call(Function::NOP, &[1]).unwrap_err();
    assert!(matches!(err, ClientError::ReplyTimeout { .. }), "{err}");
    assert_eq!(s.client().stats().corrupt_messages, 1);
    s.client_mut().set_timeouts(patient());
    assert_eq!(
        s.client_mut().call(Function::NOP, &[2]).unwrap().payload,
        [2]
    );
}

#[test]
fn impossible_lengths_resynchronise_the_queue() {
    let h = host("tu102-24g");
    let (mut cmdq, mut gsp) = manual(&h);
    // A length no element can have, with a sane elemCount: the element is skipped.
    gsp.send(&gsp_msg(1, vec![7; 5000]), Some(Corruption::Length))
        .unwrap();
    gsp.send(&gsp_msg(2, vec![8; 10]), None).unwrap();
    let err = cmdq.try_receive().unwrap_err();
    assert!(
        matches!(
            err,
            CmdqError::Corrupt {
                error: ElementError::ImpossibleLength { elem_count: 2, .. },
                resync: Resync::SkippedElement { slots: 2 }
            }
        ),
        "{err}"
    );
    assert_eq!(cmdq.try_receive().unwrap().unwrap().rpc.sequence, 2);
    // elemCount 0: nothing tells where the element ends; jump to the writer's pointer,
    // dropping what was published behind it.
    gsp.send(&gsp_msg(3, vec![]), Some(Corruption::ElemCount))
        .unwrap();
    gsp.send(&gsp_msg(4, vec![]), None).unwrap();
    let err = cmdq.try_receive().unwrap_err();
    assert!(
        matches!(
            err,
            CmdqError::Corrupt {
                resync: Resync::JumpedToWriter { slots: 2 },
                ..
            }
        ),
        "{err}"
    );
    assert!(cmdq.try_receive().unwrap().is_none());
    gsp.send(&gsp_msg(5, vec![5]), None).unwrap();
    let ok = cmdq.try_receive().unwrap().unwrap();
    assert_eq!((ok.rpc.sequence, ok.payload), (5, vec![5]));
    let stats = cmdq.stats();
    assert_eq!(
        (stats.corrupt, stats.jumped_to_writer, stats.received),
        (2, 1, 2)
    );
    // After a resync the next seqNum is accepted without a gap being counted.
    assert_eq!(stats.sequence_gaps, 0);
}

#[test]
fn a_stalled_gsp_times_out_and_its_late_reply_is_skipped() {
    let h = host("gh200-96g");
    let mut s = boot(&h, patient()).unwrap();
    s.client_mut().set_timeouts(quick());
    h.emulated().gsp().faults().stall();
    let t = Instant::now();
    let err = s.client_mut().call(Function::NOP, &[1]).unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::ReplyTimeout {
                function: Function::NOP,
                ..
            }
        ),
        "{err}"
    );
    assert!(t.elapsed() >= quick().reply);
    s.client_mut().set_timeouts(patient());
    h.emulated().gsp().faults().resume();
    assert_eq!(
        s.client_mut().call(Function::NOP, &[2]).unwrap().payload,
        [2]
    );
    assert_eq!(s.client().stats().stale_replies, 1);
}

#[test]
fn a_dropped_reply_times_out_and_the_next_call_works() {
    let h = host("tu102-24g");
    let mut s = boot(&h, patient()).unwrap();
    s.client_mut().set_timeouts(quick());
    h.emulated().gsp().faults().drop_next_replies(1);
    let err = s.client_mut().call(Function::NOP, &[]).unwrap_err();
    assert!(matches!(err, ClientError::ReplyTimeout { .. }), "{err}");
    s.client_mut().set_timeouts(patient());
    s.client_mut().call(Function::NOP, &[]).unwrap();
    assert_eq!(h.emulated().gsp().stats().replies_dropped, 1);
}

#[test]
fn unknown_events_are_logged_and_skipped() {
    let h = host("gh100-80g");
    // Before INIT_DONE (nova would abort the boot here) and after it.
    h.emulated().gsp().faults().send_unknown_event(0x10FF);
    let mut s = boot(&h, patient()).unwrap();
    h.emulated().gsp().post_event(0x1FFF, vec![1, 2, 3]);
    s.client_mut().call(Function::NOP, &[]).unwrap();
    assert_eq!(s.client().stats().unknown_events, 2);
    let names: Vec<_> = s.boot_trace().events.iter().map(|e| e.function).collect();
    assert_eq!(
        names,
        [Function::UCODE_LIBOS_PRINT, Function::GSP_INIT_DONE]
    );
    // Known events are kept for the caller.
    h.emulated()
        .gsp()
        .post_event(Function::RC_TRIGGERED.raw(), vec![9]);
    let e = s
        .client_mut()
        .wait_event(Function::RC_TRIGGERED, Duration::from_secs(5))
        .unwrap();
    assert_eq!(e.payload, [9]);
}

#[test]
fn the_whole_boot_from_cold_on_every_profile() {
    for profile in ChipProfile::all() {
        let h = host(profile.name());
        let mut s = boot(&h, patient()).unwrap_or_else(|e| panic!("{profile}: {e}"));
        let info = s.static_info().clone();
        assert_eq!(info.usable_bytes(), profile.usable_vram_size(), "{profile}");
        // The physical framebuffer holds the modelled VRAM plus the firmware carve-out above it.
        assert_eq!(
            info.fb_size,
            profile.vram_size() + gpu_emulation::gsp::fb::FIRMWARE_RESERVED
        );
        let usable: Vec<_> = info.usable_regions().collect();
        assert_eq!(usable.len(), 1);
        assert_eq!(usable[0].start, VramAddr::ZERO);
        let board = info
            .fb_regions
            .iter()
            .filter(|r| r.kind == FbRegionKind::BoardReserved);
        assert_eq!(
            board.map(|r| r.size()).sum::<u64>(),
            profile.reserved_vram_size()
        );
        let fw = info.fb_regions.last().unwrap();
        assert!(
            fw.kind == FbRegionKind::Firmware && fw.protected,
            "{profile}"
        );
        assert_eq!(fw.start.raw(), profile.vram_size());

        // Objects: memory, an address space bound to a page directory, errors.
        let mem = s.alloc_memory(3 << 20, 2 << 20).unwrap();
        assert!(mem.addr.is_aligned(2 << 20));
        assert_eq!(mem.size, 3 << 20);
        assert!(mem.addr.raw() + mem.size <= profile.usable_vram_size());
        let pd = s.alloc_memory(4096, 0).unwrap();
        let vas = s
            .create_address_space(GpuVa::new(0), 1 << 47, 0x1_0000)
            .unwrap();
        s.bind_page_directory(vas, pd.addr).unwrap();
        let rpc_status = |e: SessionError| match e {
            SessionError::Rpc(ClientError::Rpc { status, .. }) => status,
            other => panic!("{other}"),
        };
        let bad = s.bind_page_directory(mem.handle, pd.addr).unwrap_err();
        assert_eq!(rpc_status(bad), NvStatus::NV_ERR_INVALID_OBJECT_HANDLE);
        let bad = s
            .bind_page_directory(vas, VramAddr::new(pd.addr.raw() + 8))
            .unwrap_err();
        assert_eq!(rpc_status(bad), NvStatus::NV_ERR_INVALID_ARGUMENT);
        s.free(mem.handle).unwrap();
        assert_eq!(
            rpc_status(s.free(mem.handle).unwrap_err()),
            NvStatus::NV_ERR_OBJECT_NOT_FOUND
        );
        assert_eq!(
            rpc_status(s.free(info.handles.subdevice).unwrap_err()),
            NvStatus::NV_ERR_INVALID_OBJECT_HANDLE
        );
        let too_big = s.alloc_memory(profile.vram_size(), 0).unwrap_err();
        assert_eq!(rpc_status(too_big), NvStatus::NV_ERR_NO_MEMORY);
        let state = h.emulated().gsp().state().unwrap();
        // Client, device, subdevice, the page directory and the address space.
        assert_eq!(state.objects.len(), 5, "{profile}");
        assert_eq!(state.registry.len(), 3);
        assert_eq!(s.client().stats().corrupt_messages, 0);
    }
}

#[test]
fn boot_and_report_shows_fb_regions_in_table_and_json() {
    let h = host("gh200-96g");
    let report = boot_and_report(&h).unwrap();
    assert_eq!(report.chip, "gh200-96g");
    assert_eq!(report.rpc_numbering, "r570");
    assert_eq!(report.usable_vram, 95 * GIB);
    assert_eq!(report.fb_regions.len(), 3);
    assert_eq!(report.reserved, GIB + (256 << 20));
    assert_eq!(report.boot_events, ["UCODE_LIBOS_PRINT", "GSP_INIT_DONE"]);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["usable_vram"], 95 * GIB);
    assert_eq!(json["fb_regions"][1]["kind"], "board_reserved");
    assert_eq!(json["fb_regions"][1]["start"], 95 * GIB);
    assert_eq!(json["fb_regions"][2]["kind"], "firmware");
    let table = report.to_string();
    assert!(table.contains("usable VRAM 95 GiB"), "{table}");
    assert!(table.contains("board-reserved"), "{table}");
    // The GSP was stopped and its memory freed; booting again starts it afresh.
    assert!(!h.emulated().gsp().is_running());
    assert_eq!(h.emulated().dma().mapping_count(), 0);
    assert_eq!(boot_and_report(&h).unwrap(), report);
}

#[test]
fn boot_goes_through_the_falcon_registers_and_drop_stops_the_gsp() {
    let h = host("tu102-24g");
    let halted = FalconStatus {
        halted: true,
        mailbox0: 0,
    };
    assert_eq!(falcon::status(&h).unwrap(), halted);
    let s = boot(&h, patient()).unwrap();
    assert_eq!(
        falcon::status(&h).unwrap(),
        FalconStatus {
            halted: false,
            mailbox0: 0
        }
    );
    // The block and the LibOS arguments.
    assert_eq!(h.emulated().dma().mapping_count(), 2);
    drop(s);
    assert!(!h.emulated().gsp().is_running());
    assert_eq!(falcon::status(&h).unwrap(), halted);
    assert_eq!(h.emulated().dma().mapping_count(), 0, "buffers freed");
    // A boot while a session of someone else still runs resets the GSP first.
    let s1 = boot(&h, patient()).unwrap();
    let mut s2 = boot(&h, patient()).unwrap();
    s2.client_mut().call(Function::NOP, &[1]).unwrap();
    drop(s2);
    drop(s1);
}

#[test]
fn a_gsp_refusing_its_arguments_is_reported_halted_with_its_code() {
    let h = host("gh100-80g");
    let mem = GspMem::allocate(&h).unwrap();
    let mut queues = mem.init_args().unwrap();
    queues.stat_queue_offset = SHARED_SIZE; // no room for the message queue
    let libos = LibosArgs::allocate(&h, queues).unwrap();
    let timeouts = GspTimeouts {
        msgq_ready: Duration::from_millis(100),
        ..patient()
    };
    let err = boot_on(&h, mem, libos, timeouts).unwrap_err();
    match &err {
        BootError::NoAnswer { status, .. } => {
            assert!(status.halted);
            assert_eq!(status.mailbox0, emulated_gsp::START_QUEUES_REFUSED);
        }
        other => panic!("{other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("halted") && text.contains("0x47530005"),
        "{text}"
    );
    let errors = h.emulated().gsp().stats().errors;
    assert!(
        errors.last().unwrap().contains("status queue"),
        "{errors:?}"
    );
    // The failed boot freed its buffers.
    assert_eq!(h.emulated().dma().mapping_count(), 0);
}

#[test]
fn buffers_of_a_gsp_that_does_not_halt_are_leaked_not_freed() {
    // CPUCTL.HALTED (bit 4) never comes once the fault is on.
    let cpuctl =
        <crate::host_driver::regs::GspCpuCtl as crate::host_driver::regs::Register32>::OFFSET;
    let h = StuckRegister::stuck_off_later("ga100-80g", cpuctl, 0x10);
    let s = boot(&h, patient()).unwrap();
    h.set_stuck(true);
    let t = Instant::now();
    drop(s);
    assert!(t.elapsed() >= falcon::HALT_TIMEOUT);
    // Still mapped in the GPU's IOMMU: never returned to the allocator.
    assert_eq!(h.inner().emulated().dma().mapping_count(), 2);
    // And a new boot cannot reset the GSP either.
    assert!(matches!(
        boot(&h, patient()),
        Err(BootError::Falcon(falcon::FalconError::HaltTimeout(_)))
    ));
    assert_eq!(
        h.inner().emulated().dma().mapping_count(),
        2,
        "unused buffers freed"
    );
}

/// Where the guest lends its memory to the GPU in the guest-DMA test.
const GUEST_IOVA: u64 = 0x1_2340_0000;

/// Lends `h` one writable guest map at [`GUEST_IOVA`] big enough for the queue block and the
/// LibOS arguments (`readable`: whether the GPU may read it); returns the memory and a way
/// to view a range of it as a DMA buffer.
fn lend_guest_memory(
    h: &EmulatedHostGpu,
    readable: bool,
) -> (Arc<VecGuestMemory>, impl Fn(u64, u64) -> Arc<dyn DmaBuffer>) {
    let len = SHARED_SIZE + LIBOS_BUFFER_SIZE;
    let guest = Arc::new(VecGuestMemory::new(len, readable, true));
    h.map_guest_dma(GUEST_IOVA, guest.clone()).unwrap();
    let memory = Arc::clone(&guest);
    let view = move |offset, len| -> Arc<dyn DmaBuffer> {
        Arc::new(GuestView {
            memory: Arc::clone(&memory),
            iova: GUEST_IOVA,
            offset,
            len,
        })
    };
    (guest, view)
}

#[test]
fn a_gsp_boots_on_queues_in_memory_a_guest_lent_the_gpu() {
    let h = host("gb202-32g");
    // One guest map holding the block, then the LibOS arguments.
    let (guest, view) = lend_guest_memory(&h, true);
    let mem = GspMem::new(view(0, SHARED_SIZE)).unwrap();
    let queues: MessageQueueInitArgs = mem.init_args().unwrap();
    assert_eq!(queues.shared_mem_phys_addr, GUEST_IOVA);
    let libos = LibosArgs::new(view(SHARED_SIZE, LIBOS_BUFFER_SIZE), queues).unwrap();
    let mut s = boot_on(&h, mem, libos, patient()).unwrap();
    assert_eq!(
        s.static_info().usable_bytes(),
        h.identity().usable_vram_size
    );
    assert_eq!(
        s.client_mut()
            .call(Function::NOP, &[4, 5, 6])
            .unwrap()
            .payload,
        [4, 5, 6]
    );
    // The GSP wrote its message queue header into guest memory (msgCount 63 at +0xC),
    // and no host DMA buffer exists.
    let mut word = [0u8; 4];
    guest.read(0x41000 + 0xC, &mut word).unwrap();
    assert_eq!(u32::from_le_bytes(word), 63);
    assert_eq!(h.emulated().dma().mapping_count(), 1);
    drop(s);
    assert!(!h.emulated().gsp().is_running());
    h.unmap_guest_dma(GUEST_IOVA);
    assert_eq!(h.emulated().dma().mapping_count(), 0);
}

#[test]
fn a_gsp_cannot_read_boot_arguments_the_guest_made_write_only() {
    let h = host("tu102-24g");
    let (_guest, view) = lend_guest_memory(&h, false);
    let mem = GspMem::new(view(0, SHARED_SIZE)).unwrap();
    let libos = LibosArgs::new(
        view(SHARED_SIZE, LIBOS_BUFFER_SIZE),
        mem.init_args().unwrap(),
    )
    .unwrap();
    let timeouts = GspTimeouts {
        msgq_ready: Duration::from_millis(100),
        ..patient()
    };
    match boot_on(&h, mem, libos, timeouts) {
        Err(BootError::NoAnswer { status, .. }) => {
            assert_eq!(status.mailbox0, emulated_gsp::START_ARGS_UNREACHABLE);
        }
        other => panic!("{other:?}"),
    }
    let errors = h.emulated().gsp().stats().errors;
    assert!(
        errors.last().unwrap().contains("device reads"),
        "{errors:?}"
    );
}

#[test]
fn concurrent_pipelined_messages_of_random_sizes_arrive_intact_and_in_order() {
    let h = host("tu102-24g");
    let mut s = boot(&h, patient()).unwrap();
    let cmdq = s.client_mut().cmdq_mut();
    let mut rng = 0x1234_5678u64;
    let mut next_len = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = (rng >> 33) as usize;
        if r % 10 == 0 {
            r % MAX_PAYLOAD
        } else {
            r % 6000
        }
    };
    let total = 400u32;
    let mut in_flight = VecDeque::new();
    let (mut sent, mut done) = (0u32, 0u32);
    let start = Instant::now();
    while done < total {
        assert!(start.elapsed() < Duration::from_secs(30));
        if sent < total && in_flight.len() < 40 {
            let p = payload(sent, next_len());
            match cmdq.try_send(nop(sent, &p)) {
                Ok(()) => {
                    in_flight.push_back(p);
                    sent += 1;
                    continue;
                }
                Err(CmdqError::Full { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        if let Some(reply) = cmdq.try_receive().unwrap() {
            let expect = in_flight.pop_front().unwrap();
            assert_eq!(reply.rpc.sequence, done);
            assert_eq!(reply.payload, expect, "message {done}");
            done += 1;
        } else {
            std::thread::yield_now();
        }
    }
    assert_eq!(cmdq.stats().sequence_gaps, 0);
}

/// One step of either side.
#[derive(Debug, Clone)]
enum Step {
    HostSend(usize),
    GspReceive,
    GspSend(usize),
    HostReceive,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let len = prop_oneof![
        8 => 0usize..4000,
        3 => 4000usize..24_000,
        1 => 24_000usize..=MAX_PAYLOAD,
    ];
    let step = prop_oneof![
        len.clone().prop_map(Step::HostSend),
        Just(Step::GspReceive),
        len.prop_map(Step::GspSend),
        Just(Step::HostReceive),
    ];
    proptest::collection::vec(step, 1..250)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Random interleavings of producer and consumer steps on both queues: every message
    /// arrives exactly once, in order, intact.
    #[test]
    fn random_interleavings_deliver_every_message_once_in_order(steps in steps()) {
        let h = host("tu102-24g");
        let (mut cmdq, mut gsp) = manual(&h);
        let mut to_gsp: VecDeque<(u32, Vec<u8>)> = VecDeque::new();
        let mut to_host: VecDeque<(u32, Vec<u8>)> = VecDeque::new();
        let (mut host_seq, mut gsp_seq) = (0u32, 0u32);
        let gsp_receive = |gsp: &mut GspQueues, to_gsp: &mut VecDeque<(u32, Vec<u8>)>| -> Result<bool, TestCaseError> {
            match gsp.receive().unwrap() {
                Some(m) => {
                    let (seq, p) = to_gsp.pop_front().expect("a message the host sent");
                    prop_assert_eq!(m.sequence, seq);
                    prop_assert_eq!(m.payload, p);
                    Ok(true)
                }
                None => {
                    prop_assert!(to_gsp.is_empty());
                    Ok(false)
                }
            }
        };
        let host_receive = |cmdq: &mut Cmdq<'_>, to_host: &mut VecDeque<(u32, Vec<u8>)>| -> Result<bool, TestCaseError> {
            match cmdq.try_receive().unwrap() {
                Some(e) => {
                    let (seq, p) = to_host.pop_front().expect("a message the GSP sent");
                    prop_assert_eq!(e.rpc.sequence, seq);
                    prop_assert_eq!(e.payload, p);
                    Ok(true)
                }
                None => {
                    prop_assert!(to_host.is_empty());
                    Ok(false)
                }
            }
        };
        for step in steps {
            match step {
                Step::HostSend(len) => {
                    let p = payload(host_seq, len);
                    match cmdq.try_send(nop(host_seq, &p)) {
                        Ok(()) => {
                            to_gsp.push_back((host_seq, p));
                            host_seq += 1;
                        }
                        Err(CmdqError::Full { needed, free }) => prop_assert!(needed > free),
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Step::GspReceive => {
                    gsp_receive(&mut gsp, &mut to_gsp)?;
                }
                Step::GspSend(len) => {
                    let p = payload(gsp_seq, len);
                    if gsp.send(&gsp_msg(gsp_seq, p.clone()), None).unwrap() {
                        to_host.push_back((gsp_seq, p));
                        gsp_seq += 1;
                    }
                }
                Step::HostReceive => {
                    host_receive(&mut cmdq, &mut to_host)?;
                }
            }
        }
        while gsp_receive(&mut gsp, &mut to_gsp)? | host_receive(&mut cmdq, &mut to_host)? {}
        prop_assert!(to_gsp.is_empty() && to_host.is_empty());
        prop_assert_eq!(cmdq.stats().corrupt, 0);
        prop_assert_eq!(gsp.stats().corrupt_commands, 0);
        prop_assert_eq!(u64::from(host_seq), cmdq.stats().sent);
        prop_assert_eq!(u64::from(gsp_seq), cmdq.stats().received);
    }
}
