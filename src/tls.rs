//! Process-wide TLS setup. Several dependencies enable different rustls crypto backends, so
//! rustls cannot pick one by itself; every entry point installs ring before any client exists.

/// Installs ring as the default rustls crypto provider (a no-op when one is installed).
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
