//! Desired state: pure functions from a `DSparkDeployment` to the children the operator applies
//! (StatefulSet per group, headless Service, client Service, PodDisruptionBudget per group) and
//! to the server's command line. Nothing here talks to the API server.

use crate::crd::{
    resolve_profile, DSparkDeployment, Device, ResolvedProfile, API_PORT, CONTROL_PORT,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
pub const LABEL_VERSION: &str = "app.kubernetes.io/version";
/// Group index of a StatefulSet, its pods and its PDB.
pub const LABEL_GROUP: &str = "dspark.dev/group";
/// Set by the StatefulSet controller on every pod (Kubernetes >= 1.28): the pod ordinal = rank.
pub const LABEL_POD_INDEX: &str = "apps.kubernetes.io/pod-index";
/// Hash of the rendered pod template; a pod whose hash differs is outdated.
pub const ANNOTATION_SPEC_HASH: &str = "dspark.dev/spec-hash";
pub const MANAGER: &str = "dspark-operator";
pub const COMPONENT: &str = "server";

/// Where model volumes are mounted in the server container.
const MODELS_DIR: &str = "/models";
const DEFAULT_DOWNLOADER_IMAGE: &str = "python:3.12-slim";

/// Things the builders need that are not in the spec.
#[derive(Clone, Debug)]
pub struct BuildContext {
    /// Server image when spec.image is unset (the operator's own image).
    pub default_image: String,
}

/// Everything the server is started with; `server_args` renders it as flags.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerInvocation {
    pub model_path: String,
    pub served_model_name: String,
    pub world_size: i32,
    pub leader_addr: String,
    pub control_port: i32,
    pub port: i32,
    pub device: Device,
    pub profile: ResolvedProfile,
}

/// The server command line, flag for flag. Rank comes from the environment (DSPARK_RANK from
/// the pod-index label), everything else is explicit so the server's own defaults never decide
/// a serving value.
pub fn server_args(inv: &ServerInvocation) -> Vec<String> {
    let p = &inv.profile;
    let mut args = vec![
        "serve".to_string(),
        "--model".into(),
        inv.model_path.clone(),
        "--served-model-name".into(),
        inv.served_model_name.clone(),
        "--host".into(),
        "0.0.0.0".into(),
        "--port".into(),
        inv.port.to_string(),
        "--device".into(),
        inv.device.as_flag().into(),
        "--world-size".into(),
        inv.world_size.to_string(),
        "--leader-addr".into(),
        inv.leader_addr.clone(),
        "--control-port".into(),
        inv.control_port.to_string(),
        "--max-model-len".into(),
        p.max_model_len.to_string(),
        "--max-num-seqs".into(),
        p.max_num_seqs.to_string(),
        "--max-num-batched-tokens".into(),
        p.max_num_batched_tokens.to_string(),
        "--kv-cache-dtype".into(),
        p.kv_cache_dtype.as_flag().into(),
    ];
    if let Some(tokens) = p.kv_pool_tokens {
        args.push("--kv-pool-tokens".into());
        args.push(tokens.to_string());
    }
    args.extend([
        "--gpu-memory-utilization".into(),
        p.gpu_memory_utilization.to_string(),
        "--enforce-eager".into(),
        p.enforce_eager.to_string(),
        "--speculative-method".into(),
        p.speculative_method.as_flag().into(),
        "--num-speculative-tokens".into(),
        p.num_speculative_tokens.to_string(),
    ]);
    args
}

/// Names of everything derived from one DSparkDeployment.
pub fn group_name(dsd: &DSparkDeployment, group: i32) -> String {
    format!("{}-{}", dsd.name_any(), group)
}
pub fn headless_name(dsd: &DSparkDeployment) -> String {
    format!("{}-ranks", dsd.name_any())
}
pub fn client_service_name(dsd: &DSparkDeployment) -> String {
    dsd.name_any()
}
pub fn namespace(dsd: &DSparkDeployment) -> String {
    dsd.namespace().unwrap_or_else(|| "default".to_string())
}
pub fn service_port(dsd: &DSparkDeployment) -> i32 {
    dsd.spec.service.port.unwrap_or(API_PORT)
}
pub fn endpoint(dsd: &DSparkDeployment) -> String {
    format!(
        "http://{}.{}.svc:{}/v1",
        client_service_name(dsd),
        namespace(dsd),
        service_port(dsd)
    )
}

/// Labels every child carries.
pub fn labels(dsd: &DSparkDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), "dspark".to_string()),
        (LABEL_INSTANCE.to_string(), dsd.name_any()),
        (LABEL_COMPONENT.to_string(), COMPONENT.to_string()),
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_PART_OF.to_string(), "dspark".to_string()),
        (
            LABEL_VERSION.to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ])
}

/// Selector of every server pod of this deployment.
pub fn instance_selector(dsd: &DSparkDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), "dspark".to_string()),
        (LABEL_INSTANCE.to_string(), dsd.name_any()),
        (LABEL_COMPONENT.to_string(), COMPONENT.to_string()),
    ])
}

/// Selector of the pods of one group.
pub fn group_selector(dsd: &DSparkDeployment, group: i32) -> BTreeMap<String, String> {
    let mut s = instance_selector(dsd);
    s.insert(LABEL_GROUP.to_string(), group.to_string());
    s
}

/// `k=v,k=v` form of a selector for list calls.
pub fn selector_string(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn owner_reference(dsd: &DSparkDeployment) -> Option<OwnerReference> {
    dsd.controller_owner_ref(&())
}

fn metadata(dsd: &DSparkDeployment, name: String, extra_labels: &[(&str, String)]) -> Value {
    let mut labels = labels(dsd);
    for (k, v) in extra_labels {
        labels.insert(k.to_string(), v.clone());
    }
    json!({
        "name": name,
        "namespace": namespace(dsd),
        "labels": labels,
        "ownerReferences": owner_reference(dsd).into_iter().collect::<Vec<_>>(),
    })
}

/// The model path inside the container and the served name.
pub fn model_location(dsd: &DSparkDeployment) -> (String, String) {
    let m = &dsd.spec.model;
    let path = if let Some(pvc) = &m.pvc {
        let sub = pvc.path.trim_matches('/');
        if sub.is_empty() {
            MODELS_DIR.to_string()
        } else {
            format!("{MODELS_DIR}/{sub}")
        }
    } else if m.host_path.is_some() {
        MODELS_DIR.to_string()
    } else if let Some(hf) = &m.hugging_face {
        format!("{MODELS_DIR}/hf/{}", hf.repo)
    } else if let Some(image) = &m.image {
        image.path.clone()
    } else {
        MODELS_DIR.to_string()
    };
    let served = m
        .served_name
        .clone()
        .or_else(|| m.hugging_face.as_ref().map(|hf| hf.repo.clone()))
        .or_else(|| {
            let base = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
            (!base.is_empty() && path.trim_end_matches('/') != MODELS_DIR).then(|| base.to_string())
        })
        .unwrap_or_else(|| dsd.name_any());
    (path, served)
}

/// The server invocation for one group.
pub fn server_invocation(dsd: &DSparkDeployment, group: i32) -> ServerInvocation {
    let (model_path, served_model_name) = model_location(dsd);
    ServerInvocation {
        model_path,
        served_model_name,
        world_size: dsd.spec.parallelism.tensor,
        leader_addr: format!(
            "{}-0.{}.{}.svc:{}",
            group_name(dsd, group),
            headless_name(dsd),
            namespace(dsd),
            CONTROL_PORT
        ),
        control_port: CONTROL_PORT,
        port: API_PORT,
        device: dsd.spec.device,
        profile: resolve_profile(&dsd.spec.profile),
    }
}

/// NCCL environment from spec.network.
pub fn nccl_env(dsd: &DSparkDeployment) -> Vec<(String, String)> {
    let n = &dsd.spec.network;
    let mut env = Vec::new();
    if let Some(ifname) = &n.nccl_socket_ifname {
        env.push(("NCCL_SOCKET_IFNAME".to_string(), ifname.clone()));
    }
    if n.rdma.enabled {
        env.push(("NCCL_IB_DISABLE".to_string(), "0".to_string()));
        if let Some(hca) = &n.rdma.hca {
            env.push(("NCCL_IB_HCA".to_string(), hca.clone()));
        }
        if let Some(gid) = n.rdma.gid_index {
            env.push(("NCCL_IB_GID_INDEX".to_string(), gid.to_string()));
        }
    } else {
        env.push(("NCCL_IB_DISABLE".to_string(), "1".to_string()));
    }
    env
}

fn container_env(dsd: &DSparkDeployment) -> Vec<Value> {
    // The rank is the pod ordinal, published by the StatefulSet controller as a label.
    let mut env = vec![json!({
        "name": "DSPARK_RANK",
        "valueFrom": {"fieldRef": {"fieldPath": format!("metadata.labels['{LABEL_POD_INDEX}']")}}
    })];
    for (k, v) in nccl_env(dsd) {
        env.push(json!({"name": k, "value": v}));
    }
    if let Some(key) = &dsd.spec.service.api_key_secret {
        env.push(json!({
            "name": "VLLM_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": key.name, "key": key.key.clone().unwrap_or_else(|| "api-key".into())}}
        }));
    }
    for (k, v) in &dsd.spec.env {
        env.push(json!({"name": k, "value": v}));
    }
    env
}

fn container_resources(dsd: &DSparkDeployment) -> Value {
    let mut requests = Map::new();
    let mut limits = Map::new();
    if let Some(r) = &dsd.spec.resources {
        for (k, q) in r.requests.iter().flatten() {
            requests.insert(k.clone(), json!(q.0));
        }
        for (k, q) in r.limits.iter().flatten() {
            limits.insert(k.clone(), json!(q.0));
        }
    }
    if dsd.spec.device == Device::Cuda {
        requests.insert("nvidia.com/gpu".into(), json!("1"));
        limits.insert("nvidia.com/gpu".into(), json!("1"));
    }
    for (k, v) in &dsd.spec.network.rdma.resources {
        requests.insert(k.clone(), json!(v));
        limits.insert(k.clone(), json!(v));
    }
    let mut out = Map::new();
    if !requests.is_empty() {
        out.insert("requests".into(), Value::Object(requests));
    }
    if !limits.is_empty() {
        out.insert("limits".into(), Value::Object(limits));
    }
    Value::Object(out)
}

fn probes(dsd: &DSparkDeployment) -> (Value, Value, Value) {
    let period = 10;
    let startup_failures = (dsd.spec.recovery.startup_timeout_seconds + period - 1) / period;
    // Startup covers weight loading and the group rendezvous; liveness only starts after it.
    let startup = json!({
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": startup_failures.max(1),
    });
    let liveness = json!({
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6,
    });
    let readiness = json!({
        "httpGet": {"path": "/ready", "port": "http"},
        "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 2,
    });
    (startup, liveness, readiness)
}

/// The Hugging Face download init container, if the model comes from the Hub.
fn download_init_container(dsd: &DSparkDeployment, model_path: &str) -> Option<Value> {
    let hf = dsd.spec.model.hugging_face.as_ref()?;
    let mut env = vec![
        json!({"name": "HF_REPO", "value": hf.repo}),
        json!({"name": "HF_REVISION", "value": hf.revision.clone().unwrap_or_else(|| "main".into())}),
        json!({"name": "MODEL_DIR", "value": model_path}),
        json!({"name": "HF_HOME", "value": format!("{MODELS_DIR}/.hf-home")}),
        json!({"name": "HOME", "value": "/tmp"}),
    ];
    if let Some(secret) = &hf.token_secret {
        env.push(json!({
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key.clone().unwrap_or_else(|| "HF_TOKEN".into())}}
        }));
    }
    // Idempotent: `hf download` skips files already complete in the cache volume.
    let script = "set -eu\n\
        if ! command -v hf >/dev/null 2>&1; then\n\
          pip install --no-cache-dir --quiet --target /tmp/hf 'huggingface_hub>=0.34'\n\
          export PYTHONPATH=/tmp/hf PATH=/tmp/hf/bin:$PATH\n\
        fi\n\
        hf download \"$HF_REPO\" --revision \"$HF_REVISION\" --local-dir \"$MODEL_DIR\"\n";
    Some(json!({
        "name": "download-model",
        "image": hf.downloader_image.clone().unwrap_or_else(|| DEFAULT_DOWNLOADER_IMAGE.into()),
        "command": ["sh", "-c", script],
        "env": env,
        "volumeMounts": [
            {"name": "model", "mountPath": MODELS_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": container_security_context(false),
    }))
}

fn container_security_context(ipc_lock: bool) -> Value {
    let mut caps = json!({"drop": ["ALL"]});
    if ipc_lock {
        // RDMA registers (pins) memory.
        caps["add"] = json!(["IPC_LOCK"]);
    }
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "capabilities": caps,
    })
}

fn default_anti_affinity(dsd: &DSparkDeployment, group: i32) -> Value {
    // One pod of a group per node: each rank needs a whole GPU node of its own.
    json!({
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": {"matchLabels": group_selector(dsd, group)},
                "topologyKey": "kubernetes.io/hostname",
            }]
        }
    })
}

fn model_volumes(dsd: &DSparkDeployment) -> (Vec<Value>, Vec<Value>) {
    let m = &dsd.spec.model;
    let mut volumes = vec![
        json!({"name": "tmp", "emptyDir": {}}),
        // NCCL and the server's host staging buffers use shared memory.
        json!({"name": "dshm", "emptyDir": {"medium": "Memory"}}),
    ];
    let mut claim_templates = Vec::new();
    if let Some(pvc) = &m.pvc {
        volumes.push(json!({"name": "model", "persistentVolumeClaim": {"claimName": pvc.claim_name, "readOnly": true}}));
    } else if let Some(hp) = &m.host_path {
        volumes.push(json!({"name": "model", "hostPath": {"path": hp.path, "type": "Directory"}}));
    } else if let Some(hf) = &m.hugging_face {
        if let Some(claim) = &hf.cache.claim_name {
            volumes.push(json!({"name": "model", "persistentVolumeClaim": {"claimName": claim}}));
        } else {
            let mut spec = json!({
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": hf.cache.size.clone().unwrap_or_else(|| "400Gi".into())}},
            });
            if let Some(sc) = &hf.cache.storage_class_name {
                spec["storageClassName"] = json!(sc);
            }
            claim_templates.push(json!({"metadata": {"name": "model"}, "spec": spec}));
        }
    }
    (volumes, claim_templates)
}

/// The pod template of a group (without the spec-hash annotation).
fn pod_template(dsd: &DSparkDeployment, group: i32, ctx: &BuildContext) -> Value {
    let spec = &dsd.spec;
    let inv = server_invocation(dsd, group);
    let (startup, liveness, readiness) = probes(dsd);
    let (volumes, _) = model_volumes(dsd);
    let has_model_volume = spec.model.image.is_none();

    let mut mounts = vec![
        json!({"name": "tmp", "mountPath": "/tmp"}),
        json!({"name": "dshm", "mountPath": "/dev/shm"}),
    ];
    if has_model_volume {
        mounts.push(json!({"name": "model", "mountPath": MODELS_DIR, "readOnly": true}));
    }

    let mut container = json!({
        "name": "server",
        "image": spec.image.clone().unwrap_or_else(|| ctx.default_image.clone()),
        "command": ["dspark-server"],
        "args": server_args(&inv),
        "env": container_env(dsd),
        "ports": [
            {"name": "http", "containerPort": API_PORT, "protocol": "TCP"},
            {"name": "control", "containerPort": CONTROL_PORT, "protocol": "TCP"},
        ],
        "resources": container_resources(dsd),
        "startupProbe": startup,
        "livenessProbe": liveness,
        "readinessProbe": readiness,
        "volumeMounts": mounts,
        // When the server dies without writing /dev/termination-log, the log tail becomes the
        // termination message, which the operator quotes in the Degraded condition.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(spec.network.rdma.enabled),
    });
    if let Some(policy) = &spec.image_pull_policy {
        container["imagePullPolicy"] = json!(policy);
    }

    let mut tolerations: Vec<Value> = spec
        .scheduling
        .tolerations
        .iter()
        .filter_map(|t| serde_json::to_value(t).ok())
        .collect();
    if spec.device == Device::Cuda {
        tolerations
            .push(json!({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}));
    }
    let affinity = match &spec.scheduling.affinity {
        Some(a) => serde_json::to_value(a).unwrap_or(Value::Null),
        None => default_anti_affinity(dsd, group),
    };

    let mut pod = json!({
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "terminationGracePeriodSeconds": 60,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "affinity": affinity,
        "tolerations": tolerations,
        "containers": [container],
        "volumes": volumes,
    });
    if !spec.scheduling.node_selector.is_empty() {
        pod["nodeSelector"] = json!(spec.scheduling.node_selector);
    }
    if let Some(pc) = &spec.scheduling.priority_class_name {
        pod["priorityClassName"] = json!(pc);
    }
    if !spec.image_pull_secrets.is_empty() {
        pod["imagePullSecrets"] = json!(spec.image_pull_secrets);
    }
    if spec.network.host_network {
        pod["hostNetwork"] = json!(true);
        pod["dnsPolicy"] = json!("ClusterFirstWithHostNet");
    }
    if let Some(init) = download_init_container(dsd, &inv.model_path) {
        pod["initContainers"] = json!([init]);
    }
    let mut labels = labels(dsd);
    labels.insert(LABEL_GROUP.to_string(), group.to_string());
    json!({"metadata": {"labels": labels}, "spec": pod})
}

/// 64-bit FNV-1a: stable across Rust releases and operator restarts (std's hasher is not).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Hash of the pod template of a group, ignoring the group index so all groups share it.
pub fn spec_hash(dsd: &DSparkDeployment, ctx: &BuildContext) -> String {
    let template = pod_template(dsd, 0, ctx);
    format!("{:016x}", fnv1a(template.to_string().as_bytes()))
}

/// The StatefulSet of one group. Updates are OnDelete: the operator replaces a group's pods
/// together (both ranks must run the same version), one group at a time.
pub fn stateful_set(
    dsd: &DSparkDeployment,
    group: i32,
    ctx: &BuildContext,
) -> Result<StatefulSet, serde_json::Error> {
    let mut template = pod_template(dsd, group, ctx);
    template["metadata"]["annotations"] = json!({ANNOTATION_SPEC_HASH: spec_hash(dsd, ctx)});
    let (_, claim_templates) = model_volumes(dsd);
    let mut spec = json!({
        "serviceName": headless_name(dsd),
        "replicas": dsd.spec.parallelism.tensor,
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "OnDelete"},
        "selector": {"matchLabels": group_selector(dsd, group)},
        "template": template,
    });
    if !claim_templates.is_empty() {
        spec["volumeClaimTemplates"] = json!(claim_templates);
        spec["persistentVolumeClaimRetentionPolicy"] =
            json!({"whenDeleted": "Retain", "whenScaled": "Retain"});
    }
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(dsd, group_name(dsd, group), &[(LABEL_GROUP, group.to_string())]),
        "spec": spec,
    }))
}

/// Headless Service giving every rank a stable DNS name; rank 1 dials rank 0 through it
/// before anything is Ready, hence publishNotReadyAddresses.
pub fn headless_service(dsd: &DSparkDeployment) -> Result<Service, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(dsd, headless_name(dsd), &[]),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": instance_selector(dsd),
            "ports": [
                {"name": "control", "port": CONTROL_PORT, "targetPort": "control", "protocol": "TCP"},
                {"name": "http", "port": API_PORT, "targetPort": "http", "protocol": "TCP"},
            ],
        }
    }))
}

/// Client Service: rank-0 pods only (pod-index label 0). Rank 0 turns Ready only once its
/// group is formed, weights are loaded and a warm-up step ran, and it fails together with its
/// peer, so readiness alone keeps traffic on ready groups.
pub fn client_service(dsd: &DSparkDeployment) -> Result<Service, serde_json::Error> {
    let mut selector = instance_selector(dsd);
    selector.insert(LABEL_POD_INDEX.to_string(), "0".to_string());
    let mut meta = metadata(dsd, client_service_name(dsd), &[]);
    if !dsd.spec.service.annotations.is_empty() {
        meta["annotations"] = json!(dsd.spec.service.annotations);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": dsd.spec.service.r#type.clone().unwrap_or_else(|| "ClusterIP".into()),
            "selector": selector,
            "ports": [{"name": "http", "port": service_port(dsd), "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}],
        }
    }))
}

/// PDB of one group: a voluntary eviction of any member takes the whole group down, so none is
/// allowed while the group is healthy; unhealthy groups may always be drained.
pub fn pod_disruption_budget(
    dsd: &DSparkDeployment,
    group: i32,
) -> Result<PodDisruptionBudget, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(dsd, group_name(dsd, group), &[(LABEL_GROUP, group.to_string())]),
        "spec": {
            "minAvailable": dsd.spec.parallelism.tensor,
            "selector": {"matchLabels": group_selector(dsd, group)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        }
    }))
}
