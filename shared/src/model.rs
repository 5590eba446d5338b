//! The registry's data model as it travels over the HTTP API: registrations, membranes as
//! the API shows them, namespaces and their settings, and the JSON error shape.
//!
//! Deserialisation validates: a [`Registration`] that parses is one the registry accepts
//! (call [`Registration::validate`] for the cross-field limits).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::name::{MembraneId, NamespaceName, ServiceName, Tag};

/// Upper bounds on a registration, so one client cannot bloat the registry or a DNS answer.
pub mod limits {
    /// Addresses per membrane.
    pub const MAX_ADDRESSES: usize = 16;
    /// Services per membrane.
    pub const MAX_SERVICES: usize = 32;
    /// Capabilities plus tags per membrane.
    pub const MAX_LABELS: usize = 64;
    /// Longest service name, capability or tag: DNS serves each as the label `_<name>`,
    /// which must fit in 63 bytes.
    pub const MAX_PREFIXED_LABEL: usize = 62;
    /// Metadata entries per membrane.
    pub const MAX_METADATA: usize = 64;
    /// `key=value` must fit one DNS character-string (255 bytes).
    pub const MAX_METADATA_ENTRY: usize = 255;
    /// Longest endpoint path or address.
    pub const MAX_ENDPOINT: usize = 1024;
    /// Instance TTL bounds, seconds.
    pub const TTL_RANGE: std::ops::RangeInclusive<u32> = 1..=86_400;
    /// Eviction delay bounds, seconds.
    pub const EVICTION_RANGE: std::ops::RangeInclusive<u32> = 0..=7 * 86_400;
}

/// Transport protocol of a service (`_svc._tcp` or `_svc._udp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `"tcp"` or `"udp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl std::str::FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(format!("protocol {s:?} must be tcp or udp")),
        }
    }
}

fn default_proto() -> Proto {
    Proto::Tcp
}

fn default_weight() -> u16 {
    10
}

/// One service a membrane offers, served as an SRV record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Service name (`perception` in `_perception._tcp.ns.`).
    pub name: ServiceName,
    /// Transport, default tcp.
    #[serde(default = "default_proto")]
    pub proto: Proto,
    /// Port, 1-65535.
    pub port: u16,
    /// SRV priority (lower is preferred), default 0.
    #[serde(default)]
    pub priority: u16,
    /// SRV weight, default 10.
    #[serde(default = "default_weight")]
    pub weight: u16,
}

impl std::str::FromStr for ServiceSpec {
    type Err = String;

    /// Parses the command-line form `NAME:PROTO:PORT[:PRIORITY:WEIGHT]`.
    ///
    /// ```
    /// use shared::model::{ServiceSpec, Proto};
    /// let s: ServiceSpec = "visual:tcp:7100".parse().unwrap();
    /// assert_eq!((s.proto, s.port, s.priority, s.weight), (Proto::Tcp, 7100, 0, 10));
    /// let s: ServiceSpec = "visual:udp:7100:1:50".parse().unwrap();
    /// assert_eq!((s.priority, s.weight), (1, 50));
    /// assert!("visual:tcp".parse::<ServiceSpec>().is_err());
    /// assert!("visual:tcp:0".parse::<ServiceSpec>().is_err());
    /// assert!("visual:sctp:80".parse::<ServiceSpec>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 3 && parts.len() != 5 {
            return Err(format!(
                "service {s:?} must be NAME:PROTO:PORT or NAME:PROTO:PORT:PRIORITY:WEIGHT"
            ));
        }
        let name = ServiceName::new(parts[0]).map_err(|e| e.to_string())?;
        let proto = parts[1].parse()?;
        let port: u16 = parts[2]
            .parse()
            .map_err(|_| format!("service {s:?}: port {:?} is not a number 1-65535", parts[2]))?;
        if port == 0 {
            return Err(format!("service {s:?}: port must be 1-65535"));
        }
        let (mut priority, mut weight) = (0, default_weight());
        if parts.len() == 5 {
            priority = parts[3]
                .parse()
                .map_err(|_| format!("service {s:?}: priority {:?} is not 0-65535", parts[3]))?;
            weight = parts[4]
                .parse()
                .map_err(|_| format!("service {s:?}: weight {:?} is not 0-65535", parts[4]))?;
        }
        Ok(ServiceSpec {
            name,
            proto,
            port,
            priority,
            weight,
        })
    }
}

/// How a membrane receives messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Endpoint {
    /// A Maildir under this root on a shared volume: `<path>/<ns>/<id>/{tmp,new,cur}`.
    SharedVolume {
        /// Root of the shared volume.
        path: String,
    },
    /// A Unix socket at this path.
    Ipc {
        /// Socket path.
        path: String,
    },
    /// A TCP listener at `host:port`.
    Tcp {
        /// `host:port`.
        address: String,
    },
}

impl Endpoint {
    /// `"shared-volume"`, `"ipc"` or `"tcp"`.
    pub fn mode(&self) -> &'static str {
        match self {
            Endpoint::SharedVolume { .. } => "shared-volume",
            Endpoint::Ipc { .. } => "ipc",
            Endpoint::Tcp { .. } => "tcp",
        }
    }
    /// The path or address.
    pub fn target(&self) -> &str {
        match self {
            Endpoint::SharedVolume { path } | Endpoint::Ipc { path } => path,
            Endpoint::Tcp { address } => address,
        }
    }
}

/// A membrane's metadata: string key/values, served as TXT `key=value`.
///
/// Kept as a vector sorted by key: registrations carry a handful of entries, and a
/// `BTreeMap` allocates a ~550-byte node even for one — at 100,000 membranes that is tens of
/// megabytes. Serialised as a JSON object; a key given twice is rejected.
///
/// ```
/// use shared::model::Metadata;
/// let mut m: Metadata = serde_json::from_str(r#"{"version":"1.2","zone":"a"}"#).unwrap();
/// assert_eq!(m.get("version").map(String::as_str), Some("1.2"));
/// m.insert("arch".into(), "x86".into());
/// assert_eq!(m.keys().collect::<Vec<_>>(), ["arch", "version", "zone"]);
/// assert!(serde_json::from_str::<Metadata>(r#"{"a":"1","a":"2"}"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata(Vec<(String, String)>);

impl Metadata {
    /// An empty map.
    pub fn new() -> Self {
        Metadata(Vec::new())
    }
    /// Inserts or replaces `key`; returns the previous value.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.0.binary_search_by(|(k, _)| k.as_str().cmp(&key)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }
    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
    /// Keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, String)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut m = Metadata::new();
        for (k, v) in iter {
            m.insert(k, v);
        }
        m.0.shrink_to_fit();
        m
    }
}

impl std::ops::Index<&str> for Metadata {
    type Output = String;
    /// Like `BTreeMap`'s: panics when `key` is absent.
    fn index(&self, key: &str) -> &String {
        self.get(key)
            .unwrap_or_else(|| panic!("no metadata key {key:?}"))
    }
}

impl From<BTreeMap<String, String>> for Metadata {
    fn from(map: BTreeMap<String, String>) -> Self {
        // Already sorted and unique.
        Metadata(map.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Metadata {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The entries of a metadata object, sorted by key; a key given twice is an error (a JSON
/// parser would silently keep the last one). Values of any deserializable type: strings
/// for [`Metadata`], any JSON for the registry's compatibility routes.
pub fn metadata_entries<'de, A, V>(mut a: A) -> Result<Vec<(String, V)>, A::Error>
where
    A: serde::de::MapAccess<'de>,
    V: Deserialize<'de>,
{
    let mut v: Vec<(String, V)> = Vec::with_capacity(a.size_hint().unwrap_or(0).min(64));
    while let Some(entry) = a.next_entry::<String, V>()? {
        v.push(entry);
    }
    v.sort_by(|x, y| x.0.cmp(&y.0));
    if let Some(w) = v.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(serde::de::Error::custom(format!(
            "metadata key {:?} given twice",
            w[0].0
        )));
    }
    Ok(v)
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Metadata;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of string values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<Metadata, A::Error> {
                let mut v = metadata_entries(a)?;
                v.shrink_to_fit();
                Ok(Metadata(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// A list without the spare capacity parsing leaves (a one-element `Vec` grows to room for
/// four): a server holds 100,000 registrations, which keep only what they need.
///
/// ```
/// use shared::model::Registration;
/// let r: Registration = serde_json::from_str(
///     r#"{"services":[{"name":"visual","port":7100}],"capabilities":["vision"]}"#).unwrap();
/// assert_eq!(r.services.capacity(), 1);
/// assert_eq!(r.capabilities.capacity(), 1);
/// ```
fn compact_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let mut v = Vec::<T>::deserialize(d)?;
    v.shrink_to_fit();
    Ok(v)
}

/// The body of `PUT /v1/namespaces/{ns}/membranes/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Parent membrane id in the hierarchy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<MembraneId>,
    /// IPv4 and IPv6 addresses, served as A/AAAA.
    #[serde(default, deserialize_with = "compact_vec")]
    pub addresses: Vec<IpAddr>,
    /// Offered services, served as SRV.
    #[serde(deserialize_with = "compact_vec")]
    pub services: Vec<ServiceSpec>,
    /// Capabilities (DNS-SD subtypes).
    #[serde(default, deserialize_with = "compact_vec")]
    pub capabilities: Vec<Tag>,
    /// Tags (DNS-SD subtypes).
    #[serde(default, deserialize_with = "compact_vec")]
    pub tags: Vec<Tag>,
    /// Free key/values, served as TXT `key=value`.
    #[serde(default)]
    pub metadata: Metadata,
    /// Message endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    /// Instance TTL in seconds; the namespace's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u32>,
    /// Seconds a stale membrane stays listed before removal; the namespace's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction_seconds: Option<u32>,
    /// The membrane's relay public key (Ed25519, 64 hex digits): receivers check the
    /// signature of each TCP message from this membrane with it ([`crate::relay_auth`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_public_key: Option<String>,
}

/// A registration that breaks a limit; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    /// The JSON field at fault (`services[2].port`, `metadata.version`, ...).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> InvalidField {
    InvalidField {
        field: field.into(),
        message: message.into(),
    }
}

impl Registration {
    /// Checks the limits that typing alone cannot express.
    ///
    /// ```
    /// use shared::model::Registration;
    /// let r: Registration = serde_json::from_str(
    ///     r#"{"services":[{"name":"visual","port":7100}],"metadata":{"version":"1.2"}}"#).unwrap();
    /// assert!(r.validate().is_ok());
    /// let r: Registration = serde_json::from_str(r#"{"services":[{"name":"v","port":0}]}"#).unwrap();
    /// assert_eq!(r.validate().unwrap_err().field, "services[0].port");
    /// ```
    pub fn validate(&self) -> Result<(), InvalidField> {
        use limits::*;
        if self.addresses.len() > MAX_ADDRESSES {
            return Err(invalid(
                "addresses",
                format!("at most {MAX_ADDRESSES} addresses"),
            ));
        }
        for (i, a) in self.addresses.iter().enumerate() {
            if a.is_unspecified() || a.is_multicast() {
                return Err(invalid(
                    format!("addresses[{i}]"),
                    format!("{a} is not a unicast address"),
                ));
            }
        }
        if self.services.len() > MAX_SERVICES {
            return Err(invalid(
                "services",
                format!("at most {MAX_SERVICES} services"),
            ));
        }
        for (i, s) in self.services.iter().enumerate() {
            if s.port == 0 {
                return Err(invalid(format!("services[{i}].port"), "must be 1-65535"));
            }
            if s.name.as_str().len() > MAX_PREFIXED_LABEL {
                return Err(invalid(
                    format!("services[{i}].name"),
                    format!(
                        "at most {MAX_PREFIXED_LABEL} characters (served as the DNS label _<name>)"
                    ),
                ));
            }
            if self.services[..i]
                .iter()
                .any(|o| o.name == s.name && o.proto == s.proto && o.port == s.port)
            {
                return Err(invalid(
                    format!("services[{i}]"),
                    format!(
                        "duplicate service {}/{}:{}",
                        s.name,
                        s.proto.as_str(),
                        s.port
                    ),
                ));
            }
        }
        if self.capabilities.len() + self.tags.len() > MAX_LABELS {
            return Err(invalid(
                "capabilities",
                format!("at most {MAX_LABELS} capabilities and tags together"),
            ));
        }
        for (field, labels) in [("capabilities", &self.capabilities), ("tags", &self.tags)] {
            if let Some(i) = labels
                .iter()
                .position(|l| l.as_str().len() > MAX_PREFIXED_LABEL)
            {
                return Err(invalid(
                    format!("{field}[{i}]"),
                    format!(
                        "at most {MAX_PREFIXED_LABEL} characters (served as the DNS label _<name>)"
                    ),
                ));
            }
        }
        if self.metadata.len() > MAX_METADATA {
            return Err(invalid(
                "metadata",
                format!("at most {MAX_METADATA} entries"),
            ));
        }
        for (k, v) in &self.metadata {
            let key_ok = !k.is_empty()
                && k.len() <= 63
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !key_ok {
                return Err(invalid(
                    format!("metadata.{k}"),
                    "keys are 1-63 characters of letters, digits, '-', '_' and '.'",
                ));
            }
            if k.len() + 1 + v.len() > MAX_METADATA_ENTRY {
                return Err(invalid(
                    format!("metadata.{k}"),
                    format!("key=value must fit in {MAX_METADATA_ENTRY} bytes"),
                ));
            }
            if v.chars().any(char::is_control) {
                return Err(invalid(
                    format!("metadata.{k}"),
                    "values must not contain control characters",
                ));
            }
        }
        if let Some(ep) = &self.endpoint {
            let t = ep.target();
            if t.is_empty() || t.len() > MAX_ENDPOINT || t.chars().any(char::is_control) {
                return Err(invalid(
                    "endpoint",
                    format!("path or address must be 1-{MAX_ENDPOINT} printable characters"),
                ));
            }
            match ep {
                Endpoint::SharedVolume { path } | Endpoint::Ipc { path }
                    if !path.starts_with('/') =>
                {
                    return Err(invalid("endpoint.path", "must be an absolute path"));
                }
                Endpoint::Tcp { address } if !address.contains(':') => {
                    return Err(invalid("endpoint.address", "must be HOST:PORT"));
                }
                _ => {}
            }
        }
        if let Some(ttl) = self.ttl_seconds
            && !TTL_RANGE.contains(&ttl)
        {
            return Err(invalid("ttl_seconds", "must be 1-86400"));
        }
        if let Some(ev) = self.eviction_seconds
            && !EVICTION_RANGE.contains(&ev)
        {
            return Err(invalid("eviction_seconds", "must be 0-604800"));
        }
        if let Some(k) = &self.relay_public_key
            && crate::relay_auth::from_hex(k).is_none_or(|_| k.len() != 64)
        {
            return Err(invalid(
                "relay_public_key",
                "must be an Ed25519 public key in 64 hex digits",
            ));
        }
        Ok(())
    }
}

/// Health of a registered membrane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Heartbeats arrive within the TTL; served in DNS.
    Passing,
    /// No heartbeat within the TTL; listed by the API, left out of DNS.
    Stale,
}

impl HealthState {
    /// `"passing"` or `"stale"`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Passing => "passing",
            HealthState::Stale => "stale",
        }
    }
}

/// A membrane as the API shows it: the registration plus identity, state and times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembraneView {
    /// Membrane id.
    pub id: MembraneId,
    /// Namespace.
    pub namespace: NamespaceName,
    /// The registration as sent.
    #[serde(flatten)]
    pub registration: Registration,
    /// passing or stale.
    pub state: HealthState,
    /// RFC 3339 time of the first registration.
    pub registered_at: String,
    /// RFC 3339 time of the last heartbeat (or registration).
    pub last_heartbeat: String,
}

/// Per-namespace timing settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceSettings {
    /// TTL of DNS records, seconds.
    pub record_ttl: u32,
    /// Negative-answer TTL (SOA minimum), seconds.
    pub negative_ttl: u32,
    /// Default instance TTL: stale after this long without a heartbeat, seconds.
    pub instance_ttl: u32,
    /// Default delay from stale to removal, seconds.
    pub eviction_delay: u32,
}

impl Default for NamespaceSettings {
    fn default() -> Self {
        NamespaceSettings {
            record_ttl: 5,
            negative_ttl: 5,
            instance_ttl: 30,
            eviction_delay: 300,
        }
    }
}

impl NamespaceSettings {
    /// Checks the bounds of each setting.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.record_ttl > 86_400 {
            return Err(invalid("settings.record_ttl", "must be 0-86400"));
        }
        if self.negative_ttl > 86_400 {
            return Err(invalid("settings.negative_ttl", "must be 0-86400"));
        }
        if !limits::TTL_RANGE.contains(&self.instance_ttl) {
            return Err(invalid("settings.instance_ttl", "must be 1-86400"));
        }
        if !limits::EVICTION_RANGE.contains(&self.eviction_delay) {
            return Err(invalid("settings.eviction_delay", "must be 0-604800"));
        }
        Ok(())
    }
}

/// The body of `POST /v1/namespaces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateNamespace {
    /// Namespace name.
    pub name: NamespaceName,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Timing settings; defaults when absent.
    #[serde(default)]
    pub settings: NamespaceSettings,
}

/// A namespace as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceView {
    /// Namespace name.
    pub name: NamespaceName,
    /// Free text.
    pub description: String,
    /// Timing settings.
    pub settings: NamespaceSettings,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// Registered membranes (passing and stale).
    pub membranes: usize,
    /// Passing membranes.
    pub passing: usize,
    /// The join token; only in the answer to create or rotate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token: Option<String>,
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The membrane as stored.
    pub membrane: MembraneView,
    /// Secret to send as `X-Membrane-Secret` with heartbeat, deregister and re-register.
    pub instance_secret: String,
    /// Whether this created the registration (false: updated an existing one).
    pub created: bool,
    /// The namespace's relay key (64 hex digits) for signing and checking relay messages
    /// ([`crate::relay_auth`]); absent when the registry runs without an admin token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_key: Option<String>,
}

/// The JSON error shape: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Inside [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Machine-readable code (`not_found`, `invalid_name`, ...).
    pub code: String,
    /// Human-readable message naming the problem.
    pub message: String,
}

/// One registry change, as sent on `GET /v1/namespaces/{ns}/events` (Server-Sent Events:
/// `id:` is the event sequence number, `event:` the variant's `type`, `data:` this JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A membrane was registered or its registration updated.
    Registered {
        /// The membrane as now stored.
        membrane: Box<MembraneView>,
    },
    /// A membrane was removed (deregistered, evicted, or its namespace deleted).
    Deregistered {
        /// Namespace.
        namespace: NamespaceName,
        /// Membrane id.
        id: MembraneId,
        /// `deregistered`, `evicted` or `namespace_deleted`.
        reason: String,
    },
    /// A membrane changed health state.
    StateChanged {
        /// Namespace.
        namespace: NamespaceName,
        /// Membrane id.
        id: MembraneId,
        /// New state.
        state: HealthState,
    },
    /// The events the client asked to resume from are gone: fetch the full list again.
    Resync {
        /// Namespace.
        namespace: NamespaceName,
    },
}

impl Event {
    /// The SSE `event:` name.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Registered { .. } => "registered",
            Event::Deregistered { .. } => "deregistered",
            Event::StateChanged { .. } => "state_changed",
            Event::Resync { .. } => "resync",
        }
    }
}

/// Header carrying the per-membrane secret.
pub const SECRET_HEADER: &str = "x-membrane-secret";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example_parses() {
        let body = r#"{"parent": "perception", "addresses": ["10.0.0.7"], "services": [{"name": "visual",
          "proto": "tcp", "port": 7100, "priority": 0, "weight": 10}], "capabilities": ["vision"],
          "tags": ["gpu"], "metadata": {"version": "1.2"}, "endpoint": {"mode": "shared-volume",
          "path": "/var/lib/membrane/shared"}, "ttl_seconds": 30}"#;
        let r: Registration = serde_json::from_str(body).unwrap();
        r.validate().unwrap();
        assert_eq!(r.parent.as_ref().unwrap().as_str(), "perception");
        assert_eq!(r.endpoint.as_ref().unwrap().mode(), "shared-volume");
        let back: Registration = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn unknown_fields_rejected() {
        let e = serde_json::from_str::<Registration>(r#"{"services":[],"bogus":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        assert!(
            serde_json::from_str::<Registration>(
                r#"{"services":[],"endpoint":{"mode":"ipc","path":"/x","extra":1}}"#
            )
            .is_err()
        );
        assert!(
            serde_json::from_str::<Registration>(r#"{"services":[{"name":"a","port":1,"x":2}]}"#)
                .is_err()
        );
    }

    #[test]
    fn services_required_and_typed() {
        assert!(serde_json::from_str::<Registration>("{}").is_err());
        assert!(
            serde_json::from_str::<Registration>(r#"{"services":[{"name":"a","port":"x"}]}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<Registration>(r#"{"services":[{"name":"a","port":70000}]}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<Registration>(r#"{"services":[],"addresses":["999.1.1.1"]}"#)
                .is_err()
        );
    }

    /// Found by fuzzing (registration_zone): a 63-character service name, capability or
    /// tag is a valid label on its own, but DNS serves it as `_<name>`, a 64-byte label
    /// that no DNS message can carry.
    #[test]
    fn prefixed_labels_fit_a_dns_label() {
        let reg = |svc: usize, cap: usize, tag: usize| {
            let body = format!(
                r#"{{"services":[{{"name":"a","port":1}},{{"name":"{}","port":2}}],
                "capabilities":["{}"],"tags":["t","{}"]}}"#,
                "s".repeat(svc),
                "c".repeat(cap),
                "g".repeat(tag)
            );
            serde_json::from_str::<Registration>(&body)
                .unwrap()
                .validate()
        };
        assert_eq!(reg(62, 62, 62), Ok(()));
        let e = reg(63, 62, 62).unwrap_err();
        assert_eq!(e.field, "services[1].name");
        assert!(e.message.contains("at most 62"), "{e}");
        assert_eq!(reg(62, 63, 62).unwrap_err().field, "capabilities[0]");
        assert_eq!(reg(62, 62, 63).unwrap_err().field, "tags[1]");
    }

    #[test]
    fn limits_name_the_field() {
        let mut r = Registration::default();
        r.metadata.insert("bad key".into(), "v".into());
        assert_eq!(r.validate().unwrap_err().field, "metadata.bad key");
        let mut r = Registration::default();
        r.metadata.insert("k".into(), "v".repeat(300));
        assert!(r.validate().is_err());
        let r = Registration {
            ttl_seconds: Some(0),
            ..Default::default()
        };
        assert_eq!(r.validate().unwrap_err().field, "ttl_seconds");
        let r = Registration {
            endpoint: Some(Endpoint::Ipc {
                path: "rel/path".into(),
            }),
            ..Default::default()
        };
        assert_eq!(r.validate().unwrap_err().field, "endpoint.path");
        let r = Registration {
            addresses: vec!["0.0.0.0".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(r.validate().unwrap_err().field, "addresses[0]");
        let mut r = Registration {
            relay_public_key: Some("ab".repeat(31)),
            ..Default::default()
        };
        assert_eq!(r.validate().unwrap_err().field, "relay_public_key");
        r.relay_public_key = Some(format!(" {}", "ab".repeat(32)));
        assert_eq!(r.validate().unwrap_err().field, "relay_public_key");
        r.relay_public_key = Some("ab".repeat(32));
        assert!(r.validate().is_ok());
    }

    #[test]
    fn view_flattens_registration() {
        let v = MembraneView {
            id: MembraneId::new("a").unwrap(),
            namespace: NamespaceName::new("ns").unwrap(),
            registration: Registration::default(),
            state: HealthState::Passing,
            registered_at: "2026-01-01T00:00:00Z".into(),
            last_heartbeat: "2026-01-01T00:00:00Z".into(),
        };
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["state"], "passing");
        assert!(j["services"].is_array());
    }
}
