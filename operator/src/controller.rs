//! The reconcile loop: read the spec, apply the desired children with server-side apply,
//! observe the groups, act on the plan (recreate / roll), write status, publish Events.
//! Every step is a named function; the decisions live in `group` and `status`.

use crate::crd::{validate_spec, DSparkDeployment};
use crate::group::{self, Blocker, GroupObservation, GroupPlan, RecreateReason};
use crate::metrics::Metrics;
use crate::resources::{
    self, group_selector, instance_selector, selector_string, BuildContext, LABEL_GROUP,
    LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME, MANAGER,
};
use crate::status::{self, Stop, DEGRADED};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, instrument, warn};

/// Requeue while groups are starting, recreating or rolling.
const REQUEUE_BUSY: Duration = Duration::from_secs(10);
/// Requeue when everything is steady (watches trigger sooner on any change).
const REQUEUE_STEADY: Duration = Duration::from_secs(300);
/// Requeue when something in the cluster is missing.
const REQUEUE_MISSING: Duration = Duration::from_secs(60);

/// Reconcile errors; anything the user must fix is a condition, not an error.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building the desired {what}: {source}")]
    Build {
        what: &'static str,
        source: serde_json::Error,
    },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Build { .. } => "build",
        }
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Shared state of the reconcilers.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub build: BuildContext,
    /// Injected so tests control back-off timing.
    pub clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, build: BuildContext) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            build,
            clock: Arc::new(Timestamp::now),
        }
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<()>
where
    K: Resource + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, &apply_params(), &Patch::Apply(obj))
        .await?;
    Ok(())
}

async fn publish(
    ctx: &Context,
    dsd: &DSparkDeployment,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    // An Event that cannot be written must not fail the reconcile.
    if let Err(e) = ctx.recorder.publish(&ev, &dsd.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish event");
    }
}

async fn patch_status(
    ctx: &Context,
    dsd: &DSparkDeployment,
    status: &crate::crd::DSparkDeploymentStatus,
) -> Result<()> {
    let api: Api<DSparkDeployment> =
        Api::namespaced(ctx.client.clone(), &resources::namespace(dsd));
    let patch = json!({
        "apiVersion": "dspark.dev/v1alpha1",
        "kind": "DSparkDeployment",
        "status": status,
    });
    api.patch_status(&dsd.name_any(), &apply_params(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// PVCs the spec names must exist; a missing one is reported, not retried in a tight loop.
async fn check_claims(ctx: &Context, dsd: &DSparkDeployment) -> Result<Option<Blocker>> {
    let m = &dsd.spec.model;
    let claims = m
        .pvc
        .as_ref()
        .map(|p| p.claim_name.clone())
        .into_iter()
        .chain(
            m.hugging_face
                .as_ref()
                .and_then(|h| h.cache.claim_name.clone()),
        );
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &resources::namespace(dsd));
    for claim in claims {
        if api.get_opt(&claim).await?.is_none() {
            return Ok(Some(Blocker {
                reason: "MissingPVC".into(),
                message: format!(
                    "PersistentVolumeClaim {claim:?} not found in namespace {}",
                    resources::namespace(dsd)
                ),
            }));
        }
    }
    Ok(None)
}

fn previously_degraded_for(dsd: &DSparkDeployment, reason: &str) -> bool {
    dsd.status
        .as_ref()
        .and_then(|s| status::condition(s, DEGRADED))
        .is_some_and(|c| c.status == "True" && c.reason == reason)
}

/// Report a stop (invalid spec, missing PVC) once as an Event and always in status.
async fn stop(ctx: &Context, dsd: &DSparkDeployment, stop: Stop) -> Result<Action> {
    let (reason, note) = match &stop {
        Stop::InvalidSpec(p) => ("InvalidSpec".to_string(), p.join("; ")),
        Stop::Missing(b) => (b.reason.clone(), b.message.clone()),
    };
    if !previously_degraded_for(dsd, &reason) {
        publish(ctx, dsd, EventType::Warning, &reason, "Validate", note).await;
    }
    let status = status::stopped_status(dsd, &stop, (ctx.clock)());
    patch_status(ctx, dsd, &status).await?;
    Ok(match stop {
        // Only a spec change can fix the spec; the watch brings it.
        Stop::InvalidSpec(_) => Action::await_change(),
        Stop::Missing(_) => Action::requeue(REQUEUE_MISSING),
    })
}

fn build<T>(what: &'static str, r: std::result::Result<T, serde_json::Error>) -> Result<T> {
    r.map_err(|source| Error::Build { what, source })
}

/// Group index of a child from its label.
fn group_of<K: Resource>(obj: &K) -> Option<i32> {
    obj.meta().labels.as_ref()?.get(LABEL_GROUP)?.parse().ok()
}

/// Apply Services, StatefulSets and PDBs; delete groups past `replicas`.
async fn apply_children(ctx: &Context, dsd: &DSparkDeployment) -> Result<()> {
    let ns = resources::namespace(dsd);
    let svcs: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let stss: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);

    let existing = stss
        .list(&ListParams::default().labels(&selector_string(&instance_selector(dsd))))
        .await?;
    let existing_groups: Vec<i32> = existing.items.iter().filter_map(group_of).collect();

    apply(
        &svcs,
        &build("headless Service", resources::headless_service(dsd))?,
    )
    .await?;
    apply(
        &svcs,
        &build("client Service", resources::client_service(dsd))?,
    )
    .await?;
    for g in 0..dsd.spec.replicas.max(0) {
        apply(
            &stss,
            &build("StatefulSet", resources::stateful_set(dsd, g, &ctx.build))?,
        )
        .await?;
        apply(
            &pdbs,
            &build(
                "PodDisruptionBudget",
                resources::pod_disruption_budget(dsd, g),
            )?,
        )
        .await?;
        if !existing_groups.contains(&g) {
            publish(
                ctx,
                dsd,
                EventType::Normal,
                "GroupCreated",
                "Create",
                format!("created group {g} ({})", resources::group_name(dsd, g)),
            )
            .await;
        }
    }
    for sts in existing
        .items
        .iter()
        .filter(|s| group_of(*s).is_some_and(|g| g >= dsd.spec.replicas))
    {
        let name = sts.name_any();
        delete_ignoring_missing(&stss, &name).await?;
        delete_ignoring_missing(&pdbs, &name).await?;
        publish(
            ctx,
            dsd,
            EventType::Normal,
            "GroupDeleted",
            "ScaleDown",
            format!("deleted group {name}"),
        )
        .await;
    }
    Ok(())
}

async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn observe_groups(ctx: &Context, dsd: &DSparkDeployment) -> Result<Vec<GroupObservation>> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &resources::namespace(dsd));
    let list = pods
        .list(&ListParams::default().labels(&selector_string(&instance_selector(dsd))))
        .await?;
    Ok(group::observe(
        &list.items,
        dsd.spec.replicas,
        &resources::spec_hash(dsd, &ctx.build),
    ))
}

/// Delete every pod of the groups the plan replaces; their StatefulSets recreate them together.
async fn act(ctx: &Context, dsd: &DSparkDeployment, plan: &GroupPlan) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &resources::namespace(dsd));
    for (g, reason) in &plan.recreate {
        let lp = ListParams::default().labels(&selector_string(&group_selector(dsd, *g)));
        pods.delete_collection(&DeleteParams::background(), &lp)
            .await?;
        match reason {
            RecreateReason::MemberFailed(msg) => {
                ctx.metrics.group_recreated();
                info!(group = g, %msg, "recreating group after member failure");
                publish(ctx, dsd, EventType::Warning, "GroupRecreated", "Recreate", format!("group {g}: a member restarted or failed, recreating the whole group: {msg}")).await;
            }
            RecreateReason::Rollout => {
                info!(group = g, "rolling group to the new spec");
                publish(
                    ctx,
                    dsd,
                    EventType::Normal,
                    "GroupRollingUpdate",
                    "Update",
                    format!("replacing group {g} with the new spec"),
                )
                .await;
            }
        }
    }
    if let Some((_, msg)) = plan.exhausted.first() {
        if !previously_degraded_for(dsd, "RestartBudgetExhausted") {
            publish(
                ctx,
                dsd,
                EventType::Warning,
                "RestartBudgetExhausted",
                "Recreate",
                msg.clone(),
            )
            .await;
        }
    }
    Ok(())
}

/// Events for cluster problems seen on pods (image pull, config, scheduling), once per episode.
async fn report_blockers(ctx: &Context, dsd: &DSparkDeployment, observations: &[GroupObservation]) {
    if let Some((g, b)) = observations
        .iter()
        .find_map(|o| o.blocker.as_ref().map(|b| (o.index, b)))
    {
        if !previously_degraded_for(dsd, &b.reason) {
            publish(
                ctx,
                dsd,
                EventType::Warning,
                &b.reason,
                "Observe",
                format!("group {g}: {}", b.message),
            )
            .await;
        }
    }
}

/// One reconcile pass.
#[instrument(skip(dsd, ctx), fields(name = %dsd.name_any(), namespace = %dsd.namespace().unwrap_or_default()))]
pub async fn reconcile(dsd: Arc<DSparkDeployment>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&dsd, &ctx).await;
    ctx.metrics.reconciled(started.elapsed());
    result
}

async fn reconcile_inner(dsd: &DSparkDeployment, ctx: &Context) -> Result<Action> {
    if dsd.meta().deletion_timestamp.is_some() {
        // Children carry owner references: the garbage collector removes them.
        return Ok(Action::await_change());
    }
    if let Err(problems) = validate_spec(&dsd.spec) {
        return stop(ctx, dsd, Stop::InvalidSpec(problems)).await;
    }
    if let Some(missing) = check_claims(ctx, dsd).await? {
        return stop(ctx, dsd, Stop::Missing(missing)).await;
    }
    apply_children(ctx, dsd).await?;
    let observations = observe_groups(ctx, dsd).await?;
    let previous = dsd
        .status
        .as_ref()
        .map(|s| s.group_statuses.clone())
        .unwrap_or_default();
    let now = (ctx.clock)();
    let plan = group::plan(
        &observations,
        &previous,
        dsd.metadata.generation,
        dsd.spec.parallelism.tensor,
        &dsd.spec.recovery,
        now,
    );
    act(ctx, dsd, &plan).await?;
    report_blockers(ctx, dsd, &observations).await;
    let status = status::compute_status(dsd, &observations, &plan, now);
    patch_status(ctx, dsd, &status).await?;

    let steady =
        status::condition(&status, status::PROGRESSING).is_some_and(|c| c.status == "False");
    let requeue = match plan.requeue_after {
        Some(d) => d,
        None if steady => REQUEUE_STEADY,
        None => REQUEUE_BUSY,
    };
    Ok(Action::requeue(requeue))
}

/// Retry failed passes after a pause (the controller adds its own back-off on top).
pub fn error_policy(dsd: Arc<DSparkDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(name = %dsd.name_any(), %error, "reconcile failed");
    ctx.metrics.failed(error.metric_label());
    Action::requeue(Duration::from_secs(15))
}

/// Run the controller until `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let dsds: Api<DSparkDeployment> = Api::all(client.clone());
    let managed = watcher::Config::default()
        .labels(&format!("{LABEL_MANAGED_BY}={MANAGER},{LABEL_NAME}=dspark"));
    Controller::new(dsds, watcher::Config::default().any_semantic())
        .owns(Api::<StatefulSet>::all(client.clone()), managed.clone())
        .owns(Api::<Service>::all(client.clone()), managed.clone())
        .owns(
            Api::<PodDisruptionBudget>::all(client.clone()),
            managed.clone(),
        )
        // Pods belong to the StatefulSets; map them back to their DSparkDeployment by label.
        .watches(Api::<Pod>::all(client), managed, |pod: Pod| {
            let name = pod.labels().get(LABEL_INSTANCE)?.clone();
            let ns = pod.namespace()?;
            Some(ObjectRef::<DSparkDeployment>::new(&name).within(&ns))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(object = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}
