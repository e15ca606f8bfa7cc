//! The labels and annotations the worker puts on its Jobs and pods and reads back, and the
//! keys a request may therefore never set.

/// Label every Job and pod of this worker carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "k8s-job-worker");
/// Label with the Job name (the runner's `app` label; the pod watch groups pods by it).
pub const LABEL_APP: &str = "app";
/// Label with the Galaxy instance id.
pub const LABEL_INSTANCE: &str = "k8s-job-worker/instance-id";
/// Label with the Galaxy job id (made label-safe).
pub const LABEL_JOB_ID: &str = "k8s-job-worker/galaxy-job-id";
/// Annotation with the exact Galaxy job id.
pub const ANN_JOB_ID: &str = "k8s-job-worker/galaxy-job-id";
/// Annotation with the Galaxy job handler that sent the request (its events go to it).
pub const ANN_HANDLER: &str = "k8s-job-worker/handler";
/// Annotation with the request's attempt number.
pub const ANN_ATTEMPT: &str = "k8s-job-worker/attempt";
/// Annotation with the request fingerprint; a different fingerprint means a different request.
pub const ANN_FINGERPRINT: &str = "k8s-job-worker/fingerprint";
/// Annotation set when a cancel was received; the Job's outcome is then `cancelled`.
pub const ANN_CANCELLED: &str = "k8s-job-worker/cancelled";
/// Annotation set before an outdated or untrusted Job is deleted to be replaced.
pub const ANN_REPLACED: &str = "k8s-job-worker/replaced";
/// Annotation the reporter puts on a preempted Job before it publishes the intent to run it
/// again: the resubmission it is due for. An intent is carried out only on a Job marked so.
pub const ANN_RESUBMIT_DUE: &str = "k8s-job-worker/resubmit-due";
/// Annotation counting the resubmissions after preemption.
pub const ANN_RESUBMISSIONS: &str = "k8s-job-worker/resubmissions";
/// Annotation the reporter writes, conditional on the Job being as it classified it, before
/// it publishes a terminal state: that state (a cancel can no longer pass it, see
/// [`crate::decision::Plan::claim`]).
pub const ANN_CLAIMED: &str = "k8s-job-worker/reporting";
/// Annotation recording the terminal state whose event the broker confirmed.
pub const ANN_REPORTED: &str = "k8s-job-worker/reported";
/// Label of a finished Job kept as a record of its outcome (outside the tracker's watch).
pub const LABEL_RECORD: &str = "k8s-job-worker/record";
/// Annotation with the recorded exit code.
pub const ANN_EXIT_CODE: &str = "k8s-job-worker/exit-code";
/// Annotation with the recorded reason.
pub const ANN_REASON: &str = "k8s-job-worker/reason";
/// Annotation with the time (RFC 3339) after which a record may be removed.
pub const ANN_RECORD_UNTIL: &str = "k8s-job-worker/record-until";

/// Annotation with an interactive Job's routes (its Service and Ingress, as JSON): a
/// resubmitted Job gets them again, and the reporter removes them once its outcome is out.
pub const ANN_ROUTES: &str = "k8s-job-worker/routes";

/// Finalizer the reporter puts on a Job with the claim of its outcome and takes off when the
/// event is out (seconds): a Job someone deletes in between (an admin, a namespace cleanup)
/// stays, terminating, until its outcome is published. No other Job carries it: a running
/// Job, a record or a tombstone never blocks a deletion.
pub const FINALIZER: &str = "k8s-job-worker/outcome";

/// The prefix of every key the worker owns (`k8s-job-worker/...`).
pub const OWN_PREFIX: &str = "k8s-job-worker";
/// Unprefixed keys that are not a request's: the worker's `app` and the job controller's
/// pod labels.
const RESERVED_PLAIN: [&str; 3] = [LABEL_APP, "job-name", "controller-uid"];

/// The DNS prefix of a label or annotation key (`example.org` of `example.org/team`), if any.
pub fn key_prefix(key: &str) -> Option<&str> {
    key.rsplit_once('/').map(|(prefix, _)| prefix)
}

/// Whether a key prefix is in a domain Kubernetes owns: `kubernetes.io`, `k8s.io` or a
/// subdomain of either (`app.kubernetes.io`, `batch.kubernetes.io`,
/// `container.apparmor.security.beta.kubernetes.io`, ...).
pub fn is_kubernetes_domain(prefix: &str) -> bool {
    ["kubernetes.io", "k8s.io"]
        .iter()
        .any(|domain| prefix == *domain || prefix.strip_suffix(domain).is_some_and(|sub| sub.ends_with('.')))
}

/// Whether a label or annotation key belongs to the worker or to Kubernetes, so a request
/// may never set it, whatever the policy allows: the worker's (everything under
/// `k8s-job-worker/`, and `app`), the job controller's (`job-name`, `controller-uid`), and
/// every key in a Kubernetes domain (the managed-by label, AppArmor and seccomp profiles, the
/// job controller's newer labels). Such a key would stop the worker's tracking
/// (`k8s-job-worker/cancelled`, `.../reported`), move the Job to another instance
/// (`k8s-job-worker/instance-id`), hide pods from their Job (`app`, `job-name`) or weaken
/// their isolation.
pub fn is_reserved(key: &str) -> bool {
    match key_prefix(key) {
        None => RESERVED_PLAIN.contains(&key),
        Some(prefix) => prefix == OWN_PREFIX || is_kubernetes_domain(prefix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_keys() {
        for key in [ANN_CANCELLED, LABEL_INSTANCE, MANAGED_BY.0, LABEL_APP, "job-name", "batch.kubernetes.io/job-name"]
        {
            assert!(is_reserved(key), "{key}");
        }
        for key in
            ["team", "example.org/team", "sim-node.k8s-job-worker/hold", "notkubernetes.io/x", "k8s.io.example/x"]
        {
            assert!(!is_reserved(key), "{key}");
        }
        assert!(is_kubernetes_domain("x.k8s.io") && !is_kubernetes_domain("xk8s.io"));
    }
}
