//! Status and conditions, computed in one place from what was observed and decided.

use crate::crd::{resolve_profile, DSparkDeployment, DSparkDeploymentStatus, GroupStatus};
use crate::group::{Blocker, GroupObservation, GroupPlan, RecreateReason};
use crate::resources::endpoint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const GROUP_FORMED: &str = "GroupFormed";

/// Why the operator cannot act on the spec at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The spec breaks a static rule (CEL not enforced, or an object older than the rules).
    InvalidSpec(Vec<String>),
    /// Something the spec needs is missing in the cluster (PVC, Secret).
    Missing(Blocker),
}

/// One condition as computed now; `lastTransitionTime` is carried over when status is unchanged.
struct Cond {
    type_: &'static str,
    status: bool,
    reason: String,
    message: String,
}

fn finish(
    conds: Vec<Cond>,
    previous: &[Condition],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    conds
        .into_iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" }.to_string();
            let last_transition_time = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: c.type_.to_string(),
                status,
                reason: c.reason,
                message: c.message,
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

fn base_status(dsd: &DSparkDeployment) -> DSparkDeploymentStatus {
    let profile = resolve_profile(&dsd.spec.profile);
    let kv_pool_tokens = profile.kv_pool_tokens;
    DSparkDeploymentStatus {
        observed_generation: dsd.metadata.generation,
        endpoint: Some(endpoint(dsd)),
        kv_pool: Some(kv_pool_tokens.map_or_else(|| "auto".to_string(), |t| t.to_string())),
        kv_pool_tokens,
        max_full_length_concurrency: kv_pool_tokens.map(|t| t / profile.max_model_len.max(1)),
        profile: Some(profile),
        ..Default::default()
    }
}

fn previous_conditions(dsd: &DSparkDeployment) -> Vec<Condition> {
    dsd.status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
}

/// Status when the operator stops before touching any child.
pub fn stopped_status(
    dsd: &DSparkDeployment,
    stop: &Stop,
    now: Timestamp,
) -> DSparkDeploymentStatus {
    let (reason, message) = match stop {
        Stop::InvalidSpec(problems) => ("InvalidSpec".to_string(), problems.join("; ")),
        Stop::Missing(b) => (b.reason.clone(), b.message.clone()),
    };
    let previous = dsd.status.clone().unwrap_or_default();
    let mut status = base_status(dsd);
    // Groups already running keep serving the last valid spec; report them as they were.
    status.groups = previous.groups;
    status.ready_groups = previous.ready_groups;
    status.restarts = previous.restarts;
    status.group_statuses = previous.group_statuses.clone();
    status.ready = Some(format!("{}/{}", previous.ready_groups, dsd.spec.replicas));
    let conds = vec![
        Cond {
            type_: READY,
            status: false,
            reason: reason.clone(),
            message: message.clone(),
        },
        Cond {
            type_: PROGRESSING,
            status: false,
            reason: reason.clone(),
            message: message.clone(),
        },
        Cond {
            type_: DEGRADED,
            status: true,
            reason: reason.clone(),
            message: message.clone(),
        },
        Cond {
            type_: GROUP_FORMED,
            status: false,
            reason,
            message,
        },
    ];
    status.conditions = finish(conds, &previous.conditions, dsd.metadata.generation, now);
    status
}

/// Status after a reconcile pass over the groups.
pub fn compute_status(
    dsd: &DSparkDeployment,
    observations: &[GroupObservation],
    plan: &GroupPlan,
    now: Timestamp,
) -> DSparkDeploymentStatus {
    let replicas = dsd.spec.replicas.max(0);
    let tensor = dsd.spec.parallelism.tensor;
    let mut status = base_status(dsd);
    let statuses: &[GroupStatus] = &plan.statuses;
    let ready_groups = statuses.iter().filter(|s| s.ready).count() as i32;
    status.groups = observations
        .iter()
        .filter(|o| o.pods > 0 || o.terminating)
        .count() as i32;
    status.ready_groups = ready_groups;
    status.ready = Some(format!("{ready_groups}/{replicas}"));
    status.restarts = statuses.iter().map(|s| s.restarts).sum();
    status.group_statuses = statuses.to_vec();

    let ready = if replicas == 0 {
        Cond {
            type_: READY,
            status: false,
            reason: "ScaledToZero".into(),
            message: "replicas is 0".into(),
        }
    } else if ready_groups == replicas {
        Cond {
            type_: READY,
            status: true,
            reason: "AllGroupsReady".into(),
            message: format!(
                "{ready_groups}/{replicas} groups serving at {}",
                endpoint(dsd)
            ),
        }
    } else {
        Cond {
            type_: READY,
            status: false,
            reason: "GroupsNotReady".into(),
            message: format!("{ready_groups}/{replicas} groups ready"),
        }
    };

    let unformed: Vec<String> = statuses
        .iter()
        .filter(|s| !s.formed)
        .map(|s| s.index.to_string())
        .collect();
    let formed = if replicas > 0 && unformed.is_empty() {
        Cond {
            type_: GROUP_FORMED,
            status: true,
            reason: "AllGroupsFormed".into(),
            message: format!("all {tensor} ranks of every group joined"),
        }
    } else {
        Cond {
            type_: GROUP_FORMED,
            status: false,
            reason: if replicas == 0 {
                "ScaledToZero".into()
            } else {
                "WaitingForRanks".into()
            },
            message: if unformed.is_empty() {
                "no groups".into()
            } else {
                format!("groups not formed yet: {}", unformed.join(", "))
            },
        }
    };

    let member_failed = plan.recreate.iter().find_map(|(g, r)| match r {
        RecreateReason::MemberFailed(m) => Some((g, m)),
        RecreateReason::Rollout => None,
    });
    let rolling = plan
        .recreate
        .iter()
        .any(|(_, r)| *r == RecreateReason::Rollout)
        || observations.iter().any(|o| o.outdated);
    let settling = observations.iter().any(|o| !o.all_ready(tensor));
    let progressing = if let Some((g, m)) = member_failed {
        Cond {
            type_: PROGRESSING,
            status: true,
            reason: "Recreating".into(),
            message: format!("recreating group {g}: {m}"),
        }
    } else if rolling {
        Cond {
            type_: PROGRESSING,
            status: true,
            reason: "RollingUpdate".into(),
            message: "replacing outdated groups one at a time".into(),
        }
    } else if settling {
        Cond {
            type_: PROGRESSING,
            status: true,
            reason: "GroupsStarting".into(),
            message: "waiting for groups to load weights and form".into(),
        }
    } else {
        Cond {
            type_: PROGRESSING,
            status: false,
            reason: "Complete".into(),
            message: "all groups run the current spec".into(),
        }
    };

    let degraded = if let Some((_, msg)) = plan.exhausted.first() {
        Cond {
            type_: DEGRADED,
            status: true,
            reason: "RestartBudgetExhausted".into(),
            message: msg.clone(),
        }
    } else if let Some((o, b)) = observations
        .iter()
        .find_map(|o| o.blocker.as_ref().map(|b| (o, b)))
    {
        Cond {
            type_: DEGRADED,
            status: true,
            reason: b.reason.clone(),
            message: format!("group {}: {}", o.index, b.message),
        }
    } else {
        Cond {
            type_: DEGRADED,
            status: false,
            reason: "AsExpected".into(),
            message: String::new(),
        }
    };

    status.conditions = finish(
        vec![ready, progressing, degraded, formed],
        &previous_conditions(dsd),
        dsd.metadata.generation,
        now,
    );
    status
}

/// The condition of a type, if present.
pub fn condition<'a>(status: &'a DSparkDeploymentStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}
