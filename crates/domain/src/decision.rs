//! The decisions taken on a Job's outcome — stop it, resubmit it, report it, clean it up —
//! as pure functions of the outcome and the worker's rules. The tracker only carries them out.

use std::{str::FromStr, time::Duration};

use crate::{
    outcome::{JobMeta, Outcome},
    state::JobState,
    FormatError,
};

/// When a finished Job is deleted (`k8s_cleanup_job`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CleanupPolicy {
    /// Delete every finished Job once its terminal event is confirmed.
    #[default]
    Always,
    /// Delete only succeeded Jobs; keep failed ones for inspection.
    Onsuccess,
    /// Keep every Job.
    Never,
}

impl FromStr for CleanupPolicy {
    type Err = FormatError;

    fn from_str(text: &str) -> Result<Self, FormatError> {
        match text {
            "always" => Ok(CleanupPolicy::Always),
            "onsuccess" => Ok(CleanupPolicy::Onsuccess),
            "never" => Ok(CleanupPolicy::Never),
            _ => Err(FormatError::new(text, "one of always, onsuccess, never")),
        }
    }
}

/// What the submit path did with an existing or new Job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    /// A new Job was created.
    Created,
    /// An existing Job of the same request was adopted.
    Adopted,
    /// An untrusted or outdated Job was deleted and created anew.
    Replaced,
    /// A cancel came first: the request is not started.
    AlreadyCancelled,
    /// Its Job was cancelled since: the reporter tells Galaxy, once; nothing to answer here.
    BeingCancelled,
    /// The same request already ran to its end: its recorded outcome answers it.
    AlreadyFinished,
}

impl JobAction {
    /// The label in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            JobAction::Created => "created",
            JobAction::Adopted => "adopted",
            JobAction::Replaced => "replaced",
            JobAction::AlreadyCancelled => "already_cancelled",
            JobAction::BeingCancelled => "being_cancelled",
            JobAction::AlreadyFinished => "already_finished",
        }
    }
}

/// The worker's rules for what follows an outcome (from its settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// When finished Jobs are deleted.
    pub cleanup: CleanupPolicy,
    /// Resubmit preempted / node-lost jobs after this delay instead of reporting them.
    pub resubmit_preempted_after: Option<Duration>,
    /// Resubmissions after preemption before the job is reported.
    pub max_resubmissions: u32,
    /// How long a cancelled (stopped) Job stays before it is deleted: longer than a watch's
    /// re-list after an apiserver restart, so every replica sees the cancel mark.
    pub cancelled_grace: Duration,
    /// How long a Job the cleanup policy removes is kept as a record of its outcome (so a
    /// repeated request is answered, never run again); `None`: deleted outright.
    pub record_for: Option<Duration>,
    /// How long after a finished Job is reported its pods (or, deleted outright, the Job) are
    /// deleted: longer than the job controller's caches can lag after an apiserver restart.
    /// A job controller (before Kubernetes 1.26's pod tracking) that has not yet seen its
    /// Job complete, and then sees its pods go, starts the tool again.
    pub pods_grace: Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            cleanup: CleanupPolicy::Always,
            resubmit_preempted_after: None,
            max_resubmissions: 3,
            cancelled_grace: Duration::from_secs(15),
            record_for: Some(Duration::from_secs(86_400)),
            pods_grace: Duration::from_secs(60),
        }
    }
}

/// What becomes of a Job once the event about it is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// Nothing: it goes on, or another replica deals with it.
    Keep,
    /// Mark it reported, then delete it and its pods at once (it never started: waiting
    /// could let it start).
    Delete,
    /// Mark it reported now, delete it and its pods after this delay ([`Rules::pods_grace`];
    /// its TTL says the same, so Kubernetes deletes it even when no worker is left to).
    MarkThenDeleteAfter(Duration),
    /// Keep it as it is, marked reported (a restarted worker does not report it again).
    MarkReported,
    /// Turn it into a record of its outcome: the Job object stays, out of the tracker's
    /// watch, until the record expires; its pods go [`Rules::pods_grace`] later. A Job someone
    /// else is deleting is let go, and a record is created under its name once it went.
    Record,
    /// Mark it reported now, [`Cleanup::Record`] after this delay.
    MarkThenRecordAfter(Duration),
    /// It is gone already (deleted by its TTL, or by someone else): create a record of its
    /// outcome under its name.
    CreateRecord,
    /// Someone else is deleting it: mark it reported and let it go (no records are kept).
    Release,
}

/// Where a Job object stands when its report is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// It is there.
    Here,
    /// Someone else is deleting it (it goes once nothing holds it).
    Deleting,
    /// It is gone.
    Gone,
}

impl Presence {
    /// Where the Job of `meta` stands; `exists`: its object was there at the last sight.
    pub fn of(exists: bool, meta: &JobMeta) -> Self {
        match (exists, meta.deleting) {
            (false, _) => Presence::Gone,
            (true, true) => Presence::Deleting,
            (true, false) => Presence::Here,
        }
    }
}

/// What to do about one report, in order: stop the Job making pods, resubmit it later, or
/// claim the outcome on the Job, publish the event and then clean up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Stop the Job from making more pods first (a retry is pointless or harmful).
    pub stop: bool,
    /// Run it again as a new Job after this delay instead of reporting it.
    pub resubmit_after: Option<Duration>,
    /// Claim the outcome on the Job before publishing it: one write, conditional on the Job
    /// being as classified, that a cancel racing the report cannot pass (nor the claim a
    /// cancel that came first), and that holds the Job with the worker's finalizer until the
    /// event is out (seconds): no one can remove it from under its report.
    pub claim: bool,
    /// Publish the event.
    pub publish: bool,
    /// After the publish is confirmed.
    pub cleanup: Cleanup,
}

/// Decides what follows a Job reaching `outcome`. `presence`: where the Job object stands;
/// `resubmissions`: how often it was resubmitted after preemption already.
pub fn plan(outcome: &Outcome, presence: Presence, resubmissions: u32, rules: &Rules) -> Plan {
    let state = outcome.state;
    let record = rules.record_for.is_some();
    if state == JobState::Cancelled {
        // The cancel mark is the claim; its event is published here, once, and marked. The Job
        // is stopped already; it becomes a record only after a grace: removing it at once could
        // let a replica whose watch is re-listing miss the cancel mark and report `lost`.
        let grace = rules.cancelled_grace;
        let cleanup = match (presence, record) {
            (Presence::Here, true) => Cleanup::MarkThenRecordAfter(grace),
            (Presence::Here, false) => Cleanup::MarkThenDeleteAfter(grace),
            (Presence::Deleting, true) => Cleanup::Record,
            (Presence::Deleting, false) => Cleanup::Release,
            (Presence::Gone, true) => Cleanup::CreateRecord,
            (Presence::Gone, false) => Cleanup::Keep,
        };
        return Plan { stop: false, resubmit_after: None, claim: false, publish: true, cleanup };
    }
    // These states end a Job that would otherwise go on (one being deleted goes anyway).
    let exists = presence == Presence::Here;
    let stop = exists && matches!(state, JobState::OomKilled | JobState::Preempted | JobState::NodeLost);
    let preempted = matches!(state, JobState::Preempted | JobState::NodeLost);
    if let (true, true, Some(delay)) = (preempted, exists, rules.resubmit_preempted_after) {
        if resubmissions < rules.max_resubmissions {
            // Not the tool's fault: run it again later instead of reporting it.
            return Plan { stop, resubmit_after: Some(delay), claim: false, publish: false, cleanup: Cleanup::Keep };
        }
    }
    // A Job that cannot start is removed whatever the cleanup policy: it would wait forever,
    // or start the tool once nothing stops it any more, after Galaxy heard it failed.
    let cannot_start = outcome.never_started || matches!(state, JobState::Unschedulable | JobState::ImagePullFailed);
    let removed = cannot_start
        || matches!(
            (rules.cleanup, state),
            (CleanupPolicy::Always, _) | (CleanupPolicy::Onsuccess, JobState::Succeeded)
        );
    let cleanup = match (state.is_terminal(), presence, removed, record) {
        (false, _, _, _) => Cleanup::Keep,
        (true, Presence::Gone, _, true) => Cleanup::CreateRecord,
        (true, Presence::Gone, _, false) => Cleanup::Keep,
        (true, Presence::Deleting, _, true) => Cleanup::Record,
        (true, Presence::Deleting, _, false) => Cleanup::Release,
        (true, Presence::Here, true, true) => Cleanup::Record,
        (true, Presence::Here, true, false) if cannot_start => Cleanup::Delete,
        (true, Presence::Here, true, false) => Cleanup::MarkThenDeleteAfter(rules.pods_grace),
        (true, Presence::Here, false, _) => Cleanup::MarkReported,
    };
    let claim = exists && state.is_terminal();
    Plan { stop, resubmit_after: None, claim, publish: true, cleanup }
}

/// Whether a report should be re-classified with its pods as they are now: the Job watch can
/// run ahead of the pod watch, and a failure must not be reported without its pods' reasons.
pub fn wants_fresh_pods(state: JobState, known_pods: usize) -> bool {
    state == JobState::Failed || (state.is_terminal() && known_pods == 0)
}

/// The event's reason, naming the resubmissions a job went through.
pub fn reason(outcome_reason: &str, resubmissions: u32) -> String {
    if resubmissions > 0 {
        format!("{outcome_reason} (after {resubmissions} resubmission(s))")
    } else {
        outcome_reason.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(cleanup: CleanupPolicy) -> Rules {
        Rules { cleanup, ..Rules::default() }
    }

    fn presence(exists: bool) -> Presence {
        if exists {
            Presence::Here
        } else {
            Presence::Gone
        }
    }

    fn plan(state: JobState, exists: bool, resubmissions: u32, rules: &Rules) -> Plan {
        super::plan(&Outcome::new(state, "", None), presence(exists), resubmissions, rules)
    }

    #[test]
    fn the_cleanup_policy_decides_what_goes() {
        let p = |state, cleanup| plan(state, true, 0, &Rules { record_for: None, ..rules(cleanup) }).cleanup;
        // A finished Job goes a grace after its report: a job controller that has not seen it
        // finish (stale caches after an apiserver restart) would start the tool again.
        let later = Cleanup::MarkThenDeleteAfter(Duration::from_secs(60));
        assert_eq!(p(JobState::Succeeded, CleanupPolicy::Always), later);
        assert_eq!(p(JobState::Failed, CleanupPolicy::Always), later);
        assert_eq!(p(JobState::Succeeded, CleanupPolicy::Onsuccess), later);
        assert_eq!(p(JobState::Failed, CleanupPolicy::Onsuccess), Cleanup::MarkReported);
        assert_eq!(p(JobState::Succeeded, CleanupPolicy::Never), Cleanup::MarkReported);
        assert_eq!(p(JobState::ImagePullFailed, CleanupPolicy::Never), Cleanup::Delete, "it would wait forever");
        assert_eq!(p(JobState::Unschedulable, CleanupPolicy::Never), Cleanup::Delete);
        assert_eq!(p(JobState::Running, CleanupPolicy::Always), Cleanup::Keep, "it goes on");
        let without_records = Rules { record_for: None, ..Rules::default() };
        assert_eq!(plan(JobState::Succeeded, false, 0, &without_records).cleanup, Cleanup::Keep, "already gone");
    }

    #[test]
    fn item5_what_the_policy_removes_is_kept_as_a_record_of_its_outcome() {
        let p = |state, exists, cleanup| plan(state, exists, 0, &rules(cleanup)).cleanup;
        assert_eq!(p(JobState::Succeeded, true, CleanupPolicy::Always), Cleanup::Record);
        assert_eq!(p(JobState::OomKilled, true, CleanupPolicy::Always), Cleanup::Record);
        assert_eq!(p(JobState::ImagePullFailed, true, CleanupPolicy::Never), Cleanup::Record);
        assert_eq!(p(JobState::Failed, true, CleanupPolicy::Onsuccess), Cleanup::MarkReported, "kept as it is");
        assert_eq!(p(JobState::Succeeded, false, CleanupPolicy::Always), Cleanup::CreateRecord, "gone by its TTL");
        assert_eq!(p(JobState::Lost, false, CleanupPolicy::Never), Cleanup::CreateRecord);
        assert_eq!(p(JobState::Running, true, CleanupPolicy::Always), Cleanup::Keep);
        let cancelled = plan(JobState::Cancelled, true, 0, &Rules::default()).cleanup;
        let later = Cleanup::MarkThenRecordAfter(Duration::from_secs(15));
        assert_eq!(cancelled, later, "a cancelled job never runs again either");
    }

    #[test]
    fn item5_a_job_someone_else_deletes_is_reported_let_go_and_recorded_once_gone() {
        let p = |state, rules: &Rules| super::plan(&Outcome::new(state, "", None), Presence::Deleting, 0, rules);
        let plan = p(JobState::Succeeded, &Rules::default());
        assert_eq!((plan.publish, plan.claim, plan.cleanup), (true, false, Cleanup::Record));
        assert_eq!(p(JobState::Lost, &Rules::default()).cleanup, Cleanup::Record);
        let no_records = Rules { record_for: None, ..Rules::default() };
        assert_eq!(p(JobState::Failed, &no_records).cleanup, Cleanup::Release);
        let resubmitting = Rules { resubmit_preempted_after: Some(Duration::from_secs(1)), ..Rules::default() };
        let preempted = p(JobState::Preempted, &resubmitting);
        assert_eq!((preempted.stop, preempted.resubmit_after), (false, None), "it goes: reported, not resubmitted");
        assert!(!p(JobState::OomKilled, &Rules::default()).stop);
    }

    #[test]
    fn item3_a_terminal_outcome_is_claimed_on_its_job_before_it_is_published() {
        let claim = |state, presence| super::plan(&Outcome::new(state, "", None), presence, 0, &Rules::default()).claim;
        assert!(claim(JobState::Succeeded, Presence::Here) && claim(JobState::OomKilled, Presence::Here));
        assert!(!claim(JobState::Running, Presence::Here), "only an outcome is claimed");
        assert!(!claim(JobState::Cancelled, Presence::Here), "the cancel mark is its claim");
        assert!(!claim(JobState::Succeeded, Presence::Deleting) && !claim(JobState::Lost, Presence::Gone));
    }

    #[test]
    fn presence_follows_the_deletion_mark() {
        let meta = |deleting| JobMeta { deleting, ..JobMeta::default() };
        assert_eq!(Presence::of(true, &meta(true)), Presence::Deleting);
        assert_eq!(Presence::of(true, &meta(false)), Presence::Here);
        assert_eq!(Presence::of(false, &meta(true)), Presence::Gone);
    }

    #[test]
    fn what_stops_a_job() {
        let stop = |state| plan(state, true, 0, &Rules::default()).stop;
        assert!(stop(JobState::OomKilled), "retrying with the same limit is pointless");
        assert!(stop(JobState::Preempted) && stop(JobState::NodeLost));
        assert!(!stop(JobState::Failed) && !stop(JobState::Running));
        assert!(!plan(JobState::OomKilled, false, 0, &Rules::default()).stop, "nothing left to stop");
    }

    #[test]
    fn preempted_jobs_are_resubmitted_within_the_budget() {
        let r =
            Rules { resubmit_preempted_after: Some(Duration::from_secs(30)), max_resubmissions: 2, ..Rules::default() };
        let first = plan(JobState::Preempted, true, 0, &r);
        assert_eq!((first.stop, first.resubmit_after, first.publish), (true, Some(Duration::from_secs(30)), false));
        let spent = plan(JobState::NodeLost, true, 2, &r);
        assert_eq!((spent.resubmit_after, spent.publish, spent.cleanup), (None, true, Cleanup::Record));
        assert!(plan(JobState::Preempted, true, 0, &Rules::default()).publish, "no delay: reported at once");
    }

    #[test]
    fn item3_a_cancel_is_published_by_the_reporter_once_marked_and_cleaned_up_later() {
        let p = plan(JobState::Cancelled, true, 0, &Rules { record_for: None, ..Rules::default() });
        assert_eq!((p.publish, p.cleanup), (true, Cleanup::MarkThenDeleteAfter(Duration::from_secs(15))));
        let gone = plan(JobState::Cancelled, false, 0, &Rules::default());
        assert_eq!((gone.publish, gone.cleanup), (true, Cleanup::CreateRecord), "deleted before it was reported");
    }

    #[test]
    fn pods_that_never_start_delete_the_job_whatever_the_policy() {
        let mut never = Outcome::new(JobState::Failed, "no pod was created for the Job in 120 s", None);
        let no_records = |policy| Rules { record_for: None, ..rules(policy) };
        assert_eq!(
            super::plan(&never, Presence::Here, 0, &no_records(CleanupPolicy::Never)).cleanup,
            Cleanup::MarkReported
        );
        never.never_started = true;
        let p = super::plan(&never, Presence::Here, 0, &no_records(CleanupPolicy::Never));
        assert_eq!((p.stop, p.publish, p.cleanup), (false, true, Cleanup::Delete), "it would start the tool later");
        let p = super::plan(&never, Presence::Here, 0, &rules(CleanupPolicy::Never));
        assert_eq!(p.cleanup, Cleanup::Record, "its pods go, its outcome stays");
        assert_eq!(
            super::plan(&never, Presence::Gone, 0, &no_records(CleanupPolicy::Never)).cleanup,
            Cleanup::Keep,
            "already gone"
        );
    }

    #[test]
    fn fresh_pods_for_failures_and_podless_ends() {
        assert!(wants_fresh_pods(JobState::Failed, 3));
        assert!(wants_fresh_pods(JobState::Succeeded, 0));
        assert!(!wants_fresh_pods(JobState::Succeeded, 1) && !wants_fresh_pods(JobState::Running, 0));
        assert_eq!(reason("preempted", 2), "preempted (after 2 resubmission(s))");
    }
}
