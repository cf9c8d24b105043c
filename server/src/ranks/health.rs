//! Fail together: one shared record of whether the group is formed, lost or closed.
//!
//! The first loss (closed socket, missed heartbeats, communicator error, a peer's abort) is logged
//! as ONE line `rank R lost: reason`, wakes every blocked collective by closing the group's
//! sockets, and, under [`FailPolicy::ExitProcess`], ends the process with [`EXIT_PEER_LOST`]
//! after a short grace so rank 0's API can answer in-flight requests with an error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Exit status of a process whose group lost a member.
pub const EXIT_PEER_LOST: i32 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupState {
    /// Rendezvous not finished: rank 0 is not ready.
    Forming,
    /// Every rank joined and heartbeats flow.
    Formed,
    /// A member is gone; the group never recovers (the operator restarts all of it).
    Lost { rank: usize, reason: String },
    /// Orderly shutdown was sent or received; closing sockets is expected now.
    Closed,
}

/// What happens after the first loss is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPolicy {
    /// The server's choice: exit with [`EXIT_PEER_LOST`] after `grace`.
    ExitProcess { grace: Duration },
    /// Only record it; every operation returns `CommError::PeerLost` (tests, embedding).
    ReturnErrors,
}

impl Default for FailPolicy {
    fn default() -> Self {
        FailPolicy::ExitProcess {
            grace: Duration::from_secs(1),
        }
    }
}

type LossHook = Box<dyn FnOnce() + Send>;

struct Inner {
    state: watch::Sender<GroupState>,
    policy: FailPolicy,
    loss_recorded: AtomicBool,
    /// Run once on the first loss: close sockets so blocked reads return at once.
    hooks: Mutex<Vec<LossHook>>,
}

/// Cheap to clone; every clone sees the same state. Rank 0's server reads it for `/ready` and to
/// fail requests; `subscribe` gives a tokio watch receiver for async code.
#[derive(Clone)]
pub struct GroupHealth {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GroupHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupHealth")
            .field("state", &*self.inner.state.borrow())
            .field("policy", &self.inner.policy)
            .finish()
    }
}

impl GroupHealth {
    pub fn new(policy: FailPolicy) -> Self {
        let (state, _) = watch::channel(GroupState::Forming);
        Self {
            inner: Arc::new(Inner {
                state,
                policy,
                loss_recorded: AtomicBool::new(false),
                hooks: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The health of a group of one (`--world-size 1`): formed from the start, never lost.
    pub fn single_rank() -> Self {
        let h = Self::new(FailPolicy::ReturnErrors);
        h.mark_formed();
        h
    }

    pub fn state(&self) -> GroupState {
        self.inner.state.borrow().clone()
    }

    /// True while the group is formed (rank 0's readiness also needs the model warmed up).
    pub fn is_formed(&self) -> bool {
        matches!(*self.inner.state.borrow(), GroupState::Formed)
    }

    /// `(rank, reason)` of the recorded loss, if any.
    pub fn lost(&self) -> Option<(usize, String)> {
        match &*self.inner.state.borrow() {
            GroupState::Lost { rank, reason } => Some((*rank, reason.clone())),
            _ => None,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<GroupState> {
        self.inner.state.subscribe()
    }

    pub fn policy(&self) -> FailPolicy {
        self.inner.policy
    }

    pub(crate) fn mark_formed(&self) {
        self.inner.state.send_if_modified(|s| {
            if matches!(s, GroupState::Forming) {
                *s = GroupState::Formed;
                true
            } else {
                false
            }
        });
    }

    /// Orderly end: later socket closures are not losses. No effect once lost.
    pub(crate) fn mark_closed(&self) {
        self.inner.state.send_if_modified(|s| {
            if matches!(s, GroupState::Lost { .. } | GroupState::Closed) {
                false
            } else {
                *s = GroupState::Closed;
                true
            }
        });
    }

    pub fn is_closed(&self) -> bool {
        matches!(*self.inner.state.borrow(), GroupState::Closed)
    }

    /// Records that `rank` is lost. Only the first call (and none after an orderly close) logs,
    /// runs the hooks and applies the policy; returns whether this call was that first one.
    pub fn mark_lost(&self, rank: usize, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        let recorded = self.inner.state.send_if_modified(|s| {
            if matches!(s, GroupState::Lost { .. } | GroupState::Closed) {
                false
            } else {
                // Logged while the state is still locked: whoever sees `Lost` (and may exit at
                // once) is then sure the one clear line is already written.
                tracing::error!("rank {rank} lost: {reason}");
                *s = GroupState::Lost {
                    rank,
                    reason: reason.clone(),
                };
                true
            }
        });
        if !recorded || self.inner.loss_recorded.swap(true, Ordering::SeqCst) {
            return false;
        }
        let hooks =
            std::mem::take(&mut *self.inner.hooks.lock().unwrap_or_else(|p| p.into_inner()));
        for hook in hooks {
            hook();
        }
        if let FailPolicy::ExitProcess { grace } = self.inner.policy {
            std::thread::spawn(move || {
                std::thread::sleep(grace);
                std::process::exit(EXIT_PEER_LOST);
            });
        }
        true
    }

    /// Registers something to run on the first loss (runs at once if already lost).
    pub(crate) fn on_loss(&self, hook: LossHook) {
        let mut hooks = self.inner.hooks.lock().unwrap_or_else(|p| p.into_inner());
        if self.inner.loss_recorded.load(Ordering::SeqCst) {
            drop(hooks);
            hook();
        } else {
            hooks.push(hook);
        }
    }

    /// Waits up to `timeout` for a loss to be recorded elsewhere (a better reason than "socket
    /// closed" may be on its way on the control connection).
    pub(crate) fn wait_lost(&self, timeout: Duration) -> Option<(usize, String)> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lost() {
                return Some(l);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn only_the_first_loss_counts_and_hooks_run_once() {
        let h = GroupHealth::new(FailPolicy::ReturnErrors);
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        h.on_loss(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        h.mark_formed();
        assert!(h.is_formed());
        assert!(h.mark_lost(1, "connection closed"));
        assert!(!h.mark_lost(0, "second"));
        assert_eq!(h.lost(), Some((1, "connection closed".into())));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let r = runs.clone();
        h.on_loss(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        h.mark_closed();
        assert!(h.lost().is_some());
    }

    #[test]
    fn closed_group_ignores_later_losses() {
        let h = GroupHealth::new(FailPolicy::ReturnErrors);
        h.mark_formed();
        h.mark_closed();
        assert!(!h.mark_lost(1, "socket closed after shutdown"));
        assert_eq!(h.state(), GroupState::Closed);
    }
}
