//! Prometheus metrics (`GET /metrics`), with the `prometheus-client` crate.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use shared::HealthState;

/// Labels of the HTTP latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// HTTP method.
    pub method: String,
    /// Matched route pattern (`/v1/namespaces/{ns}/membranes/{id}`), not the raw path.
    pub route: String,
    /// Status code.
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// Labels of the DNS query counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    /// udp or tcp.
    pub transport: String,
    /// Response code.
    pub rcode: String,
}

/// Exports the DNS server's counters at each scrape.
pub struct DnsCollector(pub std::sync::Arc<crate::dns::Catalog>);

impl std::fmt::Debug for DnsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DnsCollector")
    }
}

impl prometheus_client::collector::Collector for DnsCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::TypedMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        let s = self.0.stats();
        let mut family = |name: &str, help: &str, rows: &[(&[(&str, &str)], u64)]| {
            let mut m = encoder.encode_descriptor(name, help, None, ConstCounter::<u64>::TYPE)?;
            for (labels, v) in rows {
                let labels: Vec<(String, String)> = labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
            }
            Ok::<_, std::fmt::Error>(())
        };
        family(
            "dns_queries",
            "DNS queries received, by transport",
            &[
                (&[("transport", "udp")], s.queries_udp),
                (&[("transport", "tcp")], s.queries_tcp),
            ],
        )?;
        let rcodes: Vec<([(&str, &str); 1], u64)> = s
            .by_rcode()
            .iter()
            .map(|(rcode, v)| ([("rcode", *rcode)], *v))
            .collect();
        let rows: Vec<(&[(&str, &str)], u64)> = rcodes.iter().map(|(l, v)| (&l[..], *v)).collect();
        family("dns_responses", "DNS responses, by response code", &rows)?;
        family(
            "dns_truncated",
            "UDP responses sent truncated (TC)",
            &[(&[], s.truncated)],
        )?;
        family(
            "dns_dropped",
            "DNS packets dropped without an answer",
            &[(&[], s.dropped)],
        )?;
        family(
            "dns_rate_limited",
            "UDP responses over the rate limit (dropped or sent truncated)",
            &[(&[], s.rate_limited)],
        )?;
        Ok(())
    }
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Accepted registrations.
    pub registrations: Counter,
    /// Deregistrations.
    pub deregistrations: Counter,
    /// Accepted heartbeats.
    pub heartbeats: Counter,
    /// Membranes removed after their eviction delay.
    pub evictions: Counter,
    /// Membrane lists answered with an answer already serialized (see `http::lists`).
    pub list_cache_hits: Counter,
    state_changes: Family<StateLabels, Counter>,
    membranes: Family<StateLabels, Gauge>,
    namespaces: Gauge,
    /// HTTP request latency, seconds.
    pub http: Family<HttpLabels, Histogram>,
    /// 1 while the store refuses writes.
    pub store_failed: Gauge,
    /// 1 while the health sweep holds stale-marking and evictions (self-preservation).
    pub self_preservation: Gauge,
}

fn latency_histogram() -> Histogram {
    // 50 us .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers all metrics.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("membrane");
        let m = Metrics {
            registrations: Counter::default(),
            deregistrations: Counter::default(),
            heartbeats: Counter::default(),
            evictions: Counter::default(),
            list_cache_hits: Counter::default(),
            state_changes: Family::default(),
            membranes: Family::default(),
            namespaces: Gauge::default(),
            http: Family::new_with_constructor(latency_histogram),
            store_failed: Gauge::default(),
            self_preservation: Gauge::default(),
            registry: Mutex::new(Registry::default()),
        };
        r.register(
            "registrations",
            "Accepted registrations (new and updated)",
            m.registrations.clone(),
        );
        r.register(
            "deregistrations",
            "Membranes deregistered by their agent or an admin",
            m.deregistrations.clone(),
        );
        r.register("heartbeats", "Accepted heartbeats", m.heartbeats.clone());
        r.register(
            "evictions",
            "Membranes removed after staying stale for their eviction delay",
            m.evictions.clone(),
        );
        r.register(
            "list_cache_hits",
            "Membrane lists answered with one already serialized at the same revision",
            m.list_cache_hits.clone(),
        );
        r.register(
            "state_changes",
            "Health state transitions, by new state",
            m.state_changes.clone(),
        );
        r.register(
            "membranes",
            "Registered membranes, by state",
            m.membranes.clone(),
        );
        r.register("namespaces", "Namespaces", m.namespaces.clone());
        r.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            m.http.clone(),
        );
        r.register(
            "store_failed",
            "1 when the store failed and writes are refused",
            m.store_failed.clone(),
        );
        r.register(
            "self_preservation",
            "1 while a mass heartbeat loss is blamed on the registry: stale-marking and \
             evictions are held",
            m.self_preservation.clone(),
        );
        *m.registry.lock().unwrap() = r;
        m
    }

    /// Counts a health transition.
    pub fn state_change(&self, to: HealthState) {
        self.state_changes
            .get_or_create(&StateLabels {
                state: to.as_str().into(),
            })
            .inc();
    }

    /// Sets the gauges.
    pub fn set_counts(&self, namespaces: usize, passing: usize, stale: usize) {
        self.namespaces.set(namespaces as i64);
        for (s, n) in [("passing", passing), ("stale", stale)] {
            self.membranes
                .get_or_create(&StateLabels { state: s.into() })
                .set(n as i64);
        }
    }

    /// Adds a collector (e.g. [`DnsCollector`]) read at each scrape.
    pub fn register_collector(&self, c: impl prometheus_client::collector::Collector) {
        self.registry
            .lock()
            .unwrap()
            .register_collector(Box::new(c));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap();
        if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_values() {
        let m = Metrics::new();
        m.registrations.inc();
        m.state_change(HealthState::Stale);
        m.set_counts(2, 5, 1);
        m.http
            .get_or_create(&HttpLabels {
                method: "PUT".into(),
                route: "/x".into(),
                status: 200,
            })
            .observe(0.001);
        let t = m.encode();
        assert!(t.contains("membrane_registrations_total 1"), "{t}");
        assert!(
            t.contains("membrane_state_changes_total{state=\"stale\"} 1"),
            "{t}"
        );
        assert!(t.contains("membrane_membranes{state=\"passing\"} 5"), "{t}");
        assert!(t.contains("membrane_namespaces 2"), "{t}");
        assert!(
            t.contains("membrane_http_request_duration_seconds_bucket"),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"), "{t}");
    }
}
