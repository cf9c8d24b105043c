//! Forming a group: rank 0 listens on the control port; every other rank dials it (retrying
//! with backoff until the deadline), opens a control and a data connection, and is checked
//! (protocol version, world size, rank, fingerprint). When all ranks are in, rank 0 sends
//! `GroupReady` (with the NCCL unique id when the CUDA backend asked for one).

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{ConfigError, GroupFingerprint, NcclUniqueId, RankConfig};
use super::control::{PlanBroadcaster, PlanReceiver, Timing};
use super::health::GroupHealth;
use super::tcp::TcpCommunicator;
use super::wire::{self, Channel, Frame, Hello, WireError, PROTOCOL_VERSION};

/// A formed group, as seen by one rank.
#[derive(Debug)]
pub struct Group {
    pub rank: usize,
    pub world_size: usize,
    /// Collectives over TCP (CPU backend). The CUDA backend builds its NCCL communicator from
    /// `nccl_unique_id` instead and keeps this one for nothing but tests.
    pub comm: Arc<TcpCommunicator>,
    pub health: GroupHealth,
    /// The id rank 0 passed to [`rendezvous`], delivered byte-exact to every rank.
    pub nccl_unique_id: Option<NcclUniqueId>,
    pub role: Role,
}

#[derive(Debug)]
pub enum Role {
    /// Rank 0: runs the API and scheduler, sends plans.
    Leader(PlanBroadcaster),
    /// Ranks > 0: run the plans rank 0 sends (see [`super::run_follower`]).
    Follower(PlanReceiver),
}

#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("rank 0 cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("rank 0 at {addr} not reachable within {}s (last error: {last_error})", .waited.as_secs_f64())]
    LeaderUnreachable {
        addr: String,
        waited: Duration,
        last_error: String,
    },
    #[error("group not formed within {}s: missing rank(s) {missing:?}", .waited.as_secs_f64())]
    RanksMissing {
        waited: Duration,
        missing: Vec<usize>,
    },
    #[error("timed out after {}s waiting for rank 0 to {what}", .waited.as_secs_f64())]
    LeaderSilent {
        waited: Duration,
        what: &'static str,
    },
    #[error("protocol version mismatch: rank 0 speaks {leader}, rank {rank} speaks {follower}")]
    VersionMismatch {
        rank: String,
        leader: u32,
        follower: u32,
    },
    #[error("world size mismatch: rank 0 has --world-size {leader}, rank {rank} has {follower}")]
    WorldSizeMismatch {
        rank: usize,
        leader: usize,
        follower: usize,
    },
    #[error("rank {rank} is not a valid follower rank for a group of {world_size}")]
    InvalidRank { rank: usize, world_size: usize },
    #[error("two processes claim rank {rank} ({first} and {second}); check --rank / pod indexes")]
    DuplicateRank {
        rank: usize,
        first: SocketAddr,
        second: SocketAddr,
    },
    #[error("model/profile mismatch: rank 0 has [{leader}], rank {rank} has [{follower}]")]
    FingerprintMismatch {
        rank: usize,
        leader: String,
        follower: String,
    },
    #[error("rank 0 rejected this rank: {0}")]
    Rejected(String),
    #[error("rank 0 aborted group formation: {0}")]
    LeaderAborted(String),
    #[error("rendezvous with {peer}: {detail}")]
    Connection { peer: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Forms the group described by `cfg`. Rank 0 passes the NCCL id to distribute (or `None` for
/// the TCP-only CPU backend); other ranks get it in [`Group::nccl_unique_id`]. `health` moves
/// from `Forming` to `Formed` on success; create it before so `/ready` can read it meanwhile.
pub fn rendezvous(
    cfg: &RankConfig,
    fingerprint: &GroupFingerprint,
    health: &GroupHealth,
    nccl_unique_id: Option<NcclUniqueId>,
) -> Result<Group, RendezvousError> {
    cfg.validate()?;
    let group = if cfg.rank == 0 {
        lead(
            cfg,
            bind_control(cfg)?,
            fingerprint,
            health,
            nccl_unique_id,
            timing(cfg),
        )?
    } else {
        follow(cfg, fingerprint, health, timing(cfg))?
    };
    Ok(formed(cfg, health, group))
}

/// Like [`rendezvous`] for rank 0, on a listener the caller already bound (tests bind port 0).
pub fn rendezvous_leader_on(
    listener: TcpListener,
    cfg: &RankConfig,
    fingerprint: &GroupFingerprint,
    health: &GroupHealth,
    nccl_unique_id: Option<NcclUniqueId>,
) -> Result<Group, RendezvousError> {
    cfg.validate()?;
    let group = lead(
        cfg,
        listener,
        fingerprint,
        health,
        nccl_unique_id,
        timing(cfg),
    )?;
    Ok(formed(cfg, health, group))
}

fn timing(cfg: &RankConfig) -> Timing {
    Timing {
        heartbeat_interval: cfg.heartbeat_interval,
        heartbeat_timeout: cfg.heartbeat_timeout,
    }
}

fn formed(cfg: &RankConfig, health: &GroupHealth, group: Group) -> Group {
    health.mark_formed();
    tracing::info!(rank = cfg.rank, world_size = cfg.world_size, "group formed");
    group
}

fn bind_control(cfg: &RankConfig) -> Result<TcpListener, RendezvousError> {
    let addr = format!("{}:{}", cfg.control_bind_host, cfg.control_port);
    TcpListener::bind(&addr).map_err(|source| RendezvousError::Bind { addr, source })
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Socket timeouts must be non-zero.
fn at_least_ms(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

fn hello(cfg: &RankConfig, fingerprint: &GroupFingerprint, channel: Channel) -> Frame {
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        world_size: cfg.world_size as u32,
        rank: cfg.rank as u32,
        channel,
        fingerprint_digest: fingerprint.digest(),
        fingerprint_description: fingerprint.description().to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// Rank 0

struct Joined {
    control: Vec<Option<(TcpStream, SocketAddr)>>,
    data: Vec<Option<(TcpStream, SocketAddr)>>,
}

impl Joined {
    fn missing(&self) -> Vec<usize> {
        (1..self.control.len())
            .filter(|&r| self.control[r].is_none() || self.data[r].is_none())
            .collect()
    }

    /// Tells every joined rank why the group will not form (they log it and exit).
    fn abort_all(&mut self, reason: &str) {
        let frame = Frame::Abort {
            reason: reason.to_string(),
        };
        for (s, _) in self.control.iter_mut().flatten() {
            let _ = wire::write_frame(s, &frame);
        }
    }
}

/// A previously joined connection whose process has gone (e.g. a restarted pod) may be replaced.
fn is_dead(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let dead = match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = s.set_nonblocking(false);
    dead
}

fn lead(
    cfg: &RankConfig,
    listener: TcpListener,
    fingerprint: &GroupFingerprint,
    health: &GroupHealth,
    nccl_unique_id: Option<NcclUniqueId>,
    timing: Timing,
) -> Result<Group, RendezvousError> {
    let deadline = Instant::now() + cfg.rendezvous_timeout;
    let local = listener.local_addr()?;
    tracing::info!(
        "rank 0 waiting for {} other rank(s) on {local} (deadline {}s)",
        cfg.world_size - 1,
        cfg.rendezvous_timeout.as_secs()
    );
    listener.set_nonblocking(true)?;
    let mut joined = Joined {
        control: (0..cfg.world_size).map(|_| None).collect(),
        data: (0..cfg.world_size).map(|_| None).collect(),
    };
    while !joined.missing().is_empty() {
        if Instant::now() >= deadline {
            let err = RendezvousError::RanksMissing {
                waited: cfg.rendezvous_timeout,
                missing: joined.missing(),
            };
            joined.abort_all(&err.to_string());
            return Err(err);
        }
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if let Err(err) = admit(cfg, fingerprint, stream, peer, &mut joined, deadline) {
            joined.abort_all(&err.to_string());
            return Err(err);
        }
    }

    let ready = Frame::GroupReady {
        nccl_unique_id: nccl_unique_id.as_ref().map(|id| Box::new(id.0)),
    };
    let mut control = Vec::new();
    let mut data = Vec::new();
    for rank in 1..cfg.world_size {
        let (mut c, addr) =
            joined.control[rank]
                .take()
                .ok_or_else(|| RendezvousError::Connection {
                    peer: format!("rank {rank}"),
                    detail: "control connection vanished".into(),
                })?;
        wire::write_frame(&mut c, &ready).map_err(|e| RendezvousError::Connection {
            peer: format!("rank {rank} at {addr}"),
            detail: e.to_string(),
        })?;
        control.push((rank, c));
        if let Some((d, _)) = joined.data[rank].take() {
            data.push((rank, d));
        }
    }
    let comm = TcpCommunicator::new(
        0,
        cfg.world_size,
        data,
        cfg.collective_timeout,
        health.clone(),
    )?;
    let plans = PlanBroadcaster::start(control, timing, health)?;
    Ok(Group {
        rank: 0,
        world_size: cfg.world_size,
        comm: Arc::new(comm),
        health: health.clone(),
        nccl_unique_id,
        role: Role::Leader(plans),
    })
}

/// Reads one newcomer's Hello and files its connection, or says why the group cannot form.
/// Strangers (no preamble, no Hello) are logged and ignored.
fn admit(
    cfg: &RankConfig,
    fingerprint: &GroupFingerprint,
    mut stream: TcpStream,
    peer: SocketAddr,
    joined: &mut Joined,
    deadline: Instant,
) -> Result<(), RendezvousError> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    let wait = at_least_ms(remaining(deadline).min(Duration::from_secs(5)));
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(wait))?;
    let hello = match wire::read_preamble(&mut stream) {
        Ok(true) => match wire::read_frame(&mut stream) {
            Ok(Frame::Hello(h)) => h,
            Ok(other) => {
                tracing::warn!("ignoring connection from {peer}: expected Hello, got {other:?}");
                return Ok(());
            }
            Err(e) => {
                tracing::warn!("ignoring connection from {peer}: {e}");
                return Ok(());
            }
        },
        Ok(false) => {
            tracing::warn!("ignoring connection from {peer}: not a dspark rank");
            return Ok(());
        }
        Err(e) => {
            tracing::debug!("ignoring connection from {peer}: {e}");
            return Ok(());
        }
    };
    let rank = hello.rank as usize;
    let check = || -> Result<(), RendezvousError> {
        if hello.version != PROTOCOL_VERSION {
            return Err(RendezvousError::VersionMismatch {
                rank: format!("at {peer}"),
                leader: PROTOCOL_VERSION,
                follower: hello.version,
            });
        }
        if hello.world_size as usize != cfg.world_size {
            return Err(RendezvousError::WorldSizeMismatch {
                rank,
                leader: cfg.world_size,
                follower: hello.world_size as usize,
            });
        }
        if rank == 0 || rank >= cfg.world_size {
            return Err(RendezvousError::InvalidRank {
                rank,
                world_size: cfg.world_size,
            });
        }
        if hello.fingerprint_digest != fingerprint.digest() {
            return Err(RendezvousError::FingerprintMismatch {
                rank,
                leader: fingerprint.description().to_string(),
                follower: hello.fingerprint_description.clone(),
            });
        }
        Ok(())
    };
    if let Err(e) = check() {
        let _ = wire::write_frame(
            &mut stream,
            &Frame::Reject {
                reason: e.to_string(),
            },
        );
        return Err(e);
    }
    let slot = match hello.channel {
        Channel::Control => &mut joined.control[rank],
        Channel::Data => &mut joined.data[rank],
    };
    if let Some((existing, first)) = slot {
        if is_dead(existing) {
            tracing::warn!(
                "rank {rank} reconnected from {peer}; dropping its dead connection from {first}"
            );
        } else {
            let e = RendezvousError::DuplicateRank {
                rank,
                first: *first,
                second: peer,
            };
            let _ = wire::write_frame(
                &mut stream,
                &Frame::Reject {
                    reason: e.to_string(),
                },
            );
            return Err(e);
        }
    }
    wire::write_frame(&mut stream, &Frame::Welcome).map_err(|e| RendezvousError::Connection {
        peer: format!("rank {rank} at {peer}"),
        detail: e.to_string(),
    })?;
    tracing::info!(
        "rank {rank} joined ({:?} connection from {peer})",
        hello.channel
    );
    *slot = Some((stream, peer));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ranks > 0

fn follow(
    cfg: &RankConfig,
    fingerprint: &GroupFingerprint,
    health: &GroupHealth,
    timing: Timing,
) -> Result<Group, RendezvousError> {
    let addr = cfg
        .leader_addr
        .clone()
        .ok_or(ConfigError::MissingLeaderAddr(cfg.rank))?;
    let deadline = Instant::now() + cfg.rendezvous_timeout;
    let mut control = dial(&addr, deadline, cfg.rendezvous_timeout)?;
    greet(
        &mut control,
        &addr,
        hello(cfg, fingerprint, Channel::Control),
        deadline,
    )?;
    let data = dial(&addr, deadline, cfg.rendezvous_timeout).and_then(|mut data| {
        greet(
            &mut data,
            &addr,
            hello(cfg, fingerprint, Channel::Data),
            deadline,
        )?;
        Ok(data)
    });
    let data = match data {
        Ok(d) => d,
        // Rank 0 may have given up on the group meanwhile; its Abort says why.
        Err(e) => return Err(abort_reason(&mut control).unwrap_or(e)),
    };
    tracing::info!(
        "rank {} joined rank 0 at {addr}; waiting for the others",
        cfg.rank
    );

    control.set_read_timeout(Some(at_least_ms(remaining(deadline))))?;
    let nccl_unique_id = match wire::read_frame(&mut control) {
        Ok(Frame::GroupReady { nccl_unique_id }) => nccl_unique_id.map(|b| NcclUniqueId(*b)),
        Ok(Frame::Abort { reason }) => return Err(RendezvousError::LeaderAborted(reason)),
        Ok(other) => {
            return Err(RendezvousError::Connection {
                peer: addr,
                detail: format!("expected GroupReady, got {other:?}"),
            })
        }
        Err(WireError::TimedOut) => {
            return Err(RendezvousError::LeaderSilent {
                waited: cfg.rendezvous_timeout,
                what: "report the group formed",
            })
        }
        Err(e) => {
            return Err(RendezvousError::Connection {
                peer: addr,
                detail: format!("while waiting for the group to form: {e}"),
            })
        }
    };
    let comm = TcpCommunicator::new(
        cfg.rank,
        cfg.world_size,
        vec![(0, data)],
        cfg.collective_timeout,
        health.clone(),
    )?;
    let plans = PlanReceiver::start(control, timing, health)?;
    Ok(Group {
        rank: cfg.rank,
        world_size: cfg.world_size,
        comm: Arc::new(comm),
        health: health.clone(),
        nccl_unique_id,
        role: Role::Follower(plans),
    })
}

/// Connects to rank 0, resolving the name afresh on each try (the headless Service's record
/// may appear late) with exponential backoff from 100 ms to 2 s, until `deadline`.
fn dial(addr: &str, deadline: Instant, total: Duration) -> Result<TcpStream, RendezvousError> {
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::from("no attempt made");
    let mut announced = false;
    loop {
        let left = remaining(deadline);
        if left.is_zero() {
            return Err(RendezvousError::LeaderUnreachable {
                addr: addr.to_string(),
                waited: total,
                last_error,
            });
        }
        match addr.to_socket_addrs() {
            Ok(candidates) => {
                for sa in candidates {
                    let attempt = at_least_ms(remaining(deadline).min(Duration::from_secs(3)));
                    match TcpStream::connect_timeout(&sa, attempt) {
                        Ok(s) => return Ok(s),
                        Err(e) => last_error = format!("{sa}: {e}"),
                    }
                }
            }
            Err(e) => last_error = format!("cannot resolve {addr}: {e}"),
        }
        if !announced {
            tracing::info!(
                "waiting for rank 0 at {addr} ({last_error}); retrying until the deadline"
            );
            announced = true;
        }
        std::thread::sleep(backoff.min(remaining(deadline)));
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Rank 0's `Abort` on the control connection, if one arrives shortly.
fn abort_reason(control: &mut TcpStream) -> Option<RendezvousError> {
    control
        .set_read_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    match wire::read_frame(control) {
        Ok(Frame::Abort { reason }) => Some(RendezvousError::LeaderAborted(reason)),
        _ => None,
    }
}

/// Sends preamble + Hello, expects Welcome.
fn greet(
    stream: &mut TcpStream,
    addr: &str,
    hello: Frame,
    deadline: Instant,
) -> Result<(), RendezvousError> {
    let conn = |e: WireError| RendezvousError::Connection {
        peer: addr.to_string(),
        detail: e.to_string(),
    };
    stream.set_nodelay(true)?;
    let wait = at_least_ms(remaining(deadline));
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(wait))?;
    wire::write_preamble(stream).map_err(conn)?;
    wire::write_frame(stream, &hello).map_err(conn)?;
    match wire::read_frame(stream) {
        Ok(Frame::Welcome) => Ok(()),
        Ok(Frame::Reject { reason }) => Err(RendezvousError::Rejected(reason)),
        Ok(Frame::Abort { reason }) => Err(RendezvousError::LeaderAborted(reason)),
        Ok(other) => Err(RendezvousError::Connection {
            peer: addr.to_string(),
            detail: format!("expected Welcome, got {other:?}"),
        }),
        Err(WireError::TimedOut) => Err(RendezvousError::LeaderSilent {
            waited: deadline.saturating_duration_since(Instant::now()),
            what: "answer the handshake",
        }),
        Err(e) => Err(conn(e)),
    }
}
