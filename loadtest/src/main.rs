//! `loadtest`: drives a fanfinity server and checks what landed.
//!
//! Only `main` lives here: flag parsing and dispatch. `replay` (a match's crowd, closed
//! pool of workers) lives in `replay.rs`; the open-model profiles `steady`, `spike` and
//! `ramp` in `profiles.rs` over the engine in `open_model.rs`; the closed-loop query poller
//! `poll` in `poll.rs`. The generator only targets this machine unless told otherwise
//! (`target.rs`), and every loop in it is bounded in time and count.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod body_template;
mod client;
mod conn_pool;
mod events;
mod fd_limit;
mod match_file;
#[cfg(test)]
mod mock_server;
mod open_model;
mod open_report;
mod open_stats;
mod poll;
mod proc_watch;
mod profiles;
mod ramp_plan;
mod replay;
mod report;
mod schedule;
mod stats;
mod target;
mod verify;
mod visibility;
mod wire;

/// Exit code of a run that completed but failed its checks.
const EXIT_CHECKS_FAILED: u8 = 1;

/// Exit code of a run that could not be carried out (bad flags, server not ready, ...),
/// the same code clap uses for usage errors.
const EXIT_CANNOT_RUN: u8 = 2;

#[derive(Parser)]
#[command(name = "loadtest", version, about = "Load generator for fanfinity")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a match's crowd against the server, then verify ClickHouse and the metrics.
    Replay(replay::ReplayArgs),
    /// Open model: one constant arrival rate for --duration seconds.
    Steady(profiles::SteadyArgs),
    /// Open model: base rate, then --multiplier x rate for --spike-for seconds, then base.
    Spike(profiles::SpikeArgs),
    /// Open model: geometric steps until p99, throughput or errors break; finds the
    /// highest rate that held.
    Ramp(profiles::RampArgs),
    /// Closed loop: --clients keep-alive clients GET --path(s) every --interval and
    /// report latency, statuses and answer age per path (the analytics API's benchmark).
    Poll(poll::PollArgs),
}

/// What any subcommand ended with: a one-line summary and why it failed, if it did.
struct Verdict {
    summary: String,
    failures: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Replay(_) => None,
        Command::Steady(a) => a.common.threads,
        Command::Spike(a) => a.common.threads,
        Command::Ramp(a) => a.common.threads,
        Command::Poll(a) => a.threads,
    };
    if threads == Some(0) {
        // Checked here: tokio refuses zero workers by panicking.
        eprintln!("loadtest: error: --threads must be 1..=1024");
        return ExitCode::from(EXIT_CANNOT_RUN);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadtest: error: starting the tokio runtime: {e}");
            return ExitCode::from(EXIT_CANNOT_RUN);
        }
    };

    let result = runtime.block_on(async {
        let open = |outcome: profiles::OpenOutcome| Verdict {
            summary: format!(
                "{} of {} events accepted, {:.0} events/s",
                outcome.result.events.accepted,
                outcome.result.events.sent,
                outcome.result.achieved_events_per_s
            ),
            failures: outcome.failures,
        };
        match cli.command {
            Command::Replay(args) => replay::run(args).await.map(|outcome| Verdict {
                summary: format!(
                    "{} of {} events accepted",
                    outcome.summary.events.accepted, outcome.summary.events.submitted
                ),
                failures: outcome.failures,
            }),
            Command::Steady(args) => profiles::run(profiles::Profile::Steady(args))
                .await
                .map(open),
            Command::Spike(args) => profiles::run(profiles::Profile::Spike(args))
                .await
                .map(open),
            Command::Ramp(args) => profiles::run(profiles::Profile::Ramp(args)).await.map(open),
            Command::Poll(args) => poll::run(args).await.map(|outcome| Verdict {
                summary: format!(
                    "{} requests, {} without 2xx, p99 {:.2} ms",
                    outcome.all.requests, outcome.all.failed, outcome.all.latency_ms.p99
                ),
                failures: outcome.failures,
            }),
        }
    });
    // Retry timers and in-flight requests of an abandoned run may still be pending; don't
    // wait for them.
    runtime.shutdown_timeout(Duration::from_secs(1));

    match result {
        Ok(verdict) => {
            if verdict.failures.is_empty() {
                eprintln!("loadtest: passed ({})", verdict.summary);
                ExitCode::SUCCESS
            } else {
                let reasons = verdict.failures.join("; ");
                eprintln!("loadtest: checks failed ({}): {reasons}", verdict.summary);
                ExitCode::from(EXIT_CHECKS_FAILED)
            }
        }
        Err(e) => {
            eprintln!("loadtest: error: {e:#}");
            ExitCode::from(EXIT_CANNOT_RUN)
        }
    }
}
