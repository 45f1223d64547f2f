//! [`Supervisor`]: the servers of `gpu-backend serve` (each guest's vfio-user server, its
//! display, the control socket), each on its own thread, watched from the thread that called
//! [`Supervisor::run`]. Jobs can be added while it runs (a guest added through the control
//! socket) and retired (a guest removed): a retired job's end is expected, any other job that
//! ends with an error is logged once and counted, and the others go on.
//!
//! `run` returns on SIGTERM/SIGINT (the global [`ShutdownSignal`]), when no job is left, or
//! when the GPU stops answering (a watchdog asks it every 200 ms). Once shutdown starts, every
//! job's own stop signal fires and the jobs get [`SHUTDOWN_GRACE`] to end; a thread still
//! running then is left behind and its socket file removed, so the process exits within that
//! bound whatever a connection is doing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::host_gpu::HostGpu;
use crate::serve::ServeError;
use crate::unix_socket::SocketFile;
use crate::vfio_user::{ShutdownSignal, STOP_GRACE};

/// How long the servers get to stop once shutdown starts before the process goes without
/// them: [`STOP_GRACE`] for a server's connection, plus a second.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(STOP_GRACE.as_secs() + 1);

/// How often the supervising thread looks at the shutdown signal between events.
const SUPERVISE_TICK: Duration = Duration::from_millis(100);

/// How often the watchdog asks the GPU whether it still answers.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(200);

/// Why a server thread ended with an error.
pub type JobError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a job: runs until its stop signal fires (`Ok`) or it fails.
pub type JobRun = Box<dyn FnOnce(ShutdownSignal) -> Result<(), JobError> + Send>;

/// One server, as the supervisor runs it.
pub struct Job {
    /// What the log calls it (its socket).
    pub label: String,
    /// Its socket file, removed when the job ends or on the way out.
    pub socket_file: Option<SocketFile>,
    /// The GPU it serves (watched).
    pub host: Arc<dyn HostGpu>,
    /// The server.
    pub run: JobRun,
}

/// A running job's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct JobId(u64);

/// What the supervising thread hears from the job threads.
struct Ended {
    id: JobId,
    /// `Err`: why the server failed.
    result: Result<(), String>,
}

/// A job still running.
struct Running {
    label: String,
    /// Removed when the job ends, before anyone waiting for the end hears of it.
    socket_file: Option<SocketFile>,
    stop: ShutdownSignal,
    /// Its end is expected (the guest was removed).
    retiring: bool,
}

/// How supervision ended.
enum Outcome {
    Stopped,
    NoneLeft,
    Lost,
}

struct Inner {
    shutdown: ShutdownSignal,
    /// The SIGTERM/SIGINT handler thread, installed before any job runs.
    signals: Mutex<Option<(signal_hook::iterator::Handle, thread::JoinHandle<()>)>>,
    tx: Mutex<mpsc::Sender<Ended>>,
    rx: Mutex<Option<mpsc::Receiver<Ended>>>,
    jobs: Mutex<BTreeMap<JobId, Running>>,
    /// Notified whenever a job leaves `jobs`.
    job_ended: Condvar,
    next: AtomicU64,
    hosts: Mutex<Vec<Arc<dyn HostGpu>>>,
    lost: AtomicBool,
    /// Servers that failed before [`Supervisor::run`] took over their ends.
    failed_before_run: AtomicU64,
}

impl Drop for Inner {
    /// A supervisor dropped without running gives SIGTERM/SIGINT back.
    fn drop(&mut self) {
        if let Some((handle, _thread)) = self.signals.get_mut().take() {
            handle.close();
        }
    }
}

/// Runs and watches the servers of one `serve` (cheap to clone: a handle).
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    /// A supervisor with no jobs, ending everything when `shutdown` fires. SIGTERM and SIGINT
    /// fire it from now on (before any job starts, so a signal is never the default
    /// action's); a second one exits the process at once.
    pub fn new(shutdown: ShutdownSignal) -> Result<Supervisor, ServeError> {
        let (tx, rx) = mpsc::channel();
        let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(ServeError::Signals)?;
        let signal_handle = signals.handle();
        let on_signal = shutdown.clone();
        let signal_thread = thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut received = signals.forever();
                if let Some(signal) = received.next() {
                    log::info!("signal {signal} received: shutting down");
                    on_signal.trigger();
                }
                // A second one while the first is being carried out (a start scrubbing a
                // large slice on hardware takes minutes) ends the process at once; stale
                // socket files left behind are replaced by the next start.
                if let Some(signal) = received.next() {
                    log::warn!("signal {signal} received again: exiting at once");
                    std::process::exit(128 + signal);
                }
            })
            .map_err(ServeError::Signals)?;
        Ok(Supervisor {
            inner: Arc::new(Inner {
                shutdown,
                signals: Mutex::new(Some((signal_handle, signal_thread))),
                tx: Mutex::new(tx),
                rx: Mutex::new(Some(rx)),
                jobs: Mutex::new(BTreeMap::new()),
                job_ended: Condvar::new(),
                next: AtomicU64::new(0),
                hosts: Mutex::new(Vec::new()),
                lost: AtomicBool::new(false),
                failed_before_run: AtomicU64::new(0),
            }),
        })
    }

    /// The signal that ends everything.
    pub fn shutdown(&self) -> &ShutdownSignal {
        &self.inner.shutdown
    }

    /// Starts `job` on its own thread with a stop signal of its own (fired by
    /// [`Supervisor::retire`] or on shutdown).
    pub fn spawn(&self, job: Job) -> Result<JobId, ServeError> {
        let stop = ShutdownSignal::new()?;
        let id = JobId(self.inner.next.fetch_add(1, Ordering::Relaxed));
        {
            let mut hosts = self.inner.hosts.lock();
            if !hosts.iter().any(|h| Arc::ptr_eq(h, &job.host)) {
                hosts.push(Arc::clone(&job.host));
            }
        }
        {
            let mut jobs = self.inner.jobs.lock();
            // Checked under the lock the shutdown path empties: a job is either refused
            // here or stopped (and its socket file removed) by `run`.
            if self.inner.shutdown.is_triggered() {
                return Err(ServeError::Thread(std::io::Error::other(
                    "the backend is shutting down",
                )));
            }
            jobs.insert(
                id,
                Running {
                    label: job.label.clone(),
                    socket_file: job.socket_file,
                    stop: stop.clone(),
                    retiring: false,
                },
            );
        }
        let tx = self.inner.tx.lock().clone();
        let run = job.run;
        let spawned = thread::Builder::new()
            .name(format!("server-{}", id.0))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(stop)))
                    .unwrap_or_else(|_| Err("the server thread panicked".into()))
                    .map_err(|e| e.to_string());
                let _ = tx.send(Ended { id, result });
            });
        match spawned {
            Ok(_) => Ok(id),
            Err(e) => {
                self.inner.jobs.lock().remove(&id);
                Err(ServeError::Thread(e))
            }
        }
    }

    /// Stops a job whose end is expected (its guest is being removed); its end is not a
    /// failure.
    pub fn retire(&self, id: JobId) {
        if let Some(job) = self.inner.jobs.lock().get_mut(&id) {
            job.retiring = true;
            job.stop.trigger();
        }
    }

    /// Waits up to `timeout` for a job to end; `true` if it did (or was never known).
    pub fn wait_ended(&self, id: JobId, timeout: Duration) -> bool {
        /// How often ends are collected here while `run` does not collect them yet.
        const COLLECT_PERIOD: Duration = Duration::from_millis(20);
        let deadline = Instant::now() + timeout;
        loop {
            self.collect_ends_before_run();
            let mut jobs = self.inner.jobs.lock();
            if !jobs.contains_key(&id) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let _ = self
                .inner
                .job_ended
                .wait_until(&mut jobs, deadline.min(now + COLLECT_PERIOD));
        }
    }

    /// Before [`Supervisor::run`] takes the jobs' ends over (a start that fails half-way
    /// stops the guests it started), they are collected here, failures counted for `run`.
    fn collect_ends_before_run(&self) {
        let ends: Vec<Ended> = match self.inner.rx.lock().as_ref() {
            Some(rx) => rx.try_iter().collect(),
            None => return,
        };
        for ended in ends {
            let failed = self.on_end(ended, false) as u64;
            self.inner
                .failed_before_run
                .fetch_add(failed, Ordering::Relaxed);
        }
    }

    /// Forgets a job that did not end in time: its thread is left behind, its socket file
    /// removed.
    pub fn abandon(&self, id: JobId) {
        if let Some(job) = self.inner.jobs.lock().remove(&id) {
            log::warn!(
                "{}: did not stop in time; leaving its thread behind",
                job.label
            );
        }
    }

    /// Watches the jobs until SIGTERM or SIGINT, until none is left, or until the GPU stops
    /// answering (see the module docs). Call once.
    pub fn run(&self) -> Result<(), ServeError> {
        let rx =
            self.inner.rx.lock().take().ok_or_else(|| {
                ServeError::Thread(std::io::Error::other("supervisor already ran"))
            })?;
        // The watchdog ends on its own once shutdown fires; it is not waited for.
        let _watchdog = self.spawn_watchdog()?;

        let mut failed = self.inner.failed_before_run.load(Ordering::Relaxed) as usize;
        let outcome = loop {
            if self.inner.shutdown.is_triggered() {
                break if self.inner.lost.load(Ordering::Acquire) {
                    Outcome::Lost
                } else {
                    Outcome::Stopped
                };
            }
            if self.inner.jobs.lock().is_empty() {
                break Outcome::NoneLeft;
            }
            match rx.recv_timeout(SUPERVISE_TICK) {
                Ok(ended) => failed += self.on_end(ended, false),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break Outcome::NoneLeft,
            }
        };

        self.inner.shutdown.trigger();
        for job in self.inner.jobs.lock().values() {
            job.stop.trigger();
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while !self.inner.jobs.lock().is_empty() {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(ended) => {
                    self.on_end(ended, true);
                }
                Err(_) => {
                    let left = std::mem::take(&mut *self.inner.jobs.lock());
                    log::warn!(
                        "{} server thread(s) did not stop within {SHUTDOWN_GRACE:?}: exiting \
                         without them",
                        left.len()
                    );
                    break;
                }
            }
        }
        if let Some((handle, thread)) = self.inner.signals.lock().take() {
            handle.close();
            let _ = thread.join();
        }
        log::info!("stopped");
        match outcome {
            Outcome::Lost => Err(ServeError::DeviceLost),
            Outcome::NoneLeft if failed > 0 => Err(ServeError::NoGuestLeft),
            Outcome::Stopped | Outcome::NoneLeft if failed > 0 => {
                Err(ServeError::GuestsFailed(failed))
            }
            Outcome::Stopped | Outcome::NoneLeft => Ok(()),
        }
    }

    /// Books a job's end (its socket file is removed); returns 1 if it counts as a failure.
    fn on_end(&self, ended: Ended, stopping: bool) -> usize {
        let (job, live) = {
            let mut jobs = self.inner.jobs.lock();
            let mut job = jobs.remove(&ended.id);
            // The socket file goes first: whoever waits for the end finds it gone.
            if let Some(job) = job.as_mut() {
                job.socket_file.take();
            }
            self.inner.job_ended.notify_all();
            (job, jobs.len())
        };
        // An abandoned job that ended after all.
        let Some(job) = job else { return 0 };
        let label = &job.label;
        match ended.result {
            Ok(()) => log::debug!("{label}: server ended"),
            Err(why) if stopping || job.retiring => {
                log::warn!("{label}: server ended with an error: {why}")
            }
            Err(why) => {
                let rest = if live == 0 {
                    "no server is left".to_owned()
                } else {
                    format!("{live} other server(s) go on")
                };
                log::error!("{label}: {why}: it is no longer served ({rest})");
                return 1;
            }
        }
        0
    }

    /// Watches the GPUs behind the jobs: once one is lost (it stopped answering; every
    /// access of its guests already fails at once with ENODEV), it stops everything and
    /// marks the GPU lost. Ends when shutdown fires.
    fn spawn_watchdog(&self) -> Result<thread::JoinHandle<()>, ServeError> {
        let inner = Arc::clone(&self.inner);
        thread::Builder::new()
            .name("gpu-watchdog".into())
            .spawn(move || {
                while !inner.shutdown.is_triggered() {
                    let lost = inner.hosts.lock().iter().find(|h| h.is_lost()).cloned();
                    if let Some(host) = lost {
                        log::error!(
                            "GPU {} stopped answering: no longer serving it (its guests are \
                             disconnected)",
                            host.identity().name
                        );
                        inner.lost.store(true, Ordering::Release);
                        inner.shutdown.trigger();
                        return;
                    }
                    thread::sleep(WATCHDOG_PERIOD);
                }
            })
            .map_err(ServeError::Thread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_gpu::emulated::EmulatedHostGpu;

    /// A job that serves until told to stop, then ends as `result` says.
    fn job(host: &Arc<dyn HostGpu>, result: Result<(), String>) -> Job {
        Job {
            label: "test".into(),
            socket_file: None,
            host: Arc::clone(host),
            run: Box::new(move |stop| {
                while !stop.is_triggered() {
                    thread::sleep(Duration::from_millis(1));
                }
                result.map_err(Into::into)
            }),
        }
    }

    /// Before `run` (a start that fails half-way stops what it started), a retired job's
    /// end is heard at once, not after the whole timeout; a failure then still counts.
    #[test]
    fn ends_before_run_are_heard_and_failures_still_count() {
        let host: Arc<dyn HostGpu> = Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap());
        let supervisor = Supervisor::new(ShutdownSignal::new().unwrap()).unwrap();
        let retired = supervisor.spawn(job(&host, Ok(()))).unwrap();
        supervisor.retire(retired);
        let asked = Instant::now();
        assert!(supervisor.wait_ended(retired, Duration::from_secs(5)));
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );

        let failing = supervisor.spawn(job(&host, Err("broken".into()))).unwrap();
        supervisor.inner.jobs.lock()[&failing].stop.trigger();
        assert!(supervisor.wait_ended(failing, Duration::from_secs(5)));
        assert_eq!(
            supervisor.inner.failed_before_run.load(Ordering::Relaxed),
            1
        );
        supervisor.shutdown().trigger();
    }
}
