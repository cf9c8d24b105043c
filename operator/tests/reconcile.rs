//! Reconcile paths against a mocked API server (tower-test), in the style of kube-rs'
//! controller-rs: each test is a scenario of expected requests and canned answers.

use dspark_operator::controller::{reconcile, Context};
use dspark_operator::crd::DSparkDeployment;
use dspark_operator::metrics::Metrics;
use dspark_operator::resources::{spec_hash, BuildContext};
use http::{Request, Response};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const NOW: &str = "2026-11-28T10:00:00Z";
const NS: &str = "llm";

/// Answers the operator's requests in the order a scenario expects them.
struct ApiServer {
    handle: Handle,
}

/// What the mock server saw.
struct Seen {
    path: String,
    body: Value,
}

impl ApiServer {
    /// Take the next request, check method and path, answer with `respond(body)`.
    async fn expect(
        &mut self,
        method: &str,
        path: &str,
        respond: impl FnOnce(&Value) -> (u16, Value),
    ) -> Seen {
        let (request, send) = self
            .handle
            .next_request()
            .await
            .expect("the operator made no further request");
        let seen_method = request.method().to_string();
        let uri = request.uri().to_string();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        assert_eq!(
            seen_method, method,
            "unexpected request {seen_method} {uri}"
        );
        assert!(uri.starts_with(path), "expected {method} {path}, got {uri}");
        let (status, answer) = respond(&body);
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
        Seen { path: uri, body }
    }

    /// Answer an apply with the object it applied (what the API server returns).
    async fn apply(&mut self, path: &str) -> Seen {
        self.expect("PATCH", path, |b| (200, b.clone())).await
    }

    async fn event(&mut self, reason: &str) -> Seen {
        let seen = self
            .expect(
                "POST",
                &format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"),
                |b| (201, b.clone()),
            )
            .await;
        assert_eq!(seen.body["reason"], reason, "event: {}", seen.body);
        seen
    }

    async fn list(&mut self, path: &str, kind: &str, items: Vec<Value>) -> Seen {
        let kind = kind.to_string();
        self.expect("GET", path, move |_| (200, json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items}))).await
    }

    /// The pod list the operator reads: answer with `pods`.
    async fn pods(&mut self, pods: Vec<Value>) -> Seen {
        self.list(&format!("/api/v1/namespaces/{NS}/pods?"), "PodList", pods)
            .await
    }

    /// A collection delete of pods (a group's recreation or rollout).
    async fn delete_pods(&mut self) -> Seen {
        self.expect("DELETE", &format!("/api/v1/namespaces/{NS}/pods?"), |_| {
            (
                200,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
            )
        })
        .await
    }

    async fn status(&mut self) -> Value {
        let path = format!("/apis/dspark.dev/v1alpha1/namespaces/{NS}/dsparkdeployments/ds/status");
        // The API server answers with the whole object.
        let seen = self
            .expect("PATCH", &path, |b| {
                let mut obj = serde_json::to_value(cr(spec(), None)).unwrap();
                obj["status"] = b["status"].clone();
                (200, obj)
            })
            .await;
        assert!(
            seen.path.contains("fieldManager=dspark-operator"),
            "{}",
            seen.path
        );
        assert!(seen.path.contains("force=true"));
        seen.body["status"].clone()
    }

    /// Services, StatefulSet and PDB applies of a one-group deployment.
    async fn children(&mut self, existing_sts: Vec<Value>) -> Value {
        self.list(
            &format!("/apis/apps/v1/namespaces/{NS}/statefulsets?"),
            "StatefulSetList",
            existing_sts,
        )
        .await;
        let headless = self
            .apply(&format!("/api/v1/namespaces/{NS}/services/ds-ranks?"))
            .await;
        assert_eq!(headless.body["spec"]["clusterIP"], "None");
        self.apply(&format!("/api/v1/namespaces/{NS}/services/ds?"))
            .await;
        let sts = self
            .apply(&format!("/apis/apps/v1/namespaces/{NS}/statefulsets/ds-0?"))
            .await;
        self.apply(&format!(
            "/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/ds-0?"
        ))
        .await;
        sts.body
    }
}

fn cr(spec: Value, status: Option<Value>) -> DSparkDeployment {
    let mut obj = json!({
        "apiVersion": "dspark.dev/v1alpha1",
        "kind": "DSparkDeployment",
        "metadata": {"name": "ds", "namespace": NS, "uid": "uid-1", "generation": 2, "resourceVersion": "10"},
        "spec": spec,
    });
    if let Some(s) = status {
        obj["status"] = s;
    }
    serde_json::from_value(obj).unwrap()
}

fn spec() -> Value {
    json!({"model": {"image": {"path": "/opt/dspark/models/tiny-dsv4"}}, "profile": {"preset": "concurrency"}})
}

fn build() -> BuildContext {
    BuildContext {
        default_image: "ghcr.io/dspark-dev/dspark:0.1.0".into(),
    }
}

fn hash(d: &DSparkDeployment) -> String {
    spec_hash(d, &build())
}

fn existing_sts(group: i32) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
           "metadata": {"name": format!("ds-{group}"), "namespace": NS, "labels": {"dspark.dev/group": group.to_string()}}})
}

/// A server pod. `terminated`: the last termination message of its container.
fn pod(
    group: i32,
    rank: i32,
    ready: bool,
    restarts: i32,
    hash: &str,
    terminated: Option<&str>,
) -> Value {
    let mut cs = json!({"name": "server", "ready": ready, "restartCount": restarts, "image": "x", "imageID": "", "state": {"running": {}}});
    if let Some(msg) = terminated {
        cs["lastState"] = json!({"terminated": {"exitCode": 1, "reason": "Error", "message": msg}});
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("ds-{group}-{rank}"), "namespace": NS,
            "labels": {"dspark.dev/group": group.to_string(), "apps.kubernetes.io/pod-index": rank.to_string(),
                       "app.kubernetes.io/instance": "ds"},
            "annotations": {"dspark.dev/spec-hash": hash},
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "containerStatuses": [cs],
        }
    })
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} in {status}"))
}

/// Run one reconcile against a scenario; both must finish.
async fn run<F, Fut>(dsd: DSparkDeployment, scenario: F) -> Action
where
    F: FnOnce(ApiServer) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let mut ctx = Context::new(client, Arc::new(Metrics::default()), build());
    ctx.clock = Arc::new(|| NOW.parse::<Timestamp>().unwrap());
    let server = tokio::spawn(scenario(ApiServer { handle }));
    let action = tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(Arc::new(dsd), Arc::new(ctx)),
    )
    .await
    .expect("reconcile hung: it made a request the scenario does not answer")
    .expect("reconcile failed");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("scenario incomplete")
        .expect("scenario failed");
    action
}

#[tokio::test]
async fn create_applies_children_and_reports_progress() {
    let dsd = cr(
        json!({"model": {"pvc": {"claimName": "weights"}}, "profile": {"preset": "concurrency"}}),
        None,
    );
    let action = run(dsd, |mut api| async move {
        api.expect("GET", &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/weights"), |_| {
            (200, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "weights", "namespace": NS}}))
        })
        .await;
        let sts = api.children(vec![]).await;
        assert_eq!(sts["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        let args: Vec<String> = serde_json::from_value(sts["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap();
        assert!(args.windows(2).any(|w| w[0] == "--max-model-len" && w[1] == "204800"));
        assert!(args.windows(2).any(|w| w[0] == "--max-num-seqs" && w[1] == "16"));
        api.event("GroupCreated").await;
        api.pods(vec![]).await;
        let status = api.status().await;
        assert_eq!(status["observedGeneration"], 2);
        assert_eq!(status["profile"]["maxModelLen"], 204800);
        assert_eq!(status["profile"]["summary"], "concurrency 204800x16");
        assert_eq!(status["kvPool"], "auto");
        assert_eq!(status["endpoint"], "http://ds.llm.svc:8000/v1");
        assert_eq!(status["ready"], "0/1");
        assert_eq!(condition(&status, "Ready")["status"], "False");
        assert_eq!(condition(&status, "Progressing")["status"], "True");
        assert_eq!(condition(&status, "Progressing")["reason"], "GroupsStarting");
        assert_eq!(condition(&status, "Degraded")["status"], "False");
        assert_eq!(condition(&status, "GroupFormed")["status"], "False");
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn ready_group_is_reported_ready_and_formed() {
    let dsd = cr(spec(), None);
    let h = hash(&dsd);
    let action = run(dsd, move |mut api| async move {
        api.children(vec![existing_sts(0)]).await;
        api.pods(vec![
            pod(0, 0, true, 0, &h, None),
            pod(0, 1, true, 0, &h, None),
        ])
        .await;
        let status = api.status().await;
        assert_eq!(status["readyGroups"], 1);
        assert_eq!(status["groups"], 1);
        assert_eq!(status["ready"], "1/1");
        assert_eq!(condition(&status, "Ready")["status"], "True");
        assert_eq!(condition(&status, "GroupFormed")["status"], "True");
        assert_eq!(condition(&status, "Progressing")["reason"], "Complete");
        assert_eq!(status["groupStatuses"][0]["formed"], true);
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

#[tokio::test]
async fn spec_update_rolls_the_group() {
    let dsd = cr(spec(), None);
    let action = run(dsd, |mut api| async move {
        api.children(vec![existing_sts(0)]).await;
        // Both pods ready but built from the previous spec.
        api.pods(vec![
            pod(0, 0, true, 0, "old", None),
            pod(0, 1, true, 0, "old", None),
        ])
        .await;
        let del = api.delete_pods().await;
        assert!(
            del.path.contains("dspark.dev%2Fgroup%3D0") || del.path.contains("dspark.dev/group=0"),
            "{}",
            del.path
        );
        api.event("GroupRollingUpdate").await;
        let status = api.status().await;
        assert_eq!(condition(&status, "Progressing")["reason"], "RollingUpdate");
        assert_eq!(condition(&status, "Ready")["status"], "False");
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

fn formed_status(restarts: i32, last: Option<&str>) -> Value {
    json!({"groupStatuses": [{"index": 0, "formed": true, "ready": true, "restarts": restarts, "generation": 2, "lastRestartTime": last}]})
}

#[tokio::test]
async fn member_restart_recreates_the_whole_group() {
    let dsd = cr(spec(), Some(formed_status(0, None)));
    let h = hash(&dsd);
    run(dsd, move |mut api| async move {
        api.children(vec![existing_sts(0)]).await;
        api.pods(vec![
            pod(0, 0, false, 0, &h, None),
            pod(
                0,
                1,
                true,
                1,
                &h,
                Some("NCCL error: unhandled system error\nbacktrace..."),
            ),
        ])
        .await;
        let del = api.delete_pods().await;
        assert!(del.path.contains("group"), "{}", del.path);
        let ev = api.event("GroupRecreated").await;
        assert!(ev.body["note"]
            .as_str()
            .unwrap()
            .contains("NCCL error: unhandled system error"));
        assert_eq!(ev.body["type"], "Warning");
        let status = api.status().await;
        assert_eq!(status["restarts"], 1);
        assert_eq!(status["groupStatuses"][0]["restarts"], 1);
        assert_eq!(status["groupStatuses"][0]["formed"], false);
        assert_eq!(status["groupStatuses"][0]["lastRestartTime"], NOW);
        assert_eq!(condition(&status, "Progressing")["reason"], "Recreating");
    })
    .await;
}

#[tokio::test]
async fn recreation_waits_for_the_back_off() {
    // One recreation 10 s ago; base back-off 30 s: wait 20 s more, delete nothing.
    let dsd = cr(spec(), Some(formed_status(1, Some("2026-11-28T09:59:50Z"))));
    let h = hash(&dsd);
    let action = run(dsd, move |mut api| async move {
        api.children(vec![existing_sts(0)]).await;
        api.pods(vec![
            pod(0, 0, true, 2, &h, Some("lost peer")),
            pod(0, 1, true, 0, &h, None),
        ])
        .await;
        let status = api.status().await;
        assert_eq!(status["groupStatuses"][0]["restarts"], 1);
        assert!(status["groupStatuses"][0]["message"]
            .as_str()
            .unwrap()
            .contains("recreating in 20s"));
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(20)));
}

#[tokio::test]
async fn exhausted_restart_budget_is_degraded_with_the_termination_message() {
    let dsd = cr(spec(), Some(formed_status(5, Some("2026-11-28T09:00:00Z"))));
    let h = hash(&dsd);
    run(dsd, move |mut api| async move {
        api.children(vec![existing_sts(0)]).await;
        api.pods(vec![
            pod(
                0,
                0,
                false,
                3,
                &h,
                Some("CUDA error: an illegal memory access was encountered\n  at kernel x"),
            ),
            pod(0, 1, false, 0, &h, None),
        ])
        .await;
        // No DELETE: the budget is spent.
        api.event("RestartBudgetExhausted").await;
        let status = api.status().await;
        let degraded = condition(&status, "Degraded");
        assert_eq!(degraded["status"], "True");
        assert_eq!(degraded["reason"], "RestartBudgetExhausted");
        let msg = degraded["message"].as_str().unwrap();
        assert!(
            msg.contains("CUDA error: an illegal memory access was encountered"),
            "{msg}"
        );
        assert!(
            !msg.contains("at kernel x"),
            "only the head of the message: {msg}"
        );
        assert_eq!(status["restarts"], 5);
    })
    .await;
}

#[tokio::test]
async fn invalid_spec_sets_a_condition_and_an_event_and_touches_nothing() {
    let dsd = cr(
        json!({"model": {"image": {"path": "/m"}}, "parallelism": {"tensor": 4}, "profile": {"maxNumSeqs": 0}}),
        None,
    );
    let action = run(dsd, |mut api| async move {
        let ev = api.event("InvalidSpec").await;
        assert_eq!(ev.body["type"], "Warning");
        let note = ev.body["note"].as_str().unwrap();
        assert!(
            note.contains("parallelism.tensor must be 2")
                && note.contains("maxNumSeqs must be >= 1"),
            "{note}"
        );
        let status = api.status().await;
        assert_eq!(condition(&status, "Degraded")["reason"], "InvalidSpec");
        assert_eq!(condition(&status, "Degraded")["status"], "True");
        assert_eq!(condition(&status, "Ready")["status"], "False");
    })
    .await;
    // Not a crash loop: nothing happens until the spec changes.
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn missing_pvc_is_reported_not_retried_hot() {
    let dsd = cr(json!({"model": {"pvc": {"claimName": "nope"}}}), None);
    let action = run(dsd, |mut api| async move {
        api.expect("GET", &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/nope"), |_| {
            (404, json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": "persistentvolumeclaims \"nope\" not found"}))
        })
        .await;
        api.event("MissingPVC").await;
        let status = api.status().await;
        assert_eq!(condition(&status, "Degraded")["reason"], "MissingPVC");
        assert!(condition(&status, "Degraded")["message"].as_str().unwrap().contains("\"nope\""));
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
}

#[tokio::test]
async fn image_pull_failure_becomes_a_condition() {
    let dsd = cr(spec(), None);
    let h = hash(&dsd);
    run(dsd, move |mut api| async move {
        api.children(vec![existing_sts(0)]).await;
        let mut p = pod(0, 0, false, 0, &h, None);
        p["status"]["containerStatuses"][0]["state"] = json!({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"ghcr.io/x:1\""}});
        api.pods(vec![p, pod(0, 1, false, 0, &h, None)]).await;
        api.event("ImagePullFailed").await;
        let status = api.status().await;
        let degraded = condition(&status, "Degraded");
        assert_eq!(degraded["reason"], "ImagePullFailed");
        assert!(degraded["message"].as_str().unwrap().contains("ghcr.io/x:1"));
    })
    .await;
}

#[tokio::test]
async fn scale_down_deletes_surplus_groups() {
    let dsd = cr(spec(), None);
    let h = hash(&dsd);
    run(dsd, move |mut api| async move {
        api.list(&format!("/apis/apps/v1/namespaces/{NS}/statefulsets?"), "StatefulSetList", vec![existing_sts(0), existing_sts(1)]).await;
        api.apply(&format!("/api/v1/namespaces/{NS}/services/ds-ranks?")).await;
        api.apply(&format!("/api/v1/namespaces/{NS}/services/ds?")).await;
        api.apply(&format!("/apis/apps/v1/namespaces/{NS}/statefulsets/ds-0?")).await;
        api.apply(&format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/ds-0?")).await;
        api.expect("DELETE", &format!("/apis/apps/v1/namespaces/{NS}/statefulsets/ds-1"), |_| (200, existing_sts(1))).await;
        api.expect("DELETE", &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/ds-1"), |_| {
            (404, json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}))
        })
        .await;
        api.event("GroupDeleted").await;
        api.pods(vec![pod(0, 0, true, 0, &h, None), pod(0, 1, true, 0, &h, None)]).await;
        let status = api.status().await;
        assert_eq!(status["ready"], "1/1");
    })
    .await;
}

#[tokio::test]
async fn deletion_leaves_cleanup_to_owner_references() {
    let mut dsd = cr(spec(), None);
    dsd.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        NOW.parse().unwrap(),
    ));
    // No request at all: the scenario answers nothing and the reconcile must not wait on one.
    let action = run(dsd, |_api| async move {}).await;
    assert_eq!(action, Action::await_change());
}
