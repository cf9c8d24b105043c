//! Serving-group semantics, free of API calls: what the pods of each group say (observe), and
//! what to do about it (plan): recreate a formed group when a member restarted or failed, within
//! a restart budget and with back-off; roll outdated groups one at a time without a surge pod.

use crate::crd::{GroupStatus, RecoverySpec};
use crate::resources::{ANNOTATION_SPEC_HASH, LABEL_GROUP, LABEL_POD_INDEX};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use std::time::Duration;

/// Longest wait between two recreations of a group.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Termination messages are quoted up to this many characters.
const MESSAGE_HEAD: usize = 240;

/// Something in the cluster keeps a group from running that the operator cannot fix itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocker {
    /// CamelCase condition reason, e.g. ImagePullFailed.
    pub reason: String,
    pub message: String,
}

/// What the pods of one group look like right now.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct GroupObservation {
    pub index: i32,
    /// Pods that exist and are not being deleted.
    pub pods: usize,
    pub ready_pods: usize,
    pub rank0_ready: bool,
    /// Some pod is being deleted (a recreation or rollout is under way).
    pub terminating: bool,
    /// Some pod runs an older pod template.
    pub outdated: bool,
    /// A member restarted or failed: the head of its termination message.
    pub member_failure: Option<String>,
    pub blocker: Option<Blocker>,
}

impl GroupObservation {
    /// Every rank exists and is Ready.
    pub fn all_ready(&self, tensor: i32) -> bool {
        !self.terminating && self.pods == tensor as usize && self.ready_pods == tensor as usize
    }
}

fn pod_group(pod: &Pod) -> Option<i32> {
    pod.metadata.labels.as_ref()?.get(LABEL_GROUP)?.parse().ok()
}

fn pod_rank(pod: &Pod) -> Option<i32> {
    pod.metadata
        .labels
        .as_ref()?
        .get(LABEL_POD_INDEX)?
        .parse()
        .ok()
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// First non-empty line of a message, cut to a readable length.
pub fn message_head(message: &str) -> String {
    let line = message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let mut head: String = line.chars().take(MESSAGE_HEAD).collect();
    if line.chars().count() > MESSAGE_HEAD {
        head.push('…');
    }
    head
}

/// Why a container last terminated, in one line.
fn termination_summary(pod_name: &str, cs: &ContainerStatus) -> Option<String> {
    let terminated = cs
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()))?;
    let detail = terminated
        .message
        .as_deref()
        .map(message_head)
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| {
            format!(
                "exit code {}{}",
                terminated.exit_code,
                terminated
                    .reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )
        });
    Some(format!("{pod_name}/{}: {detail}", cs.name))
}

fn blocker_of(pod_name: &str, pod: &Pod) -> Option<Blocker> {
    let status = pod.status.as_ref()?;
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for cs in containers {
        let Some(waiting) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = waiting.reason.as_deref().unwrap_or("");
        let message = waiting
            .message
            .as_deref()
            .map(message_head)
            .unwrap_or_default();
        let blocker = match reason {
            "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => {
                Some("ImagePullFailed")
            }
            "CreateContainerConfigError" | "CreateContainerError" => Some("ContainerConfigError"),
            "CrashLoopBackOff" => Some("CrashLoopBackOff"),
            _ => None,
        };
        if let Some(b) = blocker {
            let detail = if b == "CrashLoopBackOff" {
                termination_summary(pod_name, cs)
                    .unwrap_or_else(|| format!("{pod_name}/{}: {message}", cs.name))
            } else {
                format!("{pod_name}/{}: {reason}: {message}", cs.name)
            };
            return Some(Blocker {
                reason: b.to_string(),
                message: detail,
            });
        }
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    })?;
    Some(Blocker {
        reason: "Unschedulable".to_string(),
        message: format!(
            "{pod_name}: {}",
            message_head(unschedulable.message.as_deref().unwrap_or("no node fits"))
        ),
    })
}

/// Group the pods by their group label and summarise each group `0..replicas`.
pub fn observe(pods: &[Pod], replicas: i32, desired_hash: &str) -> Vec<GroupObservation> {
    let mut groups: Vec<GroupObservation> = (0..replicas.max(0))
        .map(|index| GroupObservation {
            index,
            ..Default::default()
        })
        .collect();
    for pod in pods {
        let Some(g) = pod_group(pod).filter(|g| (0..replicas).contains(g)) else {
            continue;
        };
        let obs = &mut groups[g as usize];
        if pod.metadata.deletion_timestamp.is_some() {
            obs.terminating = true;
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        obs.pods += 1;
        let ready = pod_ready(pod);
        if ready {
            obs.ready_pods += 1;
            if pod_rank(pod) == Some(0) {
                obs.rank0_ready = true;
            }
        }
        let hash = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_SPEC_HASH));
        if hash.map(String::as_str) != Some(desired_hash) {
            obs.outdated = true;
        }
        let status = pod.status.as_ref();
        let failed_phase = status.and_then(|s| s.phase.as_deref()) == Some("Failed");
        if obs.member_failure.is_none() {
            for cs in status
                .and_then(|s| s.container_statuses.as_ref())
                .into_iter()
                .flatten()
            {
                if cs.restart_count > 0 || failed_phase {
                    obs.member_failure = Some(
                        termination_summary(&name, cs)
                            .unwrap_or_else(|| format!("{name}/{}: restarted", cs.name)),
                    );
                    break;
                }
            }
            if failed_phase && obs.member_failure.is_none() {
                let reason = status
                    .and_then(|s| s.reason.clone())
                    .unwrap_or_else(|| "Failed".into());
                obs.member_failure = Some(format!("{name}: pod {reason}"));
            }
        }
        if obs.blocker.is_none() {
            obs.blocker = blocker_of(&name, pod);
        }
    }
    groups
}

/// Why a group is being replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecreateReason {
    /// A member of the formed group restarted or failed.
    MemberFailed(String),
    /// The group runs an older pod template.
    Rollout,
}

/// What the reconciler must do for the groups.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct GroupPlan {
    /// Groups whose pods are deleted now (the StatefulSet recreates them together).
    pub recreate: Vec<(i32, RecreateReason)>,
    /// Groups that exhausted their restart budget, with the message for Degraded.
    pub exhausted: Vec<(i32, String)>,
    /// The new per-group status.
    pub statuses: Vec<GroupStatus>,
    /// Come back after this long (back-off under way).
    pub requeue_after: Option<Duration>,
}

fn parse_time(s: &str) -> Option<Timestamp> {
    s.parse().ok()
}

/// Back-off before recreation number `restarts + 1`: base doubled per earlier recreation.
pub fn backoff(base_seconds: i64, restarts: i32) -> Duration {
    let base = Duration::from_secs(base_seconds.max(0) as u64);
    let factor = 1u32
        .checked_shl(restarts.clamp(0, 16) as u32)
        .unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

/// Decide recreations and rollouts from the observations and the previous group status.
/// Restart counters belong to a generation: a spec change resets them.
pub fn plan(
    observations: &[GroupObservation],
    previous: &[GroupStatus],
    generation: Option<i64>,
    tensor: i32,
    recovery: &RecoverySpec,
    now: Timestamp,
) -> GroupPlan {
    let mut out = GroupPlan::default();
    let mut disrupting = observations.iter().any(|o| o.terminating);
    for obs in observations {
        let prev = previous.iter().find(|s| s.index == obs.index);
        let mut st = GroupStatus {
            index: obs.index,
            generation,
            ..Default::default()
        };
        if let Some(p) = prev {
            st.formed = p.formed;
            st.last_restart_time = p.last_restart_time.clone();
            if p.generation == generation {
                st.restarts = p.restarts;
            }
        }
        if obs.all_ready(tensor) {
            st.formed = true;
        }
        st.ready = obs.rank0_ready && !obs.terminating;
        st.message = obs
            .blocker
            .as_ref()
            .map(|b| format!("{}: {}", b.reason, b.message));

        if let (true, false, Some(failure)) =
            (st.formed, obs.terminating, obs.member_failure.as_ref())
        {
            if st.restarts >= recovery.max_group_restarts {
                let msg = format!(
                    "group {} exhausted its restart budget ({}): {failure}",
                    obs.index, recovery.max_group_restarts
                );
                st.message = Some(msg.clone());
                out.exhausted.push((obs.index, msg));
            } else {
                let wait = backoff(recovery.backoff_seconds, st.restarts - 1);
                let since_last = st
                    .last_restart_time
                    .as_deref()
                    .and_then(parse_time)
                    .map(|t| now.duration_since(t))
                    .unwrap_or(SignedDuration::MAX);
                let remaining = SignedDuration::try_from(wait)
                    .unwrap_or(SignedDuration::MAX)
                    .checked_sub(since_last)
                    .unwrap_or(SignedDuration::ZERO);
                if st.restarts > 0 && remaining.is_positive() {
                    let secs = remaining.as_secs().max(1) as u64;
                    st.message = Some(format!("member failed, recreating in {secs}s: {failure}"));
                    let r = Duration::from_secs(secs);
                    out.requeue_after = Some(out.requeue_after.map_or(r, |q| q.min(r)));
                } else {
                    st.restarts += 1;
                    st.formed = false;
                    st.ready = false;
                    st.last_restart_time = Some(now.to_string());
                    st.message = Some(format!("recreated after member failure: {failure}"));
                    out.recreate
                        .push((obs.index, RecreateReason::MemberFailed(failure.clone())));
                    disrupting = true;
                }
            }
        }
        out.statuses.push(st);
    }

    // Rollout: one group at a time, never while another group is being replaced. A group that
    // is not serving anyway can be replaced at once: there is nothing to protect.
    let recreating: Vec<i32> = out.recreate.iter().map(|(g, _)| *g).collect();
    for obs in observations {
        if !obs.outdated || obs.terminating || recreating.contains(&obs.index) {
            continue;
        }
        let serving = obs.all_ready(tensor);
        let others_ready = observations
            .iter()
            .filter(|o| o.index != obs.index)
            .all(|o| o.all_ready(tensor));
        if !serving || (!disrupting && others_ready) {
            out.recreate.push((obs.index, RecreateReason::Rollout));
            if let Some(st) = out.statuses.iter_mut().find(|s| s.index == obs.index) {
                st.formed = false;
                st.ready = false;
            }
            disrupting = true;
            if serving {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(group: i32, rank: i32, ready: bool, restarts: i32, hash: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("d-{group}-{rank}"),
                         "labels": {LABEL_GROUP: group.to_string(), LABEL_POD_INDEX: rank.to_string()},
                         "annotations": {ANNOTATION_SPEC_HASH: hash}},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}],
                       "containerStatuses": [{"name": "server", "ready": ready, "restartCount": restarts, "image": "", "imageID": "",
                           "lastState": if restarts > 0 { json!({"terminated": {"exitCode": 1, "message": "\n\npeer rank 0 closed the connection\nstack"}}) } else { json!({}) }}]}
        }))
        .unwrap()
    }

    fn now() -> Timestamp {
        "2026-11-28T10:00:00Z".parse().unwrap()
    }

    /// The plan for two groups of two ranks whose desired spec hash is "new", default recovery,
    /// no previous status.
    fn plan_rollout(pods: &[Pod]) -> GroupPlan {
        plan(
            &observe(pods, 2, "new"),
            &[],
            Some(2),
            2,
            &RecoverySpec::default(),
            now(),
        )
    }

    #[test]
    fn observes_readiness_rank0_and_failures() {
        let pods = [
            pod(0, 0, true, 0, "h"),
            pod(0, 1, true, 0, "h"),
            pod(1, 0, false, 0, "h"),
            pod(1, 1, true, 2, "old"),
            pod(7, 0, true, 0, "h"),
        ];
        let obs = observe(&pods, 2, "h");
        assert_eq!(obs.len(), 2, "pods of groups past replicas are ignored");
        assert!(obs[0].all_ready(2) && obs[0].rank0_ready && !obs[0].outdated);
        assert!(!obs[1].all_ready(2) && !obs[1].rank0_ready && obs[1].outdated);
        assert_eq!(
            obs[1].member_failure.as_deref(),
            Some("d-1-1/server: peer rank 0 closed the connection")
        );
    }

    #[test]
    fn message_head_is_first_nonempty_line_cut() {
        assert_eq!(message_head("\n  first  \nsecond"), "first");
        let long = "x".repeat(500);
        assert_eq!(message_head(&long).chars().count(), MESSAGE_HEAD + 1);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(30, 0), Duration::from_secs(30));
        assert_eq!(backoff(30, 1), Duration::from_secs(60));
        assert_eq!(backoff(30, 3), Duration::from_secs(240));
        assert_eq!(backoff(30, 10), MAX_BACKOFF);
    }

    #[test]
    fn unformed_group_is_not_recreated() {
        // Restarts while the group is still forming are the kubelet's business.
        let obs = observe(
            &[pod(0, 0, false, 1, "h"), pod(0, 1, false, 0, "h")],
            1,
            "h",
        );
        let plan = plan(&obs, &[], Some(1), 2, &RecoverySpec::default(), now());
        assert!(plan.recreate.is_empty());
        assert!(!plan.statuses[0].formed);
    }

    #[test]
    fn spec_change_resets_the_restart_count() {
        let prev = [GroupStatus {
            index: 0,
            formed: true,
            restarts: 5,
            generation: Some(1),
            ..Default::default()
        }];
        let obs = observe(&[pod(0, 0, true, 1, "h"), pod(0, 1, true, 0, "h")], 1, "h");
        let p = plan(&obs, &prev, Some(2), 2, &RecoverySpec::default(), now());
        assert_eq!(p.recreate.len(), 1);
        assert_eq!(p.statuses[0].restarts, 1);
        assert!(p.exhausted.is_empty());
    }

    #[test]
    fn rollout_replaces_one_serving_group_at_a_time() {
        let pods = [
            pod(0, 0, true, 0, "old"),
            pod(0, 1, true, 0, "old"),
            pod(1, 0, true, 0, "old"),
            pod(1, 1, true, 0, "old"),
        ];
        let p = plan_rollout(&pods);
        assert_eq!(p.recreate, vec![(0, RecreateReason::Rollout)]);

        // Group 0 came back on the new spec but is not ready yet: group 1 waits.
        let pods = [
            pod(0, 0, false, 0, "new"),
            pod(0, 1, true, 0, "new"),
            pod(1, 0, true, 0, "old"),
            pod(1, 1, true, 0, "old"),
        ];
        let p = plan_rollout(&pods);
        assert!(p.recreate.is_empty());

        // Group 0 serves again: now group 1.
        let pods = [
            pod(0, 0, true, 0, "new"),
            pod(0, 1, true, 0, "new"),
            pod(1, 0, true, 0, "old"),
            pod(1, 1, true, 0, "old"),
        ];
        let p = plan_rollout(&pods);
        assert_eq!(p.recreate, vec![(1, RecreateReason::Rollout)]);
    }

    #[test]
    fn outdated_group_that_does_not_serve_is_replaced_at_once() {
        let pods = [
            pod(0, 0, true, 0, "old"),
            pod(0, 1, true, 0, "old"),
            pod(1, 0, false, 0, "old"),
            pod(1, 1, false, 0, "old"),
        ];
        let p = plan_rollout(&pods);
        // Group 1 serves nothing, so it goes first; group 0 waits for it.
        assert_eq!(p.recreate, vec![(1, RecreateReason::Rollout)]);
    }
}
