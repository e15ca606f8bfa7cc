//! Which replica reports Job outcomes: the holder of one Lease per instance.
//!
//! Every replica consumes requests and cancels and watches every Job; only the Lease holder
//! publishes `running` and terminal events. The Lease is renewed every `duration / 3` with a
//! resourceVersion precondition; a replica that has not renewed within `duration` by its own
//! clock stops reporting at once, so a frozen (SIGSTOPped) leader is fenced off locally when
//! it resumes, before anything else. That clock is `CLOCK_BOOTTIME`, which (unlike the
//! monotonic clock) keeps counting while the machine or VM is suspended: a suspended leader is
//! fenced too. Another replica takes over after observing
//! the Lease unchanged for `duration`. Nothing here knows the rest of the worker: it takes the
//! Lease API, its settings, the [`Leadership`] it updates and the shutdown signal.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::shutdown::Shutdown;

/// A point on the clock that counts suspension (`CLOCK_BOOTTIME`): time since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instant(Duration);

impl Instant {
    /// Now.
    pub fn now() -> Instant {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Instant(Duration::new(u64::try_from(t.tv_sec).unwrap_or(0), u32::try_from(t.tv_nsec).unwrap_or(0)))
    }

    /// How long after `earlier` this is (zero if before).
    pub fn duration_since(self, earlier: Instant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::ops::Add<Duration> for Instant {
    type Output = Instant;

    fn add(self, d: Duration) -> Instant {
        Instant(self.0 + d)
    }
}

/// Local view of leadership.
pub struct Leadership {
    /// Deadline of the current term by the local monotonic clock; `None` when not leader.
    valid_until: std::sync::Mutex<Option<Instant>>,
    changes: watch::Sender<bool>,
    /// The Lease's uid as last read: the key the replicas seal their intents with (only those
    /// who may read the Lease know it; Galaxy does not).
    lease_uid: std::sync::Mutex<Option<String>>,
    /// The acquire time of the Lease this replica holds or last held: the same term while it
    /// only renews, a new one after anyone took it over.
    term: std::sync::Mutex<Option<String>>,
    /// The namespace is being deleted: its Lease is gone and cannot be made again, so nobody
    /// reports any more.
    namespace_terminating: std::sync::atomic::AtomicBool,
}

impl Default for Leadership {
    fn default() -> Self {
        Leadership {
            valid_until: std::sync::Mutex::new(None),
            changes: watch::Sender::new(false),
            lease_uid: std::sync::Mutex::new(None),
            term: std::sync::Mutex::new(None),
            namespace_terminating: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Leadership {
    /// Whether this replica may report right now.
    pub fn is_leader(&self) -> bool {
        self.is_leader_at(Instant::now())
    }

    fn is_leader_at(&self, now: Instant) -> bool {
        let valid = self.valid_until.lock().map(|v| v.is_some_and(|t| now < t)).unwrap_or(false);
        if !valid && *self.changes.borrow() {
            self.changes.send_replace(false);
        }
        valid
    }

    /// The key intents are sealed with: the reporting Lease's uid, once this replica read it.
    pub fn sealing_key(&self) -> Option<Vec<u8>> {
        self.lease_uid.lock().ok()?.as_ref().map(|uid| uid.as_bytes().to_vec())
    }

    /// Remembers the uid of the Lease as read or written.
    fn saw(&self, lease: &Lease) {
        if let (Some(uid), Ok(mut known)) = (lease.metadata.uid.as_ref(), self.lease_uid.lock()) {
            if known.as_ref() != Some(uid) {
                *known = Some(uid.clone());
            }
        }
    }

    /// The term of the Lease this replica holds or last held (its acquire time). A replica
    /// that reports again in the term it had — its renewal came late, nobody took the Lease in
    /// between — knows nothing was reported by anyone else meanwhile.
    pub fn term(&self) -> Option<String> {
        self.term.lock().ok()?.clone()
    }

    /// Whether the namespace is being deleted (the Lease cannot be made again): nobody
    /// reports, and Jobs the worker's finalizer holds are to be let go by any replica.
    pub fn namespace_terminating(&self) -> bool {
        self.namespace_terminating.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Holds `lease` until `until`: records its term, then starts or continues the term.
    fn hold(&self, lease: &Lease, until: Instant) {
        let acquired = lease.spec.as_ref().and_then(|s| s.acquire_time.as_ref()).map(|t| t.0.to_string());
        if let Ok(mut term) = self.term.lock() {
            *term = acquired;
        }
        self.set(Some(until));
    }

    /// Watches leadership changes.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

    /// Starts (`Some(deadline)`) or ends (`None`) a term.
    fn set(&self, until: Option<Instant>) {
        if let Ok(mut v) = self.valid_until.lock() {
            *v = until;
        }
        let leader = until.is_some();
        if *self.changes.borrow() != leader {
            self.changes.send_replace(leader);
        }
    }
}

/// The Lease of one instance and who campaigns for it.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name (`<prefix>-<instance>-reporter`).
    pub name: String,
    /// This replica's id (the holder identity).
    pub holder: String,
    /// How long a term lasts without renewal.
    pub duration: Duration,
}

/// What to do with the Lease as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// There is none: create it, holding it.
    Create,
    /// It is ours: renew it, keeping the acquire time.
    Renew,
    /// It was released or went stale: take it over (one more transition).
    TakeOver,
    /// Another replica holds it and renews it.
    Wait,
}

/// Decides the step for the Lease as read. `observed` remembers the resourceVersion of
/// another holder's Lease and when this replica first saw it: only a Lease unchanged for a
/// whole `duration` by this replica's own clock is stale.
fn decide(
    lease: Option<(&LeaseSpec, &str)>,
    me: &str,
    duration: Duration,
    observed: &mut Option<(String, Instant)>,
    now: Instant,
) -> Step {
    let Some((spec, version)) = lease else { return Step::Create };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == me {
        return Step::Renew;
    }
    if holder.is_empty() {
        return Step::TakeOver;
    }
    match observed {
        Some((seen, since)) if seen == version => {
            if now.duration_since(*since) >= duration {
                Step::TakeOver
            } else {
                Step::Wait
            }
        }
        _ => {
            *observed = Some((version.to_string(), now));
            Step::Wait
        }
    }
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

fn spec(me: &str, duration: Duration, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(duration.as_secs() as i32),
        acquire_time: Some(acquired.unwrap_or_else(now_micro)),
        renew_time: Some(now_micro()),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// Campaigns for and renews the Lease until shutdown, then releases it.
pub async fn run(leases: Api<Lease>, config: LeaseConfig, leadership: Arc<Leadership>, stop: Shutdown) {
    let duration = config.duration.max(Duration::from_secs(3));
    let mut observed: Option<(String, Instant)> = None;
    let mut held: Option<Lease> = None; // our Lease as last written: renewing needs no GET
    loop {
        let started = Instant::now();
        if let Some(lease) = held.take() {
            match renew(&leases, &config.name, lease).await {
                Ok(lease) => {
                    leadership.saw(&lease);
                    leadership.hold(&lease, started + duration);
                    held = Some(lease);
                    if stop.sleep_or_stop(duration / 3).await {
                        break;
                    }
                    continue;
                }
                Err(err) => tracing::debug!(%err, lease = config.name, "renewal failed; re-reading the lease"),
            }
        }
        match try_acquire(&leases, &config, duration, &mut observed, &mut held, &leadership).await {
            Ok(true) => {
                if let Some(lease) = &held {
                    leadership.hold(lease, started + duration);
                }
            }
            Ok(false) => leadership.set(None),
            // Keep the term only while it is still valid by our clock (is_leader checks). What
            // was observed of another holder's Lease is forgotten: once the apiserver answers
            // again, its holder gets a whole `duration` to renew before anyone takes over (a
            // takeover would repeat the outcomes the holder told but could not record during
            // the outage; found in a chaos run).
            Err(err) => {
                observed = None;
                let terminating =
                    matches!(&err, kube::Error::Api(e) if e.code == 403 && e.message.contains("being terminated"));
                if terminating && !leadership.namespace_terminating.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(lease = config.name, "the namespace is being deleted: nobody reports any more");
                }
                tracing::debug!(%err, lease = config.name, "lease renewal failed");
            }
        }
        if stop.sleep_or_stop(duration / 3).await {
            break;
        }
    }
    if leadership.is_leader() {
        release(&leases, &config.name, &config.holder).await;
    }
    leadership.set(None);
}

/// Renews a Lease we hold with one PUT (the resourceVersion makes it fail if anyone else wrote).
async fn renew(leases: &Api<Lease>, name: &str, mut lease: Lease) -> kube::Result<Lease> {
    if let Some(spec) = lease.spec.as_mut() {
        spec.renew_time = Some(now_micro());
    }
    leases.replace(name, &PostParams::default(), &lease).await
}

/// Reads the Lease and takes the step [`decide`] chooses; whether we hold it now.
async fn try_acquire(
    leases: &Api<Lease>,
    config: &LeaseConfig,
    duration: Duration,
    observed: &mut Option<(String, Instant)>,
    held: &mut Option<Lease>,
    leadership: &Leadership,
) -> kube::Result<bool> {
    let (name, me) = (config.name.as_str(), config.holder.as_str());
    let current = leases.get_opt(name).await?;
    if let Some(lease) = &current {
        leadership.saw(lease);
    }
    let read = current
        .as_ref()
        .map(|l| (l.spec.clone().unwrap_or_default(), l.metadata.resource_version.clone().unwrap_or_default()));
    let step = decide(read.as_ref().map(|(s, v)| (s, v.as_str())), me, duration, observed, Instant::now());
    let written = match (step, current) {
        (Step::Wait, _) => return Ok(false),
        (Step::Create, _) | (_, None) => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(name.to_string()), ..ObjectMeta::default() },
                spec: Some(spec(me, duration, 0, None)),
            };
            leases.create(&PostParams::default(), &lease).await
        }
        (step, Some(mut lease)) => {
            let old = lease.spec.clone().unwrap_or_default();
            let transitions = old.lease_transitions.unwrap_or(0);
            lease.spec = Some(match step {
                Step::Renew => spec(me, duration, transitions, old.acquire_time),
                _ => spec(me, duration, transitions + 1, None),
            });
            leases.replace(name, &PostParams::default(), &lease).await
        }
    };
    match written {
        Ok(lease) => {
            leadership.saw(&lease);
            if step != Step::Renew {
                let previous = read.and_then(|(s, _)| s.holder_identity).unwrap_or_default();
                tracing::info!(lease = name, previous, "became the reporting replica");
            }
            *held = Some(lease);
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up on shutdown so another replica takes over without waiting.
async fn release(leases: &Api<Lease>, name: &str, me: &str) {
    if let Ok(Some(mut lease)) = leases.get_opt(name).await {
        if lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(me) {
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = Some(String::new());
            }
            let _ = leases.replace(name, &PostParams::default(), &lease).await;
            tracing::info!(lease = name, "released the reporting lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: Duration = Duration::from_secs(15);

    fn held_by(holder: &str) -> LeaseSpec {
        LeaseSpec { holder_identity: Some(holder.into()), ..LeaseSpec::default() }
    }

    #[test]
    fn a_missing_lease_is_created_and_our_own_renewed() {
        let mut observed = None;
        assert_eq!(decide(None, "me", TERM, &mut observed, Instant::now()), Step::Create);
        assert_eq!(decide(Some((&held_by("me"), "7")), "me", TERM, &mut observed, Instant::now()), Step::Renew);
        assert_eq!(decide(Some((&held_by(""), "7")), "me", TERM, &mut observed, Instant::now()), Step::TakeOver);
    }

    #[test]
    fn another_holder_is_stale_only_after_a_whole_term_unchanged_by_our_clock() {
        let t0 = Instant::now();
        let mut observed = None;
        let other = held_by("other");
        assert_eq!(decide(Some((&other, "7")), "me", TERM, &mut observed, t0), Step::Wait);
        assert_eq!(decide(Some((&other, "7")), "me", TERM, &mut observed, t0 + TERM / 2), Step::Wait);
        // A renewal (new resourceVersion) starts the count again.
        assert_eq!(decide(Some((&other, "8")), "me", TERM, &mut observed, t0 + TERM), Step::Wait);
        assert_eq!(decide(Some((&other, "8")), "me", TERM, &mut observed, t0 + TERM + TERM / 2), Step::Wait);
        assert_eq!(decide(Some((&other, "8")), "me", TERM, &mut observed, t0 + 2 * TERM), Step::TakeOver);
    }

    #[test]
    fn the_fencing_clock_counts_suspension() {
        // CLOCK_BOOTTIME = CLOCK_MONOTONIC + the time spent suspended: never behind it.
        let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let boot = Instant::now();
        assert!(boot.0.as_secs() >= u64::try_from(mono.tv_sec).unwrap());
        let later = Instant::now();
        assert!(later >= boot && later.duration_since(boot) < Duration::from_secs(1));
    }

    #[test]
    fn a_term_ends_by_the_local_clock_and_the_watch_hears_of_it() {
        let l = Leadership::default();
        let mut changes = l.subscribe();
        let t0 = Instant::now();
        l.set(Some(t0 + TERM));
        assert!(changes.has_changed().unwrap() && *changes.borrow_and_update());
        assert!(l.is_leader_at(t0 + TERM / 2));
        assert!(!l.is_leader_at(t0 + TERM), "fenced when the term runs out, renewed or not");
        assert!(changes.has_changed().unwrap() && !*changes.borrow_and_update());
        l.set(None);
        assert!(!changes.has_changed().unwrap(), "no change, no notification");
    }
}
