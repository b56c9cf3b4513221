//! TLS for the process and for its client connections. Several dependencies enable different
//! rustls crypto backends, so rustls cannot pick one by itself; every entry point installs
//! ring before any client exists. [`TlsFiles`] is the one shape of a broker connection's TLS
//! settings (Kafka, RabbitMQ): every certificate, key and password is a file, normally a
//! mounted Secret, never a value in the configuration document.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, ClientConnection, RootCertStore};
use serde::{Deserialize, Serialize};

/// Installs ring as the default rustls crypto provider (a no-op when one is installed).
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Client-side TLS towards a broker. The server's certificate is always verified (chain to a
/// trusted root, validity dates, host name) unless `insecureSkipVerify` says otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM file with the CA certificate(s) the server's certificate must chain to (e.g. a
    /// mounted Secret or ConfigMap). Without it the system's trusted roots are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM file with the client certificate (and its intermediates) for mutual TLS; needs
    /// `keyFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM file with the private key of `certFile` (PKCS#8; Kafka also reads PKCS#1 and
    /// encrypted keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// File holding the password of an encrypted `keyFile` (Kafka only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_password_file: Option<PathBuf>,
    /// Accept any server certificate: no chain, expiry or host name check. Only for
    /// throwaway test setups; the relay logs a warning when it connects this way.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// A TLS setting that cannot work; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TlsConfigError {
    #[error("tls.certFile and tls.keyFile go together: {missing} is missing")]
    HalfClientCertificate { missing: &'static str },
    #[error("tls.keyPasswordFile is set without tls.keyFile")]
    KeyPasswordWithoutKey,
    #[error("tls.insecureSkipVerify skips the check tls.caFile is for; set only one")]
    InsecureWithCa,
    #[error("tls.{field} is an empty path")]
    EmptyPath { field: &'static str },
}

/// A secret file that cannot be used. Never carries the file's contents.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("read {field} file {path}: {source}")]
    Read {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{field} file {path} is empty")]
    Empty { field: &'static str, path: PathBuf },
    #[error("{field} file {path} is not valid UTF-8")]
    NotUtf8 { field: &'static str, path: PathBuf },
}

impl TlsFiles {
    /// Checks the combination of settings without reading the files.
    pub fn validate(&self) -> Result<(), TlsConfigError> {
        for (field, path) in [
            ("caFile", &self.ca_file),
            ("certFile", &self.cert_file),
            ("keyFile", &self.key_file),
            ("keyPasswordFile", &self.key_password_file),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(TlsConfigError::EmptyPath { field });
            }
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => return Err(TlsConfigError::HalfClientCertificate { missing: "keyFile" }),
            (None, Some(_)) => return Err(TlsConfigError::HalfClientCertificate { missing: "certFile" }),
            _ => {}
        }
        if self.key_password_file.is_some() && self.key_file.is_none() {
            return Err(TlsConfigError::KeyPasswordWithoutKey);
        }
        if self.insecure_skip_verify && self.ca_file.is_some() {
            return Err(TlsConfigError::InsecureWithCa);
        }
        Ok(())
    }

    /// Logs the warning every insecure connection gets; `endpoint` names where it goes.
    pub fn warn_if_insecure(&self, endpoint: &str) {
        if self.insecure_skip_verify {
            tracing::warn!(
                endpoint,
                "tls.insecureSkipVerify is set: the server's certificate is NOT verified, so anyone on the path can impersonate it"
            );
        }
    }
}

/// Reads a one-value secret file (password, username, token): surrounding whitespace, such as
/// the trailing newline of `kubectl create secret --from-file`, is dropped.
pub fn read_secret_file(field: &'static str, path: &Path) -> Result<String, SecretFileError> {
    let bytes = std::fs::read(path).map_err(|source| SecretFileError::Read {
        field,
        path: path.into(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|_| SecretFileError::NotUtf8 {
        field,
        path: path.into(),
    })?;
    let value = text.trim();
    if value.is_empty() {
        return Err(SecretFileError::Empty {
            field,
            path: path.into(),
        });
    }
    Ok(value.to_owned())
}

/// How long [`diagnose_server_certificate`] waits for the TCP connection and the handshake.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Says why the certificate that `endpoint` (`host:port`) presents is not accepted with the
/// CA certificates in `ca_file`: expired, unknown issuer or a host name mismatch, in words.
/// `None` when it is accepted or the question cannot be answered (no connection, no TLS).
///
/// librdkafka reports every verification failure alike ("certificate verify failed"), so
/// the Kafka adapter asks this for the cause; it opens one short TLS handshake of its own.
/// Blocking: call it from `spawn_blocking`.
pub fn diagnose_server_certificate(endpoint: &str, ca_file: &Path) -> Option<String> {
    let (host, _port) = endpoint.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut roots = RootCertStore::empty();
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
        .ok()?
        .collect::<Result<_, _>>()
        .ok()?;
    let (added, _) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Some(format!("tls.caFile {} holds no CA certificate", ca_file.display()));
    }
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let mut connection = ClientConnection::new(Arc::new(config), name).ok()?;
    let address = endpoint.to_socket_addrs().ok()?.next()?;
    let mut socket = TcpStream::connect_timeout(&address, PROBE_TIMEOUT).ok()?;
    socket.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
    socket.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
    while connection.is_handshaking() {
        if let Err(error) = connection.complete_io(&mut socket) {
            let rustls_error = error.get_ref()?.downcast_ref::<rustls::Error>()?;
            return match rustls_error {
                rustls::Error::InvalidCertificate(cause) => Some(describe_certificate_error(
                    cause,
                    &format!("tls.caFile {}", ca_file.display()),
                )),
                _ => None,
            };
        }
    }
    // Accepted: say goodbye politely so the server logs no broken connection.
    connection.send_close_notify();
    let _ = connection.complete_io(&mut socket);
    let _ = socket.flush();
    let _ = socket.read(&mut [0u8; 1]);
    None
}

/// The certificate problem somewhere in `error`'s source chain, if any. TLS libraries hand
/// rustls' error up inside `std::io::Error`, whose `source()` skips the wrapped error itself,
/// so both links are followed.
pub fn certificate_error_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a CertificateError> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(rustls::Error::InvalidCertificate(cause)) = current.downcast_ref::<rustls::Error>() {
            return Some(cause);
        }
        next = match current.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    None
}

/// Says in words why a server certificate was refused; `trusted` names where the trusted CA
/// certificates came from (`tls.caFile /etc/...`).
pub fn describe_certificate_error(cause: &CertificateError, trusted: &str) -> String {
    match cause {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            format!("the server's certificate has expired ({cause})")
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            format!("the server's certificate is not valid yet ({cause})")
        }
        CertificateError::UnknownIssuer => {
            format!("the server's certificate is not signed by a CA in {trusted} (unknown issuer)")
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("host name mismatch: {cause}")
        }
        other => format!("the server's certificate is refused: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_certificate_and_key_go_together() {
        let cert_only = TlsFiles {
            cert_file: Some("c.pem".into()),
            ..TlsFiles::default()
        };
        assert_eq!(
            cert_only.validate(),
            Err(TlsConfigError::HalfClientCertificate { missing: "keyFile" })
        );
        let both = TlsFiles {
            key_file: Some("k.pem".into()),
            ..cert_only
        };
        assert_eq!(both.validate(), Ok(()));
    }

    #[test]
    fn insecure_and_a_ca_file_contradict_each_other() {
        let config = TlsFiles {
            ca_file: Some("ca.pem".into()),
            insecure_skip_verify: true,
            ..TlsFiles::default()
        };
        assert_eq!(config.validate(), Err(TlsConfigError::InsecureWithCa));
    }

    #[test]
    fn secret_files_lose_their_trailing_newline_and_errors_never_show_the_value() {
        let dir = std::env::temp_dir().join(format!("outbox-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(read_secret_file("saslPasswordFile", &file).unwrap(), "s3cret");
        std::fs::write(&file, " \n").unwrap();
        let err = read_secret_file("saslPasswordFile", &file).unwrap_err().to_string();
        assert!(err.contains("saslPasswordFile") && err.contains("is empty"), "{err}");
        let missing = read_secret_file("saslPasswordFile", &dir.join("absent")).unwrap_err();
        assert!(missing.to_string().contains("absent"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
