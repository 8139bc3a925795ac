//! TLS for the client listeners: the certificate and key loaded into a rustls server config,
//! and reloaded on SIGHUP without touching open sessions (each connection keeps the config it
//! was accepted with; new ones take the latest).
//!
//! Key type: [`TlsCerts`].

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ServerConfig,
};

/// The current TLS server config, shared by every shard's TLS listeners.
pub struct TlsCerts {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: Mutex<Arc<ServerConfig>>,
}

impl TlsCerts {
    /// Load the certificate chain and key; an error names the file and what is wrong with it.
    pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<TlsCerts> {
        let config = build(cert_file, key_file)?;
        Ok(TlsCerts {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: Mutex::new(config),
        })
    }

    /// The config new connections use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.lock().expect("not poisoned").clone()
    }

    /// Read both files again. On an error the old certificate stays in use.
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = build(&self.cert_file, &self.key_file)?;
        *self.current.lock().expect("not poisoned") = config;
        Ok(())
    }
}

fn build(cert_file: &Path, key_file: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .with_context(|| format!("reading tls.cert_file {}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing tls.cert_file {}", cert_file.display()))?;
    anyhow::ensure!(!certs.is_empty(), "tls.cert_file {} holds no certificate", cert_file.display());
    let key = PrivateKeyDer::from_pem_file(key_file)
        .with_context(|| format!("reading tls.key_file {} (a PEM private key)", key_file.display()))?;
    let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("tls protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("tls.cert_file and tls.key_file do not make a usable certificate")?;
    Ok(Arc::new(config))
}
