//! The ReplayJob controller, in the EventPublisher's style:
//!
//! ```text
//!  ReplayJob + its EventPublisher ──validate──▶ ValidatedReplay ──build──▶ batch/v1 Job
//!                                   (pure; a missing publisher    (pure)     │ created once
//!                                    is a condition, not a crash)            ▼ (SSA, owner ref)
//!  status ◀── compute (pure) ◀── Job state + replay Pod: /api/v1/status over the Pod IP,
//!                                 then its termination message
//! ```
//!
//! The operator never touches the publisher's database or broker: the Job's Pod mounts the
//! publisher's Secrets and does the work; the operator learns the counts from the Pod.
//! Deleting a running ReplayJob cancels it: the finalizer deletes the Job in the foreground
//! (its Pod goes first) and the status says Cancelled until the ReplayJob is gone.

pub mod build;
pub mod reconcile;
pub mod status;
pub mod validate;

pub use reconcile::run;
