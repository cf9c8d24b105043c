//! Leader election against a mocked API server: create when absent, back off from a live
//! holder, take over an expired Lease with an optimistic-concurrency replace.

use dspark_operator::leader::{LeaderElector, LeaseConfig};
use http::{Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use kube::{Api, Client};
use serde_json::{json, Value};
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/dspark";

fn elector() -> (LeaderElector, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api: Api<Lease> = Api::namespaced(Client::new(service, "ops"), "ops");
    let cfg = LeaseConfig {
        name: "dspark".into(),
        identity: "me".into(),
        lease_duration: Duration::from_secs(15),
        retry_period: Duration::from_secs(2),
    };
    (LeaderElector::new(api, cfg), handle)
}

async fn answer(handle: &mut Handle, method: &str, path: &str, status: u16, body: Value) -> Value {
    let (req, send) = handle.next_request().await.expect("request");
    assert_eq!(req.method().as_str(), method);
    assert!(req.uri().to_string().starts_with(path), "{}", req.uri());
    let bytes = req.into_body().collect_bytes().await.unwrap();
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
    if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    }
}

fn not_found() -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn lease(holder: &str, renewed_ago_secs: i64) -> Value {
    let renewed = Timestamp::now() - SignedDuration::from_secs(renewed_ago_secs);
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "dspark", "namespace": "ops", "resourceVersion": "7"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(), "leaseTransitions": 2}})
}

#[tokio::test]
async fn creates_the_lease_when_absent() {
    let (e, mut h) = elector();
    let server = tokio::spawn(async move {
        answer(&mut h, "GET", PATH, 404, not_found()).await;
        let created = answer(
            &mut h,
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/ops/leases",
            201,
            lease("me", 0),
        )
        .await;
        assert_eq!(created["spec"]["holderIdentity"], "me");
        assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    });
    assert!(e.try_acquire_or_renew().await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn does_not_take_a_live_lease() {
    let (e, mut h) = elector();
    let server = tokio::spawn(async move {
        answer(&mut h, "GET", PATH, 200, lease("other", 3)).await;
    });
    assert!(!e.try_acquire_or_renew().await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn takes_over_an_expired_lease_with_its_resource_version() {
    let (e, mut h) = elector();
    let server = tokio::spawn(async move {
        answer(&mut h, "GET", PATH, 200, lease("other", 60)).await;
        let replaced = answer(&mut h, "PUT", PATH, 200, lease("me", 0)).await;
        assert_eq!(
            replaced["metadata"]["resourceVersion"], "7",
            "optimistic concurrency"
        );
        assert_eq!(replaced["spec"]["holderIdentity"], "me");
        assert_eq!(replaced["spec"]["leaseTransitions"], 3);
    });
    assert!(e.try_acquire_or_renew().await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn losing_the_race_is_not_an_error() {
    let (e, mut h) = elector();
    let server = tokio::spawn(async move {
        answer(&mut h, "GET", PATH, 200, lease("other", 60)).await;
        answer(&mut h, "PUT", PATH, 409, json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"})).await;
    });
    assert!(!e.try_acquire_or_renew().await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn renews_its_own_lease() {
    let (e, mut h) = elector();
    let server = tokio::spawn(async move {
        answer(&mut h, "GET", PATH, 200, lease("me", 2)).await;
        let renewed = answer(&mut h, "PUT", PATH, 200, lease("me", 0)).await;
        assert_eq!(
            renewed["spec"]["leaseTransitions"], 2,
            "a renewal is not a transition"
        );
    });
    assert!(e.try_acquire_or_renew().await.unwrap());
    server.await.unwrap();
}
