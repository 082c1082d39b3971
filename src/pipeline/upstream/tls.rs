//! DNS over TLS to an upstream (RFC 7858): `tls://9.9.9.9:853#dns.quad9.net`.
//!
//! On a path dnsfence does not trust, an on-path attacker sees every UDP query and can answer
//! allowed names with its own address, which dnsfence would admit to the firewall; no ID or
//! port randomness helps against someone who sees the query. Over TLS the answer comes only
//! from whoever holds a certificate for the name after `#`, verified against the Mozilla roots
//! (webpki-roots, compiled in: the host's store is not read) plus, if the policy names one,
//! `upstream_tls_ca`. A wrong name or an untrusted certificate fails the handshake: the
//! question fails (SERVFAIL), nothing is admitted. The connection is the stream client's
//! ([`super::tcp`]): kept alive, pipelined, on a marked socket.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use super::socket;
use super::tcp::{Connecting, Dialer, Stream};

/// Opens TLS connections that must present a certificate for one name.
pub struct TlsDialer {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl TlsDialer {
    /// A dialer for `name`, trusting the webpki roots and the certificates in `ca_file`.
    pub fn new(name: &str, ca_file: Option<&Path>) -> Result<TlsDialer, String> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = ca_file {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|error| format!("{}: {error}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|error| format!("{}: {error}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no certificate in the file", path.display()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|error| format!("{}: {error}", path.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("TLS: {error}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(name.to_owned())
            .map_err(|error| format!("{name:?} is not a TLS server name: {error}"))?;
        Ok(TlsDialer {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }
}

impl Dialer for TlsDialer {
    fn dial(&self, upstream: SocketAddr, mark: u32) -> Connecting {
        let (connector, name) = (self.connector.clone(), self.name.clone());
        Box::pin(async move {
            let socket = socket::tcp(upstream, mark)?;
            let tcp = socket.connect(upstream).await?;
            let tls = connector.connect(name, tcp).await?;
            Ok(Box::new(tls) as Box<dyn Stream>)
        })
    }
}
