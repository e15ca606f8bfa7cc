//! All worker settings, from flags or environment variables named after the Galaxy
//! runner's parameters (`--k8s-namespace` / `K8S_NAMESPACE` for `k8s_namespace`).

use std::{path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

use crate::domain::{naming, resources::ResourceValue};

pub mod placement;

/// Which queue type the worker declares for requests and control messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueType {
    /// Replicated, with a delivery limit that parks poison messages.
    Quorum,
    /// Classic durable queue (no delivery limit).
    Classic,
}

/// When a finished Job is deleted (`k8s_cleanup_job`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CleanupPolicy {
    /// Delete every finished Job once its terminal event is confirmed.
    Always,
    /// Delete only succeeded Jobs; keep failed ones for inspection.
    Onsuccess,
    /// Keep every Job.
    Never,
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
    /// Queue bound to the dead-letter exchange.
    #[arg(long, env = "AMQP_DEAD_LETTER_QUEUE", default_value = "galaxy.k8s.dead-letter")]
    pub dead_letter_queue: String,
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
    /// Largest accepted message body in bytes.
    #[arg(long, env = "AMQP_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Seconds to wait for a publisher confirm before treating the publish as failed.
    #[arg(long, env = "AMQP_PUBLISH_TIMEOUT_SECONDS", default_value_t = 10)]
    pub publish_timeout_seconds: u64,
}

/// Kubernetes settings, named after the Galaxy runner's parameters.
#[derive(Debug, Clone, Args)]
pub struct KubeSettings {
    /// Namespace the Jobs are created in.
    #[arg(long, env = "K8S_NAMESPACE", default_value = "default")]
    pub k8s_namespace: String,
    /// Galaxy instance id: part of every Job name; lets a restarted worker trust and adopt its Jobs.
    #[arg(long, env = "K8S_GALAXY_INSTANCE_ID")]
    pub k8s_galaxy_instance_id: Option<String>,
    /// First part of every Job name.
    #[arg(long, env = "K8S_JOB_NAME_PREFIX", default_value = "galaxy")]
    pub k8s_job_name_prefix: String,
    /// Pod retrials before a job fails (the Job's backoffLimit), unless the request says otherwise.
    #[arg(long, env = "K8S_POD_RETRIALS", default_value_t = 3)]
    pub k8s_pod_retrials: u32,
    /// Image pull policy: Always, IfNotPresent or Never; anything else leaves it unset.
    #[arg(long, env = "K8S_PULL_POLICY")]
    pub k8s_pull_policy: Option<String>,
    /// Default CPU request (int = CPUs, float = millicores x1000, or a quantity).
    #[arg(long, env = "K8S_DEFAULT_REQUESTS_CPU")]
    pub k8s_default_requests_cpu: Option<String>,
    /// Default memory request (int = G, float = M x1000, or a quantity).
    #[arg(long, env = "K8S_DEFAULT_REQUESTS_MEMORY")]
    pub k8s_default_requests_memory: Option<String>,
    /// Default CPU limit.
    #[arg(long, env = "K8S_DEFAULT_LIMITS_CPU")]
    pub k8s_default_limits_cpu: Option<String>,
    /// Default memory limit.
    #[arg(long, env = "K8S_DEFAULT_LIMITS_MEMORY")]
    pub k8s_default_limits_memory: Option<String>,
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
    #[arg(long, env = "K8S_CLEANUP_JOB", value_enum, default_value = "always")]
    pub k8s_cleanup_job: CleanupPolicy,
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

/// Parses a default resource value written in a flag: `2` (integer), `0.5` (float) or a quantity.
pub fn parse_resource(text: &str) -> ResourceValue {
    if let Ok(n) = text.parse::<u64>() {
        ResourceValue::Integer(n)
    } else if let Ok(x) = text.parse::<f64>() {
        ResourceValue::Float(x)
    } else {
        ResourceValue::Text(text.to_string())
    }
}

impl Settings {
    /// Checks what can be checked before connecting; the message says what to fix.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(id) = &self.kube.k8s_galaxy_instance_id {
            naming::check_instance_id(id)?;
        }
        if naming::job_name(&self.kube.k8s_job_name_prefix, None, "1", None)
            != format!("{}-1", self.kube.k8s_job_name_prefix)
            || self.kube.k8s_job_name_prefix.len() > 20
        {
            return Err(format!(
                "k8s_job_name_prefix {:?} must be 1-20 lowercase letters, digits or '-'",
                self.kube.k8s_job_name_prefix
            ));
        }
        use crate::domain::resources::Resource;
        for (name, value, resource) in [
            ("k8s_default_requests_cpu", &self.kube.k8s_default_requests_cpu, Resource::Cpu),
            ("k8s_default_limits_cpu", &self.kube.k8s_default_limits_cpu, Resource::Cpu),
            ("k8s_default_requests_memory", &self.kube.k8s_default_requests_memory, Resource::Memory),
            ("k8s_default_limits_memory", &self.kube.k8s_default_limits_memory, Resource::Memory),
        ] {
            if let Some(v) = value {
                parse_resource(v).quantity(resource).map_err(|e| format!("{name}: {e}"))?;
            }
        }
        match (&self.kube.k8s_persistent_volume_claim_name, &self.kube.k8s_persistent_volume_claim_mount_path) {
            (Some(_), None) | (None, Some(_)) => {
                return Err("k8s_persistent_volume_claim_name and k8s_persistent_volume_claim_mount_path \
                            must be set together"
                    .into())
            }
            _ => {}
        }
        self.kube.placement.parse()?;
        if self.amqp.prefetch == 0 {
            return Err("prefetch must be at least 1".into());
        }
        Ok(())
    }

    /// Time limits for pods that cannot start.
    pub fn limits(&self) -> crate::domain::outcome::Limits {
        crate::domain::outcome::Limits {
            unschedulable_after: self.kube.k8s_unschedulable_walltime_limit.map(Duration::from_secs),
            image_pull_grace: Duration::from_secs(self.kube.k8s_image_pull_grace_seconds),
        }
    }

    /// The instance id, when configured.
    pub fn instance_id(&self) -> Option<&str> {
        self.kube.k8s_galaxy_instance_id.as_deref().filter(|s| !s.is_empty())
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
