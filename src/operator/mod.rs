//! The operator's reconcile steps for `EventPublisher`, each in its own module:
//!
//! ```text
//!  EventPublisher ──validate──▶ ValidatedPublisher ──build──▶ Children (ConfigMap, Deployment,
//!   (raw spec)      (pure)      (typed, relay config)  (pure)   Service, PDB)
//!                                                                   │ apply (server-side)
//!  status ◀── conditions ◀── relay Pods' /api/v1/status + Deployment ◘
//! ```
//!
//! `validate` and `build` are pure and unit-tested; the raw spec is read only by `validate`.
//! The operator holds no tenant credentials: Secrets are referenced by name and mounted into
//! the Pods it builds, never read.

pub mod build;
pub mod conditions;
pub mod metrics;
pub mod process;
pub mod reconcile;
pub mod replayjob;
pub mod shell;
pub mod status;
pub mod validate;
