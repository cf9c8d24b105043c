//! Local launcher: `dspark-server serve --world-size N` without `--rank` starts and supervises N
//! copies of itself on loopback, one per rank (the README demo and the end-to-end tests).
//!
//! Children run in their own process group so a terminal's Ctrl-C reaches them once, through
//! the launcher. SIGTERM/SIGINT are forwarded to every child. If any child exits non-zero the
//! others get SIGTERM (SIGKILL after [`KILL_GRACE`]) and the launcher exits non-zero with the
//! first failing child's status; if all exit 0, it exits 0.

use std::net::TcpListener;
use std::path::Path;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// How long the other ranks get between SIGTERM and SIGKILL once one rank has failed.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Flags the launcher sets per child; the same flags in `args` are dropped.
const PER_RANK_FLAGS: [&str; 3] = ["--rank", "--leader-addr", "--control-port"];

/// Runs `world_size` copies of the current executable with `args` plus
/// `--rank R --leader-addr 127.0.0.1:PORT --control-port PORT` (PORT a free loopback port).
/// `args` are the command line after the program name (e.g. `["serve", "--world-size", "2"]`).
pub fn launch_local(world_size: usize, args: Vec<String>) -> ExitCode {
    match std::env::current_exe() {
        Ok(exe) => launch_local_with(&exe, world_size, args),
        Err(e) => {
            tracing::error!("launcher: cannot find the current executable: {e}");
            ExitCode::FAILURE
        }
    }
}

/// [`launch_local`] with an explicit program (tests run their own binary).
pub fn launch_local_with(program: &Path, world_size: usize, args: Vec<String>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("launcher: cannot start its runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(supervise(program, world_size, args)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("launcher: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Drops `--flag value` and `--flag=value` for each per-rank flag.
fn strip_per_rank_flags(args: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if PER_RANK_FLAGS.contains(&a.as_str()) {
            it.next();
        } else if PER_RANK_FLAGS
            .iter()
            .any(|f| a.starts_with(&format!("{f}=")))
        {
            // dropped
        } else {
            out.push(a);
        }
    }
    out
}

/// Ranks > 0 serve only their probe endpoints; on one machine they must not take rank 0's HTTP
/// port, so they get an ephemeral one (`--port 0`).
fn follower_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--port" {
            it.next();
        } else if !a.starts_with("--port=") {
            out.push(a.clone());
        }
    }
    out.extend(["--port".to_string(), "0".to_string()]);
    out
}

/// A free loopback port (released just before rank 0 binds it; the window is tiny).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn send_signal(pid: Option<u32>, sig: Signal) {
    if let Some(pid) = pid.and_then(|p| Pid::from_raw(p as i32)) {
        let _ = kill_process(pid, sig);
    }
}

/// Exit code for a child's status: its code, or 128 + signal number if a signal ended it.
fn status_code(status: &ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(1),
        (None, None) => 1,
    }
}

async fn supervise(
    program: &Path,
    world_size: usize,
    args: Vec<String>,
) -> std::io::Result<ExitCode> {
    let port = free_port()?;
    let args = strip_per_rank_flags(args);
    let leader = format!("127.0.0.1:{port}");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let (tx, mut exits) = mpsc::unbounded_channel::<(usize, std::io::Result<ExitStatus>)>();
    let mut pids: Vec<Option<u32>> = Vec::with_capacity(world_size);
    for rank in 0..world_size {
        let mut cmd = tokio::process::Command::new(program);
        let rank_args = if rank == 0 {
            args.clone()
        } else {
            follower_args(&args)
        };
        cmd.args(&rank_args)
            .args(["--rank", &rank.to_string()])
            .args(["--leader-addr", &leader])
            .args(["--control-port", &port.to_string()])
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                for pid in &pids {
                    send_signal(*pid, Signal::KILL);
                }
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot start rank {rank} ({}): {e}", program.display()),
                ));
            }
        };
        pids.push(child.id());
        tracing::info!("launcher: rank {rank} started (pid {:?})", child.id());
        let tx = tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send((rank, status));
        });
    }
    drop(tx);

    let mut alive = vec![true; world_size];
    let mut first_failure: Option<u8> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let forward = |pids: &[Option<u32>], alive: &[bool], sig: Signal| {
        for (pid, up) in pids.iter().zip(alive) {
            if *up {
                send_signal(*pid, sig);
            }
        }
    };
    while alive.iter().any(|a| *a) {
        let deadline = kill_at;
        let kill_timer = async move {
            match deadline {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("launcher: SIGTERM, forwarding to the ranks");
                forward(&pids, &alive, Signal::TERM);
            }
            _ = int.recv() => {
                tracing::info!("launcher: SIGINT, forwarding to the ranks");
                forward(&pids, &alive, Signal::INT);
            }
            _ = kill_timer => {
                tracing::warn!("launcher: ranks still running {}s after a failure; killing them", KILL_GRACE.as_secs());
                forward(&pids, &alive, Signal::KILL);
                kill_at = None;
            }
            exit = exits.recv() => {
                let Some((rank, status)) = exit else { break };
                alive[rank] = false;
                let code = match &status {
                    Ok(s) => status_code(s),
                    Err(_) => 1,
                };
                match status {
                    Ok(s) if s.success() => tracing::info!("launcher: rank {rank} exited 0"),
                    other => {
                        tracing::error!("launcher: rank {rank} failed ({}); stopping the group", match other {
                            Ok(s) => s.to_string(),
                            Err(e) => e.to_string(),
                        });
                        if first_failure.is_none() {
                            first_failure = Some(code.max(1));
                            forward(&pids, &alive, Signal::TERM);
                            kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
                        }
                    }
                }
            }
        }
    }
    Ok(match first_failure {
        Some(code) => ExitCode::from(code),
        None => ExitCode::SUCCESS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_get_an_ephemeral_http_port() {
        let args: Vec<String> = ["serve", "--port", "8000", "--port=9", "--world-size", "2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            follower_args(&args),
            ["serve", "--world-size", "2", "--port", "0"]
        );
    }

    #[test]
    fn per_rank_flags_are_replaced_not_duplicated() {
        let args: Vec<String> = [
            "serve",
            "--world-size",
            "2",
            "--rank",
            "5",
            "--leader-addr=x:1",
            "--control-port",
            "1234",
            "--port",
            "8000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            strip_per_rank_flags(args),
            ["serve", "--world-size", "2", "--port", "8000"]
        );
    }
}
