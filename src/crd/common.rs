//! Types both custom resources share: Secret references and object references.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// One key of a Secret in the resource's own namespace. The operator never reads it: the Pods
/// that need the value mount the Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace as the resource.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    /// Key within the Secret whose value is used.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A username/password pair in one Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsernamePasswordRef {
    /// Name of the Secret, in the same namespace as the resource.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    /// Key of the username.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub username_key: String,
    /// Key of the password.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// A static AWS access key pair in one Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsCredentialsRef {
    /// Name of the Secret, in the same namespace as the resource.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    /// Key of the access key id.
    #[serde(default = "default_access_key_id_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub access_key_id_key: String,
    /// Key of the secret access key.
    #[serde(default = "default_secret_access_key_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub secret_access_key_key: String,
}

fn default_access_key_id_key() -> String {
    "accessKeyId".into()
}
fn default_secret_access_key_key() -> String {
    "secretAccessKey".into()
}

/// A reference to another object of this API in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectRef {
    /// Name of the object, in the same namespace as the referring resource.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
}

/// TLS material from Secrets: the CA the server's certificate must chain to and an optional
/// client certificate. Each key is mounted as a file into the Pods that connect; the operator
/// never reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSecretRefs {
    /// Secret key holding the PEM CA bundle; the system's trusted roots when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Secret holding a client certificate and its key (mutual TLS), e.g. a
    /// `kubernetes.io/tls` Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_secret_ref: Option<TlsCertificateRef>,
    /// Accept any server certificate (no chain, expiry or host name check). For throwaway
    /// test setups only: the operator records a Warning Event and the relay logs a warning.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// A certificate and its private key (PEM) in one Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsCertificateRef {
    /// Name of the Secret, in the same namespace as the resource.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    /// Key of the PEM certificate (chain).
    #[serde(default = "default_cert_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub cert_key: String,
    /// Key of the PEM private key (PKCS#8 for RabbitMQ and PostgreSQL).
    #[serde(default = "default_key_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key_key: String,
}

fn default_cert_key() -> String {
    "tls.crt".into()
}
fn default_key_key() -> String {
    "tls.key".into()
}
