//! Pure desired-state builders: every spec field lands where it should.

use dspark_operator::crd::*;
use dspark_operator::resources::*;
use serde_json::{json, Value};

fn dsd(spec: Value) -> DSparkDeployment {
    let mut d: DSparkDeployment = serde_json::from_value(json!({
        "apiVersion": "dspark.dev/v1alpha1",
        "kind": "DSparkDeployment",
        "metadata": {"name": "ds", "namespace": "llm", "uid": "uid-1", "generation": 3},
        "spec": spec,
    }))
    .unwrap();
    d.metadata.generation = Some(3);
    d
}

fn ctx() -> BuildContext {
    BuildContext {
        default_image: "ghcr.io/dspark-dev/dspark:0.1.0".into(),
    }
}

fn pvc_spec() -> Value {
    json!({"model": {"pvc": {"claimName": "weights", "path": "DeepSeek-V4-Flash"}}})
}

/// Value of `--flag` in an argument list.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .map(|i| args[i + 1].as_str())
}

/// The entry of a JSON list (env, volumes, mounts) with this `name`, if any.
fn find_named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array().unwrap().iter().find(|e| e["name"] == name)
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    find_named(list, name).unwrap_or_else(|| panic!("no entry named {name}"))
}

/// A container's environment as (name, value), with `valueFrom` standing in for a value.
fn env_vars(container: &Value) -> Vec<(String, Value)> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e.get("value")
                    .cloned()
                    .unwrap_or_else(|| e["valueFrom"].clone()),
            )
        })
        .collect()
}

fn sts_json(d: &DSparkDeployment, g: i32) -> Value {
    serde_json::to_value(stateful_set(d, g, &ctx()).unwrap()).unwrap()
}

#[test]
fn presets_resolve_to_concrete_values() {
    let long = resolve_profile(&ProfileSpec {
        preset: Preset::LongContext,
        ..Default::default()
    });
    assert_eq!((long.max_model_len, long.max_num_seqs), (1_048_576, 6));
    assert_eq!(long.kv_cache_dtype, KvCacheDtype::Fp8);
    assert_eq!(long.speculative_method, SpeculativeMethod::Dspark);
    assert_eq!(long.num_speculative_tokens, 5);
    assert_eq!(long.gpu_memory_utilization, 0.9);
    assert_eq!(long.kv_pool_tokens, None);
    assert!(!long.enforce_eager);
    assert_eq!(long.summary, "long-context 1048576x6");

    let conc = resolve_profile(&ProfileSpec {
        preset: Preset::Concurrency,
        ..Default::default()
    });
    assert_eq!((conc.max_model_len, conc.max_num_seqs), (204_800, 16));
    assert_eq!(conc.summary, "concurrency 204800x16");
}

#[test]
fn explicit_fields_override_the_preset() {
    let spec = ProfileSpec {
        preset: Preset::Concurrency,
        max_model_len: Some(131_072),
        max_num_seqs: Some(12),
        max_num_batched_tokens: Some(4096),
        kv_cache_dtype: Some(KvCacheDtype::Nvfp4),
        kv_pool_tokens: Some(2_000_000),
        gpu_memory_utilization: Some(0.85),
        enforce_eager: Some(true),
        speculative: Some(SpeculativeSpec {
            method: Some(SpeculativeMethod::None),
            num_tokens: Some(3),
        }),
    };
    let r = resolve_profile(&spec);
    assert_eq!(r.preset, Preset::Concurrency);
    assert_eq!(r.max_model_len, 131_072);
    assert_eq!(r.max_num_seqs, 12);
    assert_eq!(r.max_num_batched_tokens, 4096);
    assert_eq!(r.kv_cache_dtype, KvCacheDtype::Nvfp4);
    assert_eq!(r.kv_pool_tokens, Some(2_000_000));
    assert_eq!(r.gpu_memory_utilization, 0.85);
    assert!(r.enforce_eager);
    assert_eq!(r.speculative_method, SpeculativeMethod::None);
    assert_eq!(r.num_speculative_tokens, 3);
}

#[test]
fn server_args_carry_the_resolved_profile() {
    let d = dsd(json!({
        "model": {"pvc": {"claimName": "weights", "path": "/DeepSeek-V4-Flash/"}, "servedName": "dsv4"},
        "profile": {"preset": "long-context", "kvPoolTokens": 3000000, "gpuMemoryUtilization": 0.8},
    }));
    let inv = server_invocation(&d, 1);
    let args = server_args(&inv);
    assert_eq!(args[0], "serve");
    assert_eq!(flag(&args, "--model"), Some("/models/DeepSeek-V4-Flash"));
    assert_eq!(flag(&args, "--served-model-name"), Some("dsv4"));
    assert_eq!(flag(&args, "--world-size"), Some("2"));
    assert_eq!(
        flag(&args, "--leader-addr"),
        Some("ds-1-0.ds-ranks.llm.svc:29500")
    );
    assert_eq!(flag(&args, "--control-port"), Some("29500"));
    assert_eq!(flag(&args, "--port"), Some("8000"));
    assert_eq!(flag(&args, "--device"), Some("cuda"));
    assert_eq!(flag(&args, "--max-model-len"), Some("1048576"));
    assert_eq!(flag(&args, "--max-num-seqs"), Some("6"));
    assert_eq!(flag(&args, "--max-num-batched-tokens"), Some("8192"));
    assert_eq!(flag(&args, "--kv-cache-dtype"), Some("fp8"));
    assert_eq!(flag(&args, "--kv-pool-tokens"), Some("3000000"));
    assert_eq!(flag(&args, "--gpu-memory-utilization"), Some("0.8"));
    assert_eq!(flag(&args, "--enforce-eager"), Some("false"));
    assert_eq!(flag(&args, "--speculative-method"), Some("dspark"));
    assert_eq!(flag(&args, "--num-speculative-tokens"), Some("5"));
    // The rank is not a flag: it comes from the pod-index label through DSPARK_RANK.
    assert!(!args.iter().any(|a| a == "--rank"));
    // Every flag has a value.
    assert_eq!(args.len() % 2, 1);
}

#[test]
fn kv_pool_flag_is_omitted_when_sized_automatically() {
    let args = server_args(&server_invocation(&dsd(pvc_spec()), 0));
    assert!(!args.iter().any(|a| a == "--kv-pool-tokens"));
}

#[test]
fn served_name_defaults() {
    let (path, name) = model_location(&dsd(pvc_spec()));
    assert_eq!(
        (path.as_str(), name.as_str()),
        ("/models/DeepSeek-V4-Flash", "DeepSeek-V4-Flash")
    );
    let (path, name) = model_location(&dsd(
        json!({"model": {"huggingFace": {"repo": "deepseek-ai/DeepSeek-V4-Flash"}}}),
    ));
    assert_eq!(path, "/models/hf/deepseek-ai/DeepSeek-V4-Flash");
    assert_eq!(name, "deepseek-ai/DeepSeek-V4-Flash");
    let (path, name) = model_location(&dsd(
        json!({"model": {"image": {"path": "/opt/dspark/models/tiny-dsv4"}}}),
    ));
    assert_eq!(
        (path.as_str(), name.as_str()),
        ("/opt/dspark/models/tiny-dsv4", "tiny-dsv4")
    );
    let (_, name) = model_location(&dsd(json!({"model": {"hostPath": {"path": "/data/m"}}})));
    assert_eq!(name, "ds");
}

#[test]
fn statefulset_shape() {
    let d = dsd(pvc_spec());
    let s = sts_json(&d, 0);
    assert_eq!(s["metadata"]["name"], "ds-0");
    assert_eq!(s["metadata"]["namespace"], "llm");
    let owner = &s["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "DSparkDeployment");
    assert_eq!(owner["name"], "ds");
    assert_eq!(owner["uid"], "uid-1");
    assert_eq!(owner["controller"], true);
    let spec = &s["spec"];
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["podManagementPolicy"], "Parallel");
    assert_eq!(spec["updateStrategy"]["type"], "OnDelete");
    assert_eq!(spec["serviceName"], "ds-ranks");
    assert_eq!(spec["selector"]["matchLabels"]["dspark.dev/group"], "0");
    let tpl = &spec["template"];
    assert_eq!(tpl["metadata"]["labels"]["dspark.dev/group"], "0");
    assert!(
        tpl["metadata"]["annotations"]["dspark.dev/spec-hash"]
            .as_str()
            .unwrap()
            .len()
            == 16
    );
    let pod = &tpl["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "ghcr.io/dspark-dev/dspark:0.1.0");
    assert_eq!(c["command"], json!(["dspark-server"]));
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(c["resources"]["requests"]["nvidia.com/gpu"], "1");
    let rank = named(&c["env"], "DSPARK_RANK");
    assert_eq!(
        rank["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.labels['apps.kubernetes.io/pod-index']"
    );
    assert_eq!(c["startupProbe"]["httpGet"]["path"], "/health");
    // Default startup budget: one hour of weight loading.
    assert_eq!(
        c["startupProbe"]["failureThreshold"].as_i64().unwrap()
            * c["startupProbe"]["periodSeconds"].as_i64().unwrap(),
        3600
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(c["terminationMessagePolicy"], "FallbackToLogsOnError");
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let model_mount = named(&c["volumeMounts"], "model");
    assert_eq!(model_mount["readOnly"], true);
    assert_eq!(model_mount["mountPath"], "/models");
    let model_vol = named(&pod["volumes"], "model");
    assert_eq!(model_vol["persistentVolumeClaim"]["claimName"], "weights");
    assert_eq!(model_vol["persistentVolumeClaim"]["readOnly"], true);
    // Default: one pod of the group per node.
    let anti =
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        anti["labelSelector"]["matchLabels"]["dspark.dev/group"],
        "0"
    );
    assert!(pod["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["key"] == "nvidia.com/gpu"));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(pod.get("hostNetwork").is_none());
    assert!(pod.get("initContainers").is_none());
}

#[test]
fn app_kubernetes_io_labels_on_every_child() {
    let d = dsd(pvc_spec());
    let children = vec![
        sts_json(&d, 0),
        serde_json::to_value(headless_service(&d).unwrap()).unwrap(),
        serde_json::to_value(client_service(&d).unwrap()).unwrap(),
        serde_json::to_value(pod_disruption_budget(&d, 0).unwrap()).unwrap(),
    ];
    for child in children {
        let l = &child["metadata"]["labels"];
        assert_eq!(l["app.kubernetes.io/name"], "dspark", "{child}");
        assert_eq!(l["app.kubernetes.io/instance"], "ds");
        assert_eq!(l["app.kubernetes.io/component"], "server");
        assert_eq!(l["app.kubernetes.io/managed-by"], "dspark-operator");
        assert_eq!(l["app.kubernetes.io/part-of"], "dspark");
        assert!(l["app.kubernetes.io/version"].is_string());
        assert_eq!(child["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    }
    let pod_labels = &sts_json(&d, 0)["spec"]["template"]["metadata"]["labels"];
    assert_eq!(pod_labels["app.kubernetes.io/instance"], "ds");
}

#[test]
fn services_and_pdb() {
    let d = dsd(json!({
        "model": {"pvc": {"claimName": "w"}},
        "service": {"type": "LoadBalancer", "port": 8080, "annotations": {"a": "b"}},
    }));
    let headless = serde_json::to_value(headless_service(&d).unwrap()).unwrap();
    assert_eq!(headless["metadata"]["name"], "ds-ranks");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    assert!(headless["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["port"] == 29500));

    let client = serde_json::to_value(client_service(&d).unwrap()).unwrap();
    assert_eq!(client["metadata"]["name"], "ds");
    assert_eq!(client["metadata"]["annotations"]["a"], "b");
    assert_eq!(client["spec"]["type"], "LoadBalancer");
    assert_eq!(client["spec"]["ports"][0]["port"], 8080);
    assert_eq!(client["spec"]["ports"][0]["targetPort"], "http");
    // Only rank-0 pods serve clients.
    assert_eq!(
        client["spec"]["selector"]["apps.kubernetes.io/pod-index"],
        "0"
    );
    assert_eq!(
        client["spec"]["selector"]["app.kubernetes.io/instance"],
        "ds"
    );
    assert!(
        client["spec"]["selector"].get("dspark.dev/group").is_none(),
        "all groups behind one Service"
    );
    assert_eq!(endpoint(&d), "http://ds.llm.svc:8080/v1");

    let pdb = serde_json::to_value(pod_disruption_budget(&d, 1).unwrap()).unwrap();
    assert_eq!(pdb["metadata"]["name"], "ds-1");
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["dspark.dev/group"],
        "1"
    );
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
}

#[test]
fn network_scheduling_and_image_fields() {
    let d = dsd(json!({
        "model": {"hostPath": {"path": "/data/dsv4"}},
        "image": "registry.local/dspark:dev",
        "imagePullPolicy": "Always",
        "imagePullSecrets": [{"name": "regcred"}],
        "network": {"ncclSocketIfname": "enp1s0f0np0", "hostNetwork": true,
                    "rdma": {"enabled": true, "hca": "mlx5_0", "gidIndex": 3, "resources": {"rdma/roce": "1"}}},
        "scheduling": {"nodeSelector": {"gpu": "gb10"}, "priorityClassName": "high",
                       "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
                       "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "x", "operator": "Exists"}]}]}}}},
        "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "100Gi"}},
        "env": {"NCCL_DEBUG": "INFO"},
        "service": {"apiKeySecret": {"name": "api", "key": "token"}},
        "recovery": {"startupTimeoutSeconds": 600},
    }));
    let s = sts_json(&d, 0);
    let pod = &s["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.local/dspark:dev");
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(pod["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["nodeSelector"]["gpu"], "gb10");
    assert_eq!(pod["priorityClassName"], "high");
    assert!(pod["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["key"] == "dedicated"));
    assert!(pod["affinity"]["nodeAffinity"].is_object());
    assert!(
        pod["affinity"].get("podAntiAffinity").is_none(),
        "a user affinity replaces the default"
    );
    let env: std::collections::BTreeMap<String, Value> = env_vars(c).into_iter().collect();
    assert_eq!(env["NCCL_SOCKET_IFNAME"], "enp1s0f0np0");
    assert_eq!(env["NCCL_IB_DISABLE"], "0");
    assert_eq!(env["NCCL_IB_HCA"], "mlx5_0");
    assert_eq!(env["NCCL_IB_GID_INDEX"], "3");
    assert_eq!(env["NCCL_DEBUG"], "INFO");
    assert_eq!(env["VLLM_API_KEY"]["secretKeyRef"]["name"], "api");
    assert_eq!(env["VLLM_API_KEY"]["secretKeyRef"]["key"], "token");
    assert_eq!(c["resources"]["requests"]["cpu"], "8");
    assert_eq!(c["resources"]["limits"]["memory"], "100Gi");
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(c["resources"]["limits"]["rdma/roce"], "1");
    assert_eq!(
        c["securityContext"]["capabilities"]["add"],
        json!(["IPC_LOCK"])
    );
    assert_eq!(c["startupProbe"]["failureThreshold"], 60);
    let model_vol = named(&pod["volumes"], "model");
    assert_eq!(model_vol["hostPath"]["path"], "/data/dsv4");
}

#[test]
fn nccl_defaults_disable_ib() {
    let env = nccl_env(&dsd(pvc_spec()));
    assert_eq!(env, vec![("NCCL_IB_DISABLE".to_string(), "1".to_string())]);
}

#[test]
fn hugging_face_download_init_container_and_cache() {
    let d = dsd(json!({"model": {"huggingFace": {
        "repo": "deepseek-ai/DeepSeek-V4-Flash", "revision": "v1",
        "tokenSecret": {"name": "hf"}, "cache": {"size": "500Gi", "storageClassName": "fast"}}}}));
    let s = sts_json(&d, 0);
    let pod = &s["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    assert_eq!(init["name"], "download-model");
    assert_eq!(init["image"], "python:3.12-slim");
    let env = env_vars(init);
    assert!(env.contains(&("HF_REPO".into(), json!("deepseek-ai/DeepSeek-V4-Flash"))));
    assert!(env.contains(&("HF_REVISION".into(), json!("v1"))));
    assert!(env.contains(&(
        "MODEL_DIR".into(),
        json!("/models/hf/deepseek-ai/DeepSeek-V4-Flash")
    )));
    let token = env.iter().find(|(k, _)| k == "HF_TOKEN").unwrap();
    assert_eq!(token.1["secretKeyRef"]["key"], "HF_TOKEN");
    // The init container writes the cache; the server reads it read-only.
    let init_mount = named(&init["volumeMounts"], "model");
    assert!(init_mount.get("readOnly").is_none());
    let claim = &s["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"], "model");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "500Gi");
    assert_eq!(claim["spec"]["storageClassName"], "fast");
    assert!(find_named(&pod["volumes"], "model").is_none());
    let args: Vec<String> = serde_json::from_value(pod["containers"][0]["args"].clone()).unwrap();
    assert_eq!(
        flag(&args, "--model"),
        Some("/models/hf/deepseek-ai/DeepSeek-V4-Flash")
    );

    // A shared cache claim instead of a per-pod template.
    let d =
        dsd(json!({"model": {"huggingFace": {"repo": "a/b", "cache": {"claimName": "hf-cache"}}}}));
    let s = sts_json(&d, 0);
    assert!(s["spec"].get("volumeClaimTemplates").is_none());
    let vol = named(&s["spec"]["template"]["spec"]["volumes"], "model").clone();
    assert_eq!(vol["persistentVolumeClaim"]["claimName"], "hf-cache");
}

#[test]
fn cpu_device_has_no_gpu() {
    let d =
        dsd(json!({"model": {"image": {"path": "/opt/dspark/models/tiny-dsv4"}}, "device": "cpu"}));
    let s = sts_json(&d, 0);
    let pod = &s["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert!(c["resources"].get("limits").is_none());
    assert!(pod["tolerations"].as_array().unwrap().is_empty());
    assert!(find_named(&c["volumeMounts"], "model").is_none());
    let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap();
    assert_eq!(flag(&args, "--device"), Some("cpu"));
    assert_eq!(flag(&args, "--model"), Some("/opt/dspark/models/tiny-dsv4"));
}

#[test]
fn spec_hash_tracks_the_pod_template_only() {
    let a = dsd(pvc_spec());
    let mut b = a.clone();
    b.spec.replicas = 4;
    assert_eq!(
        spec_hash(&a, &ctx()),
        spec_hash(&b, &ctx()),
        "scaling must not roll groups"
    );
    b.spec.profile.max_num_seqs = Some(3);
    assert_ne!(spec_hash(&a, &ctx()), spec_hash(&b, &ctx()));
    // Stable across runs: the pods of a running group must not look outdated after an operator restart.
    assert_eq!(spec_hash(&a, &ctx()), spec_hash(&a.clone(), &ctx()));
    // All groups share the hash.
    assert_eq!(
        sts_json(&a, 0)["spec"]["template"]["metadata"]["annotations"],
        sts_json(&a, 3)["spec"]["template"]["metadata"]["annotations"]
    );
}

#[test]
fn tiny_cpu_example_renders_a_cpu_group() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/tiny-cpu.yaml"
    ))
    .unwrap();
    let mut d: DSparkDeployment = serde_yaml::from_str(&text).unwrap();
    d.metadata.namespace = Some("default".into());
    let args = server_args(&server_invocation(&d, 0));
    assert_eq!(flag(&args, "--device"), Some("cpu"));
    assert_eq!(flag(&args, "--world-size"), Some("2"));
    assert_eq!(flag(&args, "--speculative-method"), Some("none"));
    assert_eq!(
        flag(&args, "--leader-addr"),
        Some("tiny-0-0.tiny-ranks.default.svc:29500")
    );
}
