//! The Service and Ingress of an interactive Job ([`crate::domain::interactive`]): made once
//! its Job exists (they name it as their owner, so they go with it), and removed once its
//! outcome is out. It takes its own client and namespace.

use std::time::Duration;

use k8s_openapi::{
    api::{batch::v1::Job, core::v1::Service, networking::v1::Ingress},
    NamespaceResourceScope,
};
use kube::{
    api::{Api, DeleteParams, PostParams, Preconditions},
    Client, Resource, ResourceExt,
};
use serde::{de::DeserializeOwned, Serialize};

use super::{jobs::is_code, render};
use crate::{
    domain::{interactive::RoutePlan, keys::ANN_ROUTES, ValidationError},
    error::{Error, Result},
};

/// How often a name held by an older Job's object is freed and tried again.
const TRIES: usize = 20;

/// What a Service and an Ingress are to this module: namespaced objects it reads, makes and
/// deletes.
trait Routing:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug
{
}

impl<K> Routing for K where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug
{
}

/// The Services and Ingresses of one namespace.
pub struct Routes {
    services: Api<Service>,
    ingresses: Api<Ingress>,
}

/// Whether an object is owned by the Job with this uid.
fn owned_by(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|o| o.kind == "Job" && o.uid == uid)
}

/// The routes a Job's annotation carries, if it is an interactive one.
pub fn routes_of(job: &Job) -> Option<RoutePlan> {
    job.annotations().get(ANN_ROUTES).and_then(|a| RoutePlan::from_annotation(a))
}

impl Routes {
    /// The routes adapter for `namespace`.
    pub fn new(client: Client, namespace: &str) -> Self {
        Routes { services: Api::namespaced(client.clone(), namespace), ingresses: Api::namespaced(client, namespace) }
    }

    /// Makes sure the Service and Ingress of an interactive Job exist and are that Job's
    /// (an older Job's of the same name, on their way out with it, are deleted and made
    /// again). A Job without routes needs nothing.
    pub async fn ensure(&self, job: &Job) -> Result<()> {
        let Some(routes) = routes_of(job) else { return Ok(()) };
        let (service, ingress) = render::routes(job, &routes);
        ensure_one(&self.services, &service, job.uid().as_deref().unwrap_or_default()).await?;
        ensure_one(&self.ingresses, &ingress, job.uid().as_deref().unwrap_or_default()).await
    }

    /// Removes the Service and Ingress named `name` when they are the Job's with this uid.
    pub async fn remove(&self, name: &str, uid: &str) -> Result<()> {
        remove_one(&self.ingresses, name, uid).await?;
        remove_one(&self.services, name, uid).await
    }

    /// The Service named `name`, if any.
    pub async fn service(&self, name: &str) -> Result<Option<Service>> {
        self.services.get_opt(name).await.map_err(Error::kube("get"))
    }

    /// The Ingress named `name`, if any.
    pub async fn ingress(&self, name: &str) -> Result<Option<Ingress>> {
        self.ingresses.get_opt(name).await.map_err(Error::kube("get"))
    }
}

/// Creates `object` unless the Job with `uid` already has it; one of another owner is deleted
/// first (it belongs to a Job of the same name that is gone or going).
async fn ensure_one<K: Routing>(api: &Api<K>, object: &K, uid: &str) -> Result<()> {
    let name = object.name_any();
    for _ in 0..TRIES {
        match api.create(&PostParams::default(), object).await {
            Ok(_) => return Ok(()),
            Err(e) if is_code(&e, 409) => {}
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                let what = format!("the apiserver refused the {} {name}: {}", K::kind(&()), e.message);
                return Err(ValidationError::invalid("interactive", what).into());
            }
            Err(source) => return Err(Error::Kube { verb: "create", source }),
        }
        match api.get_opt(&name).await.map_err(Error::kube("get"))? {
            Some(existing) if owned_by(existing.meta(), uid) => return Ok(()),
            Some(existing) if existing.meta().deletion_timestamp.is_none() => delete_exactly(api, &existing).await?,
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    Err(Error::JobConflict(name))
}

/// Deletes the object `name` when the Job with `uid` owns it.
async fn remove_one<K: Routing>(api: &Api<K>, name: &str, uid: &str) -> Result<()> {
    let Some(existing) = api.get_opt(name).await.map_err(Error::kube("get"))? else { return Ok(()) };
    if !owned_by(existing.meta(), uid) {
        return Ok(());
    }
    delete_exactly(api, &existing).await
}

/// Deletes `existing` itself (its uid a precondition): gone already, or another object of its
/// name meanwhile, is done too.
async fn delete_exactly<K: Routing>(api: &Api<K>, existing: &K) -> Result<()> {
    let dp = DeleteParams {
        preconditions: Some(Preconditions { uid: existing.uid(), resource_version: None }),
        ..DeleteParams::default()
    };
    match api.delete(&existing.name_any(), &dp).await {
        Ok(_) => Ok(()),
        Err(e) if is_code(&e, 404) || is_code(&e, 409) => Ok(()),
        Err(source) => Err(Error::Kube { verb: "delete", source }),
    }
}
