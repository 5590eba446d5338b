//! Self-preservation (as in Eureka): when a large share of passing membranes miss their
//! heartbeat TTL at once, the likelier cause is the registry itself (overloaded, just
//! restarted, cut off from the network), not that many membranes died together. Marking
//! them all `stale` would empty DNS and push a state change to every subscriber — the
//! start of a metastable collapse. So the health sweep holds stale-marking and evictions
//! while the burst lasts, and resumes them once heartbeats recover.
//!
//! The rule, checked at every sweep, per namespace and for the whole registry: let
//! `burst` be the passing membranes now past their TTL plus those marked stale within the
//! last `window`; the scope is *suspect* when `burst >= min_silent` and
//! `burst > threshold × (passing + marked within window)`. A suspect namespace (or, when
//! the registry as a whole is suspect, every namespace) keeps its silent membranes passing
//! and evicts nothing. As heartbeats come back the burst shrinks; once the rule no longer
//! holds, normal sweeping resumes and whatever is still silent goes stale then, with its
//! full eviction delay still ahead.
//!
//! A hold is bounded: a scope held for `max_hold` without a break is released (a real mass
//! death, say a host with many membranes of one namespace, must not stay in DNS for ever)
//! and not held again until it stops being suspect once.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use shared::NamespaceName;
use tokio::time::Instant;

/// Tuning of the rule (`--self-preservation-*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreservationConfig {
    /// Share of passing membranes (0 < x <= 1) whose silence at once makes a scope
    /// suspect; 0 disables self-preservation.
    pub threshold: f64,
    /// Fewer silent membranes than this never make a scope suspect (small namespaces
    /// behave normally: one membrane of three going silent is not a registry fault).
    pub min_silent: usize,
    /// How long stale marks count towards a burst.
    pub window: Duration,
    /// Longest hold of one scope without a break; zero: no limit.
    pub max_hold: Duration,
}

/// Default of `--self-preservation-max-hold`.
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(15 * 60);

impl Default for PreservationConfig {
    fn default() -> Self {
        PreservationConfig {
            threshold: 0.15,
            min_silent: 10,
            window: Duration::from_secs(10),
            max_hold: DEFAULT_MAX_HOLD,
        }
    }
}

/// One namespace at a sweep: membranes passing, and of those, past their TTL.
#[derive(Debug, Clone, Copy, Default)]
pub struct Census {
    /// Passing membranes (silent ones included).
    pub passing: usize,
    /// Passing membranes past their TTL.
    pub silent: usize,
}

/// What a sweep may do.
#[derive(Debug, Default)]
pub struct Hold {
    /// The whole registry is suspect: no namespace marks or evicts.
    pub global: bool,
    /// Suspect namespaces.
    pub namespaces: BTreeSet<NamespaceName>,
}

impl Hold {
    /// Whether `ns` must not mark stale or evict at this sweep.
    pub fn holds(&self, ns: &NamespaceName) -> bool {
        self.global || self.namespaces.contains(ns)
    }
}

/// Self-preservation as shown in `/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PreservationStatus {
    /// Some scope is suspect.
    pub active: bool,
    /// The whole registry is suspect.
    pub global: bool,
    /// Suspect namespaces.
    pub namespaces: Vec<String>,
    /// Seconds since it became active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_for_seconds: Option<u64>,
    /// Membranes kept passing at the last sweep despite their silence.
    pub held_membranes: usize,
    /// The rule's settings.
    pub threshold: f64,
    /// The rule's settings.
    pub min_silent: usize,
    /// The rule's settings.
    pub window_seconds: f64,
    /// The rule's settings (0: no limit).
    pub max_hold_seconds: u64,
    /// Scopes released after `max_hold` that are still suspect (not held again until they
    /// recover); `"*"`: the whole registry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub released_after_max_hold: Vec<String>,
}

/// The rule's memory between sweeps.
#[derive(Debug, Default)]
pub struct Preservation {
    cfg: PreservationConfig,
    /// Stale marks per namespace within the window, oldest first.
    marks: HashMap<NamespaceName, VecDeque<(Instant, usize)>>,
    since: Option<Instant>,
    last: Hold,
    held_membranes: usize,
    /// When a namespace's hold last ended: its silent membranes go stale then, and their
    /// eviction delay counts from then, not from their TTL expiry during the hold.
    released: HashMap<NamespaceName, Instant>,
    /// Since when each scope has been suspect without a break (`None`: the registry).
    suspect_since: HashMap<Option<NamespaceName>, Instant>,
    /// Scopes held for `max_hold`, released while still suspect.
    spent: BTreeSet<Option<NamespaceName>>,
}

fn suspect(cfg: &PreservationConfig, passing: usize, silent: usize, marked: usize) -> bool {
    let burst = silent + marked;
    cfg.threshold > 0.0
        && burst >= cfg.min_silent.max(1)
        && burst as f64 > cfg.threshold * (passing + marked) as f64
}

impl Preservation {
    /// With `cfg`.
    pub fn new(cfg: PreservationConfig) -> Self {
        Preservation {
            cfg,
            ..Default::default()
        }
    }

    /// Replaces the settings.
    pub fn set_config(&mut self, cfg: PreservationConfig) {
        self.cfg = cfg;
    }

    /// Decides, from this sweep's census, which namespaces must hold; logs transitions.
    pub fn decide(&mut self, now: Instant, census: &HashMap<NamespaceName, Census>) -> Hold {
        let window = self.cfg.window;
        self.marks.retain(|_, q| {
            while q
                .front()
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= window)
            {
                q.pop_front();
            }
            !q.is_empty()
        });
        let marked = |ns: &NamespaceName, marks: &HashMap<NamespaceName, VecDeque<_>>| {
            marks.get(ns).map_or(0, |q: &VecDeque<(Instant, usize)>| {
                q.iter().map(|(_, n)| n).sum()
            })
        };
        let mut hold = Hold::default();
        let (mut passing, mut silent, mut all_marked) = (0, 0, 0);
        let mut held = 0;
        for (ns, c) in census {
            let m = marked(ns, &self.marks);
            passing += c.passing;
            silent += c.silent;
            all_marked += m;
            let scope = Some(ns.clone());
            if self.bounded(now, scope, suspect(&self.cfg, c.passing, c.silent, m)) {
                hold.namespaces.insert(ns.clone());
                held += c.silent;
            }
        }
        hold.global = self.bounded(now, None, suspect(&self.cfg, passing, silent, all_marked));
        self.suspect_since
            .retain(|s, _| s.as_ref().is_none_or(|ns| census.contains_key(ns)));
        self.spent
            .retain(|s| s.as_ref().is_none_or(|ns| census.contains_key(ns)));
        if hold.global {
            held = silent;
        }
        let active = hold.global || !hold.namespaces.is_empty();
        let was = self.last.global || !self.last.namespaces.is_empty();
        if active
            && (!was || hold.global != self.last.global || hold.namespaces != self.last.namespaces)
        {
            let namespaces: Vec<&str> = hold.namespaces.iter().map(|n| n.as_str()).collect();
            tracing::warn!(
                global = hold.global,
                namespaces = namespaces.join(","),
                silent,
                passing,
                threshold = self.cfg.threshold,
                "self-preservation: a large share of membranes missed their heartbeat TTL at \
                 once; suspecting the registry (overload, restart, network) and holding \
                 stale-marking and evictions until heartbeats recover"
            );
        } else if !active && was {
            tracing::warn!(
                held_for_ms = self
                    .since
                    .map_or(0, |s| now.saturating_duration_since(s).as_millis() as u64),
                silent,
                "self-preservation over: heartbeats recovered; stale-marking and evictions resume"
            );
        }
        for ns in census.keys() {
            if self.last.holds(ns) && !hold.holds(ns) {
                self.released.insert(ns.clone(), now);
            }
        }
        self.released.retain(|ns, _| census.contains_key(ns));
        self.since = match (active, self.since) {
            (true, None) => Some(now),
            (true, s) => s,
            (false, _) => None,
        };
        self.held_membranes = if active { held } else { 0 };
        self.last = Hold {
            global: hold.global,
            namespaces: hold.namespaces.clone(),
        };
        hold
    }

    /// Whether `scope` (a namespace, `None`: the registry), `suspect` at this sweep, is
    /// held: not once it has been suspect for `max_hold` without a break, until it is not
    /// suspect at some sweep.
    fn bounded(&mut self, now: Instant, scope: Option<NamespaceName>, suspect: bool) -> bool {
        if !suspect {
            self.suspect_since.remove(&scope);
            self.spent.remove(&scope);
            return false;
        }
        if self.spent.contains(&scope) {
            return false;
        }
        let since = *self.suspect_since.entry(scope.clone()).or_insert(now);
        if self.cfg.max_hold.is_zero() || now.saturating_duration_since(since) < self.cfg.max_hold {
            return true;
        }
        tracing::warn!(
            scope = scope.as_ref().map_or("*", |n| n.as_str()),
            held_for_s = now.saturating_duration_since(since).as_secs(),
            "self-preservation: held for --self-preservation-max-hold and heartbeats did not \
             come back; taking the silence as real: stale-marking and evictions resume there"
        );
        self.spent.insert(scope);
        false
    }

    /// Counts `n` membranes of `ns` marked stale at `now` towards later bursts.
    pub fn record(&mut self, now: Instant, ns: &NamespaceName, n: usize) {
        if n > 0 {
            self.marks
                .entry(ns.clone())
                .or_default()
                .push_back((now, n));
        }
    }

    /// When the hold of `ns` last ended, if ever.
    pub fn released_at(&self, ns: &NamespaceName) -> Option<Instant> {
        self.released.get(ns).copied()
    }

    /// Whether some scope is suspect (as of the last sweep).
    pub fn active(&self) -> bool {
        self.since.is_some()
    }

    /// For `/status`.
    pub fn status(&self, now: Instant) -> PreservationStatus {
        PreservationStatus {
            active: self.active(),
            global: self.last.global,
            namespaces: self.last.namespaces.iter().map(|n| n.to_string()).collect(),
            active_for_seconds: self
                .since
                .map(|s| now.saturating_duration_since(s).as_secs()),
            held_membranes: self.held_membranes,
            threshold: self.cfg.threshold,
            min_silent: self.cfg.min_silent,
            window_seconds: self.cfg.window.as_secs_f64(),
            max_hold_seconds: self.cfg.max_hold.as_secs(),
            released_after_max_hold: self
                .spent
                .iter()
                .map(|s| s.as_ref().map_or("*".to_string(), |n| n.to_string()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(s: &str) -> NamespaceName {
        NamespaceName::new(s).unwrap()
    }

    #[test]
    fn the_rule() {
        let cfg = PreservationConfig::default();
        // 1 of 20: normal.
        assert!(!suspect(&cfg, 20, 1, 0));
        // 3 of 3 but fewer than min_silent: normal (a small namespace really died).
        assert!(!suspect(&cfg, 3, 3, 0));
        // 20 of 100: suspect; 15 of 100: not (strictly more than the share).
        assert!(suspect(&cfg, 100, 20, 0));
        assert!(!suspect(&cfg, 100, 15, 0));
        // Marks within the window add up: 10 silent now + 10 marked a moment ago of 100.
        assert!(suspect(&cfg, 90, 10, 10));
        // Threshold 0 disables.
        let off = PreservationConfig {
            threshold: 0.0,
            ..cfg
        };
        assert!(!suspect(&off, 100, 100, 0));
    }

    /// A hold ends after `max_hold` even while the silence lasts (a real mass death), is
    /// not taken up again while it lasts, and protects again after a recovery.
    #[tokio::test(start_paused = true)]
    async fn a_hold_is_released_after_max_hold_until_the_scope_recovers() {
        let mut p = Preservation::new(PreservationConfig {
            max_hold: Duration::from_secs(600),
            ..Default::default()
        });
        let (a, b) = (ns("a"), ns("b"));
        // `a`: 50 of 100 silent; `b`: 1 of 1,000 (the registry as a whole not suspect).
        let census = |silent| {
            HashMap::from([
                (
                    a.clone(),
                    Census {
                        passing: 100,
                        silent,
                    },
                ),
                (
                    b.clone(),
                    Census {
                        passing: 1000,
                        silent: 1,
                    },
                ),
            ])
        };
        let start = Instant::now();
        assert!(p.decide(start, &census(50)).holds(&a));
        let h = p.decide(start + Duration::from_secs(599), &census(50));
        assert!(h.holds(&a) && !h.global && !h.holds(&b));
        let released = start + Duration::from_secs(600);
        assert!(!p.decide(released, &census(50)).holds(&a));
        assert_eq!(
            p.released_at(&a),
            Some(released),
            "eviction delays count from here"
        );
        assert_eq!(p.status(released).released_after_max_hold, ["a"]);
        // Still suspect (the marks of the release count too): not held again.
        p.record(released, &a, 50);
        let later = released + Duration::from_secs(1);
        assert!(!p.decide(later, &census(0)).holds(&a));
        // Recovered once: a new burst is held again, for up to `max_hold`.
        let calm = later + Duration::from_secs(20);
        assert!(!p.decide(calm, &census(0)).holds(&a));
        assert!(p.status(calm).released_after_max_hold.is_empty());
        assert!(
            p.decide(calm + Duration::from_secs(1), &census(30))
                .holds(&a)
        );
        // No limit: held for as long as it lasts.
        let mut q = Preservation::new(PreservationConfig {
            max_hold: Duration::ZERO,
            ..Default::default()
        });
        assert!(q.decide(start, &census(50)).holds(&a));
        assert!(
            q.decide(start + Duration::from_secs(86_400), &census(50))
                .holds(&a)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn marks_age_out_of_the_window() {
        let mut p = Preservation::new(PreservationConfig::default());
        let a = ns("a");
        let census = |silent| {
            HashMap::from([(
                a.clone(),
                Census {
                    passing: 90,
                    silent,
                },
            )])
        };
        p.record(Instant::now(), &a, 10);
        assert!(p.decide(Instant::now(), &census(10)).holds(&a));
        assert!(p.active());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!p.decide(Instant::now(), &census(10)).holds(&a));
        assert!(!p.active());
    }
}
