//! The `fanfinity` binary: command-line parsing and dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use fanfinity::app::config::{Config, Overrides};
use fanfinity::app::context::{AppContext, Roles};
use fanfinity::app::{limits, shutdown};
use fanfinity::kafka::dead_topic::{self, DeadFilter};
use fanfinity::kafka::topics::TopicAdmin;
use fanfinity::sink::migrate;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Thread-per-core ingest of live fan-engagement events: HTTP -> Kafka -> ClickHouse.
#[derive(Parser, Debug)]
#[command(name = "fanfinity", version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug)]
struct GlobalArgs {
    /// TOML configuration file (defaults, then this file, then FANFINITY_* variables,
    /// then flags).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Any setting as section.key=value, e.g. --set sink.max_batch_rows=50000.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Shortcut for --set http.listen=ADDR.
    #[arg(long, global = true, value_name = "ADDR")]
    listen: Option<String>,
    /// Shortcut for --set kafka.brokers=LIST.
    #[arg(long, global = true, value_name = "LIST")]
    brokers: Option<String>,
    /// Shortcut for --set clickhouse.url=URL.
    #[arg(long, global = true, value_name = "URL")]
    clickhouse_url: Option<String>,
    /// Shortcut for --set http.shards=N (0: one per core).
    #[arg(long, global = true, value_name = "N")]
    shards: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ingest, sink consumers and queries in one process (the default).
    Serve,
    /// HTTP ingest and queries only; no consumers.
    Ingest,
    /// Sink consumers only: Kafka -> ClickHouse.
    Consume,
    /// Kafka topic administration.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Create the ClickHouse database and tables, applying pending migrations.
    Migrate,
    /// The dead-letter topic: what could not be stored, and why.
    Dead {
        #[command(subcommand)]
        action: DeadAction,
    },
    /// Print the effective configuration (secrets redacted).
    Config {
        /// Validate only: exit non-zero with the reason if the configuration is invalid.
        #[arg(long)]
        check: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DeadAction {
    /// Print dead letters as JSON lines (reason, source position, original record).
    List(DeadArgs),
    /// Send dead letters back to the events topic (after fixing the cause).
    Replay(DeadArgs),
}

#[derive(Args, Debug)]
struct DeadArgs {
    /// Only letters whose reason contains this text.
    #[arg(long)]
    reason: Option<String>,
    /// Only letters of this match id (the record key).
    #[arg(long = "match")]
    match_id: Option<String>,
}

#[derive(Subcommand, Debug)]
enum TopicsAction {
    /// Create the events, retry and dead-letter topics if missing.
    Create,
    /// Show the topics' partition counts against the configuration.
    Describe,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load_config(&cli.global) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("fanfinity: {err:#}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    match run(cli.command.unwrap_or(Command::Serve), config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!(error = format!("{err:#}"), "fanfinity failed");
            ExitCode::FAILURE
        }
    }
}

fn load_config(global: &GlobalArgs) -> Result<Config> {
    let mut pairs = Vec::new();
    let shortcuts = [
        ("http.listen", global.listen.clone()),
        ("kafka.brokers", global.brokers.clone()),
        ("clickhouse.url", global.clickhouse_url.clone()),
        ("http.shards", global.shards.map(|n| n.to_string())),
    ];
    for (key, value) in shortcuts {
        if let Some(value) = value {
            // Quoted so addresses and URLs stay strings.
            let value = if key == "http.shards" {
                value
            } else {
                format!("{value:?}")
            };
            pairs.push(format!("{key}={value}"));
        }
    }
    pairs.extend(global.set.iter().cloned());
    Config::load(global.config.as_deref(), &Overrides { pairs }).context("configuration refused")
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_thread_names(true);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(command: Command, config: Config) -> Result<()> {
    match command {
        Command::Serve => run_service(config, Roles::SERVE),
        Command::Ingest => run_service(config, Roles::INGEST),
        Command::Consume => run_service(config, Roles::CONSUME),
        Command::Topics { action } => {
            let admin = TopicAdmin::new(&config.kafka)?;
            let states = match action {
                TopicsAction::Create => admin.ensure()?,
                TopicsAction::Describe => admin.describe()?,
            };
            let mut mismatched = 0;
            for state in &states {
                let partitions = state
                    .partitions
                    .map_or_else(|| "missing".to_string(), |n| n.to_string());
                println!(
                    "{:<32} partitions={:<8} expected={}",
                    state.name, partitions, state.expected_partitions
                );
                mismatched += usize::from(state.partitions != Some(state.expected_partitions));
            }
            if mismatched > 0 {
                anyhow::bail!(
                    "{mismatched} topic(s) missing or with an unexpected partition count"
                );
            }
            Ok(())
        }
        Command::Migrate => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start a runtime for migrations")?;
            let report = runtime.block_on(migrate::run(&config.clickhouse))?;
            println!(
                "database {}: applied {:?}, already applied {:?}",
                config.clickhouse.database, report.applied, report.already_applied
            );
            Ok(())
        }
        Command::Dead { action } => {
            let (args, replay) = match action {
                DeadAction::List(args) => (args, false),
                DeadAction::Replay(args) => (args, true),
            };
            let filter = DeadFilter {
                reason_contains: args.reason,
                key: args.match_id,
            };
            let entries = dead_topic::read_dead(&config.kafka, &filter)?;
            if replay {
                let sent = dead_topic::replay(&config.kafka, &entries)?;
                println!("replayed {sent} dead letters to {}", config.kafka.topic);
            } else {
                for entry in &entries {
                    println!("{}", sonic_rs::to_string(entry)?);
                }
                eprintln!(
                    "{} dead letters in {}",
                    entries.len(),
                    config.kafka.dead_topic
                );
            }
            Ok(())
        }
        Command::Config { check } => {
            if check {
                println!("configuration is valid");
            }
            print!("{}", config.redacted_toml());
            Ok(())
        }
    }
}

fn run_service(config: Config, roles: Roles) -> Result<()> {
    limits::raise_limits();
    info!(roles = ?roles, config = %config.redacted_toml(), "starting fanfinity");
    let context = AppContext::start(config, roles).context("start-up failed")?;
    info!("fanfinity running; SIGTERM or Ctrl-C to stop");
    shutdown::wait_for_signal().context("cannot install signal handlers")?;
    context.shutdown();
    Ok(())
}
