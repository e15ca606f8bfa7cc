//! All worker settings, from flags or environment variables named after the Galaxy
//! runner's parameters (`--k8s-namespace` / `K8S_NAMESPACE` for `k8s_namespace`).

use std::{path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

use crate::domain::{
    decision::CleanupPolicy,
    job::{Identity, JobDefaults, Quantities},
    naming::{self, Naming},
    outcome::Limits,
    resources::Amount,
};

pub mod placement;

/// Which queue type the worker declares for requests and control messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueType {
    /// Replicated, with a delivery limit that parks poison messages.
    Quorum,
    /// Classic durable queue (no delivery limit).
    Classic,
}

/// Broker settings.
#[derive(Debug, Clone, Args)]
pub struct AmqpSettings {
    /// AMQP URL of the broker.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Queue Galaxy publishes job requests to.
    #[arg(long, env = "AMQP_REQUEST_QUEUE", default_value = "galaxy.k8s.requests")]
    pub request_queue: String,
    /// Queue for cancel/control messages (separate, so a cancel never waits behind submissions).
    #[arg(long, env = "AMQP_CONTROL_QUEUE", default_value = "galaxy.k8s.control")]
    pub control_queue: String,
    /// Topic exchange result events are published to, routed by `<instance id>.<state>`.
    #[arg(long, env = "AMQP_RESULT_EXCHANGE", default_value = "galaxy.k8s.events")]
    pub result_exchange: String,
    /// Exchange refused messages are dead-lettered to.
    #[arg(long, env = "AMQP_DEAD_LETTER_EXCHANGE", default_value = "galaxy.k8s.dead-letter")]
    pub dead_letter_exchange: String,
    /// Where refused and parked messages wait for an operator, each with its reason.
    #[arg(long, env = "AMQP_DEAD_LETTER_QUEUE", default_value = "galaxy.k8s.dead-letter")]
    pub dead_letter_queue: String,
    /// The queue bound to the dead-letter exchange: the worker moves what arrives there to the
    /// dead-letter queue, giving a message the broker parked (delivery limit) its reason and
    /// a `failed` event.
    #[arg(long, env = "AMQP_DEAD_LETTER_INBOX", default_value = "galaxy.k8s.dead-letter.inbox")]
    pub dead_letter_inbox: String,
    /// Type of the request and control queues.
    #[arg(long, env = "AMQP_QUEUE_TYPE", value_enum, default_value = "quorum")]
    pub queue_type: QueueType,
    /// Deliveries of one message before a quorum queue dead-letters it (poison messages).
    #[arg(long, env = "AMQP_DELIVERY_LIMIT", default_value_t = 20)]
    pub delivery_limit: u32,
    /// Requests in flight per worker (the consumer prefetch). Larger than
    /// `k8s_max_concurrent_creates`, so broker round trips (confirm, ack, next delivery) overlap
    /// with Job creation instead of idling the apiserver.
    #[arg(long, env = "AMQP_PREFETCH", default_value_t = 64)]
    pub prefetch: u16,
    /// How long the broker lets this worker hold a delivery unacknowledged (its
    /// `x-consumer-timeout`, RabbitMQ 3.12 and later; older ones use their global
    /// `consumer_timeout`): deliveries are held through an apiserver outage or while events
    /// cannot be routed, so longer than RabbitMQ's default 30 minutes. 0: the broker's own.
    #[arg(long, env = "AMQP_CONSUMER_TIMEOUT_SECONDS", default_value_t = 86400)]
    pub consumer_timeout_seconds: u64,
    /// Largest accepted message body in bytes.
    #[arg(long, env = "AMQP_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Seconds to wait for a publisher confirm before treating the publish as failed.
    #[arg(long, env = "AMQP_PUBLISH_TIMEOUT_SECONDS", default_value_t = 10)]
    pub publish_timeout_seconds: u64,
    /// Seconds a message's work (or an event's publish) is retried on transient failures
    /// before the message goes back to the queue (or the event is tried again later). While
    /// the apiserver is unreachable, deliveries are held instead: an outage is not the
    /// message's fault and uses none of its delivery budget.
    #[arg(long, env = "AMQP_RETRY_WINDOW_SECONDS", default_value_t = 30)]
    pub retry_window_seconds: u64,
}

impl AmqpSettings {
    /// How long transient failures are retried before giving a message back.
    pub fn retry_window(&self) -> Duration {
        Duration::from_secs(self.retry_window_seconds.max(1))
    }
}

/// Kubernetes settings, named after the Galaxy runner's parameters.
#[derive(Debug, Clone, Args)]
pub struct KubeSettings {
    /// Namespace the Jobs are created in.
    #[arg(long, env = "K8S_NAMESPACE", default_value = "default")]
    pub k8s_namespace: String,
    /// Galaxy instance id: part of every Job name; lets a restarted worker trust and adopt its Jobs.
    #[arg(long, env = "K8S_GALAXY_INSTANCE_ID", value_parser = instance_id)]
    pub k8s_galaxy_instance_id: Option<String>,
    /// First part of every Job name.
    #[arg(long, env = "K8S_JOB_NAME_PREFIX", default_value = "galaxy", value_parser = naming::name_prefix)]
    pub k8s_job_name_prefix: String,
    /// Pod retrials before a job fails (the Job's backoffLimit), unless the request says otherwise.
    #[arg(long, env = "K8S_POD_RETRIALS", default_value_t = 3)]
    pub k8s_pod_retrials: u32,
    /// Galaxy 26's name for `k8s_pod_retrials`; wins when both are set.
    #[arg(long, env = "K8S_POD_RETRIES")]
    pub k8s_pod_retries: Option<u32>,
    /// Upper bound of every Job's backoffLimit, whatever a request asks (Galaxy 26's
    /// `k8s_job_spec_back_off_limit`); unset: no bound.
    #[arg(long, env = "K8S_JOB_SPEC_BACK_OFF_LIMIT")]
    pub k8s_job_spec_back_off_limit: Option<u32>,
    /// Image pull policy: Always, IfNotPresent or Never; anything else leaves it unset.
    #[arg(long, env = "K8S_PULL_POLICY")]
    pub k8s_pull_policy: Option<String>,
    /// Default CPU request (int = CPUs, float = millicores x1000, or a quantity).
    #[arg(long, env = "K8S_DEFAULT_REQUESTS_CPU", value_parser = Amount::cpu)]
    pub k8s_default_requests_cpu: Option<Amount>,
    /// Default memory request (int = G, float = M x1000, or a quantity).
    #[arg(long, env = "K8S_DEFAULT_REQUESTS_MEMORY", value_parser = Amount::memory)]
    pub k8s_default_requests_memory: Option<Amount>,
    /// Default CPU limit.
    #[arg(long, env = "K8S_DEFAULT_LIMITS_CPU", value_parser = Amount::cpu)]
    pub k8s_default_limits_cpu: Option<Amount>,
    /// Default memory limit.
    #[arg(long, env = "K8S_DEFAULT_LIMITS_MEMORY", value_parser = Amount::memory)]
    pub k8s_default_limits_memory: Option<Amount>,
    /// Supplemental group id of the pods (when > 0).
    #[arg(long, env = "K8S_SUPPLEMENTAL_GROUP_ID")]
    pub k8s_supplemental_group_id: Option<i64>,
    /// fsGroup of the pods (when > 0).
    #[arg(long, env = "K8S_FS_GROUP_ID")]
    pub k8s_fs_group_id: Option<i64>,
    /// PersistentVolumeClaim mounted into every job container.
    #[arg(long, env = "K8S_PERSISTENT_VOLUME_CLAIM_NAME")]
    pub k8s_persistent_volume_claim_name: Option<String>,
    /// Where that claim is mounted.
    #[arg(long, env = "K8S_PERSISTENT_VOLUME_CLAIM_MOUNT_PATH")]
    pub k8s_persistent_volume_claim_mount_path: Option<String>,
    /// Use the in-cluster service account instead of a kubeconfig.
    #[arg(long, env = "K8S_USE_SERVICE_ACCOUNT", default_value_t = false)]
    pub k8s_use_service_account: bool,
    /// kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "K8S_CONFIG_PATH")]
    pub k8s_config_path: Option<PathBuf>,
    /// Seconds to wait for an untrusted or outdated Job to disappear before recreating it.
    #[arg(long, env = "K8S_TIMEOUT_SECONDS_JOB_DELETION", default_value_t = 30)]
    pub k8s_timeout_seconds_job_deletion: u64,
    /// When finished Jobs are deleted (after their terminal event is confirmed).
    #[arg(long, env = "K8S_CLEANUP_JOB", default_value = "always")]
    pub k8s_cleanup_job: CleanupPolicy,
    /// Seconds a Job the cleanup policy removes is kept as a small record of its outcome (its
    /// pods deleted, the Job object kept), so a repeated request is answered with that outcome
    /// and never runs again; 0: delete finished Jobs outright.
    #[arg(long, env = "K8S_FINISHED_JOB_RECORD_SECONDS", default_value_t = 86400)]
    pub k8s_finished_job_record_seconds: u64,
    /// Seconds after a finished Job is reported before its pods (or, with no record, the Job)
    /// are deleted: longer than the job controller's caches can lag behind after an apiserver
    /// restart, or a controller that has not seen the Job finish starts the tool again
    /// (Kubernetes before 1.26).
    #[arg(long, env = "K8S_FINISHED_PODS_GRACE_SECONDS", default_value_t = 60)]
    pub k8s_finished_pods_grace_seconds: u64,
    /// Seconds after which a preempted/evicted or node-lost job is resubmitted (a new Job, not
    /// counted against the pod retrials); unset: report `preempted`/`node_lost` to Galaxy at once.
    #[arg(long, env = "K8S_PREEMPTED_RESUBMIT_DELAY_SECONDS")]
    pub k8s_preempted_resubmit_delay_seconds: Option<u64>,
    /// Resubmissions after preemption before the job is reported `preempted`/`node_lost`.
    #[arg(long, env = "K8S_PREEMPTED_MAX_RESUBMISSIONS", default_value_t = 3)]
    pub k8s_preempted_max_resubmissions: u32,
    /// Job creations (API calls) in flight at once per worker: the load it puts on the apiserver.
    #[arg(long, env = "K8S_MAX_CONCURRENT_CREATES", default_value_t = 32)]
    pub k8s_max_concurrent_creates: usize,
    /// Walltime of a job in seconds (the Job's activeDeadlineSeconds); a request may ask for less.
    #[arg(long, env = "K8S_WALLTIME_LIMIT", default_value_t = 172800)]
    pub k8s_walltime_limit: i64,
    /// Seconds a pod may stay unschedulable before the job fails as `unschedulable` (unset: no limit).
    #[arg(long, env = "K8S_UNSCHEDULABLE_WALLTIME_LIMIT")]
    pub k8s_unschedulable_walltime_limit: Option<u64>,
    /// Seconds image pull errors are tolerated before the job fails as `image_pull_failed`.
    #[arg(long, env = "K8S_IMAGE_PULL_GRACE_SECONDS", default_value_t = 120)]
    pub k8s_image_pull_grace_seconds: u64,
    /// Seconds a Job may go without a pod (refused by a quota, a LimitRange or an admission
    /// plugin) or a container may fail to be created (CreateContainerConfigError...) before the
    /// job fails as `failed`.
    #[arg(long, env = "K8S_POD_START_GRACE_SECONDS", default_value_t = 120)]
    pub k8s_pod_start_grace_seconds: u64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub placement: placement::PlacementSettings,
    /// How long a cancel for a request not yet seen keeps that request from starting (seconds).
    #[arg(long, env = "K8S_CANCEL_TOMBSTONE_SECONDS", default_value_t = 86400)]
    pub k8s_cancel_tombstone_seconds: i64,
}

/// Worker behaviour settings.
#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// Id of this replica in events and logs (default: host name and process id).
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// Bytes of pod log included in terminal events.
    #[arg(long, env = "LOG_TAIL_BYTES", default_value_t = 64 * 1024)]
    pub log_tail_bytes: usize,
    /// Address of the health and metrics endpoint.
    #[arg(long, env = "HTTP_LISTEN", default_value = "0.0.0.0:9090")]
    pub http_listen: String,
    /// Seconds a reporting replica's Lease lasts without renewal before another takes over.
    #[arg(long, env = "LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: u64,
    /// Seconds between full re-lists of Jobs and pods, catching anything a watch missed.
    #[arg(long, env = "RECONCILE_SECONDS", default_value_t = 300)]
    pub reconcile_seconds: u64,
    /// Seconds given to in-flight work after SIGTERM before exiting.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 25)]
    pub shutdown_grace_seconds: u64,
}

/// Everything `run` needs.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub amqp: AmqpSettings,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub kube: KubeSettings,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub worker: WorkerSettings,
}

/// Reads `k8s_galaxy_instance_id`; empty (`K8S_GALAXY_INSTANCE_ID=`) means unset.
fn instance_id(text: &str) -> Result<String, crate::domain::FormatError> {
    if text.is_empty() {
        Ok(String::new())
    } else {
        naming::instance_id(text)
    }
}

impl Settings {
    /// Settings from command-line arguments alone (tests and tools), e.g.
    /// `["--k8s-galaxy-instance-id", "main"]`; environment variables apply as for `run`.
    pub fn from_args<I, T>(args: I) -> Result<Settings, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            settings: Settings,
        }
        let argv = std::iter::once(std::ffi::OsString::from("k8s-job-worker")).chain(args.into_iter().map(Into::into));
        <Only as clap::Parser>::try_parse_from(argv).map(|only| only.settings)
    }

    /// Checks what no single flag can: settings that only make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let k = &self.kube;
        if k.k8s_persistent_volume_claim_name.is_some() != k.k8s_persistent_volume_claim_mount_path.is_some() {
            return Err(ConfigError(
                "k8s_persistent_volume_claim_name and k8s_persistent_volume_claim_mount_path must be set together",
            ));
        }
        if self.amqp.prefetch == 0 {
            return Err(ConfigError("prefetch must be at least 1"));
        }
        Ok(())
    }

    /// Time limits for pods that cannot start.
    pub fn limits(&self) -> Limits {
        Limits {
            unschedulable_after: self.kube.k8s_unschedulable_walltime_limit.map(Duration::from_secs),
            image_pull_grace: Duration::from_secs(self.kube.k8s_image_pull_grace_seconds),
            pod_start_grace: Duration::from_secs(self.kube.k8s_pod_start_grace_seconds),
        }
    }

    /// The instance id, when configured.
    pub fn instance_id(&self) -> Option<&str> {
        self.kube.k8s_galaxy_instance_id.as_deref().filter(|id| !id.is_empty())
    }

    /// How this instance's Jobs are named and selected.
    pub fn naming(&self) -> Naming {
        Naming { prefix: self.kube.k8s_job_name_prefix.clone(), instance_id: self.instance_id().map(str::to_string) }
    }

    /// What the worker adds to every job, from these settings.
    pub fn job_defaults(&self) -> JobDefaults {
        let k = &self.kube;
        let p = &k.placement;
        let amount = |a: &Option<Amount>| a.as_ref().and_then(|a| a.0.clone());
        let mut pvcs = p.k8s_persistent_volume_claims.0.clone();
        if let (Some(claim), Some(path)) =
            (&k.k8s_persistent_volume_claim_name, &k.k8s_persistent_volume_claim_mount_path)
        {
            pvcs.insert(
                0,
                crate::domain::placement::PvcMount {
                    claim: claim.clone(),
                    sub_path: None,
                    mount_path: path.clone(),
                    read_only: false,
                },
            );
        }
        JobDefaults {
            naming: self.naming(),
            pod_retrials: k.k8s_pod_retries.unwrap_or(k.k8s_pod_retrials),
            back_off_limit: k.k8s_job_spec_back_off_limit,
            walltime_limit: k.k8s_walltime_limit,
            requests: Quantities {
                cpu: amount(&k.k8s_default_requests_cpu),
                memory: amount(&k.k8s_default_requests_memory),
            },
            limits: Quantities { cpu: amount(&k.k8s_default_limits_cpu), memory: amount(&k.k8s_default_limits_memory) },
            pull_policy: k.k8s_pull_policy.as_deref().and_then(crate::domain::job::PullPolicy::parse_lenient),
            identity: Identity {
                run_as_user: p.k8s_run_as_user_id,
                run_as_group: p.k8s_run_as_group_id,
                fs_group: k.k8s_fs_group_id,
                supplemental_groups: k.k8s_supplemental_group_id.into_iter().collect(),
            },
            node_selector: p.k8s_node_selector.to_map(),
            tolerations: p.k8s_tolerations.0.clone(),
            affinity: p.k8s_affinity.clone(),
            priority_class: p.k8s_pod_priority_class.clone(),
            env: p.k8s_extra_job_envs.to_map(),
            job_labels: p.k8s_job_labels.to_map(),
            job_annotations: p.k8s_job_annotations.to_map(),
            pod_labels: p.k8s_pod_labels.to_map(),
            pod_annotations: p.k8s_pod_annotations.to_map(),
            pvcs,
            ttl_seconds_after_finished: p.k8s_job_ttl_secs_after_finished,
            tombstone_seconds: k.k8s_cancel_tombstone_seconds,
            policy: p.policy(),
        }
    }

    /// Publisher-confirm timeout.
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_secs(self.amqp.publish_timeout_seconds.max(1))
    }

    /// This replica's id.
    pub fn worker_id(&self) -> String {
        self.worker.worker_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "worker".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// Settings that cannot be used together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_parsed_once_into_typed_values() {
        let s = Settings::from_args([
            "--k8s-default-limits-memory",
            "0.5",
            "--k8s-node-selector",
            "pool=galaxy",
            "--k8s-persistent-volume-claims",
            "data/jobs:/jobs",
            "--policy-max-cpu",
            "500m",
            "--k8s-pull-policy",
            "Always",
        ])
        .unwrap();
        let d = s.job_defaults();
        assert_eq!(d.limits.memory.as_deref(), Some("500M"));
        assert_eq!(d.node_selector["pool"], "galaxy");
        assert_eq!(d.pvcs[0].sub_path.as_deref(), Some("jobs"));
        assert_eq!(d.policy.max_cpu_millis, Some(500));
        assert_eq!(d.pull_policy, Some(crate::domain::job::PullPolicy::Always));
        assert_eq!(d.policy.allowed_shells, ["/bin/bash", "/bin/sh"]);
    }

    #[test]
    fn a_bad_flag_is_refused_when_read_and_names_itself() {
        for (flag, value) in [
            ("--k8s-galaxy-instance-id", "Main_1"),
            ("--k8s-job-name-prefix", "x-"),
            ("--k8s-default-requests-cpu", "1Gi"),
            ("--k8s-node-selector", "novalue"),
            ("--k8s-tolerations", "{"),
            ("--k8s-affinity", "{\"nodeAffinity\": 3}"),
            ("--k8s-persistent-volume-claims", "nomount"),
            ("--policy-max-memory", "lots"),
            ("--k8s-cleanup-job", "sometimes"),
        ] {
            let err = Settings::from_args([flag, value]).unwrap_err().to_string();
            assert!(err.contains(flag), "{flag}: {err}");
        }
    }

    #[test]
    fn item8_the_new_allow_lists_are_read_once() {
        let s = Settings::from_args([
            "--policy-allowed-tolerations",
            "gpu,*",
            "--policy-allowed-priority-classes",
            "galaxy-high",
            "--policy-allowed-metadata-prefixes",
            "sidecar.istio.io",
        ])
        .unwrap();
        let p = s.job_defaults().policy;
        assert_eq!(p.allowed_tolerations, ["gpu", "*"]);
        assert_eq!(p.allowed_priority_classes, ["galaxy-high"]);
        assert_eq!(p.allowed_metadata_prefixes, ["sidecar.istio.io"]);
        let none = Settings::from_args::<_, &str>([]).unwrap().job_defaults().policy;
        assert!(none.allowed_tolerations.is_empty() && none.allowed_priority_classes.is_empty());
        assert_eq!(none.allowed_metadata_prefixes, ["app.galaxyproject.org"]);
        let err =
            Settings::from_args(["--policy-allowed-metadata-prefixes", "k8s-job-worker"]).unwrap_err().to_string();
        assert!(err.contains("--policy-allowed-metadata-prefixes"), "{err}");
    }

    #[test]
    fn item7_default_cannot_be_an_instance_id() {
        let err = Settings::from_args(["--k8s-galaxy-instance-id", "default"]).unwrap_err().to_string();
        assert!(err.contains("--k8s-galaxy-instance-id") && err.contains("reserved"), "{err}");
    }

    #[test]
    fn an_empty_instance_id_means_none() {
        assert_eq!(Settings::from_args(["--k8s-galaxy-instance-id", ""]).unwrap().naming().instance_id, None);
    }

    #[test]
    fn cross_field_checks() {
        let s = Settings::from_args(["--k8s-persistent-volume-claim-name", "pvc"]).unwrap();
        assert!(s.validate().is_err());
        assert!(Settings::from_args(["--prefetch", "0"]).unwrap().validate().is_err());
    }
}
