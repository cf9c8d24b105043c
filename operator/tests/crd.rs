//! The CRD: committed YAML matches the generated one (no drift), its shape is what `kubectl`
//! users see, and every example passes its openAPIV3Schema and CEL rules while known-bad specs
//! are rejected (by the schema or CEL, and by the operator's own check).

mod common;

use common::{repo_root, schema::validate_object};
use dspark_operator::crd::{crd_yaml, validate_spec, DSparkDeployment};
use kube::core::cel::Validator;
use kube::CustomResourceExt;
use serde_json::{json, Value};

fn committed(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path))
        .unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

#[test]
fn committed_crd_matches_generated() {
    let generated = crd_yaml().unwrap();
    for path in [
        "crds/dsparkdeployment.yaml",
        "charts/dspark/crds/dsparkdeployment.yaml",
    ] {
        assert!(
            committed(path) == generated,
            "{path} drifted from the CRD types: run `cargo run -p dspark-operator -- crd > {path}`"
        );
    }
}

fn crd_json() -> Value {
    serde_json::to_value(DSparkDeployment::crd()).unwrap()
}

fn open_api_schema() -> Value {
    // Read the committed YAML, i.e. exactly what a cluster gets.
    let crd: Value = serde_yaml::from_str(&committed("crds/dsparkdeployment.yaml")).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn crd_names_subresources_and_columns() {
    let crd = crd_json();
    assert_eq!(crd["spec"]["group"], "dspark.dev");
    assert_eq!(crd["spec"]["names"]["kind"], "DSparkDeployment");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["dsd"]));
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert_eq!(v["subresources"]["status"], json!({}));
    assert_eq!(
        v["subresources"]["scale"]["specReplicasPath"],
        ".spec.replicas"
    );
    assert_eq!(
        v["subresources"]["scale"]["statusReplicasPath"],
        ".status.groups"
    );
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        ["Ready", "Groups", "Profile", "KV pool", "Endpoint", "Age"]
    );
}

/// `kubectl explain` prints descriptions: every spec field must have one.
#[test]
fn every_spec_field_is_documented() {
    fn walk(schema: &Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                let p = format!("{path}.{k}");
                if v.get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
                {
                    missing.push(p.clone());
                }
                // Kubernetes' own types (affinity, tolerations, resources) come documented upstream.
                if !["affinity", "tolerations", "resources", "imagePullSecrets"]
                    .contains(&k.as_str())
                    || path.ends_with("rdma")
                {
                    walk(v, &p, missing);
                    if let Some(items) = v.get("items") {
                        walk(items, &p, missing);
                    }
                }
            }
        }
    }
    let schema = open_api_schema();
    let mut missing = Vec::new();
    walk(&schema["properties"]["spec"], "spec", &mut missing);
    walk(&schema["properties"]["status"], "status", &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

/// Schema + CEL verdict for an object, as the API server would give it.
fn admit(object: &Value) -> Result<(), Vec<String>> {
    let schema = open_api_schema();
    let mut errors = validate_object(&schema, object);
    if errors.is_empty() {
        if let Err(e) = Validator::new().validate(&schema, object, None) {
            errors.extend(e.into_vec().into_iter().map(|e| e.to_string()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn examples() -> Vec<(String, Value)> {
    let dir = repo_root().join("examples");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v: Value = serde::Deserialize::deserialize(doc).unwrap();
                out.push((path.display().to_string(), v));
            }
        }
    }
    out
}

#[test]
fn every_example_is_admitted_and_valid() {
    let examples = examples();
    assert!(
        examples.len() >= 3,
        "expected the three examples, found {}",
        examples.len()
    );
    for (path, object) in examples {
        assert_eq!(object["kind"], "DSparkDeployment", "{path}");
        if let Err(e) = admit(&object) {
            panic!("{path} rejected: {e:?}");
        }
        let dsd: DSparkDeployment = serde_json::from_value(object).unwrap();
        assert_eq!(validate_spec(&dsd.spec), Ok(()), "{path}");
    }
}

fn base() -> Value {
    json!({
        "apiVersion": "dspark.dev/v1alpha1",
        "kind": "DSparkDeployment",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": {"model": {"pvc": {"claimName": "m"}}}
    })
}

fn with(path: &[&str], value: Value) -> Value {
    let mut obj = base();
    let mut cur = &mut obj["spec"];
    for p in &path[..path.len() - 1] {
        cur = &mut cur[*p];
    }
    cur[path[path.len() - 1]] = value;
    obj
}

#[test]
fn minimal_spec_is_admitted() {
    admit(&base()).unwrap();
}

#[test]
fn known_bad_specs_are_rejected() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "tensor 4",
            with(&["parallelism", "tensor"], json!(4)),
            "parallelism.tensor must be 2",
        ),
        (
            "maxNumSeqs 0",
            with(&["profile", "maxNumSeqs"], json!(0)),
            "maxNumSeqs must be >= 1",
        ),
        (
            "maxModelLen 0",
            with(&["profile", "maxModelLen"], json!(0)),
            "maxModelLen must be between",
        ),
        (
            "maxModelLen 2M",
            with(&["profile", "maxModelLen"], json!(2_097_152)),
            "maxModelLen must be between",
        ),
        (
            "numTokens 0",
            with(&["profile", "speculative"], json!({"numTokens": 0})),
            "numTokens must be between 1 and 8",
        ),
        (
            "numTokens 9",
            with(&["profile", "speculative"], json!({"numTokens": 9})),
            "numTokens must be between 1 and 8",
        ),
        (
            "gpuMemoryUtilization 1.0",
            with(&["profile", "gpuMemoryUtilization"], json!(1.0)),
            "gpuMemoryUtilization must be > 0 and < 1",
        ),
        (
            "gpuMemoryUtilization 0",
            with(&["profile", "gpuMemoryUtilization"], json!(0.0)),
            "gpuMemoryUtilization must be > 0 and < 1",
        ),
        (
            "two model sources",
            with(&["model", "hostPath"], json!({"path": "/m"})),
            "exactly one model source",
        ),
        (
            "no model source",
            with(&["model"], json!({"servedName": "x"})),
            "exactly one model source",
        ),
        (
            "replicas -1",
            with(&["replicas"], json!(-1)),
            "replicas must be >= 0",
        ),
    ];
    for (what, object, expected) in cases {
        let errors = admit(&object).expect_err(what);
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{what}: {errors:?} should mention {expected:?}"
        );
        // The operator's own check agrees with the CEL rule.
        let dsd: DSparkDeployment = serde_json::from_value(object).unwrap();
        let problems = validate_spec(&dsd.spec).expect_err(what);
        assert!(
            problems
                .iter()
                .any(|p| p.contains(expected.split(' ').next().unwrap())),
            "{what}: {problems:?}"
        );
    }
}

#[test]
fn nvfp4_kv_is_admitted_but_reported_by_the_operator() {
    // nvfp4 is part of the CRD's kvCacheDtype enum; the server cannot store it yet, so the
    // operator reports it (InvalidSpec condition and Event) instead of starting pods that exit.
    let object = with(&["profile", "kvCacheDtype"], json!("nvfp4"));
    admit(&object).unwrap();
    let dsd: DSparkDeployment = serde_json::from_value(object).unwrap();
    let problems = validate_spec(&dsd.spec).unwrap_err();
    assert!(
        problems.iter().any(|p| p.contains("kvCacheDtype nvfp4")),
        "{problems:?}"
    );
    for ok in ["fp8", "bf16", "auto"] {
        let dsd: DSparkDeployment =
            serde_json::from_value(with(&["profile", "kvCacheDtype"], json!(ok))).unwrap();
        assert_eq!(validate_spec(&dsd.spec), Ok(()), "{ok}");
    }
}

#[test]
fn schema_rejects_bad_types_and_unknown_fields() {
    for (what, object) in [
        (
            "kvCacheDtype int4",
            with(&["profile", "kvCacheDtype"], json!("int4")),
        ),
        ("preset fast", with(&["profile", "preset"], json!("fast"))),
        ("device tpu", with(&["device"], json!("tpu"))),
        (
            "typo field",
            with(&["profile", "maxModelLength"], json!(4096)),
        ),
        (
            "string tensor",
            with(&["parallelism", "tensor"], json!("2")),
        ),
    ] {
        assert!(admit(&object).is_err(), "{what} was admitted");
    }
}
