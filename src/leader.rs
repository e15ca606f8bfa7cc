//! Which replica reports Job outcomes: the holder of one Lease per instance.
//!
//! Every replica consumes requests and cancels and watches every Job; only the Lease holder
//! publishes `running` and terminal events. The Lease is renewed every `lease_seconds / 3`
//! with a resourceVersion precondition; a replica that has not renewed within
//! `lease_seconds` by its own monotonic clock stops reporting at once, so a frozen
//! (SIGSTOPped) leader is fenced off locally when it resumes, before anything else.
//! Another replica takes over after observing the Lease unchanged for `lease_seconds`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::context::Context;

/// Local view of leadership.
pub struct Leadership {
    /// Deadline of the current term by the local monotonic clock; `None` when not leader.
    valid_until: std::sync::Mutex<Option<Instant>>,
    changes: watch::Sender<bool>,
}

impl Default for Leadership {
    fn default() -> Self {
        Leadership { valid_until: std::sync::Mutex::new(None), changes: watch::Sender::new(false) }
    }
}

impl Leadership {
    /// Whether this replica may report right now.
    pub fn is_leader(&self) -> bool {
        let valid = self.valid_until.lock().map(|v| v.is_some_and(|t| Instant::now() < t)).unwrap_or(false);
        if !valid && *self.changes.borrow() {
            self.changes.send_replace(false);
        }
        valid
    }

    /// Watches leadership changes.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

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

/// Name of the Lease of an instance.
pub fn lease_name(prefix: &str, instance_id: Option<&str>) -> String {
    format!("{prefix}-{}-reporter", instance_id.unwrap_or("default"))
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// Campaigns for and renews the Lease until shutdown, then releases it.
pub async fn run(ctx: Arc<Context>) {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.settings.kube.k8s_namespace);
    let name = lease_name(&ctx.settings.kube.k8s_job_name_prefix, ctx.settings.instance_id());
    let duration = Duration::from_secs(ctx.settings.worker.lease_seconds.max(3));
    let mut observed: Option<(String, Instant)> = None; // (resourceVersion, when first seen)
    let mut held: Option<Lease> = None; // our Lease as last written: renewing needs no GET
    loop {
        let started = Instant::now();
        if let Some(lease) = held.take() {
            match renew(&leases, &name, lease).await {
                Ok(lease) => {
                    held = Some(lease);
                    ctx.leadership.set(Some(started + duration));
                    if ctx.shutdown.sleep_or_stop(duration / 3).await {
                        break;
                    }
                    continue;
                }
                Err(err) => tracing::debug!(%err, lease = name, "renewal failed; re-reading the lease"),
            }
        }
        match try_acquire(&ctx, &leases, &name, duration, &mut observed, &mut held).await {
            Ok(true) => ctx.leadership.set(Some(started + duration)),
            Ok(false) => ctx.leadership.set(None),
            Err(err) => {
                tracing::debug!(%err, lease = name, "lease renewal failed");
                // Keep the term only while it is still valid by our clock (is_leader checks).
            }
        }
        if ctx.shutdown.sleep_or_stop(duration / 3).await {
            break;
        }
    }
    if ctx.leadership.is_leader() {
        release(&leases, &name, &ctx.worker_id).await;
    }
    ctx.leadership.set(None);
}

/// Renews a Lease we hold with one PUT (the resourceVersion makes it fail if anyone else wrote).
async fn renew(leases: &Api<Lease>, name: &str, mut lease: Lease) -> kube::Result<Lease> {
    if let Some(spec) = lease.spec.as_mut() {
        spec.renew_time = Some(now_micro());
    }
    leases.replace(name, &PostParams::default(), &lease).await
}

async fn try_acquire(
    ctx: &Context,
    leases: &Api<Lease>,
    name: &str,
    duration: Duration,
    observed: &mut Option<(String, Instant)>,
    held: &mut Option<Lease>,
) -> kube::Result<bool> {
    let me = ctx.worker_id.as_str();
    let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(duration.as_secs() as i32),
        acquire_time: Some(acquired.unwrap_or_else(now_micro)),
        renew_time: Some(now_micro()),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let Some(mut lease) = leases.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(name.to_string()), ..ObjectMeta::default() },
            spec: Some(spec(0, None)),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(created) => {
                tracing::info!(lease = name, "became the reporting replica");
                *held = Some(created);
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let holder = current.holder_identity.clone().unwrap_or_default();
    let version = lease.metadata.resource_version.clone().unwrap_or_default();
    let transitions = current.lease_transitions.unwrap_or(0);
    if holder == me {
        lease.spec = Some(spec(transitions, current.acquire_time.clone()));
    } else {
        // Expired when released, or unchanged for a whole lease duration by our own clock.
        let released = holder.is_empty();
        let stale = match observed {
            Some((v, since)) if *v == version => since.elapsed() >= duration,
            _ => {
                *observed = Some((version.clone(), Instant::now()));
                false
            }
        };
        if !released && !stale {
            return Ok(false);
        }
        lease.spec = Some(spec(transitions + 1, None));
    }
    match leases.replace(name, &PostParams::default(), &lease).await {
        Ok(written) => {
            if holder != me {
                tracing::info!(lease = name, previous = holder, "took over as the reporting replica");
            }
            *held = Some(written);
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
