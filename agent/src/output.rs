//! JSON output of `agent discover` and `agent list`, in the style of the reference
//! documents' `membrane discover` (`{"membranes": [{"membrane_id", "namespace_name",
//! "parent_membrane", "host", "status", "capabilities", ...}]}`), extended with the
//! registry's fields and with where the answer came from (`"cached": true` when it comes
//! from the agent's local cache because no registry answered).

use std::time::SystemTime;

use serde_json::{Map, Value, json};
use shared::model::MembraneView;

use crate::cache::CacheData;
use crate::util;

/// Where an answer came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Straight from the registry.
    Registry {
        /// The URL that answered.
        url: String,
    },
    /// From the local cache.
    Cache {
        /// Seconds since the cache was last confirmed current (None: never).
        age_seconds: Option<u64>,
        /// RFC 3339 time of that confirmation.
        updated_at: Option<String>,
        /// Why the cache was used (the registry error).
        reason: String,
    },
}

impl Source {
    /// A cache source described from its data.
    pub fn cache(data: &CacheData, reason: String) -> Self {
        Source::Cache {
            age_seconds: data.age_seconds(SystemTime::now()),
            updated_at: (data.updated_at_ms > 0)
                .then(|| util::rfc3339(util::from_unix_millis(data.updated_at_ms))),
            reason,
        }
    }

    fn annotate(&self, obj: &mut Map<String, Value>) {
        match self {
            Source::Registry { url } => {
                obj.insert("cached".into(), Value::Bool(false));
                obj.insert("registry".into(), Value::String(url.clone()));
            }
            Source::Cache {
                age_seconds,
                updated_at,
                reason,
            } => {
                obj.insert("cached".into(), Value::Bool(true));
                obj.insert("cache_age_seconds".into(), json!(age_seconds));
                obj.insert("cache_updated_at".into(), json!(updated_at));
                obj.insert("cache_reason".into(), Value::String(reason.clone()));
            }
        }
    }
}

/// One membrane in the reference documents' style.
pub fn membrane_json(m: &MembraneView) -> Value {
    let r = &m.registration;
    let mut o = Map::new();
    o.insert("membrane_id".into(), json!(m.id));
    o.insert("namespace_name".into(), json!(m.namespace));
    if let Some(p) = &r.parent {
        o.insert("parent_membrane".into(), json!(p));
    }
    o.insert("host".into(), json!(r.addresses.first()));
    o.insert("status".into(), json!(m.state.as_str()));
    o.insert("capabilities".into(), json!(r.capabilities));
    o.insert("tags".into(), json!(r.tags));
    o.insert("services".into(), json!(r.services));
    o.insert("addresses".into(), json!(r.addresses));
    o.insert("metadata".into(), json!(r.metadata));
    if let Some(ep) = &r.endpoint {
        o.insert("endpoint".into(), json!(ep));
    }
    o.insert("registered_at".into(), json!(m.registered_at));
    o.insert("last_heartbeat".into(), json!(m.last_heartbeat));
    Value::Object(o)
}

/// `{"membranes": [...], "cached": ..., ...}`.
pub fn list_json(ms: &[MembraneView], source: &Source) -> Value {
    let mut o = Map::new();
    o.insert(
        "membranes".into(),
        Value::Array(ms.iter().map(membrane_json).collect()),
    );
    source.annotate(&mut o);
    Value::Object(o)
}

/// `{"membrane": {...}, "cached": ..., ...}`.
pub fn one_json(m: &MembraneView, source: &Source) -> Value {
    let mut o = Map::new();
    o.insert("membrane".into(), membrane_json(m));
    source.annotate(&mut o);
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::view;

    #[test]
    fn reference_style_fields() {
        let mut m = view("cognitive-system", "perception", "perception", "vision");
        m.registration.parent = Some("cognitive-root".parse().unwrap());
        let v = list_json(
            std::slice::from_ref(&m),
            &Source::Registry {
                url: "http://r:1".into(),
            },
        );
        let x = &v["membranes"][0];
        assert_eq!(x["membrane_id"], "perception");
        assert_eq!(x["namespace_name"], "cognitive-system");
        assert_eq!(x["parent_membrane"], "cognitive-root");
        assert_eq!(x["host"], "10.0.0.7");
        assert_eq!(x["status"], "passing");
        assert_eq!(x["capabilities"][0], "vision");
        assert_eq!(x["services"][0]["port"], 7100);
        assert_eq!(v["cached"], false);
        let c = one_json(
            &m,
            &Source::Cache {
                age_seconds: Some(4),
                updated_at: None,
                reason: "down".into(),
            },
        );
        assert_eq!(c["cached"], true);
        assert_eq!(c["cache_age_seconds"], 4);
        assert_eq!(c["membrane"]["membrane_id"], "perception");
    }
}
