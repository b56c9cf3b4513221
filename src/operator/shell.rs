//! The reconcile shell both controllers share: a malformed object becomes an error of its
//! kind instead of breaking the watch, a span names the object, and the finalizer routes each
//! round to the kind's apply or cleanup steps.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use k8s_openapi::NamespaceResourceScope;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event, finalizer};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

/// The two failures the shell itself reports, as variants of each kind's error enum.
pub trait ShellError: std::error::Error + Send + Sized + 'static {
    /// The object could not be read as its kind.
    fn invalid_object(reason: String) -> Self;
    /// Adding or removing the finalizer failed.
    fn finalizer(reason: String) -> Self;
}

/// Whether the API server refused a write because the namespace is being deleted. The
/// namespace controller deletes an owner's children first, which wakes the owner; its writes
/// are then refused until it is deleted itself, which starts its cleanup. Both kinds wait for
/// that quietly instead of counting a failed reconcile.
pub fn refused_for_terminating_namespace(error: &kube::Error) -> bool {
    let kube::Error::Api(status) = error else {
        return false;
    };
    status.code == 403
        && status
            .details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
}

/// How long a reconcile refused for a terminating namespace waits before it looks again. The
/// object's own deletion (which bumps its generation) wakes it through the watch long before.
pub const TERMINATING_RECHECK: Duration = Duration::from_secs(60);

/// Namespaces whose writes the API server refused as terminating, with when this operator
/// saw it. Until the objects there get their own deletion, a reconcile of one of them writes
/// nothing: a thousand publishers retrying their children every few seconds made ~175
/// refused writes a second, which kept the API server from the namespace controller and held
/// a namespace deletion for four minutes.
#[derive(Debug, Default)]
pub struct TerminatingNamespaces(Mutex<HashMap<String, Timestamp>>);

impl TerminatingNamespaces {
    /// Entries older than this are dropped (namespaces gone long ago).
    const KEEP: Duration = Duration::from_secs(3600);

    /// Remembers that `namespace` refused a write as terminating.
    pub fn refused(&self, namespace: &str) {
        let now = Timestamp::now();
        if let Ok(mut refused) = self.0.lock() {
            refused.retain(|_, since| now.duration_since(*since).unsigned_abs() < Self::KEEP);
            refused.entry(namespace.to_owned()).or_insert(now);
        }
    }

    /// Whether an object created at `created` in `namespace` should wait for its deletion
    /// instead of writing. An object created after the refusal lives in a namespace deleted and
    /// made again under the same name: it goes ahead, and the entry is forgotten.
    pub fn holds(&self, namespace: &str, created: Option<&Time>) -> bool {
        let Ok(mut refused) = self.0.lock() else {
            return false;
        };
        let Some(since) = refused.get(namespace).copied() else {
            return false;
        };
        if created.is_some_and(|created| created.0 > since) {
            refused.remove(namespace);
            return false;
        }
        true
    }
}

/// Runs `apply` (the object lives) or `cleanup` (it is being deleted; returning `Ok` releases
/// `finalizer_name`) for one round of one object.
pub async fn finalized<K, E, A, AFut, C, CFut>(
    obj: &DeserializeGuard<K>,
    client: &kube::Client,
    finalizer_name: &str,
    apply: A,
    cleanup: C,
) -> Result<Action, E>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
    E: ShellError,
    A: FnOnce(Arc<K>) -> AFut,
    AFut: Future<Output = Result<Action, E>>,
    C: FnOnce(Arc<K>) -> CFut,
    CFut: Future<Output = Result<Action, E>>,
{
    let object = match &obj.0 {
        Ok(object) => object,
        Err(invalid) => {
            tracing::warn!(kind = %K::kind(&()), name = ?invalid.metadata.name, error = %invalid.error, "malformed object skipped");
            return Err(E::invalid_object(invalid.error.clone()));
        }
    };
    let namespace = object.namespace().unwrap_or_default();
    let span = tracing::info_span!(
        "reconcile",
        kind = %K::kind(&()),
        namespace = namespace.as_str(),
        name = object.name_any()
    );
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    finalizer(&api, finalizer_name, Arc::new(object.clone()), |event| async move {
        match event {
            Event::Apply(o) => apply(o).await,
            Event::Cleanup(o) => cleanup(o).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => E::finalizer(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset_secs: i64) -> Time {
        Time(Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(offset_secs))
    }

    #[test]
    fn objects_older_than_the_refusal_wait_and_a_namespace_made_again_goes_ahead() {
        let terminating = TerminatingNamespaces::default();
        assert!(!terminating.holds("shop", Some(&at(-60))));
        terminating.refused("shop");
        assert!(terminating.holds("shop", Some(&at(-60))));
        assert!(terminating.holds("shop", None));
        assert!(!terminating.holds("other", Some(&at(-60))));
        // Created after the refusal: the namespace was deleted and created again.
        assert!(!terminating.holds("shop", Some(&at(60))));
        assert!(!terminating.holds("shop", Some(&at(-60))), "the entry is forgotten");
    }
}
