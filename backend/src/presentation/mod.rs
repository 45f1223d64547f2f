//! What a guest sees of the GPU: power-of-two BARs, the trapped BAR0 (register table:
//! default-deny for a sliced guest, passthrough for a guest given the whole GPU; virtual
//! window register, PRAMIN aperture confined to the guest's VRAM, MSI-X) and PCI config
//! space (with D0/D3hot power states).

pub mod aperture;
pub mod bar0;
pub mod config_space;
pub mod function;
pub mod guest_vram;
pub mod layout;
pub mod msix;
pub mod padded_bar;
pub mod registers;
pub mod window;

pub use bar0::{TrapStats, TrappedBar0};
pub use config_space::{
    BarDecl, BarKind, Command, ConfigSpace, ConfigSpaceError, ConfigSpaceSpec, MsixDecl,
    PowerState, BAR_COUNT, CONFIG_SPACE_SIZE,
};
pub use function::{PresentationError, PresentationOptions, PresentedBar, PresentedFunction};
pub use layout::FunctionLayout;
pub use padded_bar::{
    presented_size_for, BackingError, BarBacking, MappableArea, PaddedBar, PaddedBarError,
    VecBacking, MMAP_PAGE_SIZE,
};
pub use registers::{RegisterMap, RegisterMode, RegisterRule, Treatment, REGISTER_TABLE};
