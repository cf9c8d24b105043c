//! Wire format shared by the control and data connections: a connection preamble, then
//! length-prefixed frames `[u64 LE length][u8 kind][payload]`. Integers are little-endian.
//! The step plan has its own compact binary codec (no serde format dependency).

use std::io::{self, Read, Write};

use crate::engine::{DraftPlan, LogitsWanted, SeqPlan, StepPlan};

/// Sent once by the dialing side before its first frame; lets rank 0 ignore strangers
/// (a TCP probe, a port scan) instead of failing the group.
pub const PREAMBLE: [u8; 8] = *b"DSPKRANK";

/// Bumped on any change to the frames below. Checked in the handshake.
pub const PROTOCOL_VERSION: u32 = 4;

/// Largest frame accepted; guards against garbage lengths. Larger than any collective we run
/// (logits all-gather of a full verify batch is well under 1 GiB).
pub const MAX_FRAME_BYTES: u64 = 4 << 30;

/// Longest fingerprint description carried in a Hello (the digest always travels in full).
pub const MAX_DESCRIPTION_BYTES: usize = 2048;

/// Which connection a Hello opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Handshake, heartbeats, step plans.
    Control,
    /// Collective operations of the TCP communicator.
    Data,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub version: u32,
    pub world_size: u32,
    pub rank: u32,
    pub channel: Channel,
    pub fingerprint_digest: [u8; 32],
    pub fingerprint_description: String,
}

/// Every frame of the protocol. See docs/RANKS.md for who sends what when.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Hello(Hello),
    Welcome,
    Reject {
        reason: String,
    },
    GroupReady {
        nccl_unique_id: Option<Box<[u8; 128]>>,
    },
    Heartbeat,
    Step(StepPlan),
    Release {
        seq_id: u64,
    },
    Shutdown,
    /// The sender is failing and says why; the receiver treats the sender as lost.
    Abort {
        reason: String,
    },
    /// A rank's input to collective number `seq` (operation `op`).
    Contribution {
        op: u8,
        seq: u64,
        payload: Vec<u8>,
    },
    /// Rank 0's answer to collective number `seq`.
    Result {
        op: u8,
        seq: u64,
        payload: Vec<u8>,
    },
    /// Rank 0 could not complete collective `seq` (e.g. ranks passed different lengths).
    CollectiveError {
        seq: u64,
        reason: String,
    },
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REJECT: u8 = 3;
    pub const GROUP_READY: u8 = 4;
    pub const HEARTBEAT: u8 = 5;
    pub const STEP: u8 = 6;
    pub const RELEASE: u8 = 7;
    pub const SHUTDOWN: u8 = 8;
    pub const ABORT: u8 = 9;
    pub const CONTRIBUTION: u8 = 20;
    pub const RESULT: u8 = 21;
    pub const COLLECTIVE_ERROR: u8 = 22;
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by peer")]
    Closed,
    #[error("timed out")]
    TimedOut,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

pub(crate) fn classify(e: io::Error) -> WireError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected => WireError::Closed,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => WireError::TimedOut,
        _ => WireError::Io(e),
    }
}

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&[0u8; 8]);
        self.encode_body(&mut out);
        let len = (out.len() - 8) as u64;
        out[..8].copy_from_slice(&len.to_le_bytes());
        out
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello(h) => {
                out.push(kind::HELLO);
                // Version first so any future layout can still be told apart.
                out.extend_from_slice(&h.version.to_le_bytes());
                out.extend_from_slice(&h.world_size.to_le_bytes());
                out.extend_from_slice(&h.rank.to_le_bytes());
                out.push(match h.channel {
                    Channel::Control => 0,
                    Channel::Data => 1,
                });
                out.extend_from_slice(&h.fingerprint_digest);
                put_str(
                    out,
                    truncate(&h.fingerprint_description, MAX_DESCRIPTION_BYTES),
                );
            }
            Frame::Welcome => out.push(kind::WELCOME),
            Frame::Reject { reason } => {
                out.push(kind::REJECT);
                put_str(out, reason);
            }
            Frame::GroupReady { nccl_unique_id } => {
                out.push(kind::GROUP_READY);
                match nccl_unique_id {
                    Some(id) => {
                        out.push(1);
                        out.extend_from_slice(&id[..]);
                    }
                    None => out.push(0),
                }
            }
            Frame::Heartbeat => out.push(kind::HEARTBEAT),
            Frame::Step(plan) => {
                out.push(kind::STEP);
                encode_plan(plan, out);
            }
            Frame::Release { seq_id } => {
                out.push(kind::RELEASE);
                out.extend_from_slice(&seq_id.to_le_bytes());
            }
            Frame::Shutdown => out.push(kind::SHUTDOWN),
            Frame::Abort { reason } => {
                out.push(kind::ABORT);
                put_str(out, reason);
            }
            Frame::Contribution { op, seq, payload } => {
                out.push(kind::CONTRIBUTION);
                out.push(*op);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(payload);
            }
            Frame::Result { op, seq, payload } => {
                out.push(kind::RESULT);
                out.push(*op);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(payload);
            }
            Frame::CollectiveError { seq, reason } => {
                out.push(kind::COLLECTIVE_ERROR);
                out.extend_from_slice(&seq.to_le_bytes());
                put_str(out, reason);
            }
        }
    }

    pub fn decode(body: &[u8]) -> Result<Frame, WireError> {
        let mut r = Cursor { buf: body, pos: 0 };
        let k = r.u8()?;
        let frame = match k {
            kind::HELLO => {
                let version = r.u32()?;
                if version != PROTOCOL_VERSION {
                    // Layout after the version may differ: report only what we can trust.
                    return Ok(Frame::Hello(Hello {
                        version,
                        world_size: 0,
                        rank: 0,
                        channel: Channel::Control,
                        fingerprint_digest: [0; 32],
                        fingerprint_description: String::new(),
                    }));
                }
                let world_size = r.u32()?;
                let rank = r.u32()?;
                let channel = match r.u8()? {
                    0 => Channel::Control,
                    1 => Channel::Data,
                    c => return Err(WireError::Malformed(format!("unknown channel {c}"))),
                };
                let mut fingerprint_digest = [0u8; 32];
                fingerprint_digest.copy_from_slice(r.take(32)?);
                let fingerprint_description = r.string()?;
                Frame::Hello(Hello {
                    version,
                    world_size,
                    rank,
                    channel,
                    fingerprint_digest,
                    fingerprint_description,
                })
            }
            kind::WELCOME => Frame::Welcome,
            kind::REJECT => Frame::Reject {
                reason: r.string()?,
            },
            kind::GROUP_READY => {
                let nccl_unique_id = match r.u8()? {
                    0 => None,
                    _ => {
                        let mut id = Box::new([0u8; 128]);
                        id.copy_from_slice(r.take(128)?);
                        Some(id)
                    }
                };
                Frame::GroupReady { nccl_unique_id }
            }
            kind::HEARTBEAT => Frame::Heartbeat,
            kind::STEP => Frame::Step(decode_plan(&mut r)?),
            kind::RELEASE => Frame::Release { seq_id: r.u64()? },
            kind::SHUTDOWN => Frame::Shutdown,
            kind::ABORT => Frame::Abort {
                reason: r.string()?,
            },
            kind::CONTRIBUTION | kind::RESULT => {
                let op = r.u8()?;
                let seq = r.u64()?;
                let payload = r.rest().to_vec();
                if k == kind::CONTRIBUTION {
                    Frame::Contribution { op, seq, payload }
                } else {
                    Frame::Result { op, seq, payload }
                }
            }
            kind::COLLECTIVE_ERROR => Frame::CollectiveError {
                seq: r.u64()?,
                reason: r.string()?,
            },
            other => return Err(WireError::Malformed(format!("unknown frame kind {other}"))),
        };
        if r.pos != body.len() {
            return Err(WireError::Malformed(format!(
                "{} trailing bytes after frame kind {k}",
                body.len() - r.pos
            )));
        }
        Ok(frame)
    }
}

pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<(), WireError> {
    w.write_all(&frame.encode()).map_err(classify)?;
    w.flush().map_err(classify)
}

/// Reads one frame; the reader's own timeout (if any) bounds each read.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, WireError> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(classify)?;
    let len = u64::from_le_bytes(len);
    if len == 0 || len > MAX_FRAME_BYTES {
        return Err(WireError::Malformed(format!("frame length {len}")));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).map_err(classify)?;
    Frame::decode(&body)
}

pub fn write_preamble(w: &mut impl Write) -> Result<(), WireError> {
    w.write_all(&PREAMBLE).map_err(classify)
}

/// True if the peer sent our preamble.
pub fn read_preamble(r: &mut impl Read) -> Result<bool, WireError> {
    let mut p = [0u8; 8];
    r.read_exact(&mut p).map_err(classify)?;
    Ok(p == PREAMBLE)
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_u32s(out: &mut Vec<u8>, xs: &[u32]) {
    out.extend_from_slice(&(xs.len() as u32).to_le_bytes());
    for x in xs {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Compact binary plan: `[u32 n_seqs]` then per sequence `seq_id u64, start_pos u64,
/// tokens (u32 count + u32s), block_table (u32 count + u32s), recent_table (u32 count + u32s),
/// logits u8, draft u8 (0 = none;
/// 1 = followed by num_drafts u32, seed u64, temperature f32, top_p f32, top_k u32)`.
pub fn encode_plan(plan: &StepPlan, out: &mut Vec<u8>) {
    let StepPlan { seqs } = plan;
    out.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
    for s in seqs {
        // Destructured so a new SeqPlan field fails to compile here instead of being dropped.
        let SeqPlan {
            seq_id,
            start_pos,
            tokens,
            block_table,
            recent_table,
            logits,
            draft,
        } = s;
        out.extend_from_slice(&seq_id.to_le_bytes());
        out.extend_from_slice(&(*start_pos as u64).to_le_bytes());
        put_u32s(out, tokens);
        put_u32s(out, block_table);
        put_u32s(out, recent_table);
        out.push(match logits {
            LogitsWanted::None => 0,
            LogitsWanted::Last => 1,
            LogitsWanted::All => 2,
        });
        match draft {
            None => out.push(0),
            Some(d) => {
                out.push(1);
                out.extend_from_slice(&(d.num_drafts as u32).to_le_bytes());
                out.extend_from_slice(&d.seed.to_le_bytes());
                out.extend_from_slice(&d.temperature.to_le_bytes());
                out.extend_from_slice(&d.top_p.to_le_bytes());
                out.extend_from_slice(&(d.top_k as u32).to_le_bytes());
            }
        }
    }
}

fn decode_plan(r: &mut Cursor<'_>) -> Result<StepPlan, WireError> {
    let n = r.u32()? as usize;
    let mut seqs = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let seq_id = r.u64()?;
        let start_pos = usize::try_from(r.u64()?)
            .map_err(|_| WireError::Malformed("start_pos overflows usize".into()))?;
        let tokens = r.u32s()?;
        let block_table = r.u32s()?;
        let recent_table = r.u32s()?;
        let logits = match r.u8()? {
            0 => LogitsWanted::None,
            1 => LogitsWanted::Last,
            2 => LogitsWanted::All,
            x => return Err(WireError::Malformed(format!("logits selector {x}"))),
        };
        let draft = match r.u8()? {
            0 => None,
            1 => Some(DraftPlan {
                num_drafts: r.u32()? as usize,
                seed: r.u64()?,
                temperature: f32::from_bits(r.u32()?),
                top_p: f32::from_bits(r.u32()?),
                top_k: r.u32()? as usize,
            }),
            x => return Err(WireError::Malformed(format!("draft selector {x}"))),
        };
        seqs.push(SeqPlan {
            seq_id,
            start_pos,
            tokens,
            block_table,
            recent_table,
            logits,
            draft,
        });
    }
    Ok(StepPlan { seqs })
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| WireError::Malformed("frame shorter than its fields".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn u32s(&mut self) -> Result<Vec<u32>, WireError> {
        let n = self.u32()? as usize;
        let bytes = self.take(n.saturating_mul(4))?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u32()? as usize;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Malformed("non-UTF-8 text".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let bytes = f.encode();
        let back = read_frame(&mut &bytes[..]).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn every_frame_roundtrips() {
        let plan = StepPlan {
            seqs: vec![
                SeqPlan {
                    seq_id: u64::MAX - 3,
                    start_pos: 1 << 40,
                    tokens: vec![0, 1, u32::MAX],
                    block_table: vec![7, 9],
                    recent_table: vec![u32::MAX, 3],
                    logits: LogitsWanted::All,
                    draft: Some(DraftPlan {
                        num_drafts: 5,
                        seed: u64::MAX - 1,
                        temperature: 0.7,
                        top_p: 0.9,
                        top_k: 40,
                    }),
                },
                SeqPlan {
                    seq_id: 2,
                    start_pos: 0,
                    tokens: vec![],
                    block_table: vec![],
                    recent_table: vec![],
                    logits: LogitsWanted::None,
                    draft: None,
                },
            ],
        };
        let mut id = Box::new([0u8; 128]);
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 2 + 1) as u8; // includes bytes >= 0x80 (negative as a signed c_char)
        }
        for f in [
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                world_size: 2,
                rank: 1,
                channel: Channel::Data,
                fingerprint_digest: [0xAB; 32],
                fingerprint_description: "model=x profile=y".into(),
            }),
            Frame::Welcome,
            Frame::Reject {
                reason: "no".into(),
            },
            Frame::GroupReady {
                nccl_unique_id: Some(id),
            },
            Frame::GroupReady {
                nccl_unique_id: None,
            },
            Frame::Heartbeat,
            Frame::Step(plan),
            Frame::Step(StepPlan::default()),
            Frame::Release { seq_id: 42 },
            Frame::Shutdown,
            Frame::Abort {
                reason: "engine failed".into(),
            },
            Frame::Contribution {
                op: 1,
                seq: 9,
                payload: vec![1, 2, 3],
            },
            Frame::Result {
                op: 2,
                seq: 10,
                payload: vec![],
            },
            Frame::CollectiveError {
                seq: 3,
                reason: "len".into(),
            },
        ] {
            roundtrip(f);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            vec![],
            vec![0; 8],
            vec![255; 8],
            [2u64.to_le_bytes().to_vec(), vec![99, 0]].concat(),
            [5u64.to_le_bytes().to_vec(), vec![kind::STEP, 9, 0, 0, 0]].concat(),
            [2u64.to_le_bytes().to_vec(), vec![kind::HEARTBEAT, 0]].concat(),
        ] {
            assert!(read_frame(&mut &bytes[..]).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn foreign_version_hello_still_decodes_its_version() {
        let mut body = vec![kind::HELLO];
        body.extend_from_slice(&7u32.to_le_bytes());
        body.extend_from_slice(b"anything at all");
        match Frame::decode(&body).unwrap() {
            Frame::Hello(h) => assert_eq!(h.version, 7),
            f => panic!("{f:?}"),
        }
    }
}
