//! The job request and cancel/control messages Galaxy publishes, and their validation.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    intent::{parse_intent, JobResubmit, RESUBMIT_SCHEMA},
    resources::ResourceValue,
    ValidationError,
};

/// Schema identifier carried by every job request.
pub const REQUEST_SCHEMA: &str = "k8s-job-worker/job-request/v1";
/// Schema identifier carried by every cancel/control message.
pub const CONTROL_SCHEMA: &str = "k8s-job-worker/job-cancel/v1";

/// Largest accepted command line, in bytes.
pub const MAX_COMMAND_LINE: usize = 256 * 1024;
/// Longest accepted Galaxy job id.
pub const MAX_JOB_ID: usize = 253;
/// Longest cancel reason kept (it becomes an annotation and an event's reason); a longer one
/// is cut, never a reason to refuse the cancel.
pub const MAX_REASON: usize = 1024;

/// A request to run one Galaxy job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// Must be `k8s-job-worker/job-request/v1`.
    pub schema: String,
    /// Galaxy's job id (the runner's `get_id_tag()`).
    pub job_id: String,
    /// Resubmission attempt; when given it becomes part of the Job name (`...-a<attempt>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Shell command line, run as `<shell> -c <command_line>`.
    pub command_line: String,
    /// The shell that runs the command line (Galaxy's `job_wrapper.shell`; default `/bin/bash`).
    /// Must be one of the worker's `policy_allowed_shells`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Working directory of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<String>,
    /// Container image: a full reference or its parts.
    pub image: ImageRef,
    /// CPU request: integer n = n CPUs, float x = (1000·x)m, string passes through, 0 = unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_cpu: Option<ResourceValue>,
    /// Memory request: integer n = nG, float x = (1000·x)M, string passes through, 0 = unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_memory: Option<ResourceValue>,
    /// CPU limit, same forms as `requests_cpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits_cpu: Option<ResourceValue>,
    /// Memory limit, same forms as `requests_memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits_memory: Option<ResourceValue>,
    /// Walltime in seconds (capped by the worker's `k8s_walltime_limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub walltime_seconds: Option<u64>,
    /// Pod retrials allowed before the job fails (the Job's backoffLimit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pod_retrials: Option<u32>,
    /// Galaxy 26's name for `max_pod_retrials` (either may be given; both must then agree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pod_retries: Option<u32>,
    /// Environment variables of the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Galaxy destination id; the container is named after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_id: Option<String>,
    /// Node selector (each pair must be allowed by `policy_allowed_node_selectors`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations, added to the worker's (each taint key must be in `policy_allowed_tolerations`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<super::placement::Toleration>,
    /// Priority class (overrides `k8s_pod_priority_class`; must be in `policy_allowed_priority_classes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class: Option<String>,
    /// runAsUser (overrides `k8s_run_as_user_id`; never 0 = root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<i64>,
    /// runAsGroup (overrides `k8s_run_as_group_id`; never 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_group: Option<i64>,
    /// fsGroup (overrides `k8s_fs_group_id`; must be in `policy_allowed_run_as_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_group: Option<i64>,
    /// supplementalGroups (override `k8s_supplemental_group_id`; each must be in
    /// `policy_allowed_run_as_ids`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supplemental_groups: Vec<i64>,
    /// Image pull policy (overrides `k8s_pull_policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<super::job::PullPolicy>,
    /// Pod affinity, as the pod spec writes it (overrides `k8s_affinity`; only when
    /// `policy_allow_affinity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<BTreeMap<String, serde_json::Value>>")]
    pub affinity: Option<serde_json::Value>,
    /// Extended resources by name and count, e.g. `{"nvidia.com/gpu": 1}`: the container's
    /// limits (and so its requests); each must be in `policy_allowed_extended_resources`, within
    /// its most.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extended_resources: BTreeMap<String, u64>,
    /// PVC mounts `claim[/subpath]:/mount/path[:r]` (each must be admitted by
    /// `policy_allowed_pvcs`: its claim, or its claim and a sub-path under an allowed one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Extra labels on the Job and its pods (a domain-prefixed key needs its prefix in
    /// `policy_allowed_metadata_prefixes`; the worker's and Kubernetes' keys are refused).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the Job and its pods (same rule as `labels`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The Galaxy job handler that sent it (`server_name`): its job's events are routed to
    /// it, `<instance>.<handler>.<state>` (see [`crate::naming::routing_word`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// An interactive tool's entry points: the worker makes a Service and an Ingress for them,
    /// owned by the Job (see [`crate::interactive`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interactive: Option<super::interactive::Interactive>,
}

/// A container image, as one reference or as Galaxy's destination parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ImageRef {
    /// A complete reference such as `quay.io/biocontainers/samtools:1.17`.
    Reference(String),
    /// `repo/owner/image:tag`, each part optional but `image`.
    Parts {
        /// Registry or repository prefix.
        #[serde(default)]
        repo: Option<String>,
        /// Owner or organisation.
        #[serde(default)]
        owner: Option<String>,
        /// Image name.
        image: String,
        /// Tag.
        #[serde(default)]
        tag: Option<String>,
    },
}

impl JobRequest {
    /// The shell the command line runs with.
    pub fn shell(&self) -> &str {
        self.shell.as_deref().unwrap_or(DEFAULT_SHELL)
    }

    /// Pod retrials the request asks for, under either name.
    pub fn pod_retrials(&self) -> Option<u32> {
        self.max_pod_retries.or(self.max_pod_retrials)
    }
}

/// The shell a request runs with when it names none (the runner's).
pub const DEFAULT_SHELL: &str = "/bin/bash";

impl ImageRef {
    /// The image reference as the runner assembled it: `repo/owner/image:tag`.
    pub fn reference(&self) -> String {
        match self {
            ImageRef::Reference(r) => r.clone(),
            ImageRef::Parts { repo, owner, image, tag } => {
                let mut out = String::new();
                for part in [repo, owner].into_iter().flatten().filter(|p| !p.is_empty()) {
                    out.push_str(part);
                    out.push('/');
                }
                out.push_str(image);
                if let Some(tag) = tag.as_deref().filter(|t| !t.is_empty()) {
                    out.push(':');
                    out.push_str(tag);
                }
                out
            }
        }
    }
}

/// One environment variable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    /// Variable name (a C identifier).
    pub name: String,
    /// Value.
    pub value: String,
}

/// What a control message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    /// Stop the job (or keep it from starting) and report `cancelled`.
    Cancel,
    /// Republish the job's current state (Pulsar's status poll).
    Status,
}

/// A message on the cancel/control queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobControl {
    /// Must be `k8s-job-worker/job-cancel/v1`.
    pub schema: String,
    /// Galaxy's job id.
    pub job_id: String,
    /// Attempt of the request to act on, when requests carry one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The action; `cancel` when absent.
    #[serde(default = "default_action")]
    pub action: ControlAction,
    /// Why, for the `cancelled` event's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The Galaxy job handler that asks: the answer is routed to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
}

fn default_action() -> ControlAction {
    ControlAction::Cancel
}

/// Best effort: the job id of a message that failed to parse, so a `failed` event can name it.
pub fn readable_job_id(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let id = value.get("job_id")?;
    let id = match id {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    (!id.is_empty() && id.len() <= MAX_JOB_ID && !id.chars().any(char::is_control)).then_some(id)
}

/// Best effort: the handler of a message that failed to parse (its answer is routed to it).
pub fn readable_handler(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let handler = value.get("handler")?.as_str()?;
    check_handler(handler).ok().map(|()| handler.to_string())
}

/// Best effort: the attempt of a message that failed to parse (it names the Job).
pub fn readable_attempt(body: &[u8]) -> Option<u32> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    u32::try_from(value.get("attempt")?.as_u64()?).ok()
}

/// Parses a request body; every way it can be wrong becomes a [`ValidationError`].
/// Whether `name` is an extended resource's: `<domain>/<name>`, not one of Kubernetes' own.
fn extended_resource(name: &str) -> bool {
    let Some((domain, rest)) = name.split_once('/') else { return false };
    let word =
        |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) && s.len() <= 63;
    domain.contains('.') && !domain.ends_with("kubernetes.io") && domain.split('.').all(word) && word(rest)
}

pub fn parse_request(body: &[u8], max_bytes: usize) -> Result<JobRequest, ValidationError> {
    if body.len() > max_bytes {
        return Err(ValidationError::TooLarge { size: body.len(), max: max_bytes });
    }
    let request: JobRequest = serde_json::from_slice(body).map_err(|e| ValidationError::Malformed(e.to_string()))?;
    if request.schema != REQUEST_SCHEMA {
        return Err(ValidationError::Schema(format!("schema is {:?}, expected {REQUEST_SCHEMA:?}", request.schema)));
    }
    check_job_id(&request.job_id)?;
    if let Some(handler) = &request.handler {
        check_handler(handler)?;
    }
    if request.command_line.trim().is_empty() {
        return Err(ValidationError::invalid("command_line", "is empty"));
    }
    if let (Some(a), Some(b)) = (request.max_pod_retrials, request.max_pod_retries) {
        if a != b {
            return Err(ValidationError::invalid(
                "max_pod_retries",
                format!("max_pod_retries ({b}) and max_pod_retrials ({a}) disagree"),
            ));
        }
    }
    if let Some(shell) = &request.shell {
        if !shell.starts_with('/') || shell.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ValidationError::invalid("shell", format!("{shell:?} is not an absolute path")));
        }
    }
    if request.command_line.len() > MAX_COMMAND_LINE {
        return Err(ValidationError::invalid("command_line", "is longer than 256 KiB"));
    }
    let image = request.image.reference();
    if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ValidationError::invalid("image", format!("{image:?} is not an image reference")));
    }
    if let Some(dir) = &request.working_directory {
        if !dir.starts_with('/') {
            return Err(ValidationError::invalid("working_directory", "must be an absolute path"));
        }
    }
    if request.affinity.as_ref().is_some_and(|a| !a.is_object()) {
        return Err(ValidationError::invalid("affinity", "must be an object, as the pod spec writes it"));
    }
    if let Some((name, _)) =
        request.extended_resources.iter().find(|(name, count)| !extended_resource(name) || **count == 0)
    {
        return Err(ValidationError::invalid(
            "extended_resources",
            format!(
                "{name:?}: an extended resource is a domain-prefixed name (nvidia.com/gpu) and a count of at least 1"
            ),
        ));
    }
    for var in &request.env {
        let ok = !var.name.is_empty()
            && !var.name.starts_with(|c: char| c.is_ascii_digit())
            && var.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(ValidationError::invalid("env", format!("{:?} is not a variable name", var.name)));
        }
    }
    if let Some(interactive) = &request.interactive {
        super::interactive::validate(interactive)?;
    }
    for volume in &request.volumes {
        super::placement::parse_pvc_mount(volume).map_err(|why| ValidationError::invalid("volumes", why))?;
    }
    if request.run_as_user.is_some_and(|u| u <= 0) || request.run_as_group.is_some_and(|g| g <= 0) {
        return Err(ValidationError::invalid("run_as_user", "must be a positive id (never root)"));
    }
    for (key, value) in request.labels.iter().chain(&request.node_selector) {
        super::naming::check_label(key, value).map_err(|why| ValidationError::invalid("labels", why))?;
    }
    for key in request.annotations.keys() {
        super::naming::check_label_key(key).map_err(|why| ValidationError::invalid("annotations", why))?;
    }
    Ok(request)
}

/// A message on the control queue.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlMessage {
    /// A cancel or status request from Galaxy.
    Control(JobControl),
    /// A worker's resubmission intent.
    Resubmit(JobResubmit),
}

/// Parses a message of the control queue, by its schema.
pub fn parse_control_message(body: &[u8], max_bytes: usize) -> Result<ControlMessage, ValidationError> {
    #[derive(Deserialize)]
    struct Schema {
        schema: Option<String>,
    }
    if body.len() > max_bytes {
        return Err(ValidationError::TooLarge { size: body.len(), max: max_bytes });
    }
    let is_resubmit =
        serde_json::from_slice::<Schema>(body).ok().and_then(|s| s.schema).as_deref() == Some(RESUBMIT_SCHEMA);
    if is_resubmit {
        let intent = parse_intent(body)?;
        check_job_id(&intent.job_id)?;
        return Ok(ControlMessage::Resubmit(intent));
    }
    parse_control(body, max_bytes).map(ControlMessage::Control)
}

/// Parses a cancel or status message.
pub fn parse_control(body: &[u8], max_bytes: usize) -> Result<JobControl, ValidationError> {
    if body.len() > max_bytes {
        return Err(ValidationError::TooLarge { size: body.len(), max: max_bytes });
    }
    let control: JobControl = serde_json::from_slice(body).map_err(|e| ValidationError::Malformed(e.to_string()))?;
    if control.schema != CONTROL_SCHEMA {
        return Err(ValidationError::Schema(format!("schema is {:?}, expected {CONTROL_SCHEMA:?}", control.schema)));
    }
    check_job_id(&control.job_id)?;
    if let Some(handler) = &control.handler {
        check_handler(handler)?;
    }
    let mut control = control;
    if let Some(reason) = control.reason.as_mut().filter(|r| r.len() > MAX_REASON) {
        let mut end = MAX_REASON - '…'.len_utf8();
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    Ok(control)
}

/// Longest accepted handler name.
pub const MAX_HANDLER: usize = 255;

fn check_handler(handler: &str) -> Result<(), ValidationError> {
    if handler.is_empty() || handler.len() > MAX_HANDLER || handler.chars().any(char::is_control) {
        return Err(ValidationError::invalid("handler", "must be 1-255 printable characters"));
    }
    Ok(())
}

fn check_job_id(id: &str) -> Result<(), ValidationError> {
    if id.is_empty() || id.len() > MAX_JOB_ID || id.chars().any(char::is_control) {
        return Err(ValidationError::invalid("job_id", "must be 1-253 printable characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<JobRequest, ValidationError> {
        parse_request(&serde_json::to_vec(&v).unwrap(), 1 << 20)
    }

    fn base() -> serde_json::Value {
        json!({"schema": REQUEST_SCHEMA, "job_id": "1", "command_line": "true", "image": "busybox"})
    }

    #[test]
    fn issue25_an_affinity_is_an_object_and_an_extended_resource_a_prefixed_name_and_count() {
        let with = |field: &str, value: serde_json::Value| {
            let mut v = base();
            v[field] = value;
            parse(v)
        };
        assert!(with("affinity", json!({"nodeAffinity": {}})).is_ok());
        assert!(with("affinity", json!("nodeAffinity")).is_err());
        assert!(with("extended_resources", json!({"nvidia.com/gpu": 1})).is_ok());
        for bad in [
            json!({"gpu": 1}),
            json!({"nvidia.com/gpu": 0}),
            json!({"kubernetes.io/cpu": 1}),
            json!({"nvidia.com/": 1}),
        ] {
            assert!(with("extended_resources", bad.clone()).is_err(), "{bad}");
        }
        assert!(with("pull_policy", json!("Always")).is_ok());
        assert!(with("pull_policy", json!("Sometimes")).is_err());
    }

    #[test]
    fn image_parts_are_assembled_like_the_runner() {
        let parts = |v| serde_json::from_value::<ImageRef>(v).unwrap().reference();
        assert_eq!(
            parts(json!({"repo": "quay.io", "owner": "bio", "image": "samtools", "tag": "1.17"})),
            "quay.io/bio/samtools:1.17"
        );
        assert_eq!(parts(json!({"image": "busybox"})), "busybox");
        assert_eq!(parts(json!({"owner": "galaxy", "image": "tool"})), "galaxy/tool");
        assert_eq!(parts(json!("docker.io/library/busybox:1")), "docker.io/library/busybox:1");
    }

    #[test]
    fn every_kind_of_bad_request_is_named() {
        assert!(matches!(parse_request(b"nope", 100), Err(ValidationError::Malformed(_))));
        assert!(matches!(parse_request(&[b' '; 200], 100), Err(ValidationError::TooLarge { .. })));
        let mut v = base();
        v["schema"] = json!("other/v2");
        assert!(matches!(parse(v), Err(ValidationError::Schema(_))));
        for (field, value) in [
            ("command_line", json!("   ")),
            ("job_id", json!("")),
            ("image", json!("has space")),
            ("working_directory", json!("relative/dir")),
            ("shell", json!("bash")),
            ("env", json!([{"name": "1BAD", "value": "x"}])),
            ("labels", json!({"k": "bad value"})),
            ("annotations", json!({"/x": "y"})),
        ] {
            let mut v = base();
            v[field] = value;
            let err = parse(v).unwrap_err();
            assert!(matches!(err, ValidationError::Invalid { .. }), "{field}: {err}");
        }
        let mut v = base();
        v["securityContext"] = json!({"privileged": true});
        assert!(matches!(parse(v), Err(ValidationError::Malformed(m)) if m.contains("unknown field")));
    }

    #[test]
    fn galaxy_26_names_the_retrials_max_pod_retries() {
        let mut v = base();
        v["max_pod_retries"] = json!(2);
        assert_eq!(parse(v.clone()).unwrap().pod_retrials(), Some(2));
        v["max_pod_retrials"] = json!(2);
        assert_eq!(parse(v.clone()).unwrap().pod_retrials(), Some(2));
        v["max_pod_retrials"] = json!(5);
        assert!(matches!(parse(v), Err(ValidationError::Invalid { field: "max_pod_retries", .. })));
        assert_eq!(parse(base()).unwrap().shell(), "/bin/bash");
    }

    #[test]
    fn item6_a_huge_cancel_reason_is_cut_not_refused() {
        let body = json!({"schema": CONTROL_SCHEMA, "job_id": "1", "reason": "é".repeat(150_000)});
        let control = parse_control(&serde_json::to_vec(&body).unwrap(), 1 << 20).unwrap();
        let reason = control.reason.unwrap();
        assert!(reason.len() <= MAX_REASON && reason.ends_with('…'), "{}", reason.len());
    }

    #[test]
    fn item3_control_messages_are_told_apart_by_schema() {
        let cancel = json!({"schema": CONTROL_SCHEMA, "job_id": "1"});
        assert!(matches!(
            parse_control_message(&serde_json::to_vec(&cancel).unwrap(), 1 << 20),
            Ok(ControlMessage::Control(_))
        ));
        let job = crate::outcome::JobMeta {
            name: "galaxy-main-1".into(),
            uid: "u1".into(),
            job_id: "1".into(),
            ..Default::default()
        };
        let intent = crate::intent::JobResubmit::sealed(b"k", &job, 1);
        let Ok(ControlMessage::Resubmit(r)) = parse_control_message(&serde_json::to_vec(&intent).unwrap(), 1 << 20)
        else {
            panic!("a resubmission intent")
        };
        assert_eq!((r.job_name.as_str(), r.replaces_uid.as_str()), ("galaxy-main-1", "u1"));
        assert!(parse_control_message(b"{\"schema\": \"other\"}", 1 << 20).is_err());
    }

    #[test]
    fn job_ids_are_recovered_from_broken_messages() {
        assert_eq!(readable_job_id(br#"{"job_id": "12", "junk": true}"#).as_deref(), Some("12"));
        assert_eq!(readable_job_id(br#"{"job_id": 12}"#).as_deref(), Some("12"));
        assert_eq!(readable_job_id(b"not json"), None);
        assert_eq!(readable_job_id(br#"{"job_id": ""}"#), None);
    }
}
