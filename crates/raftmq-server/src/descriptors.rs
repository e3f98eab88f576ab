//! The process's file descriptors, prepared once at start: one per client connection.
//!
//! Two things a broker holding many connections wants done before the first client arrives:
//!
//! - **The soft open-files limit raised to the hard limit** (as most servers do): the soft
//!   default (often 1,024) would refuse connections long before the machine runs short.
//! - **The descriptor table grown in advance.** The kernel doubles a process's descriptor table
//!   when it fills (at 256, 512, 1,024, … open files) and, in a multi-threaded process, waits
//!   for an RCU grace period while doing so: every thread that opens a file meanwhile waits
//!   too. Measured here: each doubling stalled every new connection for ~12 ms, which made
//!   the 99th percentile connect time 20× Mosquitto's (single-threaded, so it never waits).
//!   Opening one descriptor high up at start (and closing it) does all the doubling while
//!   nothing waits. The table costs the kernel ~8 bytes per slot, so it is grown to the open
//!   files limit, at most [`RESERVE_MAX`] slots; beyond that it still grows on demand.

use std::os::fd::RawFd;
use tracing::{debug, info, warn};

/// Most descriptor-table slots reserved at start (~2 MiB of kernel memory).
pub const RESERVE_MAX: u64 = 1 << 18;
/// Highest soft limit asked for when the hard limit is unlimited (Linux's default
/// `fs.nr_open`).
const UNLIMITED_SOFT: u64 = 1 << 20;

/// What [`prepare`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptors {
    /// The soft open-files limit now in force (`None`: unlimited or unknown).
    pub limit: Option<u64>,
    /// Descriptor-table slots reserved (0: none).
    pub reserved: u64,
}

/// Raises the soft open-files limit to the hard one and grows the descriptor table to it (at
/// most [`RESERVE_MAX`]). Failures are logged and leave things as they were: the broker works
/// without either, only less well.
pub fn prepare() -> Descriptors {
    let limit = raise_soft_limit();
    let reserved = limit.unwrap_or(RESERVE_MAX).min(RESERVE_MAX);
    let reserved = match reserve(reserved) {
        Ok(()) => reserved,
        Err(e) => {
            warn!(slots = reserved, error = %e, "could not reserve the file descriptor table");
            0
        }
    };
    info!(
        open_files_limit = limit,
        reserved_slots = reserved,
        "file descriptors prepared"
    );
    Descriptors { limit, reserved }
}

fn raise_soft_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let wanted = now.maximum.unwrap_or(UNLIMITED_SOFT);
    match now.current {
        Some(current) if current < wanted => {
            let raised = Rlimit {
                current: Some(wanted),
                maximum: now.maximum,
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => {
                    debug!(from = current, to = wanted, "raised the open files limit");
                    Some(wanted)
                }
                Err(e) => {
                    warn!(limit = current, error = %e, "could not raise the open files limit");
                    Some(current)
                }
            }
        }
        current => current,
    }
}

/// Grows the descriptor table to hold `slots` descriptors by opening (and at once closing) one
/// at the top.
fn reserve(slots: u64) -> std::io::Result<()> {
    let Some(top) = slots.checked_sub(1).and_then(|t| RawFd::try_from(t).ok()) else {
        return Ok(());
    };
    let null = std::fs::File::open("/dev/null")?;
    let high = rustix::io::fcntl_dupfd_cloexec(&null, top)?;
    drop(high);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_limit_is_raised_to_the_hard_limit_and_the_table_reserved() {
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
        let done = prepare();
        assert_eq!(done.limit, Some(hard.unwrap_or(UNLIMITED_SOFT)));
        let expected = done.limit.unwrap_or(RESERVE_MAX).min(RESERVE_MAX);
        assert_eq!(done.reserved, expected);
        // The reserved slot was closed again: a new file gets a low descriptor.
        let file = std::fs::File::open("/dev/null").expect("open");
        assert!(
            (file.as_raw_fd() as u64) < expected.saturating_sub(1),
            "descriptor {} is the reserved one",
            file.as_raw_fd()
        );
        // The kernel's table has the slots (FDSize: slots allocated).
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let size: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("FDSize line");
        assert!(size >= expected, "FDSize {size} < {expected}");
        // Idempotent.
        assert_eq!(prepare(), done);
    }
}
