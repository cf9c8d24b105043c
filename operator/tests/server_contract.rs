//! The operator/server contract: the pod template the operator renders must start a working
//! two-rank group of the real `dspark-server`.
//!
//! `two_pods_from_the_rendered_template_serve_and_stop_cleanly` builds the StatefulSet for
//! examples/tiny-cpu.yaml with the operator's own builders (the code path of
//! `dspark-operator render`), takes the server container's command, args and env exactly, and
//! runs the two pods as local processes, resolving each env var's `valueFrom` the way kubelet
//! would for pod 0 and pod 1. Only what cannot exist outside a cluster is substituted:
//!   - the model path baked into the image (`/opt/dspark/models/tiny-dsv4`, see Dockerfile)
//!     -> the same model in the repo (server/assets/tiny-dsv4);
//!   - the leader host (pod 0's DNS name under the headless Service) -> 127.0.0.1, with a free
//!     port standing in for the control port everywhere it appears (`--control-port`, the port
//!     of `--leader-addr`, the `control` containerPort);
//!   - `--port` (the `http` containerPort the probes name) -> a free port per pod, since both
//!     "pods" share one network namespace here.
//!
//! The binary is `$DSPARK_SERVER_BIN`, else `$CARGO_TARGET_DIR/debug/dspark-server`, else the
//! `debug/dspark-server` next to this test's target dir; build it first with
//! `cargo build --workspace --bins`.
//!
//! `every_rendered_flag_and_env_var_is_known_to_the_server_cli` is the pure half: every flag of
//! every example parses with the server's own CLI definition, and every DSPARK_* env var the
//! template sets is one the CLI reads.

mod common;

use clap::{CommandFactory, Parser};
use dspark_operator::crd::DSparkDeployment;
use dspark_operator::resources::{self, BuildContext, LABEL_POD_INDEX};
use dspark_server::cli::{Cli, Command as ServerCommand};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where the Dockerfile puts the tiny model in the image.
const IMAGE_MODEL_PATH: &str = "/opt/dspark/models/tiny-dsv4";
/// How long both pods may take to become ready (model load + rendezvous of the tiny model).
const READY_DEADLINE: Duration = Duration::from_secs(120);

fn load_example(name: &str) -> DSparkDeployment {
    let path = common::repo_root().join("examples").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut dsd: DSparkDeployment = serde_yaml::from_str(&text).unwrap();
    dspark_operator::crd::validate_spec(&dsd.spec).unwrap();
    // What `dspark-operator render` fills in.
    dsd.metadata.namespace.get_or_insert("default".into());
    dsd.metadata
        .uid
        .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
    dsd
}

fn rendered_sts(dsd: &DSparkDeployment) -> Value {
    let ctx = BuildContext {
        default_image: "ghcr.io/dspark-dev/dspark:test".into(),
    };
    serde_json::to_value(resources::stateful_set(dsd, 0, &ctx).unwrap()).unwrap()
}

fn server_container(sts: &Value) -> &Value {
    sts["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "server")
        .expect("the pod template has no `server` container")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("non-string arg").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Value of `--flag` in an argument list.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn set_flag(args: &mut [String], name: &str, value: String) {
    let i = args
        .iter()
        .position(|a| a == name)
        .unwrap_or_else(|| panic!("the rendered args have no {name}"));
    args[i + 1] = value;
}

/// The labels kubelet sees on pod `ordinal` of the StatefulSet: the template's, plus what the
/// StatefulSet controller adds.
fn pod_labels(sts: &Value, ordinal: usize) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> =
        serde_json::from_value(sts["spec"]["template"]["metadata"]["labels"].clone()).unwrap();
    let name = format!("{}-{ordinal}", sts["metadata"]["name"].as_str().unwrap());
    labels.insert(LABEL_POD_INDEX.into(), ordinal.to_string());
    labels.insert("statefulset.kubernetes.io/pod-name".into(), name);
    labels
}

/// The container env of pod `ordinal`, resolved as kubelet would. Any source this function does
/// not know (secrets, resource fields, envFrom, `$(VAR)` references) fails the test, so a new one
/// in the template is noticed here rather than in a cluster.
fn resolve_env(sts: &Value, container: &Value, ordinal: usize) -> Vec<(String, String)> {
    assert!(
        container.get("envFrom").is_none(),
        "envFrom is not resolved by this test: {}",
        container["envFrom"]
    );
    let labels = pod_labels(sts, ordinal);
    let pod_name = format!("{}-{ordinal}", sts["metadata"]["name"].as_str().unwrap());
    let namespace = sts["metadata"]["namespace"].as_str().unwrap().to_string();
    let mut out = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = var.get("value") {
            v.as_str().unwrap().to_string()
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            let label = path
                .strip_prefix("metadata.labels['")
                .and_then(|p| p.strip_suffix("']"));
            match (path, label) {
                (_, Some(label)) => labels
                    .get(label)
                    .unwrap_or_else(|| panic!("{name}: pod {ordinal} has no label {label}"))
                    .clone(),
                ("metadata.name", None) => pod_name.clone(),
                ("metadata.namespace", None) => namespace.clone(),
                _ => panic!("{name}: unknown fieldRef {path}"),
            }
        } else {
            panic!("{name}: unknown env source {var}");
        };
        assert!(
            !value.contains("$("),
            "{name}: $(VAR) expansion is not modelled by this test"
        );
        out.push((name, value));
    }
    out
}

fn container_port(container: &Value, port_name: &str) -> i64 {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port_name)
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("no containerPort named {port_name}"))
}

/// The HTTP path and container port a probe checks (named ports resolved).
fn probe_target(container: &Value, probe: &str) -> (String, i64) {
    let get = &container[probe]["httpGet"];
    let path = get["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{probe} is not an httpGet probe"));
    let port = match &get["port"] {
        Value::String(name) => container_port(container, name),
        Value::Number(n) => n.as_i64().unwrap(),
        other => panic!("{probe}: bad port {other}"),
    };
    (path.to_string(), port)
}

/// `n` distinct free loopback ports. The listeners are all held until every port is known: a
/// port picked and released one at a time can come back for the next pick, and a pod's HTTP
/// port equal to the group's control port fails its start ("Address already in use").
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn server_binary() -> PathBuf {
    let bin = if let Some(p) = std::env::var_os("DSPARK_SERVER_BIN") {
        PathBuf::from(p)
    } else if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        PathBuf::from(dir).join("debug/dspark-server")
    } else {
        // target/debug/deps/server_contract-HASH -> target/debug/dspark-server
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .and_then(Path::parent)
            .unwrap()
            .join("dspark-server")
    };
    assert!(
        bin.is_file(),
        "{} does not exist: build the server first (`cargo build --workspace --bins`) or set \
         DSPARK_SERVER_BIN",
        bin.display()
    );
    bin
}

/// A minimal HTTP/1.0 client (no chunked encoding to decode): status and body.
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A pod's process; killed on drop so a failing test leaves nothing behind.
struct Pod {
    ordinal: usize,
    child: Child,
    http_port: u16,
    log: PathBuf,
}

impl Pod {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        format!("--- pod {} log ---\n{}", self.ordinal, &text[start..])
    }

    fn wait_exit(&mut self, deadline: Instant) -> Option<ExitStatus> {
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sigterm(child: &Child) {
    let pid = rustix::process::Pid::from_child(child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
}

#[test]
fn two_pods_from_the_rendered_template_serve_and_stop_cleanly() {
    let bin = server_binary();
    let dsd = load_example("tiny-cpu.yaml");
    let sts = rendered_sts(&dsd);
    let container = server_container(&sts).clone();
    let replicas = sts["spec"]["replicas"].as_u64().unwrap() as usize;
    assert_eq!(replicas, 2, "tiny-cpu is a two-rank group");

    assert_eq!(
        strings(&container["command"]),
        ["dspark-server"],
        "the command is the binary on the image's PATH"
    );
    let rendered_args = strings(&container["args"]);
    let http_port = container_port(&container, "http");
    let control_port = container_port(&container, "control");

    // The rendered args agree with the container's ports and the headless Service.
    assert_eq!(
        flag(&rendered_args, "--port"),
        Some(http_port.to_string().as_str())
    );
    assert_eq!(
        flag(&rendered_args, "--control-port"),
        Some(control_port.to_string().as_str())
    );
    let leader_host = format!(
        "{}-0.{}.{}.svc",
        sts["metadata"]["name"].as_str().unwrap(),
        sts["spec"]["serviceName"].as_str().unwrap(),
        sts["metadata"]["namespace"].as_str().unwrap(),
    );
    assert_eq!(
        flag(&rendered_args, "--leader-addr"),
        Some(format!("{leader_host}:{control_port}").as_str()),
        "rank 1 must dial pod 0 through the headless Service on the control port"
    );
    assert_eq!(flag(&rendered_args, "--model"), Some(IMAGE_MODEL_PATH));
    assert_eq!(
        flag(&rendered_args, "--world-size"),
        Some(replicas.to_string().as_str())
    );

    // Probes: the named port must be the one --port makes the server listen on.
    let probes: Vec<(String, (String, i64))> = ["startupProbe", "readinessProbe"]
        .iter()
        .map(|p| (p.to_string(), probe_target(&container, p)))
        .collect();
    for (name, (_, port)) in &probes {
        assert_eq!(
            *port, http_port,
            "{name} checks a port the server does not serve"
        );
    }
    let (liveness_path, liveness_port) = probe_target(&container, "livenessProbe");
    assert_eq!(liveness_port, http_port);

    let grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);

    // Substitutions (see the module docs), consistent across both pods.
    let model_dir = common::repo_root().join("server/assets/tiny-dsv4");
    // The group's control port, then each pod's HTTP port.
    let ports = free_ports(1 + replicas);
    let local_control = ports[0];
    let scratch = std::env::temp_dir().join(format!("dspark-contract-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();

    let mut pods = Vec::new();
    for ordinal in 0..replicas {
        let local_http = ports[1 + ordinal];
        let mut args = rendered_args.clone();
        set_flag(&mut args, "--model", model_dir.display().to_string());
        set_flag(&mut args, "--port", local_http.to_string());
        set_flag(&mut args, "--control-port", local_control.to_string());
        set_flag(
            &mut args,
            "--leader-addr",
            format!("127.0.0.1:{local_control}"),
        );
        let env = resolve_env(&sts, &container, ordinal);
        assert!(
            env.contains(&("DSPARK_RANK".to_string(), ordinal.to_string())),
            "pod {ordinal} must get DSPARK_RANK={ordinal}: {env:?}"
        );
        let log = scratch.join(format!("pod-{ordinal}.log"));
        let log_file = std::fs::File::create(&log).unwrap();
        // A container sees only its image's env and the template's, not the test runner's.
        let child = Command::new(&bin)
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &scratch)
            .envs(env)
            .current_dir(&scratch)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        pods.push(Pod {
            ordinal,
            child,
            http_port: local_http,
            log,
        });
    }

    // kubelet's view: startup probe first, then readiness, on each pod until all pass.
    let deadline = Instant::now() + READY_DEADLINE;
    for pod in &mut pods {
        for (name, (path, _)) in &probes {
            loop {
                if let Some(status) = pod.child.try_wait().unwrap() {
                    panic!(
                        "pod {} exited ({status}) before its {name} passed\n{}",
                        pod.ordinal,
                        pod.log_tail()
                    );
                }
                if matches!(http(pod.http_port, "GET", path, None), Ok((200, _))) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "pod {}: {name} ({path}) not passing after {READY_DEADLINE:?}\n{}",
                    pod.ordinal,
                    pod.log_tail()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let (status, _) = http(pod.http_port, "GET", &liveness_path, None).unwrap();
        assert_eq!(status, 200, "pod {}: liveness probe", pod.ordinal);
    }

    // The client Service selects rank 0's API.
    let served = flag(&rendered_args, "--served-model-name").unwrap();
    let request = json!({
        "model": served,
        "messages": [{"role": "user", "content": "Hello from the contract test"}],
        "max_tokens": 8,
        "min_tokens": 4,
        "temperature": 0,
    });
    let (status, body) = http(
        pods[0].http_port,
        "POST",
        "/v1/chat/completions",
        Some(&request.to_string()),
    )
    .unwrap();
    assert_eq!(
        status,
        200,
        "chat completion: {body}\n{}",
        pods[0].log_tail()
    );
    let reply: Value = serde_json::from_str(&body).unwrap();
    let choice = &reply["choices"][0];
    // The tiny model's random text may land in the thinking part: either field counts.
    let text = ["content", "reasoning_content"]
        .iter()
        .filter_map(|f| choice["message"][f].as_str())
        .collect::<String>();
    assert!(!text.is_empty(), "empty choice: {body}");
    assert!(choice["finish_reason"].is_string(), "{body}");
    assert!(reply["usage"]["completion_tokens"].as_u64().unwrap() >= 4);

    // Pod deletion: kubelet sends SIGTERM to both containers, SIGKILL after the grace period.
    for pod in &pods {
        sigterm(&pod.child);
    }
    let deadline = Instant::now() + Duration::from_secs(grace);
    for pod in &mut pods {
        let status = pod.wait_exit(deadline).unwrap_or_else(|| {
            panic!(
                "pod {} still running {grace}s after SIGTERM\n{}",
                pod.ordinal,
                pod.log_tail()
            )
        });
        assert_eq!(
            status.code(),
            Some(0),
            "pod {} exited with {status} after SIGTERM\n{}",
            pod.ordinal,
            pod.log_tail()
        );
    }
    drop(pods);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The env vars the server's `serve` subcommand reads.
fn serve_cli_env_vars() -> Vec<String> {
    let cli = Cli::command();
    let serve = cli
        .find_subcommand("serve")
        .expect("dspark-server has a `serve` subcommand");
    serve
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn every_rendered_flag_and_env_var_is_known_to_the_server_cli() {
    let known_envs = serve_cli_env_vars();
    for example in [
        "tiny-cpu.yaml",
        "long-context-1m.yaml",
        "concurrency-200k.yaml",
    ] {
        let dsd = load_example(example);
        let sts = rendered_sts(&dsd);
        let container = server_container(&sts);
        let args = strings(&container["args"]);

        let argv = std::iter::once("dspark-server".to_string()).chain(args.iter().cloned());
        let parsed = match Cli::try_parse_from(argv) {
            Ok(cli) => cli,
            Err(e) => panic!("{example}: the server rejects the rendered args {args:?}:\n{e}"),
        };
        let ServerCommand::Serve(serve) = parsed.command else {
            panic!("{example}: the rendered args parse as another subcommand: {args:?}");
        };
        // A few values that decide serving behaviour land where the operator meant them.
        let inv = resources::server_invocation(&dsd, 0);
        assert_eq!(serve.model.as_deref(), Some(Path::new(&inv.model_path)));
        assert_eq!(serve.world_size as i32, inv.world_size, "{example}");
        assert_eq!(i32::from(serve.port), inv.port, "{example}");
        assert_eq!(i32::from(serve.control_port), inv.control_port, "{example}");
        assert_eq!(serve.leader_addr.as_deref(), Some(inv.leader_addr.as_str()));
        assert_eq!(
            serve.max_model_len.map(|v| v as i64),
            Some(inv.profile.max_model_len),
            "{example}"
        );
        assert_eq!(
            serve.max_num_seqs as i64,
            i64::from(inv.profile.max_num_seqs)
        );

        // Env vars meant for the server must be ones it reads; the rest are for NCCL/CUDA.
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap();
            if name.starts_with("DSPARK_") {
                assert!(
                    known_envs.iter().any(|k| k == name),
                    "{example}: the server reads no env var {name}"
                );
            }
        }
        // The rank reaches the server through the env, as a valid --rank would.
        let rank_var = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "DSPARK_RANK")
            .expect("DSPARK_RANK is set");
        assert_eq!(
            rank_var["valueFrom"]["fieldRef"]["fieldPath"],
            format!("metadata.labels['{LABEL_POD_INDEX}']")
        );
    }
}
