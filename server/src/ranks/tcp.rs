//! The TCP communicator (CPU backend, tests, demo): a star around rank 0.
//!
//! Every rank > 0 holds one data connection to rank 0. A collective is: each rank > 0 sends its
//! contribution, rank 0 combines them in rank order (`((x0 + x1) + x2) + ...` for sums) and sends
//! the one result to everyone. Every rank therefore ends with bit-identical values, and the same
//! inputs always give the same bits. Fine for two ranks and CPU-sized tensors; the CUDA backend
//! uses NCCL instead.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::health::GroupHealth;
use super::wire::{Frame, WireError, MAX_FRAME_BYTES};
use super::{CommError, Communicator};

const OP_ALL_REDUCE_SUM: u8 = 1;
const OP_ALL_GATHER: u8 = 2;
const OP_BROADCAST: u8 = 3;

const KIND_CONTRIBUTION: u8 = 20;
const KIND_RESULT: u8 = 21;

fn op_name(op: u8) -> &'static str {
    match op {
        OP_ALL_REDUCE_SUM => "all_reduce_sum",
        OP_ALL_GATHER => "all_gather",
        OP_BROADCAST => "broadcast",
        _ => "unknown collective",
    }
}

struct Links {
    /// Rank 0: `(rank, stream)` for ranks 1.. in order. Others: `[(0, stream)]`.
    peers: Vec<(usize, TcpStream)>,
    /// Number of collectives run so far; both sides must agree on it.
    seq: u64,
    /// Reused buffers so a collective does not allocate per call in steady state.
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
}

pub struct TcpCommunicator {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    health: GroupHealth,
    links: Mutex<Links>,
}

impl std::fmt::Debug for TcpCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

/// A received data frame: which collective it belongs to, payload in `Links::recv_buf[13..]`.
struct Header {
    kind: u8,
    op: u8,
    seq: u64,
}

impl TcpCommunicator {
    /// `peers` as described on [`Links::peers`]; built by the rendezvous.
    pub(crate) fn new(
        rank: usize,
        world_size: usize,
        peers: Vec<(usize, TcpStream)>,
        timeout: Duration,
        health: GroupHealth,
    ) -> std::io::Result<Self> {
        let mut closers = Vec::with_capacity(peers.len());
        for (_, s) in &peers {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            closers.push(s.try_clone()?);
        }
        // A loss seen anywhere (heartbeat, control socket) must wake a collective blocked here.
        health.on_loss(Box::new(move || {
            for s in closers {
                let _ = s.shutdown(Shutdown::Both);
            }
        }));
        Ok(Self {
            rank,
            world_size,
            timeout,
            health,
            links: Mutex::new(Links {
                peers,
                seq: 0,
                send_buf: Vec::new(),
                recv_buf: Vec::new(),
            }),
        })
    }

    pub fn health(&self) -> &GroupHealth {
        &self.health
    }

    fn lock(&self) -> Result<MutexGuard<'_, Links>, CommError> {
        if let Some((rank, reason)) = self.health.lost() {
            return Err(CommError::PeerLost { rank, reason });
        }
        if self.health.is_closed() {
            return Err(CommError::Failed("the group was shut down".into()));
        }
        Ok(self.links.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Turns an I/O failure with `peer` into `PeerLost`, recording the loss for the whole group.
    fn peer_lost(&self, peer: usize, op: u8, e: WireError) -> CommError {
        if let Some((rank, reason)) = self.health.lost() {
            return CommError::PeerLost { rank, reason };
        }
        let reason = match e {
            WireError::Closed => {
                // The control connection may be about to deliver the peer's own reason.
                if let Some((rank, reason)) = self.health.wait_lost(Duration::from_millis(300)) {
                    return CommError::PeerLost { rank, reason };
                }
                format!("data connection closed during {}", op_name(op))
            }
            WireError::TimedOut => format!(
                "no answer for {}s during {}",
                self.timeout.as_secs_f32(),
                op_name(op)
            ),
            other => format!("{other} during {}", op_name(op)),
        };
        self.health.mark_lost(peer, reason.clone());
        match self.health.lost() {
            Some((rank, reason)) => CommError::PeerLost { rank, reason },
            None => CommError::PeerLost { rank: peer, reason },
        }
    }

    /// A protocol violation (mismatched lengths or call order) leaves the streams out of step:
    /// the group cannot continue.
    fn out_of_step(&self, peer: usize, reason: String) -> CommError {
        self.health.mark_lost(peer, reason.clone());
        CommError::Failed(reason)
    }
}

fn send(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    kind: u8,
    op: u8,
    seq: u64,
    payload: &[u8],
) -> Result<(), WireError> {
    buf.clear();
    buf.extend_from_slice(&((1 + 1 + 8 + payload.len()) as u64).to_le_bytes());
    buf.push(kind);
    buf.push(op);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(payload);
    stream.write_all(buf).map_err(io_to_wire)
}

fn send_f32(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    kind: u8,
    op: u8,
    seq: u64,
    data: &[f32],
) -> Result<(), WireError> {
    buf.clear();
    buf.extend_from_slice(&((1 + 1 + 8 + data.len() * 4) as u64).to_le_bytes());
    buf.push(kind);
    buf.push(op);
    buf.extend_from_slice(&seq.to_le_bytes());
    for x in data {
        buf.extend_from_slice(&x.to_le_bytes());
    }
    stream.write_all(buf).map_err(io_to_wire)
}

fn io_to_wire(e: std::io::Error) -> WireError {
    super::wire::classify(e)
}

/// Reads one data frame into `buf`; the payload is `buf[10..]`.
fn recv(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Header, WireError> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).map_err(io_to_wire)?;
    let len = u64::from_le_bytes(len);
    if !(1..=MAX_FRAME_BYTES).contains(&len) {
        return Err(WireError::Malformed(format!("frame length {len}")));
    }
    buf.resize(len as usize, 0);
    stream.read_exact(buf).map_err(io_to_wire)?;
    let kind = buf[0];
    if kind == KIND_CONTRIBUTION || kind == KIND_RESULT {
        if buf.len() < 10 {
            return Err(WireError::Malformed("short data frame".into()));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&buf[2..10]);
        return Ok(Header {
            kind,
            op: buf[1],
            seq: u64::from_le_bytes(seq),
        });
    }
    Ok(Header {
        kind,
        op: 0,
        seq: 0,
    })
}

const PAYLOAD: usize = 10;

impl TcpCommunicator {
    /// Receives the frame for collective (`op`, `seq`) from `peer` into `links.recv_buf`.
    /// A `CollectiveError` from rank 0 becomes `Failed` with its reason.
    fn recv_for(
        &self,
        links: &mut Links,
        idx: usize,
        want_kind: u8,
        op: u8,
        seq: u64,
    ) -> Result<(), CommError> {
        let (peer, stream) = &mut links.peers[idx];
        let peer = *peer;
        let h = recv(stream, &mut links.recv_buf).map_err(|e| self.peer_lost(peer, op, e))?;
        if h.kind == want_kind && h.op == op && h.seq == seq {
            return Ok(());
        }
        if let Ok(Frame::CollectiveError { reason, .. }) = Frame::decode(&links.recv_buf) {
            // Rank 0 already recorded the loss on its side; record it here too.
            return Err(self.out_of_step(peer, format!("rank 0: {reason}")));
        }
        Err(self.out_of_step(
            peer,
            format!(
                "collectives out of step: this rank is at #{seq} {}, rank {peer} sent #{} {}",
                op_name(op),
                h.seq,
                op_name(h.op)
            ),
        ))
    }

    /// Rank 0: tells every rank > 0 that collective `seq` failed, then fails locally.
    fn fail_all(&self, links: &mut Links, seq: u64, bad_peer: usize, reason: String) -> CommError {
        let frame = Frame::CollectiveError {
            seq,
            reason: reason.clone(),
        }
        .encode();
        for (_, s) in links.peers.iter_mut() {
            let _ = s.write_all(&frame);
        }
        self.out_of_step(bad_peer, reason)
    }
}

fn read_f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
        let op = OP_ALL_REDUCE_SUM;
        let mut guard = self.lock()?;
        let links = &mut *guard;
        links.seq += 1;
        let seq = links.seq;
        if self.rank == 0 {
            // Sum in rank order: data already holds rank 0's part.
            for idx in 0..links.peers.len() {
                self.recv_for(links, idx, KIND_CONTRIBUTION, op, seq)?;
                let payload = &links.recv_buf[PAYLOAD..];
                if payload.len() != data.len() * 4 {
                    let peer = links.peers[idx].0;
                    let reason = format!(
                        "all_reduce_sum length mismatch: rank 0 has {} floats, rank {peer} has {}",
                        data.len(),
                        payload.len() / 4
                    );
                    return Err(self.fail_all(links, seq, peer, reason));
                }
                for (acc, x) in data.iter_mut().zip(read_f32s(payload)) {
                    *acc += x;
                }
            }
            let Links {
                peers, send_buf, ..
            } = &mut *links;
            for (peer, s) in peers.iter_mut() {
                let peer = *peer;
                send_f32(s, send_buf, KIND_RESULT, op, seq, data)
                    .map_err(|e| self.peer_lost(peer, op, e))?;
            }
        } else {
            let Links {
                peers, send_buf, ..
            } = &mut *links;
            send_f32(&mut peers[0].1, send_buf, KIND_CONTRIBUTION, op, seq, data)
                .map_err(|e| self.peer_lost(0, op, e))?;
            self.recv_for(links, 0, KIND_RESULT, op, seq)?;
            let payload = &links.recv_buf[PAYLOAD..];
            if payload.len() != data.len() * 4 {
                return Err(
                    self.out_of_step(0, "all_reduce_sum result has the wrong length".into())
                );
            }
            for (out, x) in data.iter_mut().zip(read_f32s(payload)) {
                *out = x;
            }
        }
        Ok(())
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        let op = OP_ALL_GATHER;
        let mut guard = self.lock()?;
        let links = &mut *guard;
        links.seq += 1;
        let seq = links.seq;
        if self.rank == 0 {
            let mut out = Vec::with_capacity(local.len() * self.world_size);
            out.extend_from_slice(local);
            for idx in 0..links.peers.len() {
                self.recv_for(links, idx, KIND_CONTRIBUTION, op, seq)?;
                let payload = &links.recv_buf[PAYLOAD..];
                if payload.len() != local.len() * 4 {
                    let peer = links.peers[idx].0;
                    let reason = format!(
                        "all_gather length mismatch: rank 0 has {} floats, rank {peer} has {}",
                        local.len(),
                        payload.len() / 4
                    );
                    return Err(self.fail_all(links, seq, peer, reason));
                }
                out.extend(read_f32s(payload));
            }
            let Links {
                peers, send_buf, ..
            } = &mut *links;
            for (peer, s) in peers.iter_mut() {
                let peer = *peer;
                send_f32(s, send_buf, KIND_RESULT, op, seq, &out)
                    .map_err(|e| self.peer_lost(peer, op, e))?;
            }
            Ok(out)
        } else {
            let Links {
                peers, send_buf, ..
            } = &mut *links;
            send_f32(&mut peers[0].1, send_buf, KIND_CONTRIBUTION, op, seq, local)
                .map_err(|e| self.peer_lost(0, op, e))?;
            self.recv_for(links, 0, KIND_RESULT, op, seq)?;
            let payload = &links.recv_buf[PAYLOAD..];
            if payload.len() != local.len() * 4 * self.world_size {
                return Err(self.out_of_step(0, "all_gather result has the wrong length".into()));
            }
            Ok(read_f32s(payload).collect())
        }
    }

    fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) -> Result<(), CommError> {
        if root >= self.world_size {
            return Err(CommError::Failed(format!(
                "broadcast root {root} is not a rank of a group of {}",
                self.world_size
            )));
        }
        let op = OP_BROADCAST;
        let mut guard = self.lock()?;
        let links = &mut *guard;
        links.seq += 1;
        let seq = links.seq;
        if self.rank == 0 {
            if root != 0 {
                let idx = links
                    .peers
                    .iter()
                    .position(|(r, _)| *r == root)
                    .ok_or_else(|| CommError::Failed(format!("no link to rank {root}")))?;
                self.recv_for(links, idx, KIND_CONTRIBUTION, op, seq)?;
                data.clear();
                data.extend_from_slice(&links.recv_buf[PAYLOAD..]);
            }
            let Links {
                peers, send_buf, ..
            } = &mut *links;
            for (peer, s) in peers.iter_mut().filter(|(r, _)| *r != root) {
                let peer = *peer;
                send(s, send_buf, KIND_RESULT, op, seq, data)
                    .map_err(|e| self.peer_lost(peer, op, e))?;
            }
        } else if self.rank == root {
            let Links {
                peers, send_buf, ..
            } = &mut *links;
            send(&mut peers[0].1, send_buf, KIND_CONTRIBUTION, op, seq, data)
                .map_err(|e| self.peer_lost(0, op, e))?;
        } else {
            self.recv_for(links, 0, KIND_RESULT, op, seq)?;
            data.clear();
            data.extend_from_slice(&links.recv_buf[PAYLOAD..]);
        }
        Ok(())
    }
}

impl Drop for TcpCommunicator {
    fn drop(&mut self) {
        let links = self.links.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, s) in &links.peers {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}
