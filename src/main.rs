//! The `fanfinity` binary: command-line parsing and dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use fanfinity::app::config::{Config, Overrides};
use fanfinity::app::context::{AppContext, Roles};
use fanfinity::app::{limits, shutdown};
use fanfinity::auth::{KeySet, Role};
use fanfinity::kafka::dead_topic::{self, DeadFilter};
use fanfinity::kafka::topics::TopicAdmin;
use fanfinity::sink::migrate;
use tracing::{error, info, warn};
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
    /// Benchmark only: the HTTP shards answering every event post 202 after reading its
    /// body, without decoding it or touching Kafka (the HTTP layer's ceiling; see
    /// benches/compare). Never deploy it: it accepts and drops events.
    NoopServer,
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
    /// API keys: make one (the plain key is printed once, with its config entry).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
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
enum KeysAction {
    /// Make a key; prints the key (give it to the client) and the `[[auth.keys]]` entry
    /// (put it in the configuration; it holds only a salted hash).
    New {
        /// Who uses the key, for operators ("android app", "ops dashboard").
        #[arg(long)]
        name: String,
        /// What the key may do; repeat for both.
        #[arg(long = "role", value_enum, required = true)]
        roles: Vec<KeyRole>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum KeyRole {
    Ingest,
    Read,
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
    match run(cli.command.unwrap_or(Command::Serve), config, &cli.global) {
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

fn run(command: Command, config: Config, global: &GlobalArgs) -> Result<()> {
    match command {
        Command::Serve => run_service(config, Roles::SERVE, global),
        Command::Ingest => run_service(config, Roles::INGEST, global),
        Command::Consume => run_service(config, Roles::CONSUME, global),
        Command::NoopServer => run_noop_server(config, global),
        Command::Keys {
            action: KeysAction::New { name, roles },
        } => {
            let roles = roles
                .iter()
                .map(|r| match r {
                    KeyRole::Ingest => Role::Ingest,
                    KeyRole::Read => Role::Read,
                })
                .collect();
            let made = fanfinity::auth::keys::new_key(&name, roles)?;
            let entry = toml::to_string(&KeysFile {
                auth: KeysSection {
                    keys: vec![made.entry],
                },
            })?;
            println!("# key (give it to the client; it is not stored anywhere):");
            println!("# {}", made.key);
            println!("{entry}");
            Ok(())
        }
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

/// The shape `keys new` prints: an `[[auth.keys]]` entry.
#[derive(serde::Serialize)]
struct KeysFile {
    auth: KeysSection,
}

#[derive(serde::Serialize)]
struct KeysSection {
    keys: Vec<fanfinity::auth::KeyEntry>,
}

fn run_service(config: Config, roles: Roles, global: &GlobalArgs) -> Result<()> {
    limits::raise_limits();
    if roles.ingest {
        check_keys(&config)?;
    }
    let signals = shutdown::install().context("cannot install signal handlers")?;
    info!(roles = ?roles, config = %config.redacted_toml(), "starting fanfinity");
    let context = AppContext::start(config, roles).context("start-up failed")?;
    info!("fanfinity running; SIGTERM or Ctrl-C to stop, SIGHUP to reload keys");
    let auth = context.auth();
    shutdown::wait_for_signal(signals, || reload_keys(global, &auth))
        .context("cannot install signal handlers")?;
    context.shutdown();
    Ok(())
}

/// `noop-server`: the shards alone, with the same signals and shutdown as the service.
fn run_noop_server(config: Config, global: &GlobalArgs) -> Result<()> {
    limits::raise_limits();
    check_keys(&config)?;
    let signals = shutdown::install().context("cannot install signal handlers")?;
    warn!(listen = %config.http.listen,
        "noop-server: answering event posts 202 and DROPPING them (benchmark only)");
    let context = AppContext::start_noop(config).context("start-up failed")?;
    let auth = context.auth();
    shutdown::wait_for_signal(signals, || reload_keys(global, &auth))
        .context("cannot install signal handlers")?;
    context.shutdown();
    Ok(())
}

/// Refuses to serve events with auth on and no key that may post them; warns when auth
/// is off or the public development keys are in force.
fn check_keys(config: &Config) -> Result<()> {
    if !config.auth.enabled {
        warn!("auth.enabled = false: anyone who reaches this port may post and read events");
        return Ok(());
    }
    if !has_ingest_key(config) {
        anyhow::bail!(
            "auth.enabled is true but no key has the ingest role: make one with \
             `fanfinity keys new --name NAME --role ingest` and add the printed entry, or \
             set auth.enabled = false (development only)"
        );
    }
    for (id, key) in fanfinity::auth::dev::in_use(config.auth.keys.iter().map(|k| k.id.clone())) {
        warn!(key_id = %id, key = %key,
            "PUBLIC development key in force (scripts/dev.toml); never deploy it");
    }
    Ok(())
}

fn has_ingest_key(config: &Config) -> bool {
    config
        .auth
        .keys
        .iter()
        .any(|k| k.roles.contains(&Role::Ingest))
}

/// SIGHUP: reads the configuration again and replaces the key set if it is valid. Other
/// settings need a restart.
fn reload_keys(global: &GlobalArgs, auth: &fanfinity::auth::AuthState) {
    let loaded = load_config(global).and_then(|config| {
        // The start-up rule holds for reloads too: a set that would lock out every
        // client posting events is refused, not swapped in.
        if auth.enabled && !has_ingest_key(&config) {
            anyhow::bail!("no key in the new configuration has the ingest role");
        }
        KeySet::from_entries(&config.auth.keys)
            .map_err(anyhow::Error::from)
            .map(|keys| (config, keys))
    });
    match loaded {
        Ok((config, keys)) => {
            if config.auth.enabled != auth.enabled {
                warn!("auth.enabled changed; that takes a restart, the keys were reloaded");
            }
            info!(keys = keys.len(), "keys reloaded");
            auth.replace(keys);
        }
        Err(err) => error!(
            error = format!("{err:#}"),
            "reload refused; the old keys stay"
        ),
    }
}
