//! The connection table of a relay listener: who holds a slot, and since when it is idle.
//!
//! A listener holds at most [`Limits::max_connections`] connections. When the table is
//! full, a new connection takes the slot of the one idle the longest (no frame being
//! read), so peers that connect and send nothing cannot lock real senders out; only when
//! every connection is in the middle of a frame (each bounded by the frame deadline) is
//! the new one closed. From three quarters of the cap on ("pressure") the idle timeout
//! drops to [`Limits::pressure_idle_timeout`], and admitting a connection closes those
//! idle longer than that. The same scheme as the DNS-over-TCP server of `dns-server`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::wire::Limits;

/// Marks a connection busy (a frame is being read).
const BUSY: u64 = u64::MAX;

struct Conn {
    /// Milliseconds since the table's epoch at which it became idle, or [`BUSY`].
    idle_since: AtomicU64,
    /// Cancelled to close it (made room for another, or shutdown).
    close: CancellationToken,
}

/// The connections of one listener.
pub struct ConnTable {
    limits: Limits,
    epoch: Instant,
    next_id: AtomicU64,
    len: AtomicUsize,
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

/// A connection's place in the table, given up when dropped.
pub struct Slot {
    table: Arc<ConnTable>,
    id: u64,
    conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut conns = self.table.conns.lock().unwrap();
        if conns.remove(&self.id).is_some() {
            self.table.len.store(conns.len(), Ordering::Relaxed);
        }
    }
}

impl Slot {
    /// The idle timeout that applies now (shorter under pressure).
    pub fn idle_timeout(&self) -> Duration {
        if self.table.under_pressure() {
            self.table
                .limits
                .pressure_idle_timeout
                .min(self.table.limits.idle_timeout)
        } else {
            self.table.limits.idle_timeout
        }
    }

    /// A frame started (the connection is not closed to make room) or ended.
    pub fn set_busy(&self, busy: bool) {
        let v = if busy {
            BUSY
        } else {
            self.table.millis(Instant::now())
        };
        self.conn.idle_since.store(v, Ordering::Relaxed);
    }

    /// Cancelled when the connection must close (evicted, or the listener stops).
    pub fn closed(&self) -> &CancellationToken {
        &self.conn.close
    }
}

impl ConnTable {
    /// An empty table.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(ConnTable {
            limits,
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            len: AtomicUsize::new(0),
            conns: Mutex::new(BTreeMap::new()),
        })
    }

    fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn pressure(&self) -> usize {
        (self.limits.max_connections * 3 / 4).max(1)
    }

    fn under_pressure(&self) -> bool {
        self.len.load(Ordering::Relaxed) >= self.pressure()
    }

    /// Connections held.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes room for a new connection and registers it (idle from now): under pressure,
    /// closes connections idle past the pressure timeout; when full, closes the one idle
    /// the longest. `None` when every connection is reading a frame. Also returns how
    /// many connections it closed.
    pub fn admit(self: &Arc<Self>, shutdown: &CancellationToken) -> (Option<Slot>, usize) {
        let mut conns = self.conns.lock().unwrap();
        let now_ms = self.millis(Instant::now());
        let mut closed = 0;
        if conns.len() >= self.pressure() {
            let limit = self.limits.pressure_idle_timeout.as_millis() as u64;
            conns.retain(|_, c| {
                let since = c.idle_since.load(Ordering::Relaxed);
                let stale = since != BUSY && now_ms.saturating_sub(since) >= limit;
                if stale {
                    c.close.cancel();
                    closed += 1;
                }
                !stale
            });
        }
        if conns.len() >= self.limits.max_connections {
            let oldest = conns
                .iter()
                .map(|(id, c)| (c.idle_since.load(Ordering::Relaxed), *id))
                .filter(|(since, _)| *since != BUSY)
                .min();
            if let Some((_, id)) = oldest
                && let Some(c) = conns.remove(&id)
            {
                c.close.cancel();
                closed += 1;
            }
        }
        if conns.len() >= self.limits.max_connections {
            self.len.store(conns.len(), Ordering::Relaxed);
            return (None, closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            idle_since: AtomicU64::new(now_ms),
            close: shutdown.child_token(),
        });
        conns.insert(id, conn.clone());
        self.len.store(conns.len(), Ordering::Relaxed);
        (
            Some(Slot {
                table: self.clone(),
                id,
                conn,
            }),
            closed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize) -> Limits {
        Limits {
            max_connections: max,
            idle_timeout: Duration::from_secs(60),
            pressure_idle_timeout: Duration::from_secs(5),
            frame_deadline: Duration::from_secs(30),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn full_table_closes_the_longest_idle_and_never_a_busy_one() {
        let t = ConnTable::new(limits(4));
        let stop = CancellationToken::new();
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(t.admit(&stop).0.unwrap());
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        held[0].set_busy(true);
        // Full: the oldest idle one (the second; the first is busy) makes room.
        let (s, closed) = t.admit(&stop);
        assert!(s.is_some());
        assert_eq!(closed, 1);
        assert!(!held[0].closed().is_cancelled());
        assert!(held[1].closed().is_cancelled());
        drop(held.remove(1));
        held.push(s.unwrap());
        assert_eq!(t.len(), 4);
        // Every one busy: the newcomer is refused.
        held.iter().for_each(|s| s.set_busy(true));
        assert!(t.admit(&stop).0.is_none());
        assert!(held.iter().all(|s| !s.closed().is_cancelled()));
    }

    #[tokio::test(start_paused = true)]
    async fn under_pressure_the_idle_timeout_is_the_shorter_one() {
        let t = ConnTable::new(limits(8));
        let stop = CancellationToken::new();
        let mut held: Vec<Slot> = (0..5).map(|_| t.admit(&stop).0.unwrap()).collect();
        assert_eq!(held[0].idle_timeout(), Duration::from_secs(60), "5 of 8");
        held.push(t.admit(&stop).0.unwrap());
        assert_eq!(held[0].idle_timeout(), Duration::from_secs(5), "6 of 8");
        // Admitting under pressure closes those idle past the short timeout.
        tokio::time::advance(Duration::from_secs(6)).await;
        held[2].set_busy(true);
        let (s, closed) = t.admit(&stop);
        assert!(s.is_some());
        assert_eq!(closed, 5);
        assert!(!held[2].closed().is_cancelled());
        held.retain(|s| !s.closed().is_cancelled());
        assert_eq!(t.len(), 2);
        assert_eq!(held[0].idle_timeout(), Duration::from_secs(60));
        // Shutdown closes the rest.
        stop.cancel();
        assert!(held[0].closed().is_cancelled());
    }
}
