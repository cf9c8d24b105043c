//! The `DSparkDeployment` custom resource (`dspark.dev/v1alpha1`): spec, status and the one
//! place where a profile preset plus explicit overrides resolve to concrete serving values.
//!
//! Doc comments on fields become the CRD's descriptions, so `kubectl explain dsd.spec...`
//! shows them: write them for users.

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The longest context DeepSeek-V4-Flash supports (max_position_embeddings): 1M = 1024 x 1024.
pub const MODEL_MAX_LEN: i64 = 1_048_576;
/// "200K" in the concurrency preset uses the same binary K as 1M: 200 x 1024 tokens.
pub const CONCURRENCY_MAX_LEN: i64 = 204_800;
/// The only tensor-parallel size the server implements today (one GPU per pod, two pods).
pub const SUPPORTED_TENSOR: i32 = 2;
/// Port of the OpenAI-compatible API, `/health`, `/ready` and `/metrics` on every rank.
pub const API_PORT: i32 = 8000;
/// Port rank 0 listens on for the rank rendezvous (the server's `--control-port` default).
pub const CONTROL_PORT: i32 = 29500;

/// A DSparkDeployment serves DeepSeek-V4-Flash with the DSpark speculative-decoding draft on one
/// or more tensor-parallel groups of pods (one GPU per pod), behind one OpenAI-compatible Service.
// clippy reads the repeated `type_` keys of separate printcolumn(...) entries as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dspark.dev",
    version = "v1alpha1",
    kind = "DSparkDeployment",
    plural = "dsparkdeployments",
    singular = "dsparkdeployment",
    shortname = "dsd",
    category = "all",
    namespaced,
    status = "DSparkDeploymentStatus",
    doc = "DSparkDeployment serves DeepSeek-V4-Flash with its DSpark speculative-decoding draft on tensor-parallel groups of GPU pods behind one OpenAI-compatible Service.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.groups"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Ready groups / desired groups"
    ),
    printcolumn(
        name = "Groups",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired number of serving groups"
    ),
    printcolumn(
        name = "Profile",
        type_ = "string",
        json_path = ".status.profile.summary",
        description = "Resolved serving profile"
    ),
    printcolumn(
        name = "KV pool",
        type_ = "string",
        json_path = ".status.kvPool",
        description = "KV pool size in tokens (auto = sized by the server from gpuMemoryUtilization)"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "In-cluster OpenAI-compatible base URL"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DSparkDeploymentSpec {
    /// Where the model checkpoint comes from and the name clients use for it.
    pub model: ModelSpec,
    /// Container image carrying dspark-server. Defaults to the image the operator was installed
    /// with (the chart's image), so server and operator versions match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy of the server containers (Always, IfNotPresent, Never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in ['Always', 'IfNotPresent', 'Never']").message("imagePullPolicy must be Always, IfNotPresent or Never"))]
    pub image_pull_policy: Option<String>,
    /// Secrets used to pull the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Compute device of the server: cuda (one NVIDIA GPU per pod) or cpu (the reference
    /// backend, for tiny models and clusters without GPUs).
    #[serde(default)]
    pub device: Device,
    /// How the model is split across pods.
    #[serde(default)]
    pub parallelism: Parallelism,
    /// Serving profile: a preset plus explicit overrides.
    #[serde(default)]
    pub profile: ProfileSpec,
    /// Resources of each server container. With device cuda the operator always requests and
    /// limits `nvidia.com/gpu: 1`; anything given here is added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where the pods run. Without an affinity the operator spreads the pods of a group one per node.
    #[serde(default)]
    pub scheduling: SchedulingSpec,
    /// How the ranks talk to each other (NCCL).
    #[serde(default)]
    pub network: NetworkSpec,
    /// The client Service in front of the rank-0 pods.
    #[serde(default)]
    pub service: ServiceSpec,
    /// Group recreation when a member of a formed group restarts or fails.
    #[serde(default)]
    pub recovery: RecoverySpec,
    /// Number of serving groups (each is `parallelism.tensor` pods). All groups sit behind the
    /// one client Service. Scale with `kubectl scale dsd NAME --replicas N`.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must be >= 0"))]
    pub replicas: i32,
    /// Extra environment variables for the server containers (e.g. NCCL_DEBUG=INFO).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

fn default_replicas() -> i32 {
    1
}

/// Compute device of the server.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// NVIDIA GPU through the CUDA backend (one GPU per pod).
    #[default]
    Cuda,
    /// The f32 reference backend; only sensible for the tiny test model.
    Cpu,
}

impl Device {
    pub fn as_flag(self) -> &'static str {
        match self {
            Device::Cuda => "cuda",
            Device::Cpu => "cpu",
        }
    }
}

/// The model checkpoint (Hugging Face layout: config.json, *.safetensors, tokenizer.json).
/// Set exactly one source: pvc, hostPath, huggingFace or image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.pvc), has(self.hostPath), has(self.huggingFace), has(self.image)].filter(x, x).size() == 1").message("set exactly one model source: pvc, hostPath, huggingFace or image"))]
pub struct ModelSpec {
    /// The checkpoint lives on an existing PersistentVolumeClaim (mounted read-only at /models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    /// The checkpoint lives in a directory on every node (mounted read-only at /models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
    /// Download the checkpoint from the Hugging Face Hub in an init container into a cache volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<HuggingFaceSource>,
    /// The checkpoint is baked into the container image at this path (the tiny demo model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
    /// Model name clients send in requests and see in /v1/models (vLLM --served-model-name).
    /// Defaults to the Hugging Face repo id, else the checkpoint directory name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
}

/// A checkpoint on an existing PersistentVolumeClaim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of the PersistentVolumeClaim in the same namespace. It must be readable from every
    /// node a pod lands on (ReadOnlyMany or ReadWriteMany when the pods spread over nodes).
    pub claim_name: String,
    /// Directory of the checkpoint inside the volume ("" = the volume root).
    #[serde(default)]
    pub path: String,
}

/// A checkpoint in a directory present on every node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    /// Absolute path of the checkpoint directory on the node.
    pub path: String,
}

/// A checkpoint downloaded from the Hugging Face Hub.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceSource {
    /// Repository id, e.g. deepseek-ai/DeepSeek-V4-Flash.
    pub repo: String,
    /// Branch, tag or commit to download (default main).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Secret holding a Hub token (for gated repositories and higher rate limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<SecretKeyRef>,
    /// Image of the download init container; it must provide `hf` (huggingface_hub >= 0.34) or
    /// `pip`. Default python:3.12-slim, which installs huggingface_hub at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloader_image: Option<String>,
    /// Where downloads are cached so a restart does not download again.
    #[serde(default)]
    pub cache: CacheSpec,
}

/// A key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key inside the Secret (default HF_TOKEN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The model cache volume for Hugging Face downloads.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Use this existing PersistentVolumeClaim (shared by all pods; needs ReadWriteMany when
    /// pods spread over nodes). Without it every pod gets its own claim from a template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// Size of the per-pod claim (default 400Gi; the FP8/FP4 checkpoint is ~160 GB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// StorageClass of the per-pod claim (default: the cluster default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// A checkpoint inside the container image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    /// Absolute path of the checkpoint directory in the image, e.g. /opt/dspark/models/tiny-dsv4.
    pub path: String,
}

/// How the model is split across pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Parallelism {
    /// Tensor-parallel size = pods per group, one GPU each (vLLM --tensor-parallel-size).
    /// Only 2 is supported today.
    #[serde(default = "default_tensor")]
    #[x_kube(validation = Rule::new("self == 2").message("parallelism.tensor must be 2 (the only tensor-parallel size supported today)"))]
    pub tensor: i32,
}

fn default_tensor() -> i32 {
    SUPPORTED_TENSOR
}

impl Default for Parallelism {
    fn default() -> Self {
        Parallelism {
            tensor: SUPPORTED_TENSOR,
        }
    }
}

/// Serving profile presets.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum Preset {
    /// 1M (1,048,576) token context, 6 concurrent sequences.
    #[default]
    #[serde(rename = "long-context")]
    LongContext,
    /// 200K (204,800) token context, 16 concurrent sequences.
    #[serde(rename = "concurrency")]
    Concurrency,
    /// No preset: the server's baseline (128K context, 8 sequences) plus your fields.
    #[serde(rename = "custom")]
    Custom,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::LongContext => "long-context",
            Preset::Concurrency => "concurrency",
            Preset::Custom => "custom",
        }
    }
}

/// KV cache element type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    /// Let the server choose (fp8 on GPUs that support it).
    Auto,
    /// bfloat16: exact, twice the memory of fp8.
    Bf16,
    /// The 584-byte FP8 record per token and layer.
    Fp8,
    /// NVFP4 values with FP8 scales.
    Nvfp4,
}

impl KvCacheDtype {
    pub fn as_flag(self) -> &'static str {
        match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::Bf16 => "bf16",
            KvCacheDtype::Fp8 => "fp8",
            KvCacheDtype::Nvfp4 => "nvfp4",
        }
    }
}

/// Speculative decoding method.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SpeculativeMethod {
    /// The DSpark draft shipped with the checkpoint.
    Dspark,
    /// Plain decoding.
    None,
}

impl SpeculativeMethod {
    pub fn as_flag(self) -> &'static str {
        match self {
            SpeculativeMethod::Dspark => "dspark",
            SpeculativeMethod::None => "none",
        }
    }
}

/// Speculative decoding settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SpeculativeSpec {
    /// dspark (default) or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<SpeculativeMethod>,
    /// Tokens drafted per step (vLLM num_speculative_tokens), 1..=8; presets use 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 8").message("speculative.numTokens must be between 1 and 8"))]
    pub num_tokens: Option<i32>,
}

/// Serving profile: a preset resolves to concrete values; every field set here overrides it.
/// The resolved values are shown in status.profile.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProfileSpec {
    /// long-context (1M context, 6 sequences), concurrency (200K = 204,800 context, 16
    /// sequences) or custom. Default long-context.
    #[serde(default)]
    pub preset: Preset,
    /// Per-request ceiling on prompt + output tokens (vLLM --max-model-len), 1..=1048576.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1048576").message("maxModelLen must be between 1 and 1048576 (the model's context length)"))]
    pub max_model_len: Option<i64>,
    /// Most sequences running at once (vLLM --max-num-seqs), >= 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxNumSeqs must be >= 1"))]
    pub max_num_seqs: Option<i32>,
    /// Most tokens processed in one step, prefill chunks included (vLLM --max-num-batched-tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxNumBatchedTokens must be >= 1"))]
    pub max_num_batched_tokens: Option<i64>,
    /// KV cache element type: auto, bf16, fp8 or nvfp4 (vLLM --kv-cache-dtype).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_dtype: Option<KvCacheDtype>,
    /// Size of the shared KV pool in tokens. Unset: whatever fits in gpuMemoryUtilization after
    /// weights and workspace. The pool is shared and allocated on demand; nothing is reserved
    /// per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("kvPoolTokens must be >= 1"))]
    pub kv_pool_tokens: Option<i64>,
    /// Fraction of GPU memory the server may use, strictly between 0 and 1 (vLLM
    /// --gpu-memory-utilization). Default 0.9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self < 1.0").message("gpuMemoryUtilization must be > 0 and < 1"))]
    pub gpu_memory_utilization: Option<f64>,
    /// Launch every decode step's kernels from the host instead of replaying captured CUDA
    /// graphs (vLLM --enforce-eager): slower, for debugging. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforce_eager: Option<bool>,
    /// Speculative decoding (DSpark draft).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<SpeculativeSpec>,
}

/// Where pods run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Node labels the pods require.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the pods (with device cuda, nvidia.com/gpu:NoSchedule is tolerated by default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity of the pods. Replaces the default anti-affinity (one pod of a group per node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// How the ranks of a group talk to each other.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// Network interface NCCL uses for sockets (NCCL_SOCKET_IFNAME), e.g. eth0 or enp1s0f0np0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nccl_socket_ifname: Option<String>,
    /// RDMA (InfiniBand / RoCE) between nodes.
    #[serde(default)]
    pub rdma: RdmaSpec,
    /// Run the pods in the node's network namespace (often needed for RoCE); the pods then use
    /// ClusterFirstWithHostNet DNS.
    #[serde(default)]
    pub host_network: bool,
}

/// RDMA settings for NCCL.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RdmaSpec {
    /// Use InfiniBand / RoCE verbs. false sets NCCL_IB_DISABLE=1 (TCP sockets only).
    #[serde(default)]
    pub enabled: bool,
    /// HCAs NCCL may use (NCCL_IB_HCA), e.g. mlx5_0,mlx5_1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hca: Option<String>,
    /// GID index for RoCE (NCCL_IB_GID_INDEX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid_index: Option<i32>,
    /// Extended resources requested per pod for the RDMA device, e.g. {"rdma/rdma_shared_device_a": "1"}.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resources: BTreeMap<String, String>,
}

/// The client Service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type: ClusterIP (default), NodePort or LoadBalancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in ['ClusterIP', 'NodePort', 'LoadBalancer']").message("service.type must be ClusterIP, NodePort or LoadBalancer"))]
    pub r#type: Option<String>,
    /// Service port (default 8000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("service.port must be a valid port"))]
    pub port: Option<i32>,
    /// Annotations on the client Service (e.g. for a cloud load balancer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// API key clients must send as a Bearer token (vLLM --api-key), read from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
}

/// Group recreation when a member of a formed group restarts or fails.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoverySpec {
    /// How many times a group is recreated before the operator stops and reports Degraded.
    /// The count resets when the spec changes. Default 5.
    #[serde(default = "default_max_group_restarts")]
    #[x_kube(validation = Rule::new("self >= 0").message("recovery.maxGroupRestarts must be >= 0"))]
    pub max_group_restarts: i32,
    /// Back-off before the first recreation, doubled each time up to 10 minutes. Default 30.
    #[serde(default = "default_backoff_seconds")]
    #[x_kube(validation = Rule::new("self >= 0").message("recovery.backoffSeconds must be >= 0"))]
    pub backoff_seconds: i64,
    /// Seconds a server may take to load weights and warm up before its startup probe fails.
    /// Default 3600.
    #[serde(default = "default_startup_seconds")]
    #[x_kube(validation = Rule::new("self >= 60").message("recovery.startupTimeoutSeconds must be >= 60"))]
    pub startup_timeout_seconds: i32,
}

fn default_max_group_restarts() -> i32 {
    5
}
fn default_backoff_seconds() -> i64 {
    30
}
fn default_startup_seconds() -> i32 {
    3600
}

impl Default for RecoverySpec {
    fn default() -> Self {
        RecoverySpec {
            max_group_restarts: default_max_group_restarts(),
            backoff_seconds: default_backoff_seconds(),
            startup_timeout_seconds: default_startup_seconds(),
        }
    }
}

/// Serving values after applying the preset and the overrides; exactly what the server gets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedProfile {
    /// Preset the values started from.
    pub preset: Preset,
    /// One-line summary, e.g. "long-context 1048576x6".
    pub summary: String,
    /// --max-model-len.
    pub max_model_len: i64,
    /// --max-num-seqs.
    pub max_num_seqs: i32,
    /// --max-num-batched-tokens.
    pub max_num_batched_tokens: i64,
    /// --kv-cache-dtype.
    pub kv_cache_dtype: KvCacheDtype,
    /// --kv-pool-tokens (absent: sized by the server from gpuMemoryUtilization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_pool_tokens: Option<i64>,
    /// --gpu-memory-utilization.
    pub gpu_memory_utilization: f64,
    /// --enforce-eager.
    #[serde(default)]
    pub enforce_eager: bool,
    /// --speculative-method.
    pub speculative_method: SpeculativeMethod,
    /// --num-speculative-tokens.
    pub num_speculative_tokens: i32,
}

/// Resolve a profile: preset baseline, then every explicit field overrides. The only place
/// serving values are decided; the server receives them as explicit flags.
pub fn resolve_profile(spec: &ProfileSpec) -> ResolvedProfile {
    let (max_model_len, max_num_seqs) = match spec.preset {
        Preset::LongContext => (MODEL_MAX_LEN, 6),
        Preset::Concurrency => (CONCURRENCY_MAX_LEN, 16),
        Preset::Custom => (131_072, 8),
    };
    let speculative = spec.speculative.clone().unwrap_or_default();
    let max_model_len = spec.max_model_len.unwrap_or(max_model_len);
    let max_num_seqs = spec.max_num_seqs.unwrap_or(max_num_seqs);
    ResolvedProfile {
        preset: spec.preset,
        summary: format!("{} {}x{}", spec.preset.name(), max_model_len, max_num_seqs),
        max_model_len,
        max_num_seqs,
        // 8192 keeps long prefills chunked so running decodes keep streaming between chunks.
        max_num_batched_tokens: spec.max_num_batched_tokens.unwrap_or(8192),
        kv_cache_dtype: spec.kv_cache_dtype.unwrap_or(KvCacheDtype::Fp8),
        kv_pool_tokens: spec.kv_pool_tokens,
        gpu_memory_utilization: spec.gpu_memory_utilization.unwrap_or(0.9),
        enforce_eager: spec.enforce_eager.unwrap_or(false),
        speculative_method: speculative.method.unwrap_or(SpeculativeMethod::Dspark),
        // k = 5 is the draft block the DSpark head was trained for.
        num_speculative_tokens: speculative.num_tokens.unwrap_or(5),
    }
}

/// The same static rules as the CRD's CEL validations, checked again by the operator so a
/// cluster that does not enforce CEL (or an object written before the rules existed) gets a
/// condition and an Event instead of a broken group.
pub fn validate_spec(spec: &DSparkDeploymentSpec) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let m = &spec.model;
    let sources = [
        m.pvc.is_some(),
        m.host_path.is_some(),
        m.hugging_face.is_some(),
        m.image.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        problems
            .push("set exactly one model source: pvc, hostPath, huggingFace or image".to_string());
    }
    if spec.parallelism.tensor != SUPPORTED_TENSOR {
        problems.push(format!(
            "parallelism.tensor must be {SUPPORTED_TENSOR} (got {})",
            spec.parallelism.tensor
        ));
    }
    if spec.replicas < 0 {
        problems.push("replicas must be >= 0".to_string());
    }
    let p = &spec.profile;
    if let Some(len) = p.max_model_len {
        if !(1..=MODEL_MAX_LEN).contains(&len) {
            problems.push(format!(
                "maxModelLen must be between 1 and {MODEL_MAX_LEN} (got {len})"
            ));
        }
    }
    if let Some(n) = p.max_num_seqs {
        if n < 1 {
            problems.push(format!("maxNumSeqs must be >= 1 (got {n})"));
        }
    }
    if let Some(n) = p.max_num_batched_tokens {
        if n < 1 {
            problems.push(format!("maxNumBatchedTokens must be >= 1 (got {n})"));
        }
    }
    if let Some(n) = p.kv_pool_tokens {
        if n < 1 {
            problems.push(format!("kvPoolTokens must be >= 1 (got {n})"));
        }
    }
    if let Some(u) = p.gpu_memory_utilization {
        if !(u > 0.0 && u < 1.0) {
            problems.push(format!(
                "gpuMemoryUtilization must be > 0 and < 1 (got {u})"
            ));
        }
    }
    // The CRD keeps nvfp4 in its enum (the recipe's KV formats); this server does not store it
    // yet, and starting pods that exit at once would be a crash loop.
    if p.kv_cache_dtype == Some(KvCacheDtype::Nvfp4) {
        problems.push(
            "kvCacheDtype nvfp4 is not supported by this server version: use fp8 (the 584-byte \
             FP8 record) or bf16"
                .to_string(),
        );
    }
    if let Some(k) = p.speculative.as_ref().and_then(|s| s.num_tokens) {
        if !(1..=8).contains(&k) {
            problems.push(format!(
                "speculative.numTokens must be between 1 and 8 (got {k})"
            ));
        }
    }
    let check_path = |what: &str, path: &str, problems: &mut Vec<String>| {
        if !path.starts_with('/') {
            problems.push(format!("{what} must be an absolute path (got {path:?})"));
        }
    };
    if let Some(h) = &m.host_path {
        check_path("model.hostPath.path", &h.path, &mut problems);
    }
    if let Some(i) = &m.image {
        check_path("model.image.path", &i.path, &mut problems);
    }
    if let Some(pvc) = &m.pvc {
        if pvc.path.split('/').any(|c| c == "..") {
            problems.push("model.pvc.path must not contain '..'".to_string());
        }
    }
    if let Some(hf) = &m.hugging_face {
        if hf.repo.split('/').count() != 2 || hf.repo.contains("..") {
            problems.push(format!(
                "model.huggingFace.repo must look like org/name (got {:?})",
                hf.repo
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DSparkDeploymentStatus {
    /// Ready, Progressing, Degraded and GroupFormed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// metadata.generation the status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of groups that exist (the scale subresource's replicas).
    #[serde(default)]
    pub groups: i32,
    /// Groups whose rank 0 is Ready and serving.
    #[serde(default)]
    pub ready_groups: i32,
    /// readyGroups/replicas, for kubectl get.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// In-cluster base URL of the OpenAI-compatible API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The resolved serving profile the servers run with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ResolvedProfile>,
    /// KV pool size in tokens, or "auto" when the server sizes it from gpuMemoryUtilization
    /// (the server reports the size at start and in /metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_pool: Option<String>,
    /// KV pool tokens when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_pool_tokens: Option<i64>,
    /// How many requests of full maxModelLen fit in the pool at once (kvPoolTokens / maxModelLen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_full_length_concurrency: Option<i64>,
    /// Group recreations since the spec last changed, over all groups.
    #[serde(default)]
    pub restarts: i32,
    /// Per-group state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_statuses: Vec<GroupStatus>,
}

/// State of one serving group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    /// Group index (StatefulSet NAME-INDEX).
    pub index: i32,
    /// All ranks were Ready together since the group was last (re)created.
    #[serde(default)]
    pub formed: bool,
    /// Rank 0 is Ready and serving.
    #[serde(default)]
    pub ready: bool,
    /// Recreations since the spec last changed.
    #[serde(default)]
    pub restarts: i32,
    /// When the group was last recreated (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_time: Option<String>,
    /// Why the group is not healthy, if it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// metadata.generation these counters belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// The CRD as YAML, exactly what `dspark-operator crd` prints and crds/ holds.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&DSparkDeployment::crd())
}
