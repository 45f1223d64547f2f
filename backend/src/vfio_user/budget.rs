//! Budgets: how much one connection, and all connections of the process together, may make
//! the server hold on a client's behalf, so that a client at its budget gets an errno and
//! nobody else notices.
//!
//! What a client can make the server hold ([`Resources`]):
//! - **DMA maps** (table entries, mapped or reached over the socket): a little heap memory
//!   each. Past the budget `DMA_MAP` fails with `ENOSPC`.
//! - **Mapped bytes**: address space of the DMA maps the server `mmap()`s (a sparse memfd of
//!   2^46 bytes costs no memory but 64 TiB of the 128 TiB a process has). `ENOMEM`.
//! - **Mappings**: each mmapped DMA map is one kernel mapping (VMA), and a process may have at
//!   most `vm.max_map_count` (65530 by default) of them for everything, thread stacks and
//!   `malloc` included. `ENOMEM`.
//! - **Fds** held: a connection's interrupt eventfds (the fd of a DMA map is closed as soon as
//!   the map is mmapped or recorded, so DMA maps hold none). Past the budget `SET_IRQS` fails
//!   with `ENOSPC`.
//!
//! Every reservation is checked against the connection's [`Account`] and then against the
//! process-wide usage ([`process_usage`]); it is released when its [`Reservation`] is dropped
//! (the map removed, the eventfd replaced, the client gone). The process budgets default to
//! several connection budgets ([`Resources::CONNECTION`], [`Resources::process_default`]),
//! so up to that many guests can each use all of theirs before any process budget is reached.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::device::Errno;

/// Amounts of what a client can make the server hold (a budget, a usage or a request).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// DMA maps (table entries).
    pub dma_maps: u64,
    /// Bytes of DMA maps mmapped in the server (address space).
    pub mapped_bytes: u64,
    /// DMA maps mmapped in the server (kernel mappings, VMAs).
    pub mappings: u64,
    /// Client fds held (interrupt eventfds).
    pub fds: u64,
}

/// One kind of [`Resources`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// [`Resources::dma_maps`].
    DmaMaps,
    /// [`Resources::mapped_bytes`].
    MappedBytes,
    /// [`Resources::mappings`].
    Mappings,
    /// [`Resources::fds`].
    Fds,
}

impl Resource {
    const ALL: [Resource; 4] = [
        Resource::DmaMaps,
        Resource::MappedBytes,
        Resource::Mappings,
        Resource::Fds,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Resource::DmaMaps => "DMA maps",
            Resource::MappedBytes => "mapped DMA bytes",
            Resource::Mappings => "mapped DMA maps",
            Resource::Fds => "client fds",
        }
    }
}

/// Whose budget a request exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The connection's own.
    Connection,
    /// The whole process's.
    Process,
}

/// Errors of reserving resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// The request does not fit the budget.
    #[error("{} budget of {} exhausted: {used} in use, {asked} more asked, limit {limit}",
        match scope { Scope::Connection => "connection", Scope::Process => "process" },
        resource.name())]
    Exhausted {
        /// Whose budget.
        scope: Scope,
        /// Which resource.
        resource: Resource,
        /// In use before the request.
        used: u64,
        /// Asked for.
        asked: u64,
        /// The budget.
        limit: u64,
    },
}

impl BudgetError {
    /// The errno a client at its budget gets: `ENOSPC` for DMA maps and fds (counts),
    /// `ENOMEM` for mapped bytes and mappings (address space).
    pub fn errno(&self) -> Errno {
        let BudgetError::Exhausted { resource, .. } = self;
        match resource {
            Resource::DmaMaps | Resource::Fds => Errno::ENOSPC,
            Resource::MappedBytes | Resource::Mappings => Errno(libc::ENOMEM),
        }
    }
}

impl From<BudgetError> for Errno {
    fn from(error: BudgetError) -> Errno {
        error.errno()
    }
}

const TIB: u64 = 1 << 40;

impl Resources {
    /// The default budget of one connection: 65535 DMA maps (the spec's `max_dma_maps`),
    /// 4 TiB of mapped DMA memory in at most 4096 mappings (QEMU maps a guest's RAM in a
    /// handful), and 1024 client fds (a device with every MSI-X vector has 2048 + 4).
    pub const CONNECTION: Resources = Resources {
        dma_maps: 65535,
        mapped_bytes: 4 * TIB,
        mappings: 4096,
        fds: 1024,
    };

    /// The default budget of the whole process: 2^20 DMA maps (16 connections' worth),
    /// 64 TiB of mapped DMA memory (16 connections' worth, half the 128 TiB of user address
    /// space of x86-64 and 48-bit arm64), half of `vm.max_map_count` mappings (32765 by
    /// default: 8 connections' worth, the rest is the process's own) and half of the soft
    /// `RLIMIT_NOFILE` as client fds (the other half is headroom for sockets, memfds and
    /// accepting connections). Reads the limits now: call it after
    /// [`crate::limits::raise_fd_limit`].
    pub fn process_default() -> Resources {
        let map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(65530);
        Resources {
            dma_maps: 1 << 20,
            mapped_bytes: 64 * TIB,
            mappings: (map_count / 2).max(1),
            fds: (crate::limits::fd_limit() / 2).max(1),
        }
    }

    /// A request of one resource.
    pub fn of(resource: Resource, amount: u64) -> Resources {
        let mut r = Resources::default();
        r.set(resource, amount);
        r
    }

    /// The amount of `resource`.
    pub fn get(&self, resource: Resource) -> u64 {
        match resource {
            Resource::DmaMaps => self.dma_maps,
            Resource::MappedBytes => self.mapped_bytes,
            Resource::Mappings => self.mappings,
            Resource::Fds => self.fds,
        }
    }

    fn set(&mut self, resource: Resource, amount: u64) {
        match resource {
            Resource::DmaMaps => self.dma_maps = amount,
            Resource::MappedBytes => self.mapped_bytes = amount,
            Resource::Mappings => self.mappings = amount,
            Resource::Fds => self.fds = amount,
        }
    }
}

/// Usage counters, updated atomically.
#[derive(Debug, Default)]
pub struct Usage {
    used: [AtomicU64; 4],
}

/// What every connection of the process holds together.
static PROCESS: Usage = Usage::new();

/// What the connections of this process hold together now.
pub fn process_usage() -> Resources {
    PROCESS.snapshot()
}

impl Usage {
    /// Nothing in use.
    pub const fn new() -> Usage {
        Usage {
            used: [
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
            ],
        }
    }

    /// The amounts in use now.
    pub fn snapshot(&self) -> Resources {
        let mut r = Resources::default();
        for resource in Resource::ALL {
            r.set(
                resource,
                self.used[resource.index()].load(Ordering::Relaxed),
            );
        }
        r
    }

    /// Adds `amount` if every resource stays within `limit`; otherwise adds nothing.
    fn try_add(
        &self,
        amount: &Resources,
        limit: &Resources,
        scope: Scope,
    ) -> Result<(), BudgetError> {
        for (done, resource) in Resource::ALL.into_iter().enumerate() {
            let asked = amount.get(resource);
            if asked == 0 {
                continue;
            }
            let max = limit.get(resource);
            let counter = &self.used[resource.index()];
            let added = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(asked).filter(|&total| total <= max)
            });
            if let Err(used) = added {
                for undo in &Resource::ALL[..done] {
                    self.used[undo.index()].fetch_sub(amount.get(*undo), Ordering::AcqRel);
                }
                return Err(BudgetError::Exhausted {
                    scope,
                    resource,
                    used,
                    asked,
                    limit: max,
                });
            }
        }
        Ok(())
    }

    fn sub(&self, amount: &Resources) {
        for resource in Resource::ALL {
            let n = amount.get(resource);
            if n != 0 {
                self.used[resource.index()].fetch_sub(n, Ordering::AcqRel);
            }
        }
    }
}

/// One connection's budget and usage, charged to the process-wide usage as well.
#[derive(Debug)]
pub struct Account {
    own: Usage,
    limits: Resources,
    process_limits: Resources,
    process: &'static Usage,
}

impl Account {
    /// An account with `limits` for the connection and `process_limits` for the process.
    pub fn new(limits: Resources, process_limits: Resources) -> Arc<Account> {
        Account::charging(limits, process_limits, &PROCESS)
    }

    /// An account charging `process` instead of the process-wide usage (for tests).
    pub(crate) fn charging(
        limits: Resources,
        process_limits: Resources,
        process: &'static Usage,
    ) -> Arc<Account> {
        Arc::new(Account {
            own: Usage::new(),
            limits,
            process_limits,
            process,
        })
    }

    /// Reserves `amount` (connection budget first, then the process's); released when the
    /// returned [`Reservation`] is dropped.
    pub fn reserve(self: &Arc<Self>, amount: Resources) -> Result<Reservation, BudgetError> {
        self.own.try_add(&amount, &self.limits, Scope::Connection)?;
        if let Err(e) = self
            .process
            .try_add(&amount, &self.process_limits, Scope::Process)
        {
            self.own.sub(&amount);
            return Err(e);
        }
        Ok(Reservation {
            account: Arc::clone(self),
            amount,
        })
    }

    /// What the connection holds now.
    pub fn usage(&self) -> Resources {
        self.own.snapshot()
    }

    /// The connection's budget.
    pub fn limits(&self) -> Resources {
        self.limits
    }
}

/// Resources reserved from an [`Account`], given back on drop.
#[derive(Debug)]
pub struct Reservation {
    account: Arc<Account>,
    amount: Resources,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.account.own.sub(&self.amount);
        self.account.process.sub(&self.amount);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process() -> &'static Usage {
        Box::leak(Box::new(Usage::new()))
    }

    const SMALL: Resources = Resources {
        dma_maps: 3,
        mapped_bytes: 100,
        mappings: 2,
        fds: 2,
    };

    #[test]
    fn a_connection_stops_at_its_budget_and_gets_it_back_on_release() {
        let account = Account::charging(SMALL, Resources::CONNECTION, process());
        let map = Resources {
            dma_maps: 1,
            mapped_bytes: 60,
            mappings: 1,
            fds: 0,
        };
        let first = account.reserve(map).unwrap();
        let err = account.reserve(map).unwrap_err();
        assert_eq!(
            err,
            BudgetError::Exhausted {
                scope: Scope::Connection,
                resource: Resource::MappedBytes,
                used: 60,
                asked: 60,
                limit: 100
            }
        );
        assert_eq!(err.errno(), Errno(libc::ENOMEM));
        // The failed request left nothing behind (its DMA map count was rolled back).
        assert_eq!(account.usage(), map);
        assert_eq!(account.process.snapshot(), map);
        // Unmapped maps cost only a count.
        let socket = Resources::of(Resource::DmaMaps, 1);
        let _a = account.reserve(socket).unwrap();
        let _b = account.reserve(socket).unwrap();
        let full = account.reserve(socket).unwrap_err();
        assert_eq!(full.errno(), Errno::ENOSPC);
        drop(first);
        assert_eq!(account.usage(), Resources::of(Resource::DmaMaps, 2));
        let again = account.reserve(map).unwrap();
        drop((again, _a, _b));
        assert_eq!(account.usage(), Resources::default());
        assert_eq!(account.process.snapshot(), Resources::default());
    }

    #[test]
    fn the_process_budget_is_shared_and_a_refusal_leaves_the_connection_untouched() {
        let shared = process();
        let a = Account::charging(Resources::CONNECTION, SMALL, shared);
        let b = Account::charging(Resources::CONNECTION, SMALL, shared);
        let fd = Resources::of(Resource::Fds, 1);
        let held = [a.reserve(fd).unwrap(), a.reserve(fd).unwrap()];
        let err = b.reserve(fd).unwrap_err();
        assert!(matches!(
            err,
            BudgetError::Exhausted {
                scope: Scope::Process,
                resource: Resource::Fds,
                used: 2,
                ..
            }
        ));
        assert_eq!(err.errno(), Errno::ENOSPC);
        assert_eq!(b.usage(), Resources::default());
        drop(held);
        let _ok = b.reserve(fd).unwrap();
        assert_eq!(shared.snapshot(), fd);
    }

    #[test]
    fn amounts_that_overflow_are_refused() {
        let account = Account::charging(
            Resources {
                mapped_bytes: u64::MAX,
                ..SMALL
            },
            Resources {
                mapped_bytes: u64::MAX,
                ..Resources::CONNECTION
            },
            process(),
        );
        let _big = account
            .reserve(Resources::of(Resource::MappedBytes, u64::MAX - 1))
            .unwrap();
        assert!(account
            .reserve(Resources::of(Resource::MappedBytes, 2))
            .is_err());
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_budget() {
        let account = Account::charging(SMALL, SMALL, process());
        let won = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        if let Ok(r) = account.reserve(Resources::of(Resource::Fds, 1)) {
                            won.fetch_add(1, Ordering::Relaxed);
                            assert!(account.usage().fds <= SMALL.fds);
                            drop(r);
                        }
                    }
                });
            }
        });
        assert!(won.load(Ordering::Relaxed) > 0);
        assert_eq!(account.usage(), Resources::default());
    }

    #[test]
    fn process_defaults_cover_several_connections() {
        let p = Resources::process_default();
        let c = Resources::CONNECTION;
        assert!(p.dma_maps >= 16 * c.dma_maps);
        assert!(p.mapped_bytes >= 16 * c.mapped_bytes);
        assert!(p.mappings >= 4 * c.mappings, "{p:?}");
        assert!(p.fds >= 1);
    }
}
