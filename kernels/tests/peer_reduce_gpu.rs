//! GPU checks of the two-rank all-reduce over peer memory (`Kernels::peer_all_reduce2`,
//! `dsk_peer_all_reduce2_f32` in collective.cu) on ONE GPU: both ranks live in this process on
//! device 0, each with its own stream, region, call counters and buffers, rank 0's peer region
//! being rank 1's own and the other way round, so the two kernels of a call spin on each other's
//! flags as they do across two GPUs (through this GPU's memory instead of NVLink).
//!
//! - Bit-exact sums on both ranks over sizes that take the vector and the scalar path, in place
//!   and not, with buffers off 16-byte alignment on both ranks or on one only (the index map
//!   must follow `n` alone), with nothing written past `n` and an out-of-place input left alone.
//! - 2,000 calls in a row, sizes and layouts changing call to call, with no host synchronisation
//!   between them (the double buffer and the flags' epochs): every output of a sample of calls
//!   (the last ones among them) checked, then each rank's per-block call counters and flags.
//! - CUDA graphs: each rank's three calls captured on its stream, both graphs replayed 100 times
//!   on new inputs (copies on the same streams, no host wait between replays), every replay
//!   checked: the counters live on the device, so each replay takes the next halves and flags.
//! - A timing print of a call of both ranks, eager and from graphs (information only).
//!
//! A call waits on the GPU for its peer's, so a protocol bug (or two launches that do not run at
//! the same time) would spin for ever: every wait polls with a deadline, and a watchdog thread
//! bounds each test, either ending the process with a message instead of hanging. Skips (passes
//! with a SKIP line) where there is no GPU, as in CI.

use std::io::Write;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::sys::{
    CUdeviceptr, CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use cudarc::driver::{result, CudaGraph, CudaSlice, CudaStream, DevicePtr};
use dspark_kernels::launch::collective::{
    check_peer_all_reduce, PeerAllReduce, PeerRegion, PEER_BLOCKS, PEER_EPOCH_BYTES,
};
use dspark_kernels::launch::submit::pdl_enabled;

mod common;
use common::{gpu, Gpu, Rng};

static GPU_LOCK: Mutex<()> = Mutex::new(());

/// f32 values one call may carry (the regions' capacity).
const CAP: usize = 1 << 18;
/// How long one wait for both ranks' streams may take before it counts as a hang.
const WAIT: Duration = Duration::from_secs(20);
/// How long one test may take once its GPU is open (launches included: a full launch queue
/// blocks the host, where no deadline poll runs).
const TEST_LIMIT: Duration = Duration::from_secs(180);
/// Written around every output (and input) range: the kernel must leave it alone.
const SENTINEL: f32 = -12345.0;
const GUARD: usize = 8;

/// Ends the process with `msg` on stderr (written past the test harness's capture, which
/// would otherwise swallow it). Not a panic: unwinding would free buffers and unload the
/// module under kernels that still spin, which can block for ever.
fn die(msg: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "\npeer_reduce_gpu FAILED: {msg}\n");
    std::process::abort();
}

/// Guards a test: unless the returned sender is dropped within `limit`, ends the process.
fn watchdog(what: &str, limit: Duration) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    let what = what.to_string();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            die(&format!(
                "{what}: still running after {limit:?}: a hang (the ranks' kernels never met, \
                 or the host blocked on a launch queue that cannot drain)"
            ));
        }
    });
    tx
}

fn ptr<T>(b: &CudaSlice<T>, s: &CudaStream) -> CUdeviceptr {
    b.device_ptr(s).0
}

/// Both ranks on one GPU: a stream, a zeroed region and zeroed call counters each.
struct Pair {
    // Dropped in this order: the memory before the streams it is freed on and the module.
    regions: [CudaSlice<u8>; 2],
    counters: [CudaSlice<u8>; 2],
    s: [Arc<CudaStream>; 2],
    region: PeerRegion,
    g: Gpu,
}

impl Pair {
    fn open(test: &str) -> Option<Pair> {
        let g = gpu(test)?;
        // SAFETY: this handle of the context is this test's own (`open_gpu` makes a new one) and
        // no buffer exists yet. Every buffer made below is used on its rank's stream only, or on
        // the other after a host wait for both (`Pair::wait`), except the regions, which the
        // kernels share under their own protocol. cudarc's automatic cross-stream waits would
        // otherwise make a rank's stream wait on the peer's stream tail, under kernels that wait
        // for each other.
        unsafe { g.ctx.disable_event_tracking() };
        let s = [g.ctx.new_stream().unwrap(), g.ctx.new_stream().unwrap()];
        let region = PeerRegion { cap: CAP };
        let regions = [0, 1].map(|r| s[r].alloc_zeros::<u8>(region.bytes()).unwrap());
        let counters = [0, 1].map(|r| s[r].alloc_zeros::<u8>(PEER_EPOCH_BYTES).unwrap());
        // Both zeroed before either rank's first call (each writes into the other's region).
        for st in &s {
            st.synchronize().unwrap();
        }
        Some(Pair {
            regions,
            counters,
            s,
            region,
            g,
        })
    }

    /// Rank `r`'s call: its own region and counters, the other rank's region as the peer's.
    fn call(&self, r: usize, input: CUdeviceptr, out: CUdeviceptr, n: usize) -> PeerAllReduce {
        PeerAllReduce {
            input,
            out,
            n,
            region: self.region,
            peer_base: ptr(&self.regions[1 - r], &self.s[1 - r]),
            own_base: ptr(&self.regions[r], &self.s[r]),
            epochs: ptr(&self.counters[r], &self.s[r]),
        }
    }

    /// Enqueues rank `r`'s call on its stream (or into the graph being captured there).
    fn launch_one(&self, r: usize, call: &PeerAllReduce) {
        check_peer_all_reduce(call).unwrap();
        // SAFETY: the regions and counters are laid out as `PeerRegion` and `PEER_EPOCH_BYTES`
        // say, were zeroed and synchronised by `open` and live as long as `self`; the callers'
        // buffers hold `n` f32 at these pointers and outlive the wait that follows the call (or
        // every replay of the graph it is captured in); rank r's calls go on stream r only, each
        // rank's in the same order with the same `n`.
        unsafe { self.g.k.peer_all_reduce2(&self.s[r], call) }.unwrap();
    }

    /// The graph of what `enqueue` submits on rank `r`'s stream (captured, not run: rank r's
    /// calls in it wait for the other rank's when replayed).
    fn capture(&self, r: usize, enqueue: impl FnOnce()) -> CudaGraph {
        self.s[r]
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .unwrap();
        enqueue();
        self.s[r]
            .end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("a captured graph")
    }

    /// Enqueues rank 0's call, then rank 1's, with no wait in between: each spins until the
    /// other's has pushed its share, so they must be in flight together. Callers alternate the
    /// ranks call by call: many calls of one rank first could fill its stream's launch queue and
    /// block the host on a kernel that waits for a call of the other not yet enqueued.
    fn launch(&self, calls: [PeerAllReduce; 2]) {
        assert_eq!(
            calls[0].n, calls[1].n,
            "test setup: the ranks' sizes differ"
        );
        for (r, c) in calls.iter().enumerate() {
            self.launch_one(r, c);
        }
    }

    /// Waits for all work enqueued so far on both streams; a hang ends the process after
    /// [`WAIT`] with a message instead.
    fn wait(&self, what: &str) {
        let events = [0, 1].map(|r| self.s[r].record_event(None).unwrap());
        let start = Instant::now();
        for (r, e) in events.iter().enumerate() {
            loop {
                match e.try_is_complete() {
                    Ok(true) => break,
                    Ok(false) if start.elapsed() < WAIT => {
                        std::thread::sleep(Duration::from_micros(100))
                    }
                    Ok(false) => die(&format!(
                        "{what}: rank {r}'s stream has not finished after {WAIT:?}: the two \
                         ranks' kernels never met (a protocol bug, or the two launches did not \
                         run at the same time)"
                    )),
                    Err(err) => panic!("{what}: rank {r}'s stream failed: {err:?}"),
                }
            }
        }
    }

    fn up(&self, r: usize, v: &[f32]) -> CudaSlice<f32> {
        self.s[r].clone_htod(v).unwrap()
    }

    /// Only after [`Self::wait`] (the copy blocks until the stream reaches it).
    fn down(&self, r: usize, b: &CudaSlice<f32>) -> Vec<f32> {
        self.s[r].clone_dtoh(b).unwrap()
    }

    /// `floats` f32 from `src` to `dst`, on rank `r`'s stream (no host wait).
    fn copy(&self, r: usize, dst: CUdeviceptr, src: CUdeviceptr, floats: usize) {
        // SAFETY: the callers pass ranges of live buffers of this context holding `floats` f32
        // at both pointers, which stay alive until a wait on the stream.
        unsafe { result::memcpy_dtod_async(dst, src, floats * 4, self.s[r].cu_stream()) }.unwrap();
    }

    /// Rank `r`'s per-block call counters and its two rows of flags (as the peer raised them).
    /// Only after [`Self::wait`].
    fn protocol_state(&self, r: usize) -> (Vec<u32>, Vec<u32>) {
        let words = |b: Vec<u8>| -> Vec<u32> {
            b.chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .collect()
        };
        let epochs = words(self.s[r].clone_dtoh(&self.counters[r]).unwrap());
        let flags = self.s[r]
            .clone_dtoh(&self.regions[r].slice(0..2 * PEER_BLOCKS * 4))
            .unwrap();
        (epochs, words(flags))
    }

    /// After `calls` calls on both ranks: every block counted each, and the flags of the last
    /// two calls stand in their rows (call e raises row e & 1).
    fn check_protocol_state(&self, calls: u32, what: &str) {
        for r in 0..2 {
            let (epochs, flags) = self.protocol_state(r);
            assert!(
                epochs.iter().all(|&e| e == calls),
                "{what}: rank {r}'s call counters {epochs:?}, want {calls} each"
            );
            for row in 0..2u32 {
                // The last call e <= calls with e & 1 == row (0 where none was made).
                let want = if calls % 2 == row {
                    calls
                } else {
                    calls.saturating_sub(1)
                };
                let got = &flags[row as usize * PEER_BLOCKS..(row as usize + 1) * PEER_BLOCKS];
                assert!(
                    got.iter().all(|&f| f == want),
                    "{what}: rank {r}'s flag row {row} {got:?}, want {want} each"
                );
            }
        }
    }
}

/// `got` must be `want` bit for bit.
fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..want.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{what}: {} of {} values wrong; first at {i}: {} (bits {:#010x}), want {} \
             (bits {:#010x})",
            bad.len(),
            want.len(),
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

fn sum(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// Where each rank's output goes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// Out of place on both ranks.
    Apart,
    /// In place on both.
    InPlace,
    /// Rank 0 in place, rank 1 out of place (both aligned: the same path).
    Mixed,
    /// Out of place, input and output 4 bytes past an aligned start on both ranks: scalar
    /// accesses even where `n` is a multiple of 4.
    Offset,
    /// Out of place, rank 0's input and output 4 bytes past an aligned start, rank 1's aligned:
    /// the ranks access their buffers differently but must move the same values per block (the
    /// index map follows `n` alone; before it did, this raced).
    OneRankOffset,
}

/// One call of both ranks on fresh random inputs, checked on both: the output range is the
/// host's f32 sum bit for bit (a + b == b + a, so the ranks agree), the guards around it and an
/// out-of-place input are untouched.
fn check_once(p: &Pair, rng: &mut Rng, n: usize, layout: Layout) {
    let what = format!("n {n}, {layout:?}");
    let offset = |r: usize| {
        usize::from(layout == Layout::Offset || (layout == Layout::OneRankOffset && r == 0))
    };
    let len = 1 + n + GUARD;
    let inputs = [rng.signed_vec(n, 1000.0), rng.signed_vec(n, 1000.0)];
    let want = sum(&inputs[0], &inputs[1]);
    let host_in: Vec<Vec<f32>> = [0, 1]
        .map(|r| {
            let mut h = vec![SENTINEL; len];
            h[offset(r)..offset(r) + n].copy_from_slice(&inputs[r]);
            h
        })
        .into();
    let in_place = |r: usize| layout == Layout::InPlace || (layout == Layout::Mixed && r == 0);
    let host_out = [0, 1].map(|r| {
        let mut h = vec![SENTINEL; len];
        h[offset(r)..offset(r) + n].fill(f32::NAN);
        h
    });
    let ins = [0, 1].map(|r| p.up(r, &host_in[r]));
    let outs = [0, 1].map(|r| (!in_place(r)).then(|| p.up(r, &host_out[r])));
    let calls = [0, 1].map(|r| {
        let i = ptr(&ins[r], &p.s[r]) + 4 * offset(r) as u64;
        let o = outs[r]
            .as_ref()
            .map_or(i, |b| ptr(b, &p.s[r]) + 4 * offset(r) as u64);
        p.call(r, i, o, n)
    });
    p.launch(calls);
    p.wait(&what);
    for r in 0..2 {
        let off = offset(r);
        let got = p.down(r, outs[r].as_ref().unwrap_or(&ins[r]));
        assert_bits(&got[off..off + n], &want, &format!("{what}: rank {r}"));
        let outside = got[..off].iter().chain(&got[off + n..]);
        assert!(
            outside.into_iter().all(|&x| x == SENTINEL),
            "{what}: rank {r} wrote outside its {n} values"
        );
        if !in_place(r) {
            assert_bits(
                &p.down(r, &ins[r]),
                &host_in[r],
                &format!("{what}: rank {r}'s input after the call"),
            );
        }
    }
}

#[test]
fn sums_are_exact_on_both_ranks() {
    const TEST: &str = "sums_are_exact_on_both_ranks";
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = Pair::open(TEST) else {
        return;
    };
    let _watchdog = watchdog(TEST, TEST_LIMIT);
    let mut rng = Rng(0x5eed_0001);
    let sizes = [
        1,
        2,
        3,
        4,
        5,
        7,
        8,
        12,
        31,
        33,
        255,
        256,
        257,
        1000,
        1001,
        1023,
        4096,
        4099,
        8191,
        8192,
        12_288,
        65_535,
        65_536,
        65_540,
        100_003,
        CAP - 4,
        CAP - 1,
        CAP,
    ];
    let layouts = [
        Layout::Apart,
        Layout::InPlace,
        Layout::Mixed,
        Layout::Offset,
        Layout::OneRankOffset,
    ];
    let mut calls = 0u32;
    for &n in &sizes {
        for &layout in &layouts {
            check_once(&p, &mut rng, n, layout);
            calls += 1;
        }
    }
    p.check_protocol_state(calls, TEST);
    println!("{TEST}: {calls} calls of both ranks bit-exact");
}

/// The size, input offset (f32, a multiple of 4: both ranks aligned alike) and in-place-ness of
/// call `c` of [`thousands_of_calls_in_a_row`].
fn plan(c: usize) -> (usize, usize, bool) {
    const SIZES: [usize; 14] = [
        4096,
        3,
        65_536,
        1000,
        4,
        12_288,
        1,
        65_537,
        7168,
        16_384,
        CAP / 2,
        5,
        256,
        33_001,
    ];
    let n = SIZES[(c * 7 + c / 13) % SIZES.len()];
    (n, 4 * ((c * 37) % 1024), c.is_multiple_of(3))
}

#[test]
fn thousands_of_calls_in_a_row() {
    const TEST: &str = "thousands_of_calls_in_a_row";
    const CALLS: usize = 2000;
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = Pair::open(TEST) else {
        return;
    };
    let _watchdog = watchdog(TEST, TEST_LIMIT);
    let mut rng = Rng(0x5eed_0002);
    // Each call reads its input at a changing offset into a pool of random values (a stale
    // half, from two calls before, holds other values), out of place from the pool or in place
    // on a copy of it. Sampled calls write into a slot of their own, checked at the end; the
    // others into a scratch buffer that later calls overwrite.
    let pool_len = CAP / 2 + 4096;
    let pools = [
        rng.signed_vec(pool_len, 1000.0),
        rng.signed_vec(pool_len, 1000.0),
    ];
    let pool_d = [0, 1].map(|r| p.up(r, &pools[r]));
    let scratch = [0, 1].map(|r| p.s[r].alloc_zeros::<f32>(CAP).unwrap());
    let sampled: Vec<usize> = (0..CALLS)
        .filter(|&c| c % 41 == 7 || c + 3 >= CALLS)
        .collect();
    let mut slots = vec![None; CALLS];
    let mut slot_len = 0;
    for &c in &sampled {
        slots[c] = Some(slot_len);
        // Slots start 16-byte aligned, as the scratch buffer does (the same path either way).
        slot_len += plan(c).0.next_multiple_of(4);
    }
    let samples = [0, 1].map(|r| p.up(r, &vec![f32::NAN; slot_len]));
    for (c, slot) in slots.iter().enumerate() {
        let (n, o, in_place) = plan(c);
        let calls = [0, 1].map(|r| {
            let out = match *slot {
                Some(at) => ptr(&samples[r], &p.s[r]) + 4 * at as u64,
                None => ptr(&scratch[r], &p.s[r]),
            };
            let src = ptr(&pool_d[r], &p.s[r]) + 4 * o as u64;
            if in_place {
                p.copy(r, out, src, n);
                p.call(r, out, out, n)
            } else {
                p.call(r, src, out, n)
            }
        });
        p.launch(calls);
    }
    p.wait(&format!("{TEST}: {CALLS} calls"));
    let got = [0, 1].map(|r| p.down(r, &samples[r]));
    for &c in &sampled {
        let (n, o, in_place) = plan(c);
        let at = slots[c].unwrap();
        let want = sum(&pools[0][o..o + n], &pools[1][o..o + n]);
        for (r, g) in got.iter().enumerate() {
            let what =
                format!("{TEST}: call {c} (n {n}, offset {o}, in place {in_place}): rank {r}");
            assert_bits(&g[at..at + n], &want, &what);
        }
    }
    p.check_protocol_state(CALLS as u32, TEST);
    println!(
        "{TEST}: {CALLS} calls of both ranks, {} sampled and bit-exact",
        sampled.len()
    );
}

#[test]
fn graph_replays_advance_the_counters() {
    const TEST: &str = "graph_replays_advance_the_counters";
    const REPLAYS: usize = 100;
    // The captured calls: (n, in place). Three a replay, so replays start on alternate halves;
    // the vector path out of place and in place, then the scalar path.
    const STEPS: [(usize, bool); 3] = [(4096, false), (65_536, true), (1001, false)];
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = Pair::open(TEST) else {
        return;
    };
    let _watchdog = watchdog(TEST, TEST_LIMIT);
    let mut rng = Rng(0x5eed_0003);
    // The steps' values lie back to back in `x` (inputs, and the in-place step's output) and `y`
    // (the out-of-place steps' outputs), each at an aligned offset.
    let starts: Vec<usize> = STEPS
        .iter()
        .scan(0, |at, &(n, _)| {
            let s = *at;
            *at += n.next_multiple_of(4);
            Some(s)
        })
        .collect();
    let per = starts[STEPS.len() - 1] + STEPS[STEPS.len() - 1].0.next_multiple_of(4);
    let x = [0, 1].map(|r| p.s[r].alloc_zeros::<f32>(per).unwrap());
    let y = [0, 1].map(|r| p.s[r].alloc_zeros::<f32>(per).unwrap());
    let staged = [
        rng.signed_vec(REPLAYS * per, 1000.0),
        rng.signed_vec(REPLAYS * per, 1000.0),
    ];
    let staged_d = [0, 1].map(|r| p.up(r, &staged[r]));
    let results = [0, 1].map(|r| p.up(r, &vec![f32::NAN; REPLAYS * per]));
    let step_call = |r: usize, k: usize| {
        let (n, in_place) = STEPS[k];
        let i = ptr(&x[r], &p.s[r]) + 4 * starts[k] as u64;
        let o = if in_place {
            i
        } else {
            ptr(&y[r], &p.s[r]) + 4 * starts[k] as u64
        };
        p.call(r, i, o, n)
    };
    // One eager call first: the counters are not at zero when the graphs are captured.
    p.launch([step_call(0, 0), step_call(1, 0)]);
    p.wait(&format!("{TEST}: the eager call before capture"));
    let graphs = [0, 1].map(|r| {
        p.capture(r, || {
            for k in 0..STEPS.len() {
                p.launch_one(r, &step_call(r, k));
            }
        })
    });
    for rep in 0..REPLAYS {
        // This replay's inputs, copied on each rank's own stream (after its previous replay).
        for r in 0..2 {
            let src = ptr(&staged_d[r], &p.s[r]) + 4 * (rep * per) as u64;
            p.copy(r, ptr(&x[r], &p.s[r]), src, per);
        }
        for g in &graphs {
            g.launch().unwrap();
        }
        for r in 0..2 {
            for (k, &(n, in_place)) in STEPS.iter().enumerate() {
                let from = if in_place { &x[r] } else { &y[r] };
                let at = 4 * starts[k] as u64;
                let to = ptr(&results[r], &p.s[r]) + 4 * (rep * per) as u64 + at;
                p.copy(r, to, ptr(from, &p.s[r]) + at, n);
            }
        }
    }
    p.wait(&format!("{TEST}: {REPLAYS} replays"));
    let got = [0, 1].map(|r| p.down(r, &results[r]));
    for rep in 0..REPLAYS {
        for (k, &(n, _)) in STEPS.iter().enumerate() {
            let at = rep * per + starts[k];
            let want = sum(&staged[0][at..at + n], &staged[1][at..at + n]);
            for (r, g) in got.iter().enumerate() {
                let what = format!("{TEST}: replay {rep}, step {k} (n {n}): rank {r}");
                assert_bits(&g[at..at + n], &want, &what);
            }
        }
    }
    // Eager again after the replays: it continues from the counters the graphs advanced.
    let fresh = [
        rng.signed_vec(STEPS[0].0, 1000.0),
        rng.signed_vec(STEPS[0].0, 1000.0),
    ];
    let fresh_d = [0, 1].map(|r| p.up(r, &fresh[r]));
    for r in 0..2 {
        p.copy(
            r,
            ptr(&x[r], &p.s[r]),
            ptr(&fresh_d[r], &p.s[r]),
            STEPS[0].0,
        );
    }
    p.launch([step_call(0, 0), step_call(1, 0)]);
    p.wait(&format!("{TEST}: the eager call after the replays"));
    let want = sum(&fresh[0], &fresh[1]);
    for (r, yr) in y.iter().enumerate() {
        let got = p.down(r, yr);
        let what = format!("{TEST}: the eager call after the replays: rank {r}");
        assert_bits(&got[..STEPS[0].0], &want, &what);
    }
    p.check_protocol_state((2 + STEPS.len() * REPLAYS) as u32, TEST);
    println!("{TEST}: {REPLAYS} replays of both ranks' graphs bit-exact");
}

#[test]
fn peer_reduce_timing_print() {
    const TEST: &str = "peer_reduce_timing_print";
    const CALLS: usize = 1000;
    const PER_GRAPH: usize = 100;
    let _lock = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = Pair::open(TEST) else {
        return;
    };
    let _watchdog = watchdog(TEST, TEST_LIMIT);
    // Microseconds a call of both ranks over what `enqueue` submits (`calls` of them): from an
    // event on rank 0's stream that rank 1's waits for, to one after both streams' last calls.
    let time_us = |calls: usize, what: &str, enqueue: &dyn Fn()| -> f64 {
        let ev = || {
            p.g.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap()
        };
        let (start, end_1, end) = (ev(), ev(), ev());
        start.record(&p.s[0]).unwrap();
        p.s[1].wait(&start).unwrap();
        enqueue();
        end_1.record(&p.s[1]).unwrap();
        p.s[0].wait(&end_1).unwrap();
        end.record(&p.s[0]).unwrap();
        p.wait(what);
        f64::from(start.elapsed_ms(&end).unwrap()) * 1000.0 / calls as f64
    };
    println!(
        "{TEST}: both ranks on one GPU (pushes through local memory, not NVLink), system \
         fence {}, PDL {}",
        std::env::var("DSPARK_PEER_FENCE")
            .ok()
            .as_deref()
            .map(str::trim)
            != Some("0"),
        pdl_enabled()
    );
    for n in [4096usize, 65_536] {
        let bufs = [0, 1].map(|r| p.s[r].alloc_zeros::<f32>(n).unwrap());
        let calls = [0, 1].map(|r| {
            let at = ptr(&bufs[r], &p.s[r]);
            p.call(r, at, at, n)
        });
        let eager = || {
            for _ in 0..CALLS {
                p.launch(calls);
            }
        };
        let warm = time_us(CALLS, &format!("{TEST}: eager warm-up, n {n}"), &eager);
        let eager_us = time_us(CALLS, &format!("{TEST}: eager, n {n}"), &eager);
        let graphs = [0, 1].map(|r| {
            p.capture(r, || {
                for _ in 0..PER_GRAPH {
                    p.launch_one(r, &calls[r]);
                }
            })
        });
        let replays = CALLS / PER_GRAPH;
        let replay = || {
            for _ in 0..replays {
                for g in &graphs {
                    g.launch().unwrap();
                }
            }
        };
        time_us(CALLS, &format!("{TEST}: graph warm-up, n {n}"), &replay);
        let graph_us = time_us(CALLS, &format!("{TEST}: graphs, n {n}"), &replay);
        println!(
            "{TEST}: all-reduce f32 x {n}: {eager_us:.2} us a call eager (first {warm:.2}), \
             {graph_us:.2} us from graphs of {PER_GRAPH} calls ({CALLS} calls of both ranks)"
        );
    }
}
