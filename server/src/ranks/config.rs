//! What a rank needs to know to join its group. Filled by the CLI (`server/src/cli.rs`) from
//! flags or their `DSPARK_*` environment variables.

use std::time::Duration;

use sha2::{Digest, Sha256};

/// One rank's view of its group and the protocol's timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankConfig {
    /// This process's index (`--rank`, `DSPARK_RANK`; the operator sets it from the pod index).
    pub rank: usize,
    /// Number of ranks (`--world-size` / `--tensor-parallel-size`).
    pub world_size: usize,
    /// `HOST:PORT` of rank 0's control port (`--leader-addr`); required on ranks > 0.
    /// In Kubernetes the DNS name of pod 0 behind the headless Service.
    pub leader_addr: Option<String>,
    /// Port rank 0 listens on (`--control-port`).
    pub control_port: u16,
    /// Address rank 0 binds the control port to.
    pub control_bind_host: String,
    /// How long rank 0 waits for the others, and the others retry dialing (`--rendezvous-timeout-secs`).
    pub rendezvous_timeout: Duration,
    /// How often each side of a control connection sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// Silence on a control connection longer than this means the peer is lost.
    pub heartbeat_timeout: Duration,
    /// Longest wait inside one collective (a peer that stops mid-step without closing its socket).
    pub collective_timeout: Duration,
}

pub const DEFAULT_CONTROL_PORT: u16 = 29500;

impl Default for RankConfig {
    fn default() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            leader_addr: None,
            control_port: DEFAULT_CONTROL_PORT,
            control_bind_host: "0.0.0.0".into(),
            rendezvous_timeout: Duration::from_secs(600),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            collective_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--world-size must be at least 1")]
    ZeroWorldSize,
    #[error(
        "--rank {rank} is out of range for --world-size {world_size} (ranks are 0..{world_size})"
    )]
    RankOutOfRange { rank: usize, world_size: usize },
    #[error(
        "--leader-addr HOST:PORT is required on rank {0} (the address of rank 0's control port)"
    )]
    MissingLeaderAddr(usize),
    #[error("heartbeat timeout ({timeout:?}) must exceed the heartbeat interval ({interval:?})")]
    HeartbeatTiming {
        interval: Duration,
        timeout: Duration,
    },
}

impl RankConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.world_size == 0 {
            return Err(ConfigError::ZeroWorldSize);
        }
        if self.rank >= self.world_size {
            return Err(ConfigError::RankOutOfRange {
                rank: self.rank,
                world_size: self.world_size,
            });
        }
        if self.rank > 0 && self.leader_addr.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::MissingLeaderAddr(self.rank));
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(ConfigError::HeartbeatTiming {
                interval: self.heartbeat_interval,
                timeout: self.heartbeat_timeout,
            });
        }
        Ok(())
    }
}

/// What every rank of a group must agree on (model, resolved profile, sharding...). The caller
/// builds a readable description; ranks compare its SHA-256 and print both descriptions on a
/// mismatch, so the log says what differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupFingerprint {
    description: String,
}

impl GroupFingerprint {
    /// `description` should name everything that must match, e.g.
    /// `"model=tiny-dsv4 weights=sha256:ab12.. max_model_len=4096 kv=bf16 spec=dspark/3"`.
    pub fn new(description: impl Into<String>) -> Self {
        Self {
            description: description.into(),
        }
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.description.as_bytes()).into()
    }
}

/// The 128 opaque bytes of an NCCL unique id, as they travel between ranks. Kept as `u8`
/// so the bytes are exact whatever the signedness of `c_char` (unsigned on aarch64).
#[derive(Clone, PartialEq, Eq)]
pub struct NcclUniqueId(pub [u8; 128]);

impl std::fmt::Debug for NcclUniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclUniqueId({:02x?}..)", &self.0[..8])
    }
}

impl NcclUniqueId {
    /// Asks NCCL (loaded at run time) for a fresh id. Rank 0 only; needs the NCCL library.
    pub fn create() -> Result<Self, String> {
        // cudarc panics when it cannot load libnccl: turn that into an error.
        let id = std::panic::catch_unwind(cudarc::nccl::safe::Id::new)
            .map_err(|_| "cannot load the NCCL library (libnccl.so.2)".to_string())?
            .map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
        Ok(Self::from_c_chars(id.internal()))
    }

    pub fn from_c_chars(internal: &[std::ffi::c_char; 128]) -> Self {
        // `to_ne_bytes` reinterprets each c_char bit-for-bit, signed (x86_64) or not (aarch64).
        Self(internal.map(|c| c.to_ne_bytes()[0]))
    }

    pub fn to_c_chars(&self) -> [std::ffi::c_char; 128] {
        self.0.map(|b| std::ffi::c_char::from_ne_bytes([b]))
    }

    pub fn to_cudarc(&self) -> cudarc::nccl::safe::Id {
        cudarc::nccl::safe::Id::uninit(self.to_c_chars())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_flag() {
        let ok = RankConfig {
            world_size: 2,
            rank: 1,
            leader_addr: Some("x:1".into()),
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let e = RankConfig {
            leader_addr: None,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("--leader-addr"), "{e}");
        let e = RankConfig {
            rank: 2,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("--rank 2"), "{e}");
        assert_eq!(
            RankConfig {
                world_size: 0,
                rank: 0,
                ..ok
            }
            .validate(),
            Err(ConfigError::ZeroWorldSize)
        );
    }

    #[test]
    fn nccl_id_bytes_survive_c_char_roundtrip() {
        let mut bytes = [0u8; 128];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(200);
        }
        let id = NcclUniqueId(bytes);
        assert_eq!(NcclUniqueId::from_c_chars(&id.to_c_chars()), id);
    }

    #[test]
    fn nccl_id_creation_without_nccl_is_an_error_not_a_panic() {
        // On this CPU machine libnccl is absent; on a GPU machine creation succeeds.
        match NcclUniqueId::create() {
            Ok(id) => assert_ne!(id.0, [0u8; 128]),
            Err(e) => assert!(e.contains("NCCL"), "{e}"),
        }
    }

    #[test]
    fn fingerprint_digest_is_sha256_of_description() {
        // sha256("abc"), FIPS 180-2 test vector.
        let d = GroupFingerprint::new("abc").digest();
        assert_eq!(d[..4], [0xba, 0x78, 0x16, 0xbf]);
        assert_eq!(d[28..], [0xf2, 0x00, 0x15, 0xad]);
    }
}
