//! End to end on a real cluster (kind/k3d): install the chart, apply examples/tiny-cpu.yaml,
//! wait for Ready, send a chat completion through the client Service.
//!
//! Ignored by default. Needs `helm` and `kubectl` on PATH, KUBECONFIG pointing at a reachable
//! cluster, and the image loaded into it (see docs/README-operator.md):
//!   DSPARK_E2E_IMAGE=ghcr.io/dspark-dev/dspark:0.1.0 \
//!   cargo test -p dspark-operator --test e2e -- --ignored --nocapture

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const OPERATOR_NS: &str = "dspark-system";
const NS: &str = "dspark-e2e";

fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(common::repo_root())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn kubectl(args: &[&str]) -> String {
    sh("kubectl", args).unwrap_or_else(|e| panic!("{e}"))
}

/// Kills the port-forward when the test ends, pass or fail.
struct Forward(Child);
impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_post(port: u16, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((code, body))
}

#[test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG), helm, kubectl and the dspark image loaded"]
fn tiny_cpu_serves_a_chat_completion_through_the_service() {
    if let Err(e) = sh("kubectl", &["version", "--request-timeout=5s"]) {
        panic!("no reachable cluster: {e}");
    }
    let image = std::env::var("DSPARK_E2E_IMAGE")
        .unwrap_or_else(|_| "ghcr.io/dspark-dev/dspark:0.1.0".into());
    let (repo, tag) = image
        .rsplit_once(':')
        .expect("DSPARK_E2E_IMAGE must be repo:tag");
    let set_repo = format!("image.repository={repo}");
    let set_tag = format!("image.tag={tag}");
    sh(
        "helm",
        &[
            "upgrade",
            "--install",
            "dspark",
            "charts/dspark",
            "--namespace",
            OPERATOR_NS,
            "--create-namespace",
            "--set",
            &set_repo,
            "--set",
            &set_tag,
            "--set",
            "image.pullPolicy=IfNotPresent",
            "--wait",
            "--timeout",
            "5m",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let _ = sh("kubectl", &["create", "namespace", NS]);
    kubectl(&["apply", "-n", NS, "-f", "examples/tiny-cpu.yaml"]);

    let waited = sh(
        "kubectl",
        &[
            "wait",
            "-n",
            NS,
            "dsd/tiny",
            "--for=condition=Ready",
            "--timeout=900s",
        ],
    );
    if let Err(e) = waited {
        let describe = sh("kubectl", &["describe", "-n", NS, "dsd/tiny"]).unwrap_or_default();
        let pods = sh("kubectl", &["get", "pods", "-n", NS, "-o", "wide"]).unwrap_or_default();
        panic!("tiny never became Ready: {e}\n{describe}\n{pods}");
    }
    let row = kubectl(&["get", "dsd", "-n", NS, "tiny"]);
    assert!(
        row.contains("1/1") && row.contains("custom 2048x4"),
        "kubectl get dsd: {row}"
    );

    let port = 18_000 + (std::process::id() % 1000) as u16;
    let _forward = Forward(
        Command::new("kubectl")
            .args([
                "port-forward",
                "-n",
                NS,
                "svc/tiny",
                &format!("{port}:8000"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl port-forward"),
    );
    let body =
        r#"{"model":"tiny-dsv4","messages":[{"role":"user","content":"Hello"}],"max_tokens":8}"#;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (code, text) = loop {
        match http_post(port, "/v1/chat/completions", body) {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for port-forward: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => panic!("chat completion: {e}"),
        }
    };
    assert_eq!(code, 200, "{text}");
    // Chunked or not, the JSON object carries the completion.
    let start = text.find('{').expect("JSON body");
    let end = text.rfind('}').expect("JSON body");
    let v: serde_json::Value =
        serde_json::from_str(&text[start..=end]).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap_or(0) >= 1,
        "{v}"
    );

    if std::env::var("DSPARK_E2E_KEEP").is_err() {
        let _ = sh(
            "kubectl",
            &[
                "delete",
                "-n",
                NS,
                "-f",
                "examples/tiny-cpu.yaml",
                "--wait=true",
            ],
        );
    }
}
