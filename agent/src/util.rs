//! Small helpers: wall-clock formatting, jitter, capped exponential backoff and atomic
//! file writes.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Raises the soft limit on open files to the hard limit (at most 1M), so that peers
/// holding connections cannot exhaust the descriptors the agent needs for its heartbeats;
/// returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let want = hard.min(1 << 20);
            if want > soft && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
                return want;
            }
            soft
        }
        Err(_) => 1024,
    }
}

/// The soft limit on open files.
pub fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// RFC 3339 (UTC, seconds) rendering of a wall-clock time. A time RFC 3339 cannot show
/// (before 1970 or past the year 9999, e.g. a peer's made-up `sent_at`) is rendered as its
/// milliseconds since the Unix epoch instead (`humantime` would panic).
pub fn rfc3339(t: SystemTime) -> String {
    /// 10000-01-01T00:00:00Z, in seconds since the epoch.
    const YEAR_10000: u64 = 253_402_300_800;
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() < YEAR_10000 => humantime::format_rfc3339_seconds(t).to_string(),
        Ok(d) => d.as_millis().to_string(),
        Err(e) => format!("-{}", e.duration().as_millis()),
    }
}

/// RFC 3339 rendering of now.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the Unix epoch.
pub fn from_unix_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A tiny xorshift generator for jitter (no cryptographic use), seeded from the standard
/// library's per-process random hash keys so that two agents do not heartbeat in step.
#[derive(Debug, Clone)]
pub struct Jitter {
    state: u64,
    fraction: f64,
}

impl Jitter {
    /// Jitter of `±fraction` (0.1 = ±10 %) with a random seed.
    pub fn new(fraction: f64) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        Self::with_seed(fraction, h.finish())
    }

    /// Jitter of `±fraction` with a fixed seed (tests).
    pub fn with_seed(fraction: f64, seed: u64) -> Self {
        // splitmix64: small or similar seeds must not start xorshift near zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Jitter {
            state: (z ^ (z >> 31)) | 1,
            fraction: fraction.clamp(0.0, 0.9),
        }
    }

    fn next_unit(&mut self) -> f64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A random duration in `[0, d]` ("full jitter": spreads a crowd evenly over `d`).
    pub fn upto(&mut self, d: Duration) -> Duration {
        d.mul_f64(self.next_unit())
    }

    /// `d` scaled by a random factor in `[1 - fraction, 1 + fraction]`.
    pub fn apply(&mut self, d: Duration) -> Duration {
        if self.fraction == 0.0 {
            return d;
        }
        let f = 1.0 - self.fraction + 2.0 * self.fraction * self.next_unit();
        d.mul_f64(f)
    }
}

/// Capped exponential backoff: `min`, `2*min`, `4*min`, ... up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `min` and doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.min(max);
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The next delay (before jitter); doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the minimum after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub fn fsync_dir(p: &Path) -> std::io::Result<()> {
    std::fs::File::open(p)?.sync_all()
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync of the
/// directory: the new file survives a power loss once this returns) with `mode`.
///
/// The temporary file (`path` with the extension `tmp`) is always a new file made here: a
/// leftover one (a crash, another mode, a symbolic link) is removed first, never reused
/// or followed. Writers of one `path` must not run at the same time.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => fsync_dir(dir),
        _ => fsync_dir(Path::new(".")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_bounds_and_varies() {
        let mut j = Jitter::with_seed(0.1, 42);
        let base = Duration::from_secs(10);
        let samples: Vec<Duration> = (0..1000).map(|_| j.apply(base)).collect();
        assert!(samples.iter().all(|d| *d >= Duration::from_secs(9)));
        assert!(samples.iter().all(|d| *d <= Duration::from_secs(11)));
        let min = samples.iter().min().unwrap();
        let max = samples.iter().max().unwrap();
        assert!(
            *max - *min > Duration::from_millis(1500),
            "{min:?}..{max:?}"
        );
        assert_eq!(Jitter::with_seed(0.0, 1).apply(base), base);
    }

    #[test]
    fn backoff_doubles_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let got: Vec<u64> = (0..6).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 10, 10]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn atomic_write_sets_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn atomic_write_makes_a_new_temporary_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        let tmp = dir.path().join("f.tmp");
        // A leftover temporary file with a wider mode.
        std::fs::write(&tmp, b"old").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&p, b"one", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A symbolic link in its place: not followed.
        let target = dir.path().join("target");
        std::fs::write(&target, b"untouched").unwrap();
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
        let meta = std::fs::symlink_metadata(&p).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
    }

    #[test]
    fn rfc3339_round_trip() {
        let t = from_unix_millis(1_700_000_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        assert_eq!(unix_millis(t), 1_700_000_000_000);
    }
}
