//! REGION_READ latency measurement, in-process over a socketpair, for the perf report.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::ServerConfig;
use super::connection::Connection;
use super::device::VfioUserDevice;
use super::protocol::{Command, Header, RegionAccessMsg, HEADER_SIZE};
use super::server::serve_stream;
use super::test_client::{ClientError, TestClient};

/// How the server side runs during the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    /// The connection runs on its own thread, as in production: each round trip includes two
    /// thread wake-ups.
    Threaded,
    /// The connection is stepped on the measuring thread right after the request is sent: the
    /// server's cost (parse, device read, reply) plus the four socket syscalls, without
    /// scheduler wake-ups.
    Inline,
    /// Only the server's step is timed: one `recvmsg`, the handling, one `send`.
    ServerStep,
    /// Only the in-memory handling is timed: parse, validate, device read, reply encoding
    /// (no syscalls).
    Dispatch,
}

/// Latency distribution of the measured round trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyStats {
    /// Number of measured round trips.
    pub samples: usize,
    /// Fastest.
    pub min: Duration,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest.
    pub max: Duration,
    /// Mean.
    pub mean: Duration,
}

impl LatencyStats {
    /// Summarize per-sample latencies in nanoseconds (sorted in place).
    pub fn from_nanos(samples: &mut [u64]) -> LatencyStats {
        samples.sort_unstable();
        let n = samples.len();
        let at = |q: f64| -> Duration {
            if n == 0 {
                return Duration::ZERO;
            }
            let i = ((n as f64 * q).ceil() as usize).clamp(1, n) - 1;
            Duration::from_nanos(samples[i])
        };
        let sum: u128 = samples.iter().map(|&s| s as u128).sum();
        LatencyStats {
            samples: n,
            min: at(0.0),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: samples
                .last()
                .map_or(Duration::ZERO, |&s| Duration::from_nanos(s)),
            mean: Duration::from_nanos(sum.checked_div(n as u128).unwrap_or(0) as u64),
        }
    }
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Socket setup failed.
    #[error("setup: {0}")]
    Setup(#[from] std::io::Error),
    /// A request failed.
    #[error("request failed: {0}")]
    Client(#[from] ClientError),
    /// The server side failed.
    #[error("server: {0}")]
    Server(String),
}

/// Measure `iterations` REGION_READs of `size` bytes at `offset` of region `region` of `device`
/// (after a warm-up of `iterations / 10`, at least 100) and return their latency distribution.
pub fn bench_region_read(
    device: Arc<dyn VfioUserDevice>,
    region: u32,
    offset: u64,
    size: u32,
    iterations: usize,
    mode: BenchMode,
) -> Result<LatencyStats, BenchError> {
    let (client_end, server_end) = UnixStream::pair()?;
    let mut client = TestClient::new(client_end);
    let warmup = (iterations / 10).max(100);
    let mut samples = Vec::with_capacity(iterations);
    let mut buf = vec![0u8; size as usize];
    match mode {
        BenchMode::Threaded => {
            let server = std::thread::spawn(move || {
                serve_stream(server_end, device, ServerConfig::default(), None)
            });
            client.version()?;
            for i in 0..warmup + iterations {
                let start = Instant::now();
                let id = client.send_region_read(region, offset, size)?;
                client.recv_region_read(id, &mut buf)?;
                if i >= warmup {
                    samples.push(start.elapsed().as_nanos() as u64);
                }
            }
            drop(client);
            server
                .join()
                .map_err(|_| BenchError::Server("connection thread panicked".into()))?
                .map_err(|e| BenchError::Server(e.to_string()))?;
        }
        BenchMode::Inline => {
            let mut conn = Connection::new(server_end, device, ServerConfig::default(), None)?;
            conn.start();
            let id = client.send(
                super::protocol::Command::Version as u16,
                0,
                &[&[0, 0, 0, 0]],
                &[],
            )?;
            conn.step().map_err(|e| BenchError::Server(e.to_string()))?;
            client.reply_to(id)?;
            for i in 0..warmup + iterations {
                let start = Instant::now();
                let id = client.send_region_read(region, offset, size)?;
                conn.step().map_err(|e| BenchError::Server(e.to_string()))?;
                client.recv_region_read(id, &mut buf)?;
                if i >= warmup {
                    samples.push(start.elapsed().as_nanos() as u64);
                }
            }
            conn.finish();
        }
        BenchMode::ServerStep | BenchMode::Dispatch => {
            let mut conn = Connection::new(server_end, device, ServerConfig::default(), None)?;
            conn.start();
            let id = client.send(Command::Version as u16, 0, &[&[0, 0, 0, 0]], &[])?;
            conn.step().map_err(|e| BenchError::Server(e.to_string()))?;
            client.reply_to(id)?;
            let mut request = [0u8; HEADER_SIZE + RegionAccessMsg::SIZE];
            let _ = Header {
                id: 1,
                command: Command::RegionRead as u16,
                size: request.len() as u32,
                flags: 0,
                error: 0,
            }
            .encode(&mut request);
            let _ = RegionAccessMsg {
                offset,
                region,
                count: size,
            }
            .encode(&mut request[HEADER_SIZE..]);
            for i in 0..warmup + iterations {
                let elapsed = if mode == BenchMode::Dispatch {
                    let start = Instant::now();
                    conn.dispatch_in_memory(&request)
                        .map_err(|e| BenchError::Server(e.to_string()))?;
                    start.elapsed()
                } else {
                    let id = client.send_region_read(region, offset, size)?;
                    let start = Instant::now();
                    conn.step().map_err(|e| BenchError::Server(e.to_string()))?;
                    let elapsed = start.elapsed();
                    client.recv_region_read(id, &mut buf)?;
                    elapsed
                };
                if i >= warmup {
                    samples.push(elapsed.as_nanos() as u64);
                }
            }
            conn.finish();
        }
    }
    Ok(LatencyStats::from_nanos(&mut samples))
}

/// Send `count` posted (`NO_REPLY`) 4-byte REGION_WRITEs at `offset` of `region` to a threaded
/// connection, then one REGION_READ, and return the average time per write until that read's
/// reply arrived (the server drains the whole backlog first).
pub fn bench_posted_writes(
    device: Arc<dyn VfioUserDevice>,
    region: u32,
    offset: u64,
    count: usize,
) -> Result<Duration, BenchError> {
    let (client_end, server_end) = UnixStream::pair()?;
    let mut client = TestClient::new(client_end);
    let server =
        std::thread::spawn(move || serve_stream(server_end, device, ServerConfig::default(), None));
    client.version()?;
    let start = Instant::now();
    for i in 0..count {
        client.region_write(region, offset, &(i as u32).to_ne_bytes(), true)?;
    }
    client.region_read(region, offset, 4)?;
    let per_write = start.elapsed() / count.max(1) as u32;
    drop(client);
    server
        .join()
        .map_err(|_| BenchError::Server("connection thread panicked".into()))?
        .map_err(|e| BenchError::Server(e.to_string()))?;
    Ok(per_write)
}
