//! NCCL between two processes on two GPUs, the id created by rank 0 and carried by the rendezvous.
//! Needs two CUDA devices and NCCL (the `nvidia-h200-x2` machine); elsewhere it is skipped.
//! Run: `DSPARK_TEST_NCCL=1 cargo test -p dspark-server --test ranks_nccl -- --nocapture`.

use std::process::Command;
use std::time::{Duration, Instant};

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use dspark_kernels::{Kernels, LoaderConfig};
use dspark_server::backend::cuda::nccl::NcclCommunicator;
use dspark_server::backend::cuda::peer::{PeerMemory, PEER_CAP};
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
    // SAFETY: no buffer of this context exists yet and every one below is used on `stream` only
    // (as the CUDA backend does, which turns tracking off for the same reason): cudarc's
    // per-buffer events would otherwise make a captured collective wait on an event recorded
    // before the capture, which invalidates it ("operation failed due to a previous error
    // during capture", seen on two H200s).
    unsafe { ctx.disable_event_tracking() };
    // A stream of its own: the legacy default stream cannot be captured into a graph.
    let stream = ctx.new_stream().unwrap();
    let mut nccl = NcclCommunicator::new(stream.clone(), rank, 2, &id).unwrap();

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
    let nccl_graph_us = graph_us_per_op(&stream, 100, || {
        nccl.all_reduce_sum_device(&mut dev).unwrap();
    });
    println!("rank {rank}: NCCL all_reduce f32 x {n} in a CUDA graph: {nccl_graph_us:.2} us/op");

    peer_all_reduce_checks(rank, &ctx, &stream, &mut nccl);
    group.comm.barrier().unwrap();
    println!("rank {rank}: NCCL OK");
    std::process::exit(0);
}

/// Microseconds per call of `op` captured `calls` times into one CUDA graph and replayed.
fn graph_us_per_op(stream: &Arc<CudaStream>, calls: usize, mut op: impl FnMut()) -> f64 {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .unwrap();
    for _ in 0..calls {
        op();
    }
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a captured graph");
    graph.launch().unwrap();
    stream.synchronize().unwrap();
    let replays = 20;
    let t0 = Instant::now();
    for _ in 0..replays {
        graph.launch().unwrap();
    }
    stream.synchronize().unwrap();
    t0.elapsed().as_secs_f64() * 1e6 / (replays * calls) as f64
}

/// Rank `rank`'s value `j` of call `call`: exact sums of two that differ call to call, so a
/// read of the wrong call's half (or a stale line) shows.
fn peer_value(rank: usize, call: usize, j: usize) -> f32 {
    ((rank * 7 + call * 13 + j * 3) % 4093) as f32 * 0.25 - 500.0
}

/// The peer all-reduce between the two processes (CUDA IPC): bit-exact sums over sizes that take
/// the vector and scalar paths, in place and not, eager and from a graph, both halves of the
/// region in turn; then its latency in a graph beside NCCL's.
fn peer_all_reduce_checks(
    rank: usize,
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    nccl: &mut NcclCommunicator,
) {
    let memory = nccl.connect_peer_memory(true).unwrap();
    println!("rank {rank}: small all-reduces over {memory}");
    assert_eq!(
        memory,
        PeerMemory::CudaIpc,
        "two processes on one host that see both GPUs map each other's memory"
    );
    let kernels = Kernels::load(ctx, &LoaderConfig::from_env()).unwrap();
    let link = nccl.peer_link().unwrap();
    let ptr = |b: &CudaSlice<f32>| b.device_ptr(stream).0;
    for (n, calls) in [
        (1usize, 9usize),
        (3, 9),
        (4, 9),
        (4099, 7),
        (4096, 64),
        (65_536, 5),
        (PEER_CAP, 3),
    ] {
        let input: Vec<f32> = (0..calls * n)
            .map(|k| peer_value(rank, k / n, k % n))
            .collect();
        let dev_in = stream.clone_htod(&input).unwrap();
        let dev_out = stream.alloc_zeros::<f32>(calls * n).unwrap();
        for c in 0..calls {
            let (i, o) = (
                ptr(&dev_in) + (c * n * 4) as u64,
                ptr(&dev_out) + (c * n * 4) as u64,
            );
            // SAFETY: both hold `n` f32 at these offsets; the link and buffers outlive the
            // stream's work (synchronised below); both ranks make the same calls.
            unsafe { kernels.peer_all_reduce2(stream, &link.all_reduce(i, o, n)) }.unwrap();
        }
        let got = stream.clone_dtoh(&dev_out).unwrap();
        stream.synchronize().unwrap();
        for (k, v) in got.iter().enumerate() {
            let (c, j) = (k / n, k % n);
            let want = peer_value(0, c, j) + peer_value(1, c, j);
            assert_eq!(
                v.to_bits(),
                want.to_bits(),
                "rank {rank}: n {n}, call {c}, value {j}"
            );
        }
    }
    // In place, the same buffer every call (as the layer stack uses it).
    let n = 16_384;
    let mut buf = stream.alloc_zeros::<f32>(n).unwrap();
    for c in 0..5 {
        let host: Vec<f32> = (0..n).map(|j| peer_value(rank, c, j)).collect();
        stream.memcpy_htod(&host, &mut buf).unwrap();
        let at = ptr(&buf);
        // SAFETY: as above, in place.
        unsafe { kernels.peer_all_reduce2(stream, &link.all_reduce(at, at, n)) }.unwrap();
        let got = stream.clone_dtoh(&buf).unwrap();
        stream.synchronize().unwrap();
        assert!(got
            .iter()
            .enumerate()
            .all(|(j, v)| *v == peer_value(0, c, j) + peer_value(1, c, j)));
    }
    // From a graph: one captured call replayed on new inputs (the call counters live on the
    // device, so each replay takes the next half and flag).
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let out = stream.alloc_zeros::<f32>(n).unwrap();
    let (at, to) = (ptr(&buf), ptr(&out));
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .unwrap();
    // SAFETY: as above; captured, then replayed while `buf`, `out` and the link live.
    unsafe { kernels.peer_all_reduce2(stream, &link.all_reduce(at, to, n)) }.unwrap();
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a captured graph");
    for c in 0..9 {
        let host: Vec<f32> = (0..n).map(|j| peer_value(rank, 100 + c, j)).collect();
        stream.memcpy_htod(&host, &mut buf).unwrap();
        graph.launch().unwrap();
        let got = stream.clone_dtoh(&out).unwrap();
        stream.synchronize().unwrap();
        assert!(got
            .iter()
            .enumerate()
            .all(|(j, v)| *v == peer_value(0, 100 + c, j) + peer_value(1, 100 + c, j)));
    }
    for width in [4096usize, 16 * 4096] {
        let mut dev = stream.alloc_zeros::<f32>(width).unwrap();
        let at = ptr(&dev);
        let peer_us = graph_us_per_op(stream, 100, || {
            // SAFETY: as above.
            unsafe { kernels.peer_all_reduce2(stream, &link.all_reduce(at, at, width)) }.unwrap();
        });
        let nccl_us = graph_us_per_op(stream, 100, || {
            nccl.all_reduce_sum_device(&mut dev).unwrap();
        });
        println!(
            "rank {rank}: all-reduce f32 x {width} in a CUDA graph: peer memory {peer_us:.2} us/op, \
             NCCL {nccl_us:.2} us/op"
        );
    }
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
