//! Target resolution: which membranes a message goes to, and by which route.
//!
//! Targets: a membrane id; `parent` (this membrane's parent); `children` (every membrane
//! whose parent is this one); `_svc._tcp` / `_svc._udp` (the passing instances offering
//! service `svc`: one chosen by priority then weight as SRV clients do, or all with
//! `--all`). The agent's cache answers first; the registry when the cache has no answer.

use shared::model::{Endpoint, HealthState, MembraneView};
use shared::name::{MembraneId, NamespaceName, ServiceName};

use crate::cache::{self, CacheData};
use crate::client::{HttpRegistry, ListFilter};

/// A parsed target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One membrane.
    Id(MembraneId),
    /// This membrane's parent.
    Parent,
    /// This membrane's children (all of them).
    Children,
    /// Instances of a service.
    Service(ServiceName),
}

impl Target {
    /// Parses a target; the error says why (a usage error).
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        match s {
            "parent" => return Ok(Target::Parent),
            "children" => return Ok(Target::Children),
            _ => {}
        }
        if let Some(rest) = s.strip_prefix('_') {
            let svc = rest
                .strip_suffix("._tcp")
                .or_else(|| rest.strip_suffix("._udp"))
                .ok_or_else(|| format!("{s:?}: a service target is _NAME._tcp or _NAME._udp"))?;
            return ServiceName::new(svc)
                .map(Target::Service)
                .map_err(|e| format!("{s:?}: {e}"));
        }
        MembraneId::new(s).map(Target::Id).map_err(|e| {
            format!("{s:?} is not a target (a membrane id, parent, children or _svc._tcp): {e}")
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Id(id) => write!(f, "{id}"),
            Target::Parent => f.write_str("parent"),
            Target::Children => f.write_str("children"),
            Target::Service(s) => write!(f, "_{s}._tcp"),
        }
    }
}

/// Why a target could not be resolved (exit code 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ResolveError(pub String);

/// The membranes chosen, and how.
#[derive(Debug, Clone)]
pub struct Resolution {
    /// Chosen membranes.
    pub membranes: Vec<MembraneView>,
    /// How they were found (for `agent send --debug`).
    pub debug: Vec<String>,
}

/// What resolution needs to know.
pub struct Resolver<'a> {
    /// Our namespace.
    pub namespace: &'a NamespaceName,
    /// Our id.
    pub self_id: &'a MembraneId,
    /// Our parent if known (the daemon knows its registration).
    pub self_parent: Option<MembraneId>,
    /// The cache, if any.
    pub cache: Option<std::sync::Arc<CacheData>>,
    /// The registry, if any.
    pub client: Option<&'a HttpRegistry>,
}

/// Picks an index by SRV rules: lowest priority, then randomly by weight (`r` in [0,1)).
pub fn pick_weighted(entries: &[(u16, u16)], r: f64) -> Option<usize> {
    let best = entries.iter().map(|e| e.0).min()?;
    let idx: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].0 == best)
        .collect();
    // Weight 0 still gets a small chance (RFC 2782), as 0.1.
    let w = |i: usize| f64::from(entries[i].1).max(0.1);
    let total: f64 = idx.iter().map(|&i| w(i)).sum();
    let mut x = r.clamp(0.0, 1.0) * total;
    for &i in &idx {
        x -= w(i);
        if x < 0.0 {
            return Some(i);
        }
    }
    idx.last().copied()
}

impl Resolver<'_> {
    fn cached(&self) -> Option<&CacheData> {
        self.cache
            .as_deref()
            .filter(|c| c.namespace == *self.namespace && !c.membranes.is_empty())
    }

    /// One membrane by id: cache, then registry.
    pub async fn one(
        &self,
        id: &MembraneId,
        debug: &mut Vec<String>,
    ) -> Result<MembraneView, ResolveError> {
        if let Some(m) = self.cached().and_then(|c| c.membranes.get(id.as_str())) {
            debug.push(format!(
                "{id}: found in the agent's cache (revision {:?})",
                self.cache.as_ref().and_then(|c| c.revision)
            ));
            return Ok(m.clone());
        }
        let Some(client) = self.client else {
            return Err(ResolveError(format!(
                "membrane {id} is not in the cache and no registry is known (--registry-url)"
            )));
        };
        match client.get(self.namespace, id).await {
            Ok(m) => {
                debug.push(format!(
                    "{id}: not in the cache; found in the registry {}",
                    client.current_url()
                ));
                Ok(m)
            }
            Err(e) if e.status() == Some(404) => Err(ResolveError(format!(
                "membrane {id} is not registered in namespace {}",
                self.namespace
            ))),
            Err(e) => Err(ResolveError(format!(
                "cannot resolve {id}: {}",
                e.explain()
            ))),
        }
    }

    async fn many(
        &self,
        filter: &ListFilter,
        what: &str,
        debug: &mut Vec<String>,
    ) -> Result<Vec<MembraneView>, ResolveError> {
        let keep = |m: &MembraneView| m.state == HealthState::Passing && m.id != *self.self_id;
        if let Some(c) = self.cached() {
            let ms: Vec<MembraneView> = c.select(filter).into_iter().filter(keep).collect();
            if !ms.is_empty() {
                debug.push(format!("{what}: {} passing in the agent's cache", ms.len()));
                return Ok(ms);
            }
        }
        let Some(client) = self.client else {
            return Err(ResolveError(format!(
                "no {what} in the cache and no registry is known (--registry-url)"
            )));
        };
        let list = client
            .list(self.namespace, filter)
            .await
            .map_err(|e| ResolveError(format!("cannot list {what}: {}", e.explain())))?;
        let ms: Vec<MembraneView> = list
            .membranes
            .into_iter()
            .filter(|m| cache::matches(m, filter))
            .filter(keep)
            .collect();
        debug.push(format!(
            "{what}: {} passing in the registry {}",
            ms.len(),
            client.current_url()
        ));
        if ms.is_empty() {
            return Err(ResolveError(format!(
                "no passing {what} in namespace {}",
                self.namespace
            )));
        }
        Ok(ms)
    }

    /// Resolves `target` (`all`: every instance of a service); `r` in [0,1) picks by weight.
    pub async fn resolve(
        &self,
        target: &Target,
        all: bool,
        r: f64,
    ) -> Result<Resolution, ResolveError> {
        let mut debug = Vec::new();
        let membranes = match target {
            Target::Id(id) => vec![self.one(id, &mut debug).await?],
            Target::Parent => {
                let parent = match &self.self_parent {
                    Some(p) => {
                        debug.push(format!("parent: {p} (this agent's registration)"));
                        p.clone()
                    }
                    None => {
                        let me = self.one(self.self_id, &mut debug).await?;
                        me.registration.parent.clone().ok_or_else(|| {
                            ResolveError(format!("{} has no parent", self.self_id))
                        })?
                    }
                };
                vec![self.one(&parent, &mut debug).await?]
            }
            Target::Children => {
                let f = ListFilter {
                    parent: Some(self.self_id.to_string()),
                    ..Default::default()
                };
                self.many(&f, &format!("children of {}", self.self_id), &mut debug)
                    .await?
            }
            Target::Service(svc) => {
                let f = ListFilter {
                    service: Some(svc.to_string()),
                    ..Default::default()
                };
                let ms = self
                    .many(&f, &format!("instances of _{svc}._tcp"), &mut debug)
                    .await?;
                if all {
                    ms
                } else {
                    let entries: Vec<(u16, u16)> = ms
                        .iter()
                        .map(|m| {
                            m.registration
                                .services
                                .iter()
                                .find(|s| s.name == *svc)
                                .map_or((0, 0), |s| (s.priority, s.weight))
                        })
                        .collect();
                    let i = pick_weighted(&entries, r).expect("non-empty");
                    debug.push(format!(
                        "chose {} (priority {}, weight {}) among {}",
                        ms[i].id,
                        entries[i].0,
                        entries[i].1,
                        ms.iter()
                            .map(|m| m.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    vec![ms[i].clone()]
                }
            }
        };
        for m in &membranes {
            debug.push(format!(
                "route to {}: {}",
                m.id,
                route(m.registration.endpoint.as_ref())
            ));
        }
        Ok(Resolution { membranes, debug })
    }
}

/// A route, described.
pub fn route(ep: Option<&Endpoint>) -> String {
    match ep {
        None => "no message endpoint registered".into(),
        Some(Endpoint::SharedVolume { path }) => {
            format!("shared-volume Maildir under {path}")
        }
        Some(Endpoint::Ipc { path }) => format!("ipc Unix socket {path}"),
        Some(Endpoint::Tcp { address }) => format!("tcp {address}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_refuse_paths() {
        assert_eq!(Target::parse("parent").unwrap(), Target::Parent);
        assert_eq!(Target::parse("children").unwrap(), Target::Children);
        assert_eq!(
            Target::parse("_visual._tcp").unwrap(),
            Target::Service("visual".parse().unwrap())
        );
        assert_eq!(
            Target::parse("Worker-1").unwrap(),
            Target::Id("worker-1".parse().unwrap())
        );
        for bad in ["../etc", "a/b", "", "_visual", "_a/b._tcp", "x..y", "."] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn weighted_pick_follows_srv_rules() {
        // Lower priority wins whatever the weights.
        assert_eq!(pick_weighted(&[(1, 100), (0, 1)], 0.0), Some(1));
        // Weights 30/10: r below 0.75 picks the first.
        let e = [(0, 30), (0, 10)];
        assert_eq!(pick_weighted(&e, 0.5), Some(0));
        assert_eq!(pick_weighted(&e, 0.8), Some(1));
        let mut counts = [0; 2];
        for i in 0..1000 {
            counts[pick_weighted(&e, f64::from(i) / 1000.0).unwrap()] += 1;
        }
        assert_eq!(counts, [750, 250]);
        assert_eq!(pick_weighted(&[], 0.5), None);
    }
}
