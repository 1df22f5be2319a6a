//! The shutdown contract, and the signal that starts it.
//!
//! On the first SIGTERM or SIGINT the process shuts down in this order, each stage
//! logged at info with its counts ([`super::context::AppContext::shutdown`] runs it):
//! 1. Shards stop accepting connections and refuse new events with 503
//!    `shutting_down`; requests already in flight get their real answer (202 after
//!    Kafka's acknowledgement, or 503); connections close after their current request.
//!    Bounded by `http.shutdown_grace_ms`.
//! 2. The producer is flushed, bounded by `kafka.flush_timeout_ms`. It is never dropped
//!    unflushed; a record still queued after the bound belongs to a request that was not
//!    answered 202.
//! 3. Consumers insert their current batch (retrying up to `sink.shutdown_drain_ms`),
//!    store and commit its offsets, and leave the group. A batch that could not be
//!    inserted stays uncommitted and is consumed again on the next start.
//! 4. The query runtime stops.
//!
//! A second signal during shutdown exits at once with status 130. Signals arriving within
//! two seconds of the first count as the same request, because supervisors such as
//! `timeout` signal the process and then its whole group.

use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{info, warn};

/// Signals this soon after the first are taken as repeats of it.
const SAME_REQUEST: Duration = Duration::from_secs(2);

/// Blocks until SIGTERM or SIGINT, then arms the "second signal exits now" handler.
///
/// # Errors
/// The signal handlers cannot be installed.
pub fn wait_for_signal() -> std::io::Result<i32> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let first = signals.forever().next().unwrap_or(SIGTERM);
    let requested = Instant::now();
    info!(signal = first, "shutdown requested");
    std::thread::Builder::new()
        .name("second-signal".into())
        .spawn(move || {
            for second in signals.forever() {
                if requested.elapsed() < SAME_REQUEST {
                    continue;
                }
                warn!(
                    signal = second,
                    "second signal, exiting without finishing shutdown"
                );
                std::process::exit(130);
            }
        })?;
    Ok(first)
}
