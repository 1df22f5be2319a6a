//! `loadtest`: drives a fanfinity server with a replayed match and checks what landed.
//!
//! Only `main` lives here: flag parsing and dispatch. Each subcommand has its own module
//! (`replay.rs` for now). The generator only targets this machine unless told otherwise
//! (`target.rs`), and every loop in it is bounded in time and count.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod client;
mod events;
mod match_file;
#[cfg(test)]
mod mock_server;
mod replay;
mod report;
mod schedule;
mod stats;
mod target;
mod verify;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadtest: error: starting the tokio runtime: {e}");
            return ExitCode::from(EXIT_CANNOT_RUN);
        }
    };

    let result = runtime.block_on(async {
        match cli.command {
            Command::Replay(args) => replay::run(args).await,
        }
    });
    // Retry timers of abandoned batches may still be pending; don't wait for them.
    runtime.shutdown_timeout(Duration::from_secs(1));

    match result {
        Ok(outcome) => {
            let events = &outcome.summary.events;
            let accepted = format!(
                "{} of {} events accepted",
                events.accepted, events.submitted
            );
            if outcome.failures.is_empty() {
                eprintln!("loadtest: passed ({accepted})");
                ExitCode::SUCCESS
            } else {
                let reasons = outcome.failures.join("; ");
                eprintln!("loadtest: checks failed ({accepted}): {reasons}");
                ExitCode::from(EXIT_CHECKS_FAILED)
            }
        }
        Err(e) => {
            eprintln!("loadtest: error: {e:#}");
            ExitCode::from(EXIT_CANNOT_RUN)
        }
    }
}
