//! [`GspFaults`]: tells the emulated GSP to misbehave, for tests of the host driver's
//! error handling. Every fault is one-shot (counted down as it is applied) except the
//! stall, which lasts until [`GspFaults::resume`].

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

/// How to damage an outgoing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// Flip a bit of the checksum: the receiver's check fails; `elemCount` stays sane.
    Checksum,
    /// Write an `rpc.length` no element can have (more than 16 slots); `elemCount` stays
    /// sane, so the receiver can skip the element.
    Length,
    /// Write `elemCount = 0`: the receiver cannot tell where the element ends and must
    /// jump to the writer's pointer.
    ElemCount,
}

#[derive(Debug, Default)]
struct FaultState {
    stalled: bool,
    drop_replies: u32,
    corruptions: VecDeque<Corruption>,
    unknown_events: VecDeque<u32>,
}

/// Misbehaviour the emulated GSP has been told to show. Shared with the GSP thread.
#[derive(Debug, Default)]
pub struct GspFaults {
    state: Mutex<FaultState>,
}

impl GspFaults {
    fn state(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the GSP: it consumes no commands and posts no messages until
    /// [`GspFaults::resume`] (doorbells are remembered).
    pub fn stall(&self) {
        self.state().stalled = true;
    }

    /// Ends a [`GspFaults::stall`]. The GSP notices within its idle poll period (5 ms), or
    /// at once on the next doorbell.
    pub fn resume(&self) {
        self.state().stalled = false;
    }

    /// Whether the GSP is stalled.
    pub fn is_stalled(&self) -> bool {
        self.state().stalled
    }

    /// The GSP handles the next `n` commands that would get a reply, but drops the replies.
    pub fn drop_next_replies(&self, n: u32) {
        self.state().drop_replies += n;
    }

    /// The next message the GSP posts (reply or event) is damaged as `how`.
    pub fn corrupt_next_message(&self, how: Corruption) {
        self.state().corruptions.push_back(how);
    }

    /// The GSP posts an event with the unknown number `function` (e.g. 0x10FF) at its next
    /// opportunity.
    pub fn send_unknown_event(&self, function: u32) {
        self.state().unknown_events.push_back(function);
    }

    pub(crate) fn take_drop_reply(&self) -> bool {
        let mut s = self.state();
        if s.drop_replies > 0 {
            s.drop_replies -= 1;
            true
        } else {
            false
        }
    }

    pub(crate) fn take_corruption(&self) -> Option<Corruption> {
        self.state().corruptions.pop_front()
    }

    pub(crate) fn take_unknown_event(&self) -> Option<u32> {
        self.state().unknown_events.pop_front()
    }
}
