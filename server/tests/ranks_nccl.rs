//! NCCL between two processes on two GPUs, the id created by rank 0 and carried by the rendezvous.
//! Needs two CUDA devices and NCCL (the `nvidia-h200-x2` machine); elsewhere it is skipped.
//! Run: `DSPARK_TEST_NCCL=1 cargo test -p dspark-server --test ranks_nccl -- --nocapture`.

use std::process::Command;
use std::time::{Duration, Instant};

use cudarc::driver::CudaContext;
use dspark_server::backend::cuda::nccl::NcclCommunicator;
use dspark_server::ranks::{
    rendezvous, Communicator, FailPolicy, GroupFingerprint, GroupHealth, NcclUniqueId, RankConfig,
};

const ROLE: &str = "DSPARK_TEST_NCCL_RANK";
const ADDR: &str = "DSPARK_TEST_NCCL_ADDR";

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
fn nccl_rank_entry() {
    let Ok(rank) = std::env::var(ROLE) else {
        return;
    };
    let rank: usize = rank.parse().unwrap();
    let addr = std::env::var(ADDR).unwrap();
    let port = addr.rsplit(':').next().unwrap().parse().unwrap();
    let cfg = RankConfig {
        rank,
        world_size: 2,
        leader_addr: Some(addr),
        control_port: port,
        control_bind_host: "127.0.0.1".into(),
        rendezvous_timeout: Duration::from_secs(60),
        ..RankConfig::default()
    };
    let health = GroupHealth::new(FailPolicy::default());
    let id = (rank == 0).then(|| NcclUniqueId::create().unwrap());
    let group = rendezvous(
        &cfg,
        &GroupFingerprint::new("nccl-test"),
        &health,
        id.clone(),
    )
    .unwrap();
    let id = group
        .nccl_unique_id
        .clone()
        .expect("rank 0 sent an NCCL id");
    println!("rank {rank}: nccl id starts {:02x?}", &id.0[..8]);

    let ctx = CudaContext::new(rank).unwrap();
    let stream = ctx.default_stream();
    let nccl = NcclCommunicator::new(stream.clone(), rank, 2, &id).unwrap();

    // Host-path all-reduce equals the TCP communicator's, bit for bit (a sum of two is
    // commutative in IEEE arithmetic, so NCCL's order cannot matter here).
    let len = 100_000;
    let mut via_nccl = input(rank, len);
    nccl.all_reduce_sum(&mut via_nccl).unwrap();
    let mut via_tcp = input(rank, len);
    group.comm.all_reduce_sum(&mut via_tcp).unwrap();
    let nb: Vec<u32> = via_nccl.iter().map(|x| x.to_bits()).collect();
    let tb: Vec<u32> = via_tcp.iter().map(|x| x.to_bits()).collect();
    assert_eq!(nb, tb, "rank {rank}: NCCL and TCP all-reduce differ");

    let local: Vec<f32> = (0..7).map(|i| (rank * 100 + i) as f32).collect();
    assert_eq!(
        nccl.all_gather(&local).unwrap(),
        group.comm.all_gather(&local).unwrap()
    );

    let mut bytes = if rank == 1 {
        b"from rank one".to_vec()
    } else {
        vec![]
    };
    nccl.broadcast_bytes(1, &mut bytes).unwrap();
    assert_eq!(bytes, b"from rank one");
    nccl.barrier().unwrap();

    // Device path, as the CUDA backend will use it.
    let n = 4096;
    let mut dev = stream.clone_htod(&vec![(rank + 1) as f32; n]).unwrap();
    nccl.all_reduce_sum_device(&mut dev).unwrap();
    let back = stream.clone_dtoh(&dev).unwrap();
    stream.synchronize().unwrap();
    assert!(back.iter().all(|&x| x == 3.0));
    let iters = 200;
    let t0 = Instant::now();
    for _ in 0..iters {
        nccl.all_reduce_sum_device(&mut dev).unwrap();
    }
    stream.synchronize().unwrap();
    println!(
        "rank {rank}: device all_reduce f32 x {n}: {:.1} us/op",
        t0.elapsed().as_secs_f64() * 1e6 / iters as f64
    );
    group.comm.barrier().unwrap();
    println!("rank {rank}: NCCL OK");
    std::process::exit(0);
}

#[test]
fn nccl_between_two_processes_matches_tcp() {
    if std::env::var("DSPARK_TEST_NCCL").as_deref() != Ok("1") {
        eprintln!("skipped: set DSPARK_TEST_NCCL=1 on a machine with two GPUs");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "nccl_rank_entry",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(ROLE, rank.to_string())
                .env(ADDR, &addr)
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, mut c) in children.into_iter().enumerate() {
        let status = c.wait().unwrap();
        assert!(status.success(), "rank {rank}: {status}");
    }
}
