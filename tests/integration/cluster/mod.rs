//! The local cluster runs Pods for real: the scheduler binds them, the Deployment, ReplicaSet
//! and Job controllers compute status from what the node agent (hack/process-node) reports,
//! and every container is a local process.

mod jobs;
mod pods;
mod workloads;
