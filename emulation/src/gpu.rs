//! [`EmulatedGpu`]: one emulated NVIDIA GPU — its chip profile, VRAM, instance memory,
//! BAR0 register model and MMU (TLB, BAR1 translation).

use thiserror::Error;

use std::sync::Arc;

use crate::bar0::{
    AccessWidth, Bar0Effect, Bar0Error, Bar0Registers, FbSizeRegisters, RegisterSnapshot,
    UnimplementedStats,
};
use crate::gsp::{DmaSpace, EmulatedGsp, FalconAction};
use crate::mmu::bar1::{Bar1, Bar1Buf};
use crate::mmu::{
    self, Bar1Error, Bar1Fault, Bar1Stats, BarBinding, InvalidateScope, Mmu, TlbStats, Translation,
};
use crate::profile::{BarRole, BarSpec, ChipProfile};
use crate::vram::{Vram, VramError};

/// Errors of creating an emulated GPU.
#[derive(Debug, Error)]
pub enum GpuError {
    /// The VRAM memfd could not be created.
    #[error("creating {size:#x} bytes of emulated VRAM failed: {source}")]
    Vram {
        /// Requested VRAM size.
        size: u64,
        /// Cause.
        #[source]
        source: VramError,
    },
    /// The instance-memory memfd could not be created.
    #[error("creating {size:#x} bytes of emulated instance memory failed: {source}")]
    InstanceMemory {
        /// Requested instance-memory size.
        size: u64,
        /// Cause.
        #[source]
        source: VramError,
    },
}

/// Where a memory BAR's bytes live: a range of one of the GPU's memfd-backed memories.
#[derive(Debug, Clone, Copy)]
pub struct BarMemory<'a> {
    /// The memory backing the BAR (VRAM or instance memory); map `memory.as_fd()`.
    pub memory: &'a Vram,
    /// Offset in `memory` (and in its fd) of the BAR's first byte.
    pub offset: u64,
    /// Real length of the BAR in bytes.
    pub len: u64,
}

/// An emulated NVIDIA GPU.
///
/// Thread safe (`Send + Sync`): BAR0 accesses may come from any thread concurrently, and
/// the VRAM may at the same time be accessed through other mappings of its memfd.
#[derive(Debug)]
pub struct EmulatedGpu {
    profile: &'static ChipProfile,
    vram: Vram,
    instance_memory: Option<Vram>,
    bar0: Bar0Registers,
    mmu: Mmu,
    dma: Arc<DmaSpace>,
    gsp: EmulatedGsp,
}

impl EmulatedGpu {
    /// Powers on an emulated GPU of `profile`: creates its VRAM memfd
    /// ([`ChipProfile::vram_size`] bytes, sparse) and, if the part has an instance-memory
    /// BAR, a memfd of that BAR's size.
    pub fn new(profile: &'static ChipProfile) -> Result<EmulatedGpu, GpuError> {
        EmulatedGpu::with_vram_file(profile, None)
    }

    /// [`EmulatedGpu::new`], with VRAM kept in the file at `vram_file` if given
    /// ([`Vram::open_file`]: it survives the process, and is never shared).
    pub fn with_vram_file(
        profile: &'static ChipProfile,
        vram_file: Option<&std::path::Path>,
    ) -> Result<EmulatedGpu, GpuError> {
        let size = profile.vram_size();
        let vram = match vram_file {
            Some(path) => Vram::open_file(path, size),
            None => Vram::new_named(c"gpu-emulation-vram", size),
        }
        .map_err(|source| GpuError::Vram { size, source })?;
        let instance_memory = match profile.instance_bar() {
            Some(bar) => Some(Vram::new_named(c"gpu-emulation-instmem", bar.size).map_err(
                |source| GpuError::InstanceMemory {
                    size: bar.size,
                    source,
                },
            )?),
            None => None,
        };
        let bar0 = Bar0Registers::new(
            profile.generation(),
            profile.boot0(),
            profile.boot42(),
            FbSizeRegisters::for_sizes(profile.vram_size(), profile.usable_vram_size()),
        );
        let dma = Arc::new(DmaSpace::default());
        let gsp = EmulatedGsp::new(profile, Arc::clone(bar0.gsp_falcon()), Arc::clone(&dma));
        Ok(EmulatedGpu {
            profile,
            vram,
            instance_memory,
            bar0,
            mmu: Mmu::default(),
            dma,
            gsp,
        })
    }

    /// The chip profile this GPU emulates.
    pub fn profile(&self) -> &'static ChipProfile {
        self.profile
    }

    /// The emulated device memory (all of it, including any reserved carve-out).
    pub fn vram(&self) -> &Vram {
        &self.vram
    }

    /// The memory behind the instance-memory BAR, if the profile has one.
    pub fn instance_memory(&self) -> Option<&Vram> {
        self.instance_memory.as_ref()
    }

    /// Where the memory BAR whose first slot is `index` is backed, or `None` for the
    /// register BAR and for slots without a BAR.
    pub fn bar_memory(&self, index: u8) -> Option<BarMemory<'_>> {
        let bar: &BarSpec = self.profile.bar(index)?;
        match bar.role {
            BarRole::Registers => None,
            BarRole::Vram { vram_offset } => Some(BarMemory {
                memory: &self.vram,
                offset: vram_offset,
                len: bar.size,
            }),
            BarRole::InstanceMemory => Some(BarMemory {
                memory: self.instance_memory.as_ref()?,
                offset: 0,
                len: bar.size,
            }),
        }
    }

    /// Reads `width` bytes at BAR0 `offset` (little-endian, zero-extended). See the
    /// [`crate::bar0`] module documentation for the access rules and register behaviour.
    pub fn bar0_read(&self, offset: u64, width: AccessWidth) -> Result<u64, Bar0Error> {
        self.bar0.read(&self.vram, offset, width)
    }

    /// Writes the low `width` bytes of `value` at BAR0 `offset`; `value` must fit the
    /// width. See the [`crate::bar0`] module documentation. Before returning, a write of
    /// `MMU_INVALIDATE` with TRIGGER flushes the TLB (see [`crate::mmu::tlb`]), a GSP
    /// CPUCTL write with STARTCPU starts the GSP and a GSP ENGINE reset halts it (see
    /// [`crate::gsp`]).
    pub fn bar0_write(&self, offset: u64, width: AccessWidth, value: u64) -> Result<(), Bar0Error> {
        match self.bar0.write(&self.vram, offset, width, value)? {
            Some(Bar0Effect::TlbInvalidate(req)) => {
                let scope = InvalidateScope::from_request(req);
                let removed = self.mmu.tlb.invalidate(scope);
                log::trace!("TLB invalidate {scope:?}: {removed} entries removed");
            }
            Some(Bar0Effect::Falcon(FalconAction::StartCpu)) => self.gsp.start_cpu(),
            Some(Bar0Effect::Falcon(FalconAction::Reset)) => self.gsp.engine_reset(),
            None => {}
        }
        Ok(())
    }

    /// Halts the GSP, puts the registers back to their power-on values (BAR1 back in
    /// physical mode) and empties the TLB. VRAM and instance-memory contents are kept, as are the
    /// unimplemented-access statistics, the unimplemented read value and the TLB and BAR1
    /// counters.
    pub fn reset(&self) {
        self.gsp.halt();
        self.bar0.reset();
        self.mmu.tlb.clear();
    }

    /// The emulated IOMMU: host buffers the GPU can reach by DMA ([`crate::gsp::dma`]).
    pub fn dma(&self) -> &DmaSpace {
        &self.dma
    }

    /// The emulated GSP ([`crate::gsp`]). A reset halts it.
    pub fn gsp(&self) -> &EmulatedGsp {
        &self.gsp
    }

    /// The VRAM BAR that BAR1 accesses address: the one starting at VRAM address 0.
    fn bar1(&self) -> Result<Bar1<'_>, Bar1Error> {
        let (vram_offset, size) = self
            .profile
            .bars()
            .iter()
            .find_map(|b| match b.role {
                BarRole::Vram { vram_offset: 0 } => Some((0, b.size)),
                _ => None,
            })
            .ok_or(Bar1Error::NoVramBar)?;
        Ok(Bar1 {
            vram: &self.vram,
            mmu: &self.mmu,
            format: self.profile.generation().mmu_version(),
            binding: self.bar0.bar1_binding(),
            vram_offset,
            size,
        })
    }

    /// Reads `buf.len()` bytes at BAR1 `offset`: VRAM 1:1 in physical mode, translated
    /// through the BAR1 page tables and the TLB in virtual mode (faulting pages read 0xFF
    /// and are counted). See [`crate::mmu::bar1`].
    pub fn bar1_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Bar1Error> {
        self.bar1()?.access(offset, Bar1Buf::Read(buf))
    }

    /// Writes `data` at BAR1 `offset` (physical or virtual mode as for
    /// [`EmulatedGpu::bar1_read`]; writes to faulting pages are dropped and counted).
    pub fn bar1_write(&self, offset: u64, data: &[u8]) -> Result<(), Bar1Error> {
        self.bar1()?.access(offset, Bar1Buf::Write(data))
    }

    /// The BAR1 binding the block register(s) currently hold.
    pub fn bar1_binding(&self) -> BarBinding {
        self.bar0.bar1_binding()
    }

    /// Translates BAR1 VA `va` with the current binding by a fresh walk (the TLB is
    /// neither used nor filled). Meaningful in virtual mode; the binding's mode is not
    /// checked.
    pub fn bar1_translate(&self, va: u64) -> Result<Translation, Bar1Fault> {
        let block = mmu::instance::read_instance_block(&self.vram, &self.bar0.bar1_binding())?;
        block.check_limit(va)?;
        mmu::translate(
            &self.vram,
            block.pdb,
            self.profile.generation().mmu_version(),
            va,
        )
        .map_err(|fault| Bar1Fault::Walk { va, fault })
    }

    /// BAR1 fault counters and the last fault.
    pub fn bar1_stats(&self) -> Bar1Stats {
        self.mmu.bar1.stats()
    }

    /// TLB counters.
    pub fn tlb_stats(&self) -> TlbStats {
        self.mmu.tlb.stats()
    }

    /// Counts (and the first distinct offsets) of accesses to unimplemented registers.
    pub fn unimplemented_accesses(&self) -> UnimplementedStats {
        self.bar0.unimplemented_stats()
    }

    /// Clears the unimplemented-access statistics.
    pub fn clear_unimplemented_accesses(&self) {
        self.bar0.clear_unimplemented_stats();
    }

    /// Sets what unimplemented registers read as (default
    /// [`crate::bar0::UNIMPLEMENTED_REGISTER_VALUE`]). Open RM treats 0xBADxxxxx values as
    /// PRI errors; 0 may be the friendlier answer for some drivers.
    pub fn set_unimplemented_read_value(&self, value: u32) {
        self.bar0.set_unimplemented_value(value);
    }

    /// A snapshot of the stored register state (window, TLB invalidate, BAR blocks).
    pub fn registers(&self) -> RegisterSnapshot {
        self.bar0.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bar0::UNIMPLEMENTED_REGISTER_VALUE;
    use crate::chip::{Generation, WindowRegisterKind};
    use crate::regs::{
        self, Boot0, Boot42, LocalMemoryRange, PbusBar0Window, XalBar0Window, BOOT_0, BOOT_1,
        BOOT_42, PRAMIN_BASE, PRAMIN_SIZE,
    };
    use crate::vram::VramAddr;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use AccessWidth::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn gpu(name: &str) -> EmulatedGpu {
        EmulatedGpu::new(ChipProfile::by_name(name).unwrap()).unwrap()
    }

    /// Points the window of `g` at `base` (VRAM, 64 KiB aligned) the way its generation does.
    fn set_window(g: &EmulatedGpu, base: u64) {
        let generation = g.profile().generation();
        let raw = match generation.window_register() {
            WindowRegisterKind::Pbus0x1700 => PbusBar0Window::default()
                .with_base_address(VramAddr::new(base))
                .unwrap()
                .raw(),
            WindowRegisterKind::Xal0x10FD40 => XalBar0Window::default()
                .with_base_address(VramAddr::new(base), generation)
                .unwrap()
                .raw(),
        };
        g.bar0_write(generation.window_register().offset(), Dword, u64::from(raw))
            .unwrap();
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn gpu_is_send_and_sync() {
        assert_send_sync::<EmulatedGpu>();
    }

    #[test]
    fn every_profile_powers_on_with_its_identity() {
        for p in ChipProfile::all() {
            let g = EmulatedGpu::new(p).unwrap();
            assert_eq!(g.vram().size(), p.vram_size(), "{p}");
            let boot0 = Boot0::from_raw(g.bar0_read(BOOT_0, Dword).unwrap() as u32);
            let boot42 = Boot42::from_raw(g.bar0_read(BOOT_42, Dword).unwrap() as u32);
            assert_eq!(boot0, p.boot0(), "{p}");
            assert_eq!(boot42, p.boot42(), "{p}");
            assert_eq!(boot0.generation(), Ok(p.generation()));
            assert_eq!(boot42.generation(), Ok(p.generation()));
            assert_eq!(g.bar0_read(BOOT_1, Dword).unwrap(), 0);
            // Writes to the identification registers are ignored.
            g.bar0_write(BOOT_0, Dword, 0).unwrap();
            g.bar0_write(BOOT_1, Dword, 0x0100_0001).unwrap();
            g.bar0_write(BOOT_42, Dword, 0).unwrap();
            assert_eq!(g.bar0_read(BOOT_0, Dword).unwrap() as u32, p.boot0().raw());
            assert_eq!(g.bar0_read(BOOT_1, Dword).unwrap(), 0);
            assert_eq!(
                g.bar0_read(BOOT_42, Dword).unwrap() as u32,
                p.boot42().raw()
            );
            assert_eq!(g.unimplemented_accesses().reads, 0);

            match p.instance_bar() {
                Some(bar) => {
                    assert_eq!(g.instance_memory().unwrap().size(), bar.size);
                    let m = g.bar_memory(bar.index).unwrap();
                    assert_eq!((m.offset, m.len), (0, 32 * MIB));
                }
                None => assert!(g.instance_memory().is_none()),
            }
            assert!(g.bar_memory(0).is_none());
        }
    }

    #[test]
    fn gh200_bar_memory_split() {
        let g = gpu("gh200-96g");
        assert_eq!(g.vram().size(), 96 * GIB);
        let resmem = g.bar_memory(2).unwrap();
        assert_eq!((resmem.offset, resmem.len), (95 * GIB, GIB));
        let usemem = g.bar_memory(4).unwrap();
        assert_eq!((usemem.offset, usemem.len), (0, 95 * GIB));
        assert!(std::ptr::eq(usemem.memory, g.vram()));
        assert!(g.bar_memory(3).is_none());
    }

    #[test]
    fn window_register_reads_back_on_both_generations() {
        for name in ["tu102-24g", "gh100-80g", "gb202-32g"] {
            let g = gpu(name);
            let generation = g.profile().generation();
            let off = generation.window_register().offset();
            let mask = match generation.window_register() {
                WindowRegisterKind::Pbus0x1700 => PbusBar0Window::DEFINED_MASK,
                WindowRegisterKind::Xal0x10FD40 => XalBar0Window::base_mask(generation),
            };
            for v in [0u32, 1, 0x1234, 0x0200_0010, 0xFFFF_FFFF, 0x8000_0000] {
                g.bar0_write(off, Dword, u64::from(v)).unwrap();
                assert_eq!(
                    g.bar0_read(off, Dword).unwrap() as u32,
                    v & mask,
                    "{name} {v:#x}"
                );
            }
            // Open RM style: two separate read-modify-write field updates (BASE then TARGET).
            if generation.window_register() == WindowRegisterKind::Pbus0x1700 {
                g.bar0_write(off, Dword, 0).unwrap();
                let cur = PbusBar0Window::from_raw(g.bar0_read(off, Dword).unwrap() as u32);
                g.bar0_write(off, Dword, u64::from(cur.with_base(0x42).raw()))
                    .unwrap();
                let cur = PbusBar0Window::from_raw(g.bar0_read(off, Dword).unwrap() as u32);
                g.bar0_write(off, Dword, u64::from(cur.with_target_raw(0).raw()))
                    .unwrap();
                assert_eq!(g.bar0_read(off, Dword).unwrap(), 0x42);
            }
            assert_eq!(g.unimplemented_accesses().reads, 0, "{name}");
        }
    }

    #[test]
    fn pramin_shows_vram_at_window_base_and_back() {
        for name in ["tu102-24g", "gh100-80g", "gh200-96g"] {
            let g = gpu(name);
            let base = 0x1234_0000u64;
            set_window(&g, base);
            // VRAM -> PRAMIN.
            g.vram()
                .write_u64(VramAddr::new(base + 0x88), 0x0102_0304_0506_0708)
                .unwrap();
            assert_eq!(
                g.bar0_read(PRAMIN_BASE + 0x88, Qword).unwrap(),
                0x0102_0304_0506_0708
            );
            assert_eq!(g.bar0_read(PRAMIN_BASE + 0x8C, Dword).unwrap(), 0x0102_0304);
            assert_eq!(g.bar0_read(PRAMIN_BASE + 0x8A, Word).unwrap(), 0x0506);
            assert_eq!(g.bar0_read(PRAMIN_BASE + 0x89, Byte).unwrap(), 0x07);
            // PRAMIN -> VRAM, every width, including the last bytes of the aperture.
            g.bar0_write(PRAMIN_BASE + PRAMIN_SIZE - 8, Qword, 0xAABB_CCDD_EEFF_0011)
                .unwrap();
            assert_eq!(
                g.vram().read_u64(VramAddr::new(base + MIB - 8)).unwrap(),
                0xAABB_CCDD_EEFF_0011
            );
            g.bar0_write(PRAMIN_BASE, Byte, 0x5A).unwrap();
            g.bar0_write(PRAMIN_BASE + 2, Word, 0x1234).unwrap();
            assert_eq!(g.vram().read_u32(VramAddr::new(base)).unwrap(), 0x1234_005A);
            g.bar0_write(PRAMIN_BASE + 4, Dword, 0xDEAD_BEEF).unwrap();
            assert_eq!(
                g.vram().read_u32(VramAddr::new(base + 4)).unwrap(),
                0xDEAD_BEEF
            );
            // Moving the window moves the view; the old data stays in VRAM.
            set_window(&g, base + 0x1_0000);
            assert_eq!(
                g.bar0_read(PRAMIN_BASE + MIB - 0x1_0000 - 8, Qword)
                    .unwrap(),
                0xAABB_CCDD_EEFF_0011
            );
            assert_eq!(g.bar0_read(PRAMIN_BASE, Dword).unwrap(), 0);
            assert_eq!(g.unimplemented_accesses().reads, 0);
        }
    }

    #[test]
    fn window_past_end_of_vram_reads_ones_and_drops_writes() {
        for name in ["tu102-24g", "gh100-80g", "gb202-32g"] {
            let g = gpu(name);
            let size = g.vram().size();
            let end_window = size.next_multiple_of(1 << 16);
            set_window(&g, end_window);
            assert_eq!(g.bar0_read(PRAMIN_BASE, Dword).unwrap(), 0xFFFF_FFFF);
            assert_eq!(g.bar0_read(PRAMIN_BASE + 0x100, Qword).unwrap(), u64::MAX);
            assert_eq!(g.bar0_read(PRAMIN_BASE + 0x3, Byte).unwrap(), 0xFF);
            g.bar0_write(PRAMIN_BASE, Qword, 0x1122_3344_5566_7788)
                .unwrap();
            g.bar0_write(PRAMIN_BASE + 8, Byte, 0x11).unwrap();
            // Far past the end (largest base the register can hold).
            let reach = g.profile().generation().window_reach();
            set_window(&g, reach - (1 << 16));
            assert_eq!(
                g.bar0_read(PRAMIN_BASE + MIB - 4, Dword).unwrap(),
                0xFFFF_FFFF
            );
            g.bar0_write(PRAMIN_BASE + MIB - 4, Dword, 0).unwrap();
            // Nothing was written into VRAM.
            assert!(g.vram().allocated_bytes().unwrap() < MIB, "{name}");
        }
    }

    #[test]
    fn window_overlapping_end_of_vram() {
        // 24,220 MiB is a multiple of 64 KiB, so a window can start 64 KiB before the end:
        // the first 64 KiB are real, the rest reads 0xFF.
        let g = gpu("tu102-24g");
        let size = g.vram().size();
        set_window(&g, size - 0x1_0000);
        g.bar0_write(PRAMIN_BASE + 0xFFFC, Dword, 0xCAFE_F00D)
            .unwrap();
        assert_eq!(
            g.vram().read_u32(VramAddr::new(size - 4)).unwrap(),
            0xCAFE_F00D
        );
        assert_eq!(
            g.bar0_read(PRAMIN_BASE + 0xFFFC, Dword).unwrap(),
            0xCAFE_F00D
        );
        assert_eq!(
            g.bar0_read(PRAMIN_BASE + 0x1_0000, Dword).unwrap(),
            0xFFFF_FFFF
        );
        g.bar0_write(PRAMIN_BASE + 0x1_0000, Dword, 0).unwrap();
        assert_eq!(
            g.bar0_read(PRAMIN_BASE + 0x1_0000, Dword).unwrap(),
            0xFFFF_FFFF
        );
    }

    #[test]
    fn last_bytes_of_vram_through_pramin() {
        // VRAM sizes are 4 KiB multiples and PRAMIN accesses are naturally aligned, so with
        // a real profile an access ends exactly at the end of VRAM or lies wholly past it.
        // (The split of a straddling access is tested in `bar0` with an odd-sized VRAM.)
        let g = gpu("gh100-80g");
        let size = g.vram().size();
        let base = (size - 8) & !0xFFFF;
        set_window(&g, base);
        let last = size - 8 - base;
        g.bar0_write(PRAMIN_BASE + last, Qword, 0x0807_0605_0403_0201)
            .unwrap();
        assert_eq!(
            g.bar0_read(PRAMIN_BASE + last, Qword).unwrap(),
            0x0807_0605_0403_0201
        );
        assert_eq!(
            g.bar0_read(PRAMIN_BASE + last + 8, Qword).unwrap(),
            u64::MAX
        );
        assert_eq!(g.bar0_read(PRAMIN_BASE + last + 7, Byte).unwrap(), 0x08);
        assert_eq!(g.bar0_read(PRAMIN_BASE + last + 8, Byte).unwrap(), 0xFF);
    }

    #[test]
    fn bar0_errors() {
        let g = gpu("tu102-24g");
        assert!(matches!(
            g.bar0_read(16 * MIB, Dword),
            Err(Bar0Error::OutOfRange { .. })
        ));
        assert!(matches!(
            g.bar0_write(16 * MIB - 4, Qword, 0),
            Err(Bar0Error::OutOfRange { .. })
        ));
        assert!(matches!(
            g.bar0_read(0xA02, Dword),
            Err(Bar0Error::Misaligned { .. })
        ));
        assert!(matches!(
            AccessWidth::from_bytes(0),
            Err(Bar0Error::InvalidWidth(0))
        ));
        assert!(matches!(
            g.bar0_write(PRAMIN_BASE, Word, 0x1_0000),
            Err(Bar0Error::ValueTooWide { .. })
        ));
    }

    #[test]
    fn unimplemented_registers_read_bad_value_and_are_counted() {
        let g = gpu("gh100-80g");
        // nova reads GFW registers the model does not implement.
        assert_eq!(
            g.bar0_read(0x118128, Dword).unwrap(),
            u64::from(UNIMPLEMENTED_REGISTER_VALUE)
        );
        assert_eq!(g.bar0_read(0x11812A, Word).unwrap(), 0xBADF);
        // SEC2 falcon registers (the GSP's are modelled, see crate::gsp::falcon).
        g.bar0_write(0x840040, Dword, 1).unwrap();
        g.bar0_write(0x840004, Byte, 0x40).unwrap();
        let s = g.unimplemented_accesses();
        assert_eq!((s.reads, s.writes), (2, 2));
        assert_eq!(s.offsets, [0x118128, 0x840040, 0x840004]);
        assert!(!s.offsets_truncated);
        // Writes to unimplemented registers are dropped.
        assert_eq!(
            g.bar0_read(0x840040, Dword).unwrap(),
            u64::from(UNIMPLEMENTED_REGISTER_VALUE)
        );
        g.set_unimplemented_read_value(0);
        assert_eq!(g.bar0_read(0x118128, Dword).unwrap(), 0);
        g.clear_unimplemented_accesses();
        assert_eq!(g.unimplemented_accesses(), UnimplementedStats::default());
    }

    #[test]
    fn fb_size_registers_answer_for_every_profile() {
        // (profile, MiB LOCAL_MEMORY_RANGE states): exact where the 6-bit mantissa and
        // 4-bit scale can state the VRAM size, the smallest size above it otherwise.
        let expected = [
            ("tu102-24g", 24_576),
            ("ga100-80g", 81_920),
            ("gh100-80g", 81_920),
            ("gh200-96g", 98_304),
            ("gb202-32g", 32_768),
        ];
        assert_eq!(expected.len(), ChipProfile::all().len());
        for (name, mib) in expected {
            let g = gpu(name);
            let p = g.profile();
            let range = LocalMemoryRange::from_raw(
                g.bar0_read(regs::LOCAL_MEMORY_RANGE, Dword).unwrap() as u32,
            );
            assert_eq!(range.size(), mib * MIB, "{name}");
            assert_eq!(range.ecc_mode(), 0);
            assert!(range.size() >= p.vram_size());
            assert_eq!(range.size() == p.vram_size(), mib * MIB == p.vram_size());
            let usable = g.bar0_read(regs::USABLE_FB_SIZE_IN_MB, Dword).unwrap();
            assert_eq!(usable * MIB, p.usable_vram_size(), "{name}");
            // Read-only.
            g.bar0_write(regs::LOCAL_MEMORY_RANGE, Dword, 0).unwrap();
            g.bar0_write(regs::USABLE_FB_SIZE_IN_MB, Dword, 0).unwrap();
            assert_eq!(
                g.bar0_read(regs::LOCAL_MEMORY_RANGE, Dword).unwrap() as u32,
                range.raw()
            );
            assert_eq!(
                g.bar0_read(regs::USABLE_FB_SIZE_IN_MB, Dword).unwrap(),
                usable
            );
            assert_eq!(g.unimplemented_accesses(), UnimplementedStats::default());
        }
        assert_eq!(
            gpu("gh200-96g")
                .bar0_read(regs::USABLE_FB_SIZE_IN_MB, Dword)
                .unwrap(),
            95 * 1024
        );
    }

    #[test]
    fn reset_keeps_vram() {
        let g = gpu("ga100-80g");
        set_window(&g, 0x10_0000);
        g.bar0_write(PRAMIN_BASE + 0x10, Dword, 0x1234_5678)
            .unwrap();
        g.instance_memory()
            .unwrap()
            .write_u32(VramAddr::new(0x40), 7)
            .unwrap();
        g.reset();
        assert_eq!(g.registers().window, 0);
        assert_eq!(g.registers().window_base, VramAddr::ZERO);
        assert_eq!(
            g.vram().read_u32(VramAddr::new(0x10_0010)).unwrap(),
            0x1234_5678
        );
        assert_eq!(
            g.instance_memory()
                .unwrap()
                .read_u32(VramAddr::new(0x40))
                .unwrap(),
            7
        );
    }

    #[test]
    fn concurrent_register_and_pramin_access() {
        let g = gpu("tu102-24g");
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let g = &g;
                s.spawn(move || {
                    for i in 0..1000u64 {
                        let off = PRAMIN_BASE + (t * 0x1000) + (i % 64) * 8;
                        g.bar0_write(off, Qword, t << 32 | i).unwrap();
                        assert_eq!(g.bar0_read(off, Qword).unwrap(), t << 32 | i);
                        g.bar0_read(BOOT_0, Dword).unwrap();
                    }
                });
            }
        });
        assert_eq!(g.unimplemented_accesses().reads, 0);
    }

    // --- property test ---------------------------------------------------------------

    #[derive(Debug, Clone)]
    enum Op {
        /// Raw value written to the window register.
        Window(u32),
        Read {
            off: u64,
            width: AccessWidth,
        },
        Write {
            off: u64,
            width: AccessWidth,
            value: u64,
        },
    }

    fn width() -> impl Strategy<Value = AccessWidth> {
        prop_oneof![Just(Byte), Just(Word), Just(Dword), Just(Qword)]
    }

    /// Window values: random raw bits, or bases near 0 / near the end of VRAM, possibly
    /// with a non-VID target on Turing.
    fn window_value(vram_size: u64) -> impl Strategy<Value = u32> {
        let end = (vram_size >> 16) as u32;
        prop_oneof![
            any::<u32>(),
            0u32..64,
            (end.saturating_sub(24))..(end + 24),
            (end.saturating_sub(24)..end + 24, 0u32..4).prop_map(|(b, t)| b | t << 24),
        ]
    }

    fn op(vram_size: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => window_value(vram_size).prop_map(Op::Window),
            3 => (0..PRAMIN_SIZE, width()).prop_map(|(o, w)| Op::Read {
                off: PRAMIN_BASE + o / w.bytes() * w.bytes(),
                width: w,
            }),
            3 => (0..PRAMIN_SIZE, width(), any::<u64>()).prop_map(|(o, w, v)| Op::Write {
                off: PRAMIN_BASE + o / w.bytes() * w.bytes(),
                width: w,
                value: v & w.value_mask(),
            }),
            // Arbitrary (possibly invalid) accesses anywhere must not panic either.
            1 => (any::<u64>(), width(), any::<u64>()).prop_map(|(o, w, v)| Op::Write {
                off: o % (BAR0_LIMIT + 16),
                width: w,
                value: v,
            }),
        ]
    }

    const BAR0_LIMIT: u64 = crate::regs::BAR0_SIZE;

    /// Effective VRAM window base for a raw window value, or `None` for a sysmem target.
    fn model_base(generation: Generation, raw: u32) -> Option<u64> {
        match generation.window_register() {
            WindowRegisterKind::Pbus0x1700 => {
                let w = PbusBar0Window::from_raw(raw);
                (w.target_raw() == 0).then(|| w.base_address().raw())
            }
            WindowRegisterKind::Xal0x10FD40 => {
                let base = raw & XalBar0Window::base_mask(generation);
                Some(u64::from(base) << 16)
            }
        }
    }

    /// Data pages of the memfd (offsets of allocated 4 KiB pages), via SEEK_DATA/SEEK_HOLE.
    fn allocated_pages(v: &Vram) -> Vec<u64> {
        use std::os::fd::AsRawFd;
        let fd = v.as_fd().as_raw_fd();
        let mut pages = Vec::new();
        let mut pos: libc::off_t = 0;
        loop {
            // SAFETY: plain lseek syscalls on a valid fd owned by `v`.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: no more data
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            assert!(hole > data);
            let mut p = data as u64 & !4095;
            while p < hole as u64 {
                pages.push(p);
                p += 4096;
            }
            pos = hole;
        }
        pages
    }

    #[test]
    fn allocated_pages_sees_exactly_the_touched_pages() {
        let g = gpu("tu102-24g");
        assert!(allocated_pages(g.vram()).is_empty());
        set_window(&g, 0x20_0000);
        g.bar0_write(PRAMIN_BASE + 0x1008, Dword, 1).unwrap();
        g.bar0_read(PRAMIN_BASE + 0x3000, Byte).unwrap();
        assert_eq!(allocated_pages(g.vram()), [0x20_1000, 0x20_3000]);
    }

    fn run_ops(name: &str, ops: &[Op]) -> Result<(), TestCaseError> {
        let g = gpu(name);
        let generation = g.profile().generation();
        let size = g.vram().size();
        let window_off = generation.window_register().offset();
        let mut window_raw = 0u32;
        let mut windows = vec![0u64]; // every base a write could have reached
        let mut model: HashMap<u64, u8> = HashMap::new();

        for op in ops {
            match *op {
                Op::Window(raw) => {
                    g.bar0_write(window_off, Dword, u64::from(raw)).unwrap();
                    window_raw = g.bar0_read(window_off, Dword).unwrap() as u32;
                    if let Some(b) = model_base(generation, window_raw) {
                        windows.push(b);
                    }
                }
                Op::Read { off, width } => {
                    let got = g.bar0_read(off, width).unwrap();
                    let mut expect = 0u64;
                    for i in 0..width.bytes() {
                        let byte = match model_base(generation, window_raw) {
                            None => 0xFF,
                            Some(b) => {
                                let a = b + (off - PRAMIN_BASE) + i;
                                if a >= size {
                                    0xFF
                                } else {
                                    *model.get(&a).unwrap_or(&0)
                                }
                            }
                        };
                        expect |= u64::from(byte) << (8 * i);
                    }
                    prop_assert_eq!(got, expect, "read {:#x} {:?}", off, width);
                }
                Op::Write { off, width, value } => {
                    let res = g.bar0_write(off, width, value);
                    let in_pramin = (PRAMIN_BASE..PRAMIN_BASE + PRAMIN_SIZE).contains(&off);
                    if res.is_err() || !in_pramin {
                        // Errors and register writes never touch VRAM; a register write
                        // may have moved the window, so resynchronise the model.
                        window_raw = g.bar0_read(window_off, Dword).unwrap() as u32;
                        if let Some(b) = model_base(generation, window_raw) {
                            windows.push(b);
                        }
                        continue;
                    }
                    if let Some(b) = model_base(generation, window_raw) {
                        for i in 0..width.bytes() {
                            let a = b + (off - PRAMIN_BASE) + i;
                            if a < size {
                                model.insert(a, (value >> (8 * i)) as u8);
                            }
                        }
                    }
                }
            }
        }

        // Contents: every byte the model wrote is in VRAM.
        for (&a, &v) in &model {
            prop_assert_eq!(g.vram().read_u8(VramAddr::new(a)).unwrap(), v);
        }
        // Nothing outside [base, base + 1 MiB) ∩ VRAM of some window was touched (written
        // or even read: reads of a shmem hole through a mapping allocate the page).
        for page in allocated_pages(g.vram()) {
            prop_assert!(page < size);
            prop_assert!(
                windows.iter().any(|&b| page >= b && page < b + PRAMIN_SIZE),
                "page {:#x} outside every window {:x?}",
                page,
                windows
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn pramin_never_touches_vram_outside_the_window_turing(
            ops in proptest::collection::vec(op(24_220 * MIB), 1..40)
        ) {
            run_ops("tu102-24g", &ops)?;
        }

        #[test]
        fn pramin_never_touches_vram_outside_the_window_hopper(
            ops in proptest::collection::vec(op(81_559 * MIB), 1..40)
        ) {
            run_ops("gh100-80g", &ops)?;
        }
    }
}
