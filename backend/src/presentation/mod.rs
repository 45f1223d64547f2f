//! What a guest sees of the GPU: power-of-two BARs and PCI config space.

pub mod config_space;
pub mod function;
pub mod host_backing;
pub mod layout;
pub mod msix;
pub mod padded_bar;

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
