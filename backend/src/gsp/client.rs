//! RPCs over the queues: requests, replies matched by function number and `sequence`,
//! and the events that arrive in between.
//!
//! Every message the client takes off the message queue is one of:
//! - the reply to an outstanding request (same function number, same `sequence`): kept
//!   until its caller collects it, so requests may be pipelined;
//! - an event (0x1000 and up) named in the [`Function`] table: queued for
//!   [`GspClient::wait_event`] / [`GspClient::take_events`] (the oldest are dropped past
//!   [`MAX_QUEUED_EVENTS`]);
//! - an event number not in the table: logged and skipped (not fatal, unlike nova);
//! - a reply nobody waits for (its request timed out, or a GSP bug): logged and skipped;
//! - a corrupt message: already dropped and resynchronised by the queue, logged and
//!   counted here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use thiserror::Error;

use super::cmdq::{Backoff, Cmdq, CmdqError};
use super::element::{Element, Outgoing};
use super::rpc::{Function, NvStatus};

/// Most events kept unread.
pub const MAX_QUEUED_EVENTS: usize = 1024;

/// How long the client waits for each stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GspTimeouts {
    /// For room in the command queue.
    pub send: Duration,
    /// For the reply to a request.
    pub reply: Duration,
    /// For the GSP to initialise its message queue after start.
    pub msgq_ready: Duration,
    /// For GSP_INIT_DONE after start.
    pub init_done: Duration,
}

impl Default for GspTimeouts {
    fn default() -> GspTimeouts {
        GspTimeouts {
            send: Duration::from_secs(1),
            reply: Duration::from_secs(2),
            msgq_ready: Duration::from_secs(1),
            init_done: Duration::from_secs(5),
        }
    }
}

/// Errors of RPCs.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The queues failed.
    #[error(transparent)]
    Queue(#[from] CmdqError),
    /// The GSP answered with an error status.
    #[error("{} failed: {} ({:#x})", function.name(), status.name(), status.raw())]
    Rpc {
        /// The request.
        function: Function,
        /// What the GSP returned.
        status: NvStatus,
    },
    /// No reply in time.
    #[error("no reply to {} (sequence {sequence}) within {waited:?}", function.name())]
    ReplyTimeout {
        /// The request.
        function: Function,
        /// Its sequence.
        sequence: u32,
        /// How long the client waited.
        waited: Duration,
    },
    /// The awaited event did not arrive in time.
    #[error("no {} event within {waited:?}", event.name())]
    EventTimeout {
        /// The event.
        event: Function,
        /// How long the client waited.
        waited: Duration,
    },
}

/// An event from the GSP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Event number.
    pub function: Function,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A reply from the GSP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request's function.
    pub function: Function,
    /// `rpc_result`.
    pub status: NvStatus,
    /// The request's sequence.
    pub sequence: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Counters of one client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientStats {
    /// Replies received.
    pub replies: u64,
    /// Known events received.
    pub events: u64,
    /// Events with numbers not in the table (skipped).
    pub unknown_events: u64,
    /// Events dropped because too many were unread.
    pub events_dropped: u64,
    /// Replies nobody was waiting for (skipped).
    pub stale_replies: u64,
    /// Corrupt messages the queue dropped.
    pub corrupt_messages: u64,
}

/// An RPC client on the CPU's end of the queues.
#[derive(Debug)]
pub struct GspClient<'a> {
    cmdq: Cmdq<'a>,
    timeouts: GspTimeouts,
    next_sequence: u32,
    outstanding: HashSet<(u32, u32)>,
    replies: HashMap<(u32, u32), Reply>,
    events: VecDeque<Event>,
    stats: ClientStats,
}

impl<'a> GspClient<'a> {
    /// A client on `cmdq`.
    pub fn new(cmdq: Cmdq<'a>, timeouts: GspTimeouts) -> GspClient<'a> {
        GspClient {
            cmdq,
            timeouts,
            next_sequence: 1,
            outstanding: HashSet::new(),
            replies: HashMap::new(),
            events: VecDeque::new(),
            stats: ClientStats::default(),
        }
    }

    /// The queues.
    pub fn cmdq(&self) -> &Cmdq<'a> {
        &self.cmdq
    }

    /// The queues, for direct use (benchmarks, tests).
    pub fn cmdq_mut(&mut self) -> &mut Cmdq<'a> {
        &mut self.cmdq
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> GspTimeouts {
        self.timeouts
    }

    /// Replaces the timeouts.
    pub fn set_timeouts(&mut self, timeouts: GspTimeouts) {
        self.timeouts = timeouts;
    }

    /// Counters so far.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// Waits for the GSP to initialise its message queue.
    pub fn wait_msgq_ready(&mut self) -> Result<(), ClientError> {
        Ok(self.cmdq.wait_msgq_ready(self.timeouts.msgq_ready)?)
    }

    /// Sends a request; if `expect_reply`, its reply will be kept for
    /// [`GspClient::wait_reply`]. While the command queue is full, incoming messages are
    /// taken (a GSP blocked on a full message queue cannot drain the command queue).
    /// Returns the request's sequence.
    pub fn send(
        &mut self,
        function: Function,
        payload: &[u8],
        expect_reply: bool,
    ) -> Result<u32, ClientError> {
        let sequence = self.next_sequence;
        self.next_sequence = self.next_sequence.wrapping_add(1).max(1);
        let msg = Outgoing {
            function: function.raw(),
            sequence,
            payload,
        };
        let mut backoff = Backoff::new();
        loop {
            match self.cmdq.try_send(msg) {
                Ok(()) => break,
                Err(CmdqError::Full { needed, free }) => {
                    if backoff.elapsed() >= self.timeouts.send {
                        return Err(CmdqError::SendTimeout {
                            needed,
                            free,
                            waited: backoff.elapsed(),
                        }
                        .into());
                    }
                    if !self.pump()? {
                        backoff.snooze();
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        if expect_reply {
            self.outstanding.insert((function.raw(), sequence));
        }
        Ok(sequence)
    }

    /// Takes one message off the queue if there is one and files it. Returns whether a
    /// message (good or corrupt) was taken.
    pub fn pump(&mut self) -> Result<bool, ClientError> {
        match self.cmdq.try_receive() {
            Ok(Some(element)) => {
                self.file(element);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(CmdqError::Corrupt { .. }) => {
                // Cmdq::drop_corrupt has logged it.
                self.stats.corrupt_messages += 1;
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn file(&mut self, element: Element) {
        let function = Function::from_raw(element.rpc.function);
        let key = (element.rpc.function, element.rpc.sequence);
        if self.outstanding.remove(&key) {
            self.stats.replies += 1;
            let reply = Reply {
                function,
                status: NvStatus::from_raw(element.rpc.rpc_result),
                sequence: element.rpc.sequence,
                payload: element.payload,
            };
            self.replies.insert(key, reply);
        } else if function.is_event() {
            if let Function::Unknown(raw) = function {
                log::warn!("GSP event {raw:#x} is not in the r570 table: skipped");
                self.stats.unknown_events += 1;
                return;
            }
            log::debug!("GSP event {}", function.name());
            self.stats.events += 1;
            if self.events.len() == MAX_QUEUED_EVENTS {
                self.events.pop_front();
                self.stats.events_dropped += 1;
            }
            self.events.push_back(Event {
                function,
                payload: element.payload,
            });
        } else {
            log::warn!(
                "GSP reply {} (sequence {}) answers no outstanding request: skipped",
                function.name(),
                element.rpc.sequence
            );
            self.stats.stale_replies += 1;
        }
    }

    /// Waits for the reply to request (`function`, `sequence`), whatever its status.
    pub fn wait_reply(&mut self, function: Function, sequence: u32) -> Result<Reply, ClientError> {
        let key = (function.raw(), sequence);
        let mut backoff = Backoff::new();
        loop {
            if let Some(reply) = self.replies.remove(&key) {
                return Ok(reply);
            }
            if backoff.elapsed() >= self.timeouts.reply {
                // A late reply will count as stale.
                self.outstanding.remove(&key);
                return Err(ClientError::ReplyTimeout {
                    function,
                    sequence,
                    waited: backoff.elapsed(),
                });
            }
            if !self.pump()? {
                backoff.snooze();
            }
        }
    }

    /// Sends a request and waits for its reply; a non-OK status is an error.
    pub fn call(&mut self, function: Function, payload: &[u8]) -> Result<Reply, ClientError> {
        let sequence = self.send(function, payload, true)?;
        let reply = self.wait_reply(function, sequence)?;
        if reply.status != NvStatus::NV_OK {
            return Err(ClientError::Rpc {
                function,
                status: reply.status,
            });
        }
        Ok(reply)
    }

    /// Waits up to `timeout` for event `event` (taking it out of the unread events; other
    /// events stay queued).
    pub fn wait_event(&mut self, event: Function, timeout: Duration) -> Result<Event, ClientError> {
        let mut backoff = Backoff::new();
        loop {
            if let Some(i) = self.events.iter().position(|e| e.function == event) {
                return Ok(self.events.remove(i).expect("index just found"));
            }
            if backoff.elapsed() >= timeout {
                return Err(ClientError::EventTimeout {
                    event,
                    waited: backoff.elapsed(),
                });
            }
            if !self.pump()? {
                backoff.snooze();
            }
        }
    }

    /// The unread events, oldest first, removed from the client.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }
}
