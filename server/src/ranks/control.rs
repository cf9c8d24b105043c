//! Control connections after the rendezvous: heartbeats both ways, step plans from rank 0 to the
//! others, orderly shutdown, and the follower loop that executes the plans.

use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::health::GroupHealth;
use super::wire::{self, Frame, WireError};
use super::CommError;
use crate::engine::{EngineError, KvLayout, ModelRunner, StepOutput, StepPlan};

/// What rank 0 tells the other ranks to do.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanMessage {
    /// Run this step (same plan as rank 0; each rank on its shard).
    Step(StepPlan),
    /// Drop per-request state for this sequence.
    Release { seq_id: u64 },
    /// The group is shutting down in order: exit 0.
    Shutdown,
}

/// One control connection with its heartbeat sender and reader threads.
struct ControlLink {
    peer: usize,
    writer: Arc<Mutex<TcpStream>>,
    socket: TcpStream,
    stop_heartbeat: Option<mpsc::Sender<()>>,
    heartbeat: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
}

impl ControlLink {
    /// `inbox` receives plan messages (ranks > 0); rank 0 passes `None` and only listens for
    /// heartbeats and aborts.
    fn start(
        peer: usize,
        stream: TcpStream,
        timing: Timing,
        health: &GroupHealth,
        inbox: Option<mpsc::Sender<PlanMessage>>,
    ) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timing.heartbeat_timeout))?;
        stream.set_write_timeout(Some(timing.heartbeat_timeout))?;
        let socket = stream.try_clone()?;
        let closer = stream.try_clone()?;
        health.on_loss(Box::new(move || {
            let _ = closer.shutdown(Shutdown::Both);
        }));
        let reader_stream = stream.try_clone()?;
        let writer = Arc::new(Mutex::new(stream));

        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let hb_writer = writer.clone();
        let hb_health = health.clone();
        let heartbeat = std::thread::Builder::new()
            .name(format!("heartbeat-{peer}"))
            .spawn(move || heartbeat_loop(peer, hb_writer, stop_rx, timing, hb_health))?;

        let rd_health = health.clone();
        let reader = std::thread::Builder::new()
            .name(format!("control-{peer}"))
            .spawn(move || reader_loop(peer, reader_stream, timing, rd_health, inbox))?;

        Ok(Self {
            peer,
            writer,
            socket,
            stop_heartbeat: Some(stop_tx),
            heartbeat: Some(heartbeat),
            reader: Some(reader),
        })
    }

    fn send_encoded(&self, bytes: &[u8]) -> Result<(), WireError> {
        use std::io::Write;
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(bytes).map_err(WireError::from)
    }

    fn stop_heartbeat(&mut self) {
        self.stop_heartbeat.take();
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
    }

    fn join_reader(&mut self) {
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ControlLink {
    fn drop(&mut self) {
        self.stop_heartbeat();
        let _ = self.socket.shutdown(Shutdown::Both);
        self.join_reader();
    }
}

fn heartbeat_loop(
    peer: usize,
    writer: Arc<Mutex<TcpStream>>,
    stop: mpsc::Receiver<()>,
    timing: Timing,
    health: GroupHealth,
) {
    let beat = Frame::Heartbeat.encode();
    loop {
        match stop.recv_timeout(timing.heartbeat_interval) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if health.lost().is_some() || health.is_closed() {
            return;
        }
        let result = {
            use std::io::Write;
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            w.write_all(&beat)
        };
        if let Err(e) = result {
            if !health.is_closed() {
                health.mark_lost(peer, format!("cannot send heartbeat: {e}"));
            }
            return;
        }
    }
}

fn reader_loop(
    peer: usize,
    mut stream: TcpStream,
    timing: Timing,
    health: GroupHealth,
    inbox: Option<mpsc::Sender<PlanMessage>>,
) {
    loop {
        let frame = match wire::read_frame(&mut stream) {
            Ok(f) => f,
            Err(e) => {
                if health.is_closed() || health.lost().is_some() {
                    return;
                }
                let reason = match e {
                    WireError::Closed => "control connection closed".to_string(),
                    WireError::TimedOut => format!(
                        "no heartbeat for {}s",
                        timing.heartbeat_timeout.as_secs_f32()
                    ),
                    other => other.to_string(),
                };
                health.mark_lost(peer, reason);
                return;
            }
        };
        let msg = match frame {
            Frame::Heartbeat => continue,
            Frame::Abort { reason } => {
                health.mark_lost(peer, format!("rank {peer} failed: {reason}"));
                return;
            }
            Frame::Step(plan) => PlanMessage::Step(plan),
            Frame::Release { seq_id } => PlanMessage::Release { seq_id },
            Frame::Shutdown => PlanMessage::Shutdown,
            other => {
                health.mark_lost(peer, format!("protocol error: unexpected {other:?}"));
                return;
            }
        };
        let Some(inbox) = &inbox else {
            health.mark_lost(peer, format!("protocol error: rank {peer} sent {msg:?}"));
            return;
        };
        let shutdown = msg == PlanMessage::Shutdown;
        if shutdown {
            health.mark_closed();
            // Rank 0 waits for our side to close; don't make it wait for the link to be dropped.
            let _ = stream.shutdown(Shutdown::Write);
        }
        if inbox.send(msg).is_err() || shutdown {
            return;
        }
    }
}

/// Rank 0's end: sends plans to every other rank and watches their heartbeats.
pub struct PlanBroadcaster {
    links: Vec<ControlLink>,
    health: GroupHealth,
}

impl std::fmt::Debug for PlanBroadcaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peers: Vec<usize> = self.links.iter().map(|l| l.peer).collect();
        f.debug_struct("PlanBroadcaster")
            .field("peers", &peers)
            .finish()
    }
}

impl PlanBroadcaster {
    pub(crate) fn start(
        streams: Vec<(usize, TcpStream)>,
        timing: Timing,
        health: &GroupHealth,
    ) -> std::io::Result<Self> {
        let mut links = Vec::with_capacity(streams.len());
        for (peer, s) in streams {
            links.push(ControlLink::start(peer, s, timing, health, None)?);
        }
        Ok(Self {
            links,
            health: health.clone(),
        })
    }

    pub fn health(&self) -> &GroupHealth {
        &self.health
    }

    fn check(&self) -> Result<(), CommError> {
        if let Some((rank, reason)) = self.health.lost() {
            return Err(CommError::PeerLost { rank, reason });
        }
        if self.health.is_closed() {
            return Err(CommError::Failed("the group was shut down".into()));
        }
        Ok(())
    }

    fn send_to_all(&self, bytes: &[u8]) -> Result<(), CommError> {
        self.check()?;
        for link in &self.links {
            if let Err(e) = link.send_encoded(bytes) {
                let reason = format!("cannot send plan: {e}");
                self.health.mark_lost(link.peer, reason.clone());
                return Err(match self.health.lost() {
                    Some((rank, reason)) => CommError::PeerLost { rank, reason },
                    None => CommError::PeerLost {
                        rank: link.peer,
                        reason,
                    },
                });
            }
        }
        Ok(())
    }

    pub fn send_step(&self, plan: &StepPlan) -> Result<(), CommError> {
        let mut bytes = vec![0u8; 8];
        bytes.push(6); // Frame::Step kind; encoded by hand to avoid cloning the plan.
        wire::encode_plan(plan, &mut bytes);
        let len = (bytes.len() - 8) as u64;
        bytes[..8].copy_from_slice(&len.to_le_bytes());
        self.send_to_all(&bytes)
    }

    /// Tells every rank this one is failing (best effort) and records the loss here.
    pub fn abort_all(&self, reason: &str) {
        let bytes = Frame::Abort {
            reason: reason.into(),
        }
        .encode();
        for link in &self.links {
            let _ = link.send_encoded(&bytes);
        }
        self.health.mark_lost(0, reason);
    }

    pub fn send_release(&self, seq_id: u64) -> Result<(), CommError> {
        self.send_to_all(&Frame::Release { seq_id }.encode())
    }

    /// Orderly end: every other rank's `run_follower` returns `Ok`. Waits (up to the heartbeat
    /// timeout) for them to close their side so nothing they sent is cut off.
    pub fn shutdown(mut self) -> Result<(), CommError> {
        self.check()?;
        for link in &mut self.links {
            link.stop_heartbeat();
        }
        self.health.mark_closed();
        let bytes = Frame::Shutdown.encode();
        let mut first_err = None;
        for link in &self.links {
            if let Err(e) = link.send_encoded(&bytes) {
                first_err.get_or_insert(CommError::PeerLost {
                    rank: link.peer,
                    reason: format!("cannot send shutdown: {e}"),
                });
            }
            let _ = link.socket.shutdown(Shutdown::Write);
        }
        for link in &mut self.links {
            link.join_reader();
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// A rank > 0's end: the plans sent by rank 0, in order.
pub struct PlanReceiver {
    link: ControlLink,
    inbox: mpsc::Receiver<PlanMessage>,
    health: GroupHealth,
}

impl std::fmt::Debug for PlanReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanReceiver").finish_non_exhaustive()
    }
}

impl PlanReceiver {
    pub(crate) fn start(
        stream: TcpStream,
        timing: Timing,
        health: &GroupHealth,
    ) -> std::io::Result<Self> {
        let (tx, inbox) = mpsc::channel();
        let link = ControlLink::start(0, stream, timing, health, Some(tx))?;
        Ok(Self {
            link,
            inbox,
            health: health.clone(),
        })
    }

    pub fn health(&self) -> &GroupHealth {
        &self.health
    }

    /// Next message from rank 0. Blocks until one arrives or the group is lost (never hangs
    /// past the heartbeat timeout once rank 0 is gone).
    pub fn recv(&self) -> Result<PlanMessage, CommError> {
        match self.inbox.recv() {
            Ok(m) => Ok(m),
            Err(_) => Err(match self.health.lost() {
                Some((rank, reason)) => CommError::PeerLost { rank, reason },
                None => CommError::Failed("control connection ended".into()),
            }),
        }
    }

    /// Tells rank 0 this rank is failing (best effort), so its log says why.
    pub fn abort(&self, reason: &str) {
        let _ = self.link.send_encoded(
            &Frame::Abort {
                reason: reason.into(),
            }
            .encode(),
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("step failed on this rank: {0}")]
    Engine(#[from] EngineError),
}

/// The loop of every rank > 0: run each plan rank 0 sends on the local shard until `Shutdown`
/// (`Ok`) or a failure (`Err`; rank 0 is told why before this returns).
///
/// `Err(FollowerError::Comm(CommError::PeerLost { .. }))` means the group was lost; the one log
/// line was already written by [`GroupHealth`], so the caller should just exit with
/// [`super::EXIT_PEER_LOST`].
pub fn run_follower(
    runner: &mut dyn ModelRunner,
    link: &PlanReceiver,
) -> Result<(), FollowerError> {
    loop {
        let message = match link.recv() {
            Ok(message) => message,
            Err(e) => {
                // The plan channel can see the loss before the heartbeat watcher does: record
                // it here too, so the one clear log line is written before the caller exits.
                if let CommError::PeerLost { rank, reason } = &e {
                    link.health().mark_lost(*rank, reason.clone());
                }
                return Err(e.into());
            }
        };
        match message {
            PlanMessage::Step(plan) => match runner.step(&plan) {
                // Outputs are discarded: rank 0 holds the same logits after the final gather.
                Ok(_) => {}
                // Every rank rejects the same plan the same way, before any collective (the
                // engine validates first), so the group stays in step.
                Err(EngineError::Invalid(reason)) => {
                    tracing::debug!("plan rejected on every rank: {reason}");
                }
                Err(e) => {
                    // A collective inside the step saw the group fail: that loss (already
                    // logged) is the error, not its echo from the engine.
                    if let Some((rank, reason)) = link.health().lost() {
                        return Err(CommError::PeerLost { rank, reason }.into());
                    }
                    link.abort(&e.to_string());
                    return Err(e.into());
                }
            },
            PlanMessage::Release { seq_id } => runner.release(seq_id),
            PlanMessage::Shutdown => return Ok(()),
        }
    }
}

/// Rank 0's model runner for a group: every step and release is first sent to the other ranks,
/// then run locally. The scheduler drives it like any [`ModelRunner`].
pub struct LeaderRunner<R: ModelRunner> {
    local: R,
    plans: PlanBroadcaster,
}

impl<R: ModelRunner> LeaderRunner<R> {
    pub fn new(local: R, plans: PlanBroadcaster) -> Self {
        Self { local, plans }
    }

    pub fn health(&self) -> &GroupHealth {
        self.plans.health()
    }

    /// Orderly end of the group; returns the local runner.
    pub fn shutdown(self) -> (R, Result<(), CommError>) {
        let r = self.plans.shutdown();
        (self.local, r)
    }
}

impl<R: ModelRunner> ModelRunner for LeaderRunner<R> {
    fn kv_layout(&self) -> KvLayout {
        self.local.kv_layout()
    }

    fn vocab_size(&self) -> usize {
        self.local.vocab_size()
    }

    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
        self.plans
            .send_step(plan)
            .map_err(|e| EngineError::Comm(e.to_string()))?;
        match self.local.step(plan) {
            Ok(out) => Ok(out),
            // Rejected identically on every rank before any collective: the group is intact.
            Err(e @ EngineError::Invalid(_)) => Err(e),
            // The other ranks may be waiting inside a collective of this step: the group can
            // no longer agree on its state, so it fails together.
            Err(e) => {
                self.plans.abort_all(&format!("step failed: {e}"));
                Err(e)
            }
        }
    }

    fn release(&mut self, seq_id: u64) {
        // A lost group fails the next step anyway; release has no error channel.
        let _ = self.plans.send_release(seq_id);
        self.local.release(seq_id);
    }
}
