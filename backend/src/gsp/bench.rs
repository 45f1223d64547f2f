//! Measurement helpers: RPC round trip host → emulated GSP → host, back-to-back messages
//! per second, and the same two numbers for a plain `std::sync::mpsc` channel between two
//! threads in the same run, as the baseline.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::boot::{boot, BootError};
use super::client::{ClientError, GspTimeouts};
use super::cmdq::{Backoff, CmdqError};
use super::element::Outgoing;
use super::rpc::Function;
use crate::host_gpu::emulated::EmulatedHostGpu;

/// Requests kept in flight by the back-to-back measurement (both for the GSP and for the
/// channel): fewer than the 62 usable slots, so replies always fit the message queue.
pub const PIPELINE_DEPTH: u32 = 32;

/// Errors of the measurement helpers.
#[derive(Debug, Error)]
pub enum BenchError {
    /// The emulated GPU could not be created.
    #[error("creating the emulated GPU failed: {0}")]
    Gpu(String),
    /// Booting the GSP failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// An RPC failed.
    #[error(transparent)]
    Rpc(#[from] ClientError),
    /// The queues failed.
    #[error(transparent)]
    Queue(#[from] CmdqError),
    /// A reply did not match its request.
    #[error("reply mismatch: {0}")]
    Mismatch(String),
    /// The baseline threads failed.
    #[error("the channel baseline failed: {0}")]
    Channel(String),
    /// Zero iterations asked for.
    #[error("nothing to measure: round_trips and messages must be non-zero")]
    Empty,
}

/// Latency percentiles and throughput of one transport.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TransportFigures {
    /// Median round trip.
    pub round_trip_p50: Duration,
    /// 99th-percentile round trip.
    pub round_trip_p99: Duration,
    /// Requests completed per second with [`PIPELINE_DEPTH`] in flight.
    pub messages_per_second: f64,
}

/// The result of [`measure_rpc`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RpcBenchmark {
    /// Emulated profile used.
    pub profile: String,
    /// Round trips timed.
    pub round_trips: u32,
    /// Back-to-back messages timed.
    pub messages: u32,
    /// Payload bytes per message.
    pub payload_bytes: usize,
    /// NOP RPCs through the queues and the emulated GSP thread.
    pub gsp: TransportFigures,
    /// The same pattern over two `std::sync::mpsc` channels between two threads.
    pub channel: TransportFigures,
}

fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    sorted[(sorted.len() * pct / 100).min(sorted.len() - 1)]
}

fn figures(mut samples: Vec<Duration>, messages: u32, elapsed: Duration) -> TransportFigures {
    samples.sort_unstable();
    TransportFigures {
        round_trip_p50: percentile(&samples, 50),
        round_trip_p99: percentile(&samples, 99),
        messages_per_second: f64::from(messages) / elapsed.as_secs_f64(),
    }
}

/// Boots the emulated GSP of `profile`, then times `round_trips` NOP RPCs one at a time
/// and `messages` NOPs back to back (up to [`PIPELINE_DEPTH`] in flight), each with a
/// `payload_bytes` payload the GSP echoes; then the same over mpsc channels.
pub fn measure_rpc(
    profile: &str,
    round_trips: u32,
    messages: u32,
    payload_bytes: usize,
) -> Result<RpcBenchmark, BenchError> {
    if round_trips == 0 || messages == 0 {
        return Err(BenchError::Empty);
    }
    let host = EmulatedHostGpu::by_name(profile).map_err(|e| BenchError::Gpu(e.to_string()))?;
    let mut session = boot(&host, GspTimeouts::default())?;
    let client = session.client_mut();
    let payload = vec![0xA5u8; payload_bytes];

    let mut samples = Vec::with_capacity(round_trips as usize);
    for _ in 0..round_trips {
        let t = Instant::now();
        let reply = client.call(Function::NOP, &payload)?;
        samples.push(t.elapsed());
        if reply.payload.len() != payload_bytes {
            return Err(BenchError::Mismatch(format!(
                "{} bytes echoed",
                reply.payload.len()
            )));
        }
    }

    // Back to back, straight on the queues: keep PIPELINE_DEPTH NOPs in flight.
    let cmdq = client.cmdq_mut();
    let timeout = Duration::from_secs(5);
    let (mut sent, mut done) = (0u32, 0u32);
    let start = Instant::now();
    let mut backoff = Backoff::new();
    while done < messages {
        let mut progressed = false;
        while sent < messages && sent - done < PIPELINE_DEPTH {
            let msg = Outgoing {
                function: Function::NOP.raw(),
                sequence: sent,
                payload: &payload,
            };
            match cmdq.try_send(msg) {
                Ok(()) => {
                    sent += 1;
                    progressed = true;
                }
                Err(CmdqError::Full { .. }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(reply) = cmdq.try_receive()? {
            if reply.rpc.sequence != done {
                return Err(BenchError::Mismatch(format!(
                    "sequence {} for {done}",
                    reply.rpc.sequence
                )));
            }
            done += 1;
            progressed = true;
        }
        if progressed {
            backoff = Backoff::new();
        } else if backoff.elapsed() > timeout {
            return Err(CmdqError::ReceiveTimeout(timeout).into());
        } else {
            backoff.snooze();
        }
    }
    let gsp = figures(samples, messages, start.elapsed());
    let channel = channel_baseline(round_trips, messages, payload_bytes)?;
    Ok(RpcBenchmark {
        profile: profile.to_owned(),
        round_trips,
        messages,
        payload_bytes,
        gsp,
        channel,
    })
}

/// Round trips and back-to-back messages over two mpsc channels to an echo thread.
fn channel_baseline(
    round_trips: u32,
    messages: u32,
    payload_bytes: usize,
) -> Result<TransportFigures, BenchError> {
    let (to_echo, echo_rx) = mpsc::channel::<(u32, Vec<u8>)>();
    let (echo_tx, from_echo) = mpsc::channel::<(u32, Vec<u8>)>();
    let echo = std::thread::spawn(move || {
        while let Ok(m) = echo_rx.recv() {
            if echo_tx.send(m).is_err() {
                break;
            }
        }
    });
    let lost = |_| BenchError::Channel("echo thread gone".into());
    let payload = vec![0xA5u8; payload_bytes];
    let mut samples = Vec::with_capacity(round_trips as usize);
    for i in 0..round_trips {
        let t = Instant::now();
        to_echo
            .send((i, payload.clone()))
            .map_err(|_| BenchError::Channel("send".into()))?;
        let (seq, _) = from_echo.recv().map_err(lost)?;
        samples.push(t.elapsed());
        if seq != i {
            return Err(BenchError::Mismatch(format!(
                "channel sequence {seq} for {i}"
            )));
        }
    }
    let (mut sent, mut done) = (0u32, 0u32);
    let start = Instant::now();
    while done < messages {
        while sent < messages && sent - done < PIPELINE_DEPTH {
            to_echo
                .send((sent, payload.clone()))
                .map_err(|_| BenchError::Channel("send".into()))?;
            sent += 1;
        }
        from_echo.recv().map_err(lost)?;
        done += 1;
    }
    let elapsed = start.elapsed();
    drop(to_echo);
    echo.join()
        .map_err(|_| BenchError::Channel("echo thread panicked".into()))?;
    Ok(figures(samples, messages, elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_both_transports() {
        let r = measure_rpc("tu102-24g", 50, 200, 64).unwrap();
        assert_eq!((r.round_trips, r.messages), (50, 200));
        for t in [r.gsp, r.channel] {
            assert!(t.round_trip_p50 <= t.round_trip_p99);
            assert!(t.messages_per_second > 0.0);
        }
        assert!(matches!(
            measure_rpc("tu102-24g", 0, 1, 0),
            Err(BenchError::Empty)
        ));
    }
}
