//! What a guest sees of the GPU: power-of-two BARs, the trapped BAR0 (register table,
//! virtual window register, PRAMIN aperture confined to the guest's VRAM, MSI-X) and PCI
//! config space.

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
    BarDecl, BarKind, Command, ConfigSpace, ConfigSpaceError, ConfigSpaceSpec, MsixDecl, BAR_COUNT,
    CONFIG_SPACE_SIZE,
};
pub use function::{PresentationError, PresentedBar, PresentedFunction};
pub use layout::FunctionLayout;
pub use padded_bar::{
    presented_size_for, BackingError, BarBacking, MappableArea, PaddedBar, PaddedBarError,
    VecBacking, MMAP_PAGE_SIZE,
};
pub use registers::{RegisterMap, RegisterRule, Treatment, REGISTER_TABLE};
