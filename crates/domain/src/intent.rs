//! The worker's own intents on the control queue: running a preempted job again as a new
//! Job. Galaxy can write to that queue too (anyone who may publish to the default exchange
//! can), so an intent carries no pod spec — only what names the job and the Job it replaces —
//! and the handler rebuilds the new Job from the kept one, after checking that the worker
//! itself marked that Job for this resubmission ([`judge`]). The one case where the kept Job
//! is gone (the worker stopped between retiring it and creating the next) is told from a
//! forgery by the intent's seal: an HMAC-SHA256 keyed with a value only the workers read.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ValidationError;

/// Schema identifier of a resubmission intent.
pub const RESUBMIT_SCHEMA: &str = "k8s-job-worker/job-resubmit/v1";

/// A worker's durable intent to run a preempted job again as a new Job of the same name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobResubmit {
    /// Always [`RESUBMIT_SCHEMA`].
    pub schema: String,
    /// Galaxy's job id.
    pub job_id: String,
    /// Attempt of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The Job's name (the same for the new generation).
    pub job_name: String,
    /// The request's fingerprint (a record made when the resubmission was interrupted keeps it).
    pub fingerprint: String,
    /// The uid of the Job it replaces.
    pub replaces_uid: String,
    /// Which resubmission this is (1 for the first).
    pub resubmission: u32,
    /// The Galaxy job handler the job's events go to, when its request named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// Hex HMAC-SHA256 of the fields above, keyed with the workers' sealing key.
    pub seal: String,
}

impl JobResubmit {
    /// A sealed intent.
    pub fn sealed(key: &[u8], job: &crate::outcome::JobMeta, resubmission: u32) -> Self {
        let mut intent = JobResubmit {
            schema: RESUBMIT_SCHEMA.to_string(),
            job_id: job.job_id.clone(),
            attempt: job.attempt,
            job_name: job.name.clone(),
            fingerprint: job.fingerprint.clone(),
            replaces_uid: job.uid.clone(),
            resubmission,
            handler: job.handler.clone(),
            seal: String::new(),
        };
        intent.seal = hex(&hmac_sha256(key, &intent.sealed_text()));
        intent
    }

    /// What the seal covers.
    fn sealed_text(&self) -> Vec<u8> {
        let fields =
            (&self.job_id, self.attempt, &self.job_name, &self.fingerprint, &self.replaces_uid, self.resubmission);
        serde_json::to_vec(&fields).unwrap_or_default()
    }

    /// Whether a worker holding `key` sealed it (compared in constant time).
    pub fn is_sealed_by(&self, key: &[u8]) -> bool {
        let expected = hex(&hmac_sha256(key, &self.sealed_text()));
        expected.len() == self.seal.len()
            && expected.bytes().zip(self.seal.bytes()).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
    }
}

/// Parses an intent; a message with any other field (a `job` spec, say) is refused.
pub fn parse_intent(body: &[u8]) -> Result<JobResubmit, ValidationError> {
    let intent: JobResubmit = serde_json::from_slice(body).map_err(|e| ValidationError::Malformed(e.to_string()))?;
    if intent.resubmission == 0 {
        return Err(ValidationError::invalid("resubmission", "must be at least 1"));
    }
    Ok(intent)
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the handler found under the intent's Job name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its uid.
    pub uid: String,
    /// Whether it carries the identity of the intent's job (see [`crate::ownership`]).
    pub owned: bool,
    /// The resubmission the worker marked it for (`k8s-job-worker/resubmit-due`), if any.
    pub due: Option<u32>,
    /// How often the job was resubmitted up to this Job.
    pub resubmissions: u32,
    /// Whether something else ended it: cancelled, replaced, reported, being deleted.
    pub ended: bool,
}

/// What to do with an intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Retire the Job found and create the next generation from it.
    Resubmit,
    /// Nothing: it was carried out already, or something else ended the job first.
    Done,
    /// The Job it replaces is gone and no new one was made (a worker stopped in between):
    /// the job's outcome is `preempted`, recorded under its name.
    Interrupted,
    /// A forgery, or an intent this worker does not carry out: dead-lettered with the reason.
    Refuse(String),
}

/// Decides what an intent leads to. `expected_name`: the name the worker gives the intent's
/// job; `allowed`: the most resubmissions the worker makes (`None`: it makes none);
/// `sealed`: whether the intent carries the workers' seal.
pub fn judge(
    intent: &JobResubmit,
    expected_name: &str,
    found: Option<&Found>,
    allowed: Option<u32>,
    sealed: bool,
) -> Verdict {
    if intent.job_name != expected_name {
        return Verdict::Refuse(format!(
            "job_name {:?} is not the name of job {:?} ({expected_name})",
            intent.job_name, intent.job_id
        ));
    }
    let Some(max) = allowed else {
        return Verdict::Refuse("this worker does not resubmit preempted jobs".into());
    };
    if intent.resubmission > max {
        return Verdict::Refuse(format!("resubmission {} is beyond the limit of {max}", intent.resubmission));
    }
    match found {
        Some(job) if job.uid == intent.replaces_uid => {
            if !job.owned {
                Verdict::Refuse(format!("the Job {} is not job {:?}'s", intent.job_name, intent.job_id))
            } else if job.ended {
                Verdict::Done // cancelled, reported or deleted meanwhile: its own path reports it
            } else if job.due == Some(intent.resubmission) {
                Verdict::Resubmit
            } else {
                Verdict::Refuse(format!(
                    "the worker did not mark Job {} for resubmission {}",
                    intent.job_name, intent.resubmission
                ))
            }
        }
        // Another Job under the name: the next generation made already (or a later one), or
        // something else came first (a cancel, a new request): nothing for this intent.
        Some(job) if job.owned && (job.resubmissions >= intent.resubmission || job.ended) => Verdict::Done,
        Some(_) => Verdict::Refuse(format!("Job {} is not the one this intent replaces", intent.job_name)),
        None if sealed => Verdict::Interrupted,
        None => Verdict::Refuse(format!(
            "no Job {} exists and the intent does not carry the workers' seal",
            intent.job_name
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent(key: &[u8]) -> JobResubmit {
        JobResubmit::sealed(key, &meta("3", "uid-1"), 1)
    }

    fn meta(job_id: &str, uid: &str) -> crate::outcome::JobMeta {
        crate::outcome::JobMeta {
            name: format!("galaxy-main-{job_id}"),
            uid: uid.into(),
            job_id: job_id.into(),
            fingerprint: "fp".into(),
            ..Default::default()
        }
    }

    fn found(uid: &str, due: Option<u32>) -> Found {
        Found { uid: uid.into(), owned: true, due, resubmissions: 0, ended: false }
    }

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        let long_key = [0xaa; 131]; // test case 6: a key longer than the block is hashed first
        let mac = hmac_sha256(&long_key, b"Test Using Larger Than Block-Size Key - Hash Key First");
        assert_eq!(hex(&mac), "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    }

    #[test]
    fn item1_an_intent_carries_no_pod_spec() {
        let forged = serde_json::json!({"schema": RESUBMIT_SCHEMA, "job_id": "3", "job_name": "galaxy-main-3",
            "fingerprint": "fp", "replaces_uid": "u", "resubmission": 1, "seal": "00",
            "job": {"spec": {"template": {"spec": {"containers": [{"securityContext": {"privileged": true}}]}}}}});
        let err = parse_intent(&serde_json::to_vec(&forged).unwrap()).unwrap_err();
        assert!(matches!(&err, ValidationError::Malformed(m) if m.contains("unknown field `job`")), "{err}");
        let sealed = intent(b"key");
        assert_eq!(parse_intent(&serde_json::to_vec(&sealed).unwrap()).unwrap(), sealed);
    }

    #[test]
    fn item1_the_seal_binds_every_field_to_the_key() {
        let sealed = intent(b"key");
        assert!(sealed.is_sealed_by(b"key"));
        assert!(!sealed.is_sealed_by(b"other key"));
        let mut changed = sealed.clone();
        changed.resubmission = 2;
        assert!(!changed.is_sealed_by(b"key"));
        let mut changed = sealed.clone();
        changed.job_id = "4".into();
        assert!(!changed.is_sealed_by(b"key"));
        let mut cut = sealed;
        cut.seal.pop();
        assert!(!cut.is_sealed_by(b"key"));
    }

    #[test]
    fn item1_only_a_job_the_worker_marked_is_resubmitted() {
        let i = intent(b"k");
        let judge = |found: Option<&Found>, sealed| judge(&i, "galaxy-main-3", found, Some(3), sealed);
        assert_eq!(judge(Some(&found("uid-1", Some(1))), false), Verdict::Resubmit, "the kept Job is the proof");
        assert!(matches!(judge(Some(&found("uid-1", None)), true), Verdict::Refuse(_)), "not marked by the worker");
        assert!(matches!(judge(Some(&found("uid-1", Some(2))), true), Verdict::Refuse(_)), "marked for another");
        let foreign = Found { owned: false, ..found("uid-1", Some(1)) };
        assert!(matches!(judge(Some(&foreign), true), Verdict::Refuse(_)));
        let ended = Found { ended: true, ..found("uid-1", Some(1)) };
        assert_eq!(judge(Some(&ended), false), Verdict::Done, "a cancel came first");
        let next = Found { resubmissions: 1, ..found("uid-2", None) };
        assert_eq!(judge(Some(&next), false), Verdict::Done, "carried out already");
        assert!(matches!(judge(Some(&found("uid-2", None)), true), Verdict::Refuse(_)), "someone else's generation");
        assert_eq!(judge(None, true), Verdict::Interrupted, "the kept Job went, the next was never made");
        assert!(matches!(judge(None, false), Verdict::Refuse(_)), "a forgery creates nothing");
    }

    #[test]
    fn item1_refused_whatever_is_found_when_the_worker_does_not_resubmit() {
        let i = intent(b"k");
        let marked = found("uid-1", Some(1));
        assert!(matches!(judge(&i, "galaxy-main-3", Some(&marked), None, true), Verdict::Refuse(_)));
        assert!(matches!(judge(&i, "galaxy-main-3", Some(&marked), Some(0), true), Verdict::Refuse(_)));
        assert!(
            matches!(judge(&i, "galaxy-other-3", Some(&marked), Some(3), true), Verdict::Refuse(_)),
            "a name not the job's"
        );
    }
}
