//! In-process tests: every rank on its own thread over real loopback sockets. Tests that need
//! separate processes (kill -9, exit codes, the launcher) live in `server/tests/ranks_processes.rs`.

use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::wire::{self, Channel, Frame, Hello};
use super::*;
use crate::engine::{
    EngineError, KvLayout, LogitsWanted, ModelRunner, SeqPlan, StepOutput, StepPlan,
};

fn cfg(rank: usize, world_size: usize, leader: &str) -> RankConfig {
    RankConfig {
        rank,
        world_size,
        leader_addr: Some(leader.to_string()),
        control_port: 0,
        control_bind_host: "127.0.0.1".into(),
        rendezvous_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout: Duration::from_millis(1000),
        collective_timeout: Duration::from_secs(10),
    }
}

fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

fn fp(s: &str) -> GroupFingerprint {
    GroupFingerprint::new(s)
}

fn health() -> GroupHealth {
    GroupHealth::new(FailPolicy::ReturnErrors)
}

/// Forms a group of `world_size` ranks on threads; returns the groups in rank order.
fn form(world_size: usize) -> Vec<Group> {
    let (l, addr) = listener();
    let followers: Vec<_> = (1..world_size)
        .map(|r| {
            let addr = addr.clone();
            thread::spawn(move || rendezvous(&cfg(r, world_size, &addr), &fp("m"), &health(), None))
        })
        .collect();
    let leader =
        rendezvous_leader_on(l, &cfg(0, world_size, &addr), &fp("m"), &health(), None).unwrap();
    let mut groups = vec![leader];
    for f in followers {
        groups.push(f.join().unwrap().unwrap());
    }
    groups
}

/// Runs `f(rank, comm)` on one thread per rank; results in rank order.
fn on_all<T: Send + 'static>(
    groups: &[Group],
    f: impl Fn(usize, &dyn Communicator) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = groups
        .iter()
        .map(|g| {
            let comm = g.comm.clone();
            let f = f.clone();
            thread::spawn(move || f(comm.rank(), &*comm))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Values whose float sum depends on the order of addition.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| match (rank + i) % 3 {
            0 => 1.0e8,
            1 => 1.0 + i as f32 * 0.1,
            _ => -1.0e8 + rank as f32 * 0.37,
        })
        .collect()
}

#[test]
fn all_reduce_sums_in_rank_order_bit_identically_with_2_and_3_ranks() {
    for world_size in [2, 3] {
        let groups = form(world_size);
        let len = 1000;
        let results = on_all(&groups, move |rank, c| {
            let mut v = input(rank, len);
            c.all_reduce_sum(&mut v).unwrap();
            v
        });
        // Independent reference: left-to-right in rank order.
        let mut expected = input(0, len);
        for r in 1..world_size {
            for (e, x) in expected.iter_mut().zip(input(r, len)) {
                *e += x;
            }
        }
        for (rank, got) in results.iter().enumerate() {
            let got_bits: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
            let want_bits: Vec<u32> = expected.iter().map(|x| x.to_bits()).collect();
            assert_eq!(got_bits, want_bits, "rank {rank} of {world_size}");
        }
        // Repeating gives the same bits (no order that depends on arrival).
        let again = on_all(&groups, move |rank, c| {
            let mut v = input(rank, len);
            c.all_reduce_sum(&mut v).unwrap();
            v
        });
        assert_eq!(again, results);
    }
}

#[test]
fn all_gather_concatenates_in_rank_order_with_2_and_3_ranks() {
    for world_size in [2, 3] {
        let groups = form(world_size);
        let results = on_all(&groups, |rank, c| {
            let local: Vec<f32> = (0..5).map(|i| (rank * 10 + i) as f32).collect();
            c.all_gather(&local).unwrap()
        });
        let expected: Vec<f32> = (0..world_size)
            .flat_map(|r| (0..5).map(move |i| (r * 10 + i) as f32))
            .collect();
        for got in results {
            assert_eq!(got, expected);
        }
    }
}

#[test]
fn broadcast_from_every_root_with_2_and_3_ranks() {
    for world_size in [2, 3] {
        let groups = form(world_size);
        for root in 0..world_size {
            let results = on_all(&groups, move |rank, c| {
                let mut data = if rank == root {
                    format!("from rank {root}: {}", "x".repeat(root * 1000)).into_bytes()
                } else {
                    vec![0xEE; 3]
                };
                c.broadcast_bytes(root, &mut data).unwrap();
                data
            });
            let expected = format!("from rank {root}: {}", "x".repeat(root * 1000)).into_bytes();
            for got in results {
                assert_eq!(got, expected);
            }
        }
        // An empty broadcast and a barrier also complete.
        on_all(&groups, |_, c| {
            let mut empty = Vec::new();
            c.broadcast_bytes(0, &mut empty).unwrap();
            assert!(empty.is_empty());
            c.barrier().unwrap();
        });
        let bad = groups[0].comm.broadcast_bytes(world_size, &mut Vec::new());
        assert!(matches!(bad, Err(CommError::Failed(_))));
    }
}

#[test]
fn mismatched_lengths_fail_on_every_rank_instead_of_hanging() {
    let groups = form(2);
    let results = on_all(&groups, |rank, c| {
        let mut v = vec![1.0; 4 + rank];
        c.all_reduce_sum(&mut v).map_err(|e| e.to_string())
    });
    for r in &results {
        let e = r.as_ref().unwrap_err();
        assert!(e.contains("length mismatch"), "{e}");
    }
}

#[test]
fn group_carries_the_nccl_id_byte_exact() {
    let (l, addr) = listener();
    let mut id = [0u8; 128];
    for (i, b) in id.iter_mut().enumerate() {
        *b = 255 - i as u8; // high bytes: negative as a signed c_char
    }
    let follower = {
        let addr = addr.clone();
        thread::spawn(move || rendezvous(&cfg(1, 2, &addr), &fp("m"), &health(), None))
    };
    let h0 = health();
    assert_eq!(h0.state(), GroupState::Forming);
    let leader =
        rendezvous_leader_on(l, &cfg(0, 2, &addr), &fp("m"), &h0, Some(NcclUniqueId(id))).unwrap();
    let follower = follower.join().unwrap().unwrap();
    assert_eq!(follower.nccl_unique_id, Some(NcclUniqueId(id)));
    assert_eq!(leader.nccl_unique_id, Some(NcclUniqueId(id)));
    assert!(h0.is_formed());
    assert!(follower.health.is_formed());
}

/// Rank 0 with `leader_fp` against one follower with `follower_cfg`/`follower_fp`: both errors.
fn both_fail(
    follower_cfg: RankConfig,
    leader_fp: &str,
    follower_fp: &str,
) -> (RendezvousError, RendezvousError) {
    let (l, addr) = listener();
    let follower_fp = fp(follower_fp);
    let follower = thread::spawn(move || {
        let c = RankConfig {
            leader_addr: Some(addr),
            ..follower_cfg
        };
        rendezvous(&c, &follower_fp, &health(), None)
    });
    let leader = rendezvous_leader_on(l, &cfg(0, 2, "unused:1"), &fp(leader_fp), &health(), None);
    (leader.unwrap_err(), follower.join().unwrap().unwrap_err())
}

#[test]
fn fingerprint_mismatch_is_a_clear_error_on_both_sides() {
    let (leader, follower) = both_fail(
        cfg(1, 2, ""),
        "model=A profile=long",
        "model=B profile=long",
    );
    for e in [leader.to_string(), follower.to_string()] {
        assert!(e.contains("model/profile mismatch"), "{e}");
        assert!(
            e.contains("model=A profile=long") && e.contains("model=B profile=long"),
            "{e}"
        );
    }
    assert!(matches!(
        leader,
        RendezvousError::FingerprintMismatch { rank: 1, .. }
    ));
    assert!(matches!(follower, RendezvousError::Rejected(_)));
}

#[test]
fn world_size_mismatch_is_a_clear_error_on_both_sides() {
    let (leader, follower) = both_fail(cfg(1, 3, ""), "m", "m");
    assert!(matches!(
        leader,
        RendezvousError::WorldSizeMismatch {
            rank: 1,
            leader: 2,
            follower: 3
        }
    ));
    let f = follower.to_string();
    assert!(
        f.contains("world size mismatch: rank 0 has --world-size 2, rank 1 has 3"),
        "{f}"
    );
}

#[test]
fn protocol_version_mismatch_is_a_clear_error_on_both_sides() {
    let (l, addr) = listener();
    let client = thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        wire::write_preamble(&mut s).unwrap();
        let hello = Frame::Hello(Hello {
            version: 99,
            world_size: 2,
            rank: 1,
            channel: Channel::Control,
            fingerprint_digest: fp("m").digest(),
            fingerprint_description: "m".into(),
        });
        wire::write_frame(&mut s, &hello).unwrap();
        wire::read_frame(&mut s).unwrap()
    });
    let e = rendezvous_leader_on(l, &cfg(0, 2, "x:1"), &fp("m"), &health(), None).unwrap_err();
    assert!(
        matches!(
            e,
            RendezvousError::VersionMismatch {
                leader: wire::PROTOCOL_VERSION,
                follower: 99,
                ..
            }
        ),
        "{e}"
    );
    match client.join().unwrap() {
        Frame::Reject { reason } => {
            assert!(reason.contains("protocol version mismatch"), "{reason}")
        }
        f => panic!("{f:?}"),
    }
}

#[test]
fn duplicate_rank_claim_is_a_clear_error_to_both_claimants_and_rank_0() {
    let (l, addr) = listener();
    let first = {
        let addr = addr.clone();
        thread::spawn(move || rendezvous(&cfg(1, 3, &addr), &fp("m"), &health(), None))
    };
    let leader = thread::spawn(move || {
        rendezvous_leader_on(l, &cfg(0, 3, "x:1"), &fp("m"), &health(), None)
    });
    // The first claimant is in (rank 2 is missing, so it waits); a second one claims rank 1.
    thread::sleep(Duration::from_millis(500));
    let second = rendezvous(&cfg(1, 3, &addr), &fp("m"), &health(), None).unwrap_err();
    let leader = leader.join().unwrap().unwrap_err();
    let first = first.join().unwrap().unwrap_err();
    assert!(
        matches!(leader, RendezvousError::DuplicateRank { rank: 1, .. }),
        "{leader}"
    );
    for e in [leader.to_string(), second.to_string(), first.to_string()] {
        assert!(e.contains("two processes claim rank 1"), "{e}");
    }
    assert!(matches!(second, RendezvousError::Rejected(_)));
    assert!(matches!(first, RendezvousError::LeaderAborted(_)));
}

#[test]
fn wrong_leader_address_fails_after_the_deadline() {
    let (l, addr) = listener();
    drop(l); // nothing listens there now
    let c = RankConfig {
        rendezvous_timeout: Duration::from_millis(1500),
        ..cfg(1, 2, &addr)
    };
    let t0 = Instant::now();
    let e = rendezvous(&c, &fp("m"), &health(), None).unwrap_err();
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("rank 0 at {addr} not reachable")),
        "{msg}"
    );
    assert!(msg.contains("refused"), "{msg}");

    // An unresolvable name is retried too and ends the same way.
    let c = RankConfig {
        rendezvous_timeout: Duration::from_millis(500),
        ..cfg(1, 2, "no-such-host.invalid:29500")
    };
    let msg = rendezvous(&c, &fp("m"), &health(), None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("not reachable") && msg.contains("cannot resolve"),
        "{msg}"
    );
}

#[test]
fn rank_0_gives_up_after_its_deadline_naming_the_missing_ranks() {
    let (l, _) = listener();
    let c = RankConfig {
        rendezvous_timeout: Duration::from_millis(500),
        ..cfg(0, 3, "x:1")
    };
    let e = rendezvous_leader_on(l, &c, &fp("m"), &health(), None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "group not formed within 0.5s: missing rank(s) [1, 2]"
    );
}

#[test]
fn late_ranks_join_within_the_deadline_in_either_order() {
    // Follower first: it retries until rank 0 listens.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let follower = {
        let addr = addr.clone();
        thread::spawn(move || rendezvous(&cfg(1, 2, &addr), &fp("m"), &health(), None))
    };
    thread::sleep(Duration::from_millis(1200));
    let leader_cfg = RankConfig {
        control_port: port,
        ..cfg(0, 2, &addr)
    };
    let leader = rendezvous(&leader_cfg, &fp("m"), &health(), None).unwrap();
    let follower = follower.join().unwrap().unwrap();
    let r = on_all(&[leader, follower], |_, c| c.all_gather(&[1.0]).unwrap());
    assert_eq!(r[0], vec![1.0, 1.0]);

    // Rank 0 first: it waits for a follower that arrives late.
    let (l, addr) = listener();
    let leader = thread::spawn(move || {
        rendezvous_leader_on(l, &cfg(0, 2, "x:1"), &fp("m"), &health(), None)
    });
    thread::sleep(Duration::from_millis(1200));
    let follower = rendezvous(&cfg(1, 2, &addr), &fp("m"), &health(), None).unwrap();
    let leader = leader.join().unwrap().unwrap();
    let r = on_all(&[leader, follower], |rank, c| {
        c.all_gather(&[rank as f32]).unwrap()
    });
    assert_eq!(r[1], vec![0.0, 1.0]);
}

#[test]
fn strangers_on_the_control_port_are_ignored() {
    let (l, addr) = listener();
    let a = addr.clone();
    let probes = thread::spawn(move || {
        // A TCP readiness probe (connect + close) and some garbage.
        drop(TcpStream::connect(&a).unwrap());
        let mut s = TcpStream::connect(&a).unwrap();
        std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\n\r\n").unwrap();
        drop(s);
        rendezvous(&cfg(1, 2, &a), &fp("m"), &health(), None)
    });
    let leader = rendezvous_leader_on(l, &cfg(0, 2, "x:1"), &fp("m"), &health(), None).unwrap();
    let follower = probes.join().unwrap().unwrap();
    on_all(&[leader, follower], |_, c| c.barrier().unwrap());
}

/// Records what it was asked to run; optionally all-reduces like a tensor-parallel layer.
struct RecordingRunner {
    comm: Option<Arc<dyn Communicator>>,
    seen: Arc<Mutex<Vec<String>>>,
    fail_on_step: Option<usize>,
    invalid_on_step: Option<usize>,
}

impl ModelRunner for RecordingRunner {
    fn kv_layout(&self) -> KvLayout {
        KvLayout {
            block_size: 16,
            num_blocks: 8,
            bytes_per_block: 1,
            recent_blocks: 8,
            bytes_per_recent: 1,
            recent_reach: 15,
        }
    }
    fn vocab_size(&self) -> usize {
        4
    }
    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
        let n = {
            let mut seen = self.seen.lock().unwrap();
            seen.push(format!("step {plan:?}"));
            seen.len()
        };
        if self.fail_on_step == Some(n) {
            return Err(EngineError::Backend("out of device memory".into()));
        }
        if self.invalid_on_step == Some(n) {
            return Err(EngineError::Invalid("prompt too long".into()));
        }
        let mut partial = vec![plan.seqs.len() as f32; 4];
        if let Some(c) = &self.comm {
            c.all_reduce_sum(&mut partial)
                .map_err(|e| EngineError::Comm(e.to_string()))?;
        }
        Ok(StepOutput {
            drafts: Vec::new(),
            logits: vec![vec![partial]; plan.seqs.len()],
        })
    }
    fn release(&mut self, seq_id: u64) {
        self.seen.lock().unwrap().push(format!("release {seq_id}"));
    }
}

fn plan(n: u64) -> StepPlan {
    StepPlan {
        seqs: (0..n)
            .map(|i| SeqPlan {
                seq_id: i,
                start_pos: i as usize * 3,
                tokens: vec![1, 2, i as u32],
                block_table: vec![i as u32],
                recent_table: vec![i as u32],
                logits: LogitsWanted::Last,
                draft: None,
            })
            .collect(),
    }
}

fn split(g: Group) -> (Arc<TcpCommunicator>, Role) {
    (g.comm, g.role)
}

#[test]
fn followers_run_every_plan_in_order_and_stop_on_shutdown() {
    let mut groups = form(3).into_iter();
    let (c0, leader) = split(groups.next().unwrap());
    let followers: Vec<_> = groups
        .map(|g| {
            let (comm, role) = split(g);
            let Role::Follower(link) = role else {
                panic!("rank > 0 must follow")
            };
            let seen = Arc::new(Mutex::new(Vec::new()));
            let s = seen.clone();
            let h = thread::spawn(move || {
                let mut runner = RecordingRunner {
                    comm: Some(comm),
                    seen: s,
                    fail_on_step: None,
                    invalid_on_step: None,
                };
                run_follower(&mut runner, &link).map_err(|e| e.to_string())
            });
            (h, seen)
        })
        .collect();
    let Role::Leader(plans) = leader else {
        panic!("rank 0 must lead")
    };
    let seen0 = Arc::new(Mutex::new(Vec::new()));
    let mut runner = LeaderRunner::new(
        RecordingRunner {
            comm: Some(c0),
            seen: seen0.clone(),
            fail_on_step: None,
            invalid_on_step: None,
        },
        plans,
    );
    for n in 1..=3 {
        let out = runner.step(&plan(n)).unwrap();
        // Three ranks each contributed n.
        assert_eq!(out.logits[0][0], vec![3.0 * n as f32; 4]);
    }
    runner.release(7);
    runner.step(&StepPlan::default()).unwrap();
    let (_, r) = runner.shutdown();
    r.unwrap();
    let expected = seen0.lock().unwrap().clone();
    assert_eq!(expected.len(), 5);
    for (h, seen) in followers {
        assert_eq!(h.join().unwrap(), Ok(()));
        assert_eq!(*seen.lock().unwrap(), expected);
    }
}

#[test]
fn follower_failure_is_reported_to_rank_0_with_its_reason() {
    let mut groups = form(2).into_iter();
    let g0 = groups.next().unwrap();
    let h0 = g0.health.clone();
    let (_, leader) = split(g0);
    let (_, follower) = split(groups.next().unwrap());
    let Role::Follower(link) = follower else {
        panic!()
    };
    let f = thread::spawn(move || {
        let mut runner = RecordingRunner {
            comm: None,
            seen: Arc::new(Mutex::new(Vec::new())),
            fail_on_step: Some(2),
            invalid_on_step: None,
        };
        let r = run_follower(&mut runner, &link).map_err(|e| e.to_string());
        // Keep the sockets open a moment, as a real process would while logging.
        thread::sleep(Duration::from_millis(200));
        r
    });
    let Role::Leader(plans) = leader else {
        panic!()
    };
    plans.send_step(&plan(1)).unwrap();
    plans.send_step(&plan(1)).unwrap();
    let err = f.join().unwrap().unwrap_err();
    assert!(err.contains("out of device memory"), "{err}");
    let lost = wait_for_loss(&h0, Duration::from_secs(3));
    assert_eq!(lost.0, 1);
    assert!(
        lost.1
            .contains("rank 1 failed: backend: out of device memory"),
        "{lost:?}"
    );
    let e = plans.send_step(&plan(1)).unwrap_err();
    assert!(matches!(e, CommError::PeerLost { rank: 1, .. }));
}

fn wait_for_loss(h: &GroupHealth, within: Duration) -> (usize, String) {
    let t0 = Instant::now();
    loop {
        if let Some(l) = h.lost() {
            return l;
        }
        assert!(
            t0.elapsed() < within,
            "no loss recorded within {within:?}: {:?}",
            h.state()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn closed_connection_wakes_a_blocked_collective_with_peer_lost() {
    let mut groups = form(2).into_iter();
    let g0 = groups.next().unwrap();
    let g1 = groups.next().unwrap();
    let c0 = g0.comm.clone();
    let blocked = thread::spawn(move || {
        let t0 = Instant::now();
        let mut v = vec![1.0; 8];
        (c0.all_reduce_sum(&mut v), t0.elapsed())
    });
    thread::sleep(Duration::from_millis(300));
    drop(g1); // rank 1 vanishes without a Shutdown
    let (r, waited) = blocked.join().unwrap();
    assert!(
        matches!(r, Err(CommError::PeerLost { rank: 1, .. })),
        "{r:?}"
    );
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert_eq!(g0.health.lost().map(|l| l.0), Some(1));
    // Every later operation fails at once with the same loss.
    let again = g0.comm.all_gather(&[1.0]).unwrap_err();
    assert!(matches!(again, CommError::PeerLost { rank: 1, .. }));
}

#[test]
fn silent_peer_is_lost_after_the_heartbeat_timeout() {
    // A hand-made rank 1 that completes the handshake, then never sends a heartbeat.
    let (l, addr) = listener();
    let silent = thread::spawn(move || {
        let dial = |channel| {
            let mut s = TcpStream::connect(&addr).unwrap();
            wire::write_preamble(&mut s).unwrap();
            wire::write_frame(
                &mut s,
                &Frame::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    world_size: 2,
                    rank: 1,
                    channel,
                    fingerprint_digest: fp("m").digest(),
                    fingerprint_description: "m".into(),
                }),
            )
            .unwrap();
            assert_eq!(wire::read_frame(&mut s).unwrap(), Frame::Welcome);
            s
        };
        let control = dial(Channel::Control);
        let data = dial(Channel::Data);
        thread::sleep(Duration::from_secs(4));
        (control, data)
    });
    let g0 = rendezvous_leader_on(l, &cfg(0, 2, "x:1"), &fp("m"), &health(), None).unwrap();
    let t0 = Instant::now();
    let (rank, reason) = wait_for_loss(&g0.health, Duration::from_secs(3));
    assert_eq!(rank, 1);
    assert_eq!(reason, "no heartbeat for 1s");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    drop(silent.join().unwrap());
}

#[test]
fn orderly_shutdown_is_not_a_loss() {
    let mut groups = form(2).into_iter();
    let g0 = groups.next().unwrap();
    let g1 = groups.next().unwrap();
    let (h0, h1) = (g0.health.clone(), g1.health.clone());
    let Role::Follower(link) = g1.role else {
        panic!()
    };
    let Role::Leader(plans) = g0.role else {
        panic!()
    };
    let f = thread::spawn(move || {
        let msg = link.recv();
        // Hold the link (and its heartbeat thread) a while after the Shutdown.
        thread::sleep(Duration::from_secs(3));
        msg
    });
    let t0 = Instant::now();
    plans.shutdown().unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(700),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(f.join().unwrap().unwrap(), PlanMessage::Shutdown);
    thread::sleep(Duration::from_millis(1500)); // past the heartbeat timeout
    assert_eq!(h0.state(), GroupState::Closed);
    assert_eq!(h1.state(), GroupState::Closed);
}

#[test]
fn invalid_plans_keep_the_group_but_a_rank_0_step_failure_ends_it() {
    let mut groups = form(2).into_iter();
    let g0 = groups.next().unwrap();
    let g1 = groups.next().unwrap();
    let h1 = g1.health.clone();
    let Role::Follower(link) = g1.role else {
        panic!()
    };
    let Role::Leader(plans) = g0.role else {
        panic!()
    };
    let (c0, c1) = (g0.comm, g1.comm);
    let f = thread::spawn(move || {
        let mut runner = RecordingRunner {
            comm: Some(c1),
            seen: Arc::new(Mutex::new(Vec::new())),
            fail_on_step: None,
            invalid_on_step: Some(2),
        };
        run_follower(&mut runner, &link).map_err(|e| e.to_string())
    });
    let mut runner = LeaderRunner::new(
        RecordingRunner {
            comm: Some(c0),
            seen: Arc::new(Mutex::new(Vec::new())),
            fail_on_step: Some(3),
            invalid_on_step: Some(2),
        },
        plans,
    );
    runner.step(&plan(1)).unwrap();
    assert!(matches!(
        runner.step(&plan(1)),
        Err(EngineError::Invalid(_))
    ));
    assert!(
        runner.health().is_formed(),
        "an invalid plan must not end the group"
    );
    assert!(matches!(
        runner.step(&plan(1)),
        Err(EngineError::Backend(_))
    ));
    let err = f.join().unwrap().unwrap_err();
    assert!(
        err.contains("rank 0 failed: step failed: backend: out of device memory"),
        "{err}"
    );
    assert_eq!(h1.lost().map(|l| l.0), Some(0));
    assert!(runner.health().lost().is_some());
    assert!(matches!(runner.step(&plan(1)), Err(EngineError::Comm(_))));
}

#[test]
fn single_rank_health_is_formed() {
    let h = GroupHealth::single_rank();
    assert!(h.is_formed());
    assert_eq!(*h.subscribe().borrow(), GroupState::Formed);
}
