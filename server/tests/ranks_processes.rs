//! Ranks as real, separate processes: this test binary re-runs itself as a rank (the test
//! `rank_process_entry`, selected with `--exact`, does the work when `DSPARK_TEST_RANK_ROLE` is
//! set) so kill -9, exit codes and the launcher are exercised for real.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dspark_server::engine::{
    EngineError, KvLayout, LogitsWanted, ModelRunner, SeqPlan, StepOutput, StepPlan,
};
use dspark_server::ranks::{
    launch_local_with, rendezvous, rendezvous_leader_on, run_follower, CommError, Communicator,
    FailPolicy, FollowerError, GroupFingerprint, GroupHealth, LeaderRunner, RankConfig, Role,
    EXIT_PEER_LOST,
};

const ROLE: &str = "DSPARK_TEST_RANK_ROLE";
const ADDR: &str = "DSPARK_TEST_LEADER_ADDR";

fn rank_cfg(rank: usize, addr: &str) -> RankConfig {
    let port = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    RankConfig {
        rank,
        world_size: 2,
        leader_addr: Some(addr.to_string()),
        control_port: port,
        control_bind_host: "127.0.0.1".into(),
        rendezvous_timeout: Duration::from_secs(20),
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(2),
        collective_timeout: Duration::from_secs(30),
    }
}

/// A stand-in for a tensor-parallel model: every step all-reduces a partial result.
struct AllReducingRunner {
    comm: Arc<dyn Communicator>,
}

impl ModelRunner for AllReducingRunner {
    fn kv_layout(&self) -> KvLayout {
        KvLayout {
            block_size: 16,
            num_blocks: 4,
            bytes_per_block: 1,
            recent_blocks: 4,
            bytes_per_recent: 1,
            recent_reach: 15,
        }
    }
    fn vocab_size(&self) -> usize {
        8
    }
    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, EngineError> {
        let mut partial = vec![1.0f32; 8];
        self.comm
            .all_reduce_sum(&mut partial)
            .map_err(|e| EngineError::Comm(e.to_string()))?;
        Ok(StepOutput {
            drafts: Vec::new(),
            logits: vec![vec![partial]; plan.seqs.len()],
        })
    }
    fn release(&mut self, _seq_id: u64) {}
}

fn one_seq_plan(i: u64) -> StepPlan {
    StepPlan {
        seqs: vec![SeqPlan {
            seq_id: i,
            start_pos: 0,
            tokens: vec![1],
            block_table: vec![0],
            recent_table: vec![0],
            logits: LogitsWanted::Last,
            draft: None,
        }],
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// The body of a rank process. Does nothing in a normal test run.
#[test]
fn rank_process_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    init_logs();
    let addr = std::env::var(ADDR).unwrap_or_default();
    let health = GroupHealth::new(FailPolicy::ExitProcess {
        grace: Duration::from_millis(200),
    });
    let fp = GroupFingerprint::new("model=test");
    match role.as_str() {
        // Rank 0 that steps forever (until its peer is lost or it is killed).
        "leader" => {
            let g = rendezvous(&rank_cfg(0, &addr), &fp, &health, None).unwrap();
            let Role::Leader(plans) = g.role else {
                unreachable!()
            };
            let mut runner = LeaderRunner::new(
                AllReducingRunner {
                    comm: g.comm.clone(),
                },
                plans,
            );
            for i in 0.. {
                // Back to back, so a kill lands inside a step's collective as often as not.
                match runner.step(&one_seq_plan(i)) {
                    Ok(_) if i % 100 == 0 => println!("step {i}"),
                    Ok(_) => {}
                    Err(_) => {
                        // The loss is already logged; wait for the exit the policy schedules.
                        std::thread::sleep(Duration::from_secs(30));
                        std::process::exit(1);
                    }
                }
            }
        }
        "follower" => {
            let g = rendezvous(&rank_cfg(1, &addr), &fp, &health, None).unwrap();
            let Role::Follower(link) = g.role else {
                unreachable!()
            };
            let mut runner = AllReducingRunner {
                comm: g.comm.clone(),
            };
            println!("formed");
            let code = match run_follower(&mut runner, &link) {
                Ok(()) => 0,
                Err(FollowerError::Comm(CommError::PeerLost { .. })) => EXIT_PEER_LOST,
                Err(e) => {
                    eprintln!("follower: {e}");
                    1
                }
            };
            std::process::exit(code);
        }
        other => panic!("unknown role {other}"),
    }
}

struct RankProcess {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    /// The threads copying the pipes: joined once the process exited, so its last lines are in.
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn collect(
    pipe: impl std::io::Read + Send + 'static,
) -> (Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut b = b.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    });
    (buf, reader)
}

fn spawn_rank(role: &str, addr: &str) -> RankProcess {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "rank_process_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(ADDR, addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (stdout, out_reader) = collect(child.stdout.take().unwrap());
    let (stderr, err_reader) = collect(child.stderr.take().unwrap());
    RankProcess {
        child,
        stdout,
        stderr,
        readers: vec![out_reader, err_reader],
    }
}

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the process to exit; returns its exit code and how long that took.
fn wait_exit(p: &mut RankProcess, within: Duration) -> (Option<i32>, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            let took = t0.elapsed();
            for reader in p.readers.drain(..) {
                let _ = reader.join();
            }
            return (status.code(), took);
        }
        if t0.elapsed() > within {
            let _ = p.child.kill();
            panic!(
                "process still running after {within:?}; stderr:\n{}",
                p.stderr.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kill_9_of_rank_1_gives_rank_0_peer_lost_within_seconds() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let mut follower = spawn_rank("follower", &addr);
    let health = GroupHealth::new(FailPolicy::ReturnErrors);
    let g = rendezvous_leader_on(
        l,
        &rank_cfg(0, &addr),
        &GroupFingerprint::new("model=test"),
        &health,
        None,
    )
    .unwrap();
    let Role::Leader(plans) = g.role else {
        unreachable!()
    };
    let mut runner = LeaderRunner::new(
        AllReducingRunner {
            comm: g.comm.clone(),
        },
        plans,
    );
    for i in 0..5 {
        let out = runner.step(&one_seq_plan(i)).unwrap();
        assert_eq!(out.logits[0][0], vec![2.0; 8]);
    }
    follower.child.kill().unwrap(); // SIGKILL
    let t0 = Instant::now();
    let err = loop {
        match runner.step(&one_seq_plan(99)) {
            Ok(_) => assert!(t0.elapsed() < Duration::from_secs(5), "loss not detected"),
            Err(e) => break e,
        }
    };
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let msg = err.to_string();
    assert!(msg.contains("peer rank 1 lost"), "{msg}");
    assert!(matches!(health.lost(), Some((1, _))));
    let _ = follower.child.wait();
}

#[test]
fn kill_9_of_either_rank_makes_the_other_exit_non_zero_with_one_clear_line() {
    for victim in [0usize, 1] {
        let addr = free_addr();
        let leader = spawn_rank("leader", &addr);
        let follower = spawn_rank("follower", &addr);
        let l_out = leader.stdout.clone();
        wait_until("rank 0 to run steps", Duration::from_secs(30), || {
            l_out.lock().unwrap().contains("step 500")
        });
        let (mut dead, mut survivor) = if victim == 0 {
            (leader, follower)
        } else {
            (follower, leader)
        };
        dead.child.kill().unwrap();
        let (code, took) = wait_exit(&mut survivor, Duration::from_secs(10));
        let _ = dead.child.wait();
        let log = survivor.stderr.lock().unwrap().clone();
        assert_eq!(code, Some(EXIT_PEER_LOST), "victim {victim}; log:\n{log}");
        assert!(
            took < Duration::from_secs(5),
            "victim {victim}: took {took:?}"
        );
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(" lost: ")).collect();
        assert_eq!(lines.len(), 1, "victim {victim}; log:\n{log}");
        assert!(
            lines[0].contains(&format!("rank {victim} lost: ")),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("ERROR"), "{}", lines[0]);
    }
}

// ---------------------------------------------------------------------------------------------
// Launcher: children are this binary running `launcher_child_entry`. The launcher appends
// `--rank R --leader-addr A --control-port P` after our `--`, where libtest takes them as extra
// (non-matching) name filters; the entry reads them back from its arguments.

fn flag_value(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

#[test]
fn launcher_child_entry() {
    let args: Vec<String> = std::env::args().collect();
    let Some(mode) = args.iter().find_map(|a| a.strip_prefix("mode=")) else {
        return;
    };
    init_logs();
    let rank: usize = flag_value(&args, "--rank").unwrap().parse().unwrap();
    let leader = flag_value(&args, "--leader-addr").unwrap();
    let port: u16 = flag_value(&args, "--control-port")
        .unwrap()
        .parse()
        .unwrap();
    match mode {
        "fail-rank-1" => {
            if rank == 1 {
                std::thread::sleep(Duration::from_millis(300));
                std::process::exit(7);
            }
            std::thread::sleep(Duration::from_secs(120));
            std::process::exit(0);
        }
        "form-and-shutdown" => {
            let cfg = RankConfig {
                control_port: port,
                ..rank_cfg(rank, &leader)
            };
            let health = GroupHealth::new(FailPolicy::default());
            let g = rendezvous(&cfg, &GroupFingerprint::new("m"), &health, None).unwrap();
            g.comm.barrier().unwrap();
            match g.role {
                Role::Leader(plans) => plans.shutdown().unwrap(),
                Role::Follower(link) => {
                    let mut runner = AllReducingRunner {
                        comm: g.comm.clone(),
                    };
                    run_follower(&mut runner, &link).unwrap();
                }
            }
            std::process::exit(0);
        }
        "wait-for-signal" => {
            let dir = args.iter().find_map(|a| a.strip_prefix("dir=")).unwrap();
            std::fs::write(
                format!("{dir}/rank{rank}.pid"),
                std::process::id().to_string(),
            )
            .unwrap();
            std::thread::sleep(Duration::from_secs(120));
            std::process::exit(0);
        }
        "launcher" => unreachable!(),
        other => panic!("unknown mode {other}"),
    }
}

fn child_args(extra: &[&str]) -> Vec<String> {
    [
        "launcher_child_entry",
        "--exact",
        "--nocapture",
        "--test-threads=1",
        "--",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn launcher_exits_0_when_every_rank_does() {
    let exe = std::env::current_exe().unwrap();
    let code = launch_local_with(&exe, 2, child_args(&["mode=form-and-shutdown"]));
    assert_eq!(code, ExitCode::SUCCESS);
}

#[test]
fn launcher_kills_the_others_and_fails_when_a_rank_fails() {
    let exe = std::env::current_exe().unwrap();
    let t0 = Instant::now();
    let code = launch_local_with(&exe, 2, child_args(&["mode=fail-rank-1"]));
    // Rank 0 would sleep 120 s: the launcher must have stopped it.
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert_eq!(code, ExitCode::from(7));
}

/// Runs the launcher itself in a process so a signal can be sent to it.
#[test]
fn launcher_process_entry() {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.iter().find_map(|a| a.strip_prefix("launcher-dir=")) else {
        return;
    };
    init_logs();
    let exe = std::env::current_exe().unwrap();
    let dir_arg = format!("dir={dir}");
    let code = launch_local_with(&exe, 2, child_args(&["mode=wait-for-signal", &dir_arg]));
    std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
}

#[test]
fn launcher_forwards_sigterm_to_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().display().to_string();
    let mut launcher = Command::new(std::env::current_exe().unwrap())
        .args([
            "launcher_process_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "--",
            &format!("launcher-dir={dir_s}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid_file = |r: usize| dir.path().join(format!("rank{r}.pid"));
    wait_until("both ranks to start", Duration::from_secs(20), || {
        pid_file(0).exists() && pid_file(1).exists()
    });
    std::thread::sleep(Duration::from_millis(100)); // pid files are written whole by now
    let pids: Vec<i32> = (0..2)
        .map(|r| {
            std::fs::read_to_string(pid_file(r))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    let launcher_pid = rustix::process::Pid::from_raw(launcher.id() as i32).unwrap();
    rustix::process::kill_process(launcher_pid, rustix::process::Signal::TERM).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = launcher.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "launcher did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The ranks died of the forwarded SIGTERM (status 143): the launcher reports failure.
    assert_eq!(status.code(), Some(1));
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "rank pid {pid} still exists"
        );
    }
}
