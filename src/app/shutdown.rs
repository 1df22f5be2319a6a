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

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
pub use signal_hook::iterator::Signals;
use tracing::{info, warn};

/// Signals this soon after the first are taken as repeats of it.
const SAME_REQUEST: Duration = Duration::from_secs(2);

/// Takes over SIGTERM, SIGINT and SIGHUP. Call it before anything starts: until then
/// SIGHUP's default action would kill the process.
///
/// # Errors
/// The signal handlers cannot be installed.
pub fn install() -> std::io::Result<Signals> {
    Signals::new([SIGTERM, SIGINT, SIGHUP])
}

/// Blocks until SIGTERM or SIGINT, calling `on_reload` for every SIGHUP meanwhile, then
/// arms the "second signal exits now" handler.
///
/// # Errors
/// The signal handlers cannot be installed.
pub fn wait_for_signal(mut signals: Signals, mut on_reload: impl FnMut()) -> std::io::Result<i32> {
    let mut first = SIGTERM;
    for signal in signals.forever() {
        if signal == SIGHUP {
            info!(signal, "reload requested");
            on_reload();
            continue;
        }
        first = signal;
        break;
    }
    let requested = Instant::now();
    info!(signal = first, "shutdown requested");
    std::thread::Builder::new()
        .name("second-signal".into())
        .spawn(move || {
            for second in signals.forever() {
                if second == SIGHUP || requested.elapsed() < SAME_REQUEST {
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
