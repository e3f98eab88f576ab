//! Test-only fault injection: a slow disk. While the file given to [`inject_disk_faults`]
//! exists and holds a number of milliseconds, every sync of the WAL syncer takes that much
//! longer, as if its `fsync` stalled: every Raft log write waiting for it (append, vote,
//! truncation, purge, of every shard) is reported durable that much later. The
//! file is read again at most every 100 ms; a missing, empty or unreadable file, or one that
//! is not a number, means a healthy disk. Nothing is injected unless the process asked for it
//! (`cluster.disk_faults_file`).

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How often the file is read again.
const REREAD_EVERY: Duration = Duration::from_millis(100);
/// The longest stall a file can ask for (a larger number is capped): a test's fault, not a
/// hang.
const MAX_STALL: Duration = Duration::from_secs(30);

struct DiskFaults {
    path: PathBuf,
    /// When the file was last read, and the delay it gave.
    last: Mutex<Option<(Instant, Duration)>>,
}

static DISK_FAULTS: OnceLock<DiskFaults> = OnceLock::new();

/// Turns slow-disk injection on for this process, driven by the file at `path` (see the
/// module docs). For tests only. Returns false if it was already on (the first path stays).
pub fn inject_disk_faults(path: PathBuf) -> bool {
    DISK_FAULTS
        .set(DiskFaults {
            path,
            last: Mutex::new(None),
        })
        .is_ok()
}

/// The delay the file at `path` asks for now.
fn read_delay(path: &std::path::Path) -> Duration {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, |ms| {
            Duration::from_millis(ms).min(MAX_STALL)
        })
}

impl DiskFaults {
    /// The delay the file asks for at `now`, read again if the last read is older than
    /// [`REREAD_EVERY`].
    fn delay_at(&self, now: Instant) -> Duration {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match *last {
            Some((read_at, delay)) if now.saturating_duration_since(read_at) < REREAD_EVERY => {
                delay
            }
            _ => {
                let delay = read_delay(&self.path);
                *last = Some((now, delay));
                delay
            }
        }
    }
}

/// The delay to add to a synced write now (zero unless injection is on and the file asks
/// for one).
fn sync_delay() -> Duration {
    DISK_FAULTS
        .get()
        .map_or(Duration::ZERO, |faults| faults.delay_at(Instant::now()))
}

/// Stalls the calling thread for the injected delay, if any: called by the WAL syncer right
/// after its `fsync`, on its thread (which a stalled `fsync` would block too).
pub(crate) fn stall_synced_write() {
    let delay = sync_delay();
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_gives_the_delay_and_anything_else_is_a_healthy_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        assert_eq!(read_delay(&path), Duration::ZERO, "missing file");
        std::fs::write(&path, "250\n").expect("write");
        assert_eq!(read_delay(&path), Duration::from_millis(250));
        std::fs::write(&path, "").expect("write");
        assert_eq!(read_delay(&path), Duration::ZERO, "empty file");
        std::fs::write(&path, "slow").expect("write");
        assert_eq!(read_delay(&path), Duration::ZERO, "not a number");
        std::fs::write(&path, "-5").expect("write");
        assert_eq!(read_delay(&path), Duration::ZERO, "negative");
        std::fs::write(&path, "999999999").expect("write");
        assert_eq!(read_delay(&path), MAX_STALL, "capped");
    }

    #[test]
    fn the_file_is_read_again_at_most_every_100_ms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let faults = DiskFaults {
            path: path.clone(),
            last: Mutex::new(None),
        };
        let t0 = Instant::now();
        assert_eq!(faults.delay_at(t0), Duration::ZERO);
        std::fs::write(&path, "40").expect("write");
        assert_eq!(
            faults.delay_at(t0 + Duration::from_millis(50)),
            Duration::ZERO
        );
        assert_eq!(
            faults.delay_at(t0 + REREAD_EVERY),
            Duration::from_millis(40)
        );
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(
            faults.delay_at(t0 + REREAD_EVERY + Duration::from_millis(99)),
            Duration::from_millis(40),
            "cached"
        );
        assert_eq!(faults.delay_at(t0 + 2 * REREAD_EVERY), Duration::ZERO);
    }
}
