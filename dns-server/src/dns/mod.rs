//! Authoritative DNS for every namespace, answered from registry snapshots.
//!
//! PLACEHOLDER on main while the DNS implementation is developed on its own branch: it binds
//! and holds the sockets but answers nothing. Replaced by the real module at merge.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use shared::NamespaceName;
use tokio_util::sync::CancellationToken;

use crate::snapshot::NamespaceSnapshot;

/// DNS settings.
#[derive(Debug, Clone, Default)]
pub struct DnsConfig {
    /// Zone suffix.
    pub domain_suffix: Option<String>,
    /// Addresses of the NS host.
    pub ns_addresses: Vec<IpAddr>,
}

/// DNS errors.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {}

/// Zones.
pub struct Catalog;

impl Catalog {
    /// New catalog.
    pub fn new(_config: DnsConfig) -> Result<Self, DnsError> {
        Ok(Catalog)
    }
    /// Update a zone.
    pub fn update(&self, _snap: &NamespaceSnapshot) {}
    /// Remove a zone.
    pub fn remove(&self, _ns: &NamespaceName) {}
}

/// Binds UDP sockets.
pub fn bind_udp(addr: SocketAddr, _n: usize) -> std::io::Result<Vec<tokio::net::UdpSocket>> {
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    Ok(vec![tokio::net::UdpSocket::from_std(s)?])
}

/// Serves until shutdown.
pub async fn serve(
    _udp: Vec<tokio::net::UdpSocket>,
    _tcp: Vec<tokio::net::TcpListener>,
    _catalog: Arc<Catalog>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    shutdown.cancelled().await;
    Ok(())
}

/// Zone file.
pub fn export_zone(_snap: &NamespaceSnapshot, _config: &DnsConfig) -> String {
    String::new()
}
