//! The `switchboard` binary: `switchboard serve` runs the engine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchboard::config::DurabilityMode;
use switchboard::Config;

/// Switchboard: a thread-per-core push engine for customer-service platforms.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine. Without flags it uses the embedded defaults (ops/switchboard.toml
    /// lists them): data port 127.0.0.1:7400, control port 127.0.0.1:7401, one shard per
    /// allowed CPU.
    Serve(ServeArgs),
    /// Print the effective configuration (defaults, file, flags) as TOML and exit.
    Config(ServeArgs),
    /// Read a shard's journal directory (DATA_DIR/shard-N), for operators. Run it on a stopped
    /// engine's directory, or on a copy.
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Print segments, position ranges, checksums and any damage.
    Inspect {
        /// The journal directory of one shard.
        dir: PathBuf,
    },
    /// Check every frame and checksum; exit 1 when anything is damaged.
    Verify {
        /// The journal directory of one shard.
        dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file; flags given here override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data port for gateways (binary protocol).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Control port (HTTP /healthz, /readyz, /metrics).
    #[arg(long, value_name = "ADDR")]
    control: Option<SocketAddr>,
    /// Number of shards (0 = one per allowed CPU).
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// CPUs to pin shards to, e.g. "0,1" or "2-5" (default: the process's affinity set).
    #[arg(long, value_name = "LIST", value_parser = parse_cpus)]
    cpus: Option<CpuList>,
    /// Directory for durable state (one journal per shard under DIR/shard-N).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// What PUBACK promises for tenants without their own setting: `sync` (after fdatasync),
    /// `interval` (after the journal write; synced every journal.store.interval_ms) or `none`
    /// (memory only; no journal).
    #[arg(long, value_name = "MODE", value_parser = parse_durability)]
    durability: Option<DurabilityMode>,
}

fn parse_durability(text: &str) -> Result<DurabilityMode, String> {
    match text {
        "sync" => Ok(DurabilityMode::Sync),
        "interval" => Ok(DurabilityMode::Interval),
        "none" => Ok(DurabilityMode::None),
        other => Err(format!("`{other}` is not a durability; use sync, interval or none")),
    }
}

#[derive(Clone)]
struct CpuList(Vec<usize>);

fn parse_cpus(text: &str) -> Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parse = |n: &str| n.trim().parse::<usize>().map_err(|_| format!("`{n}` is not a CPU number"));
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (parse(from)?, parse(to)?);
                if from > to || to - from > 4096 {
                    return Err(format!("bad CPU range `{part}`"));
                }
                cpus.extend(from..=to);
            }
            None => cpus.push(parse(part)?),
        }
    }
    if cpus.is_empty() {
        return Err("empty CPU list".into());
    }
    Ok(CpuList(cpus))
}

impl ServeArgs {
    fn effective_config(&self) -> Result<Config, switchboard::config::ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(control) = self.control {
            config.server.control = control;
        }
        if let Some(shards) = self.shards {
            config.server.shards = shards;
        }
        if let Some(cpus) = &self.cpus {
            config.server.cpus.clone_from(&cpus.0);
        }
        if let Some(dir) = &self.data_dir {
            config.server.data_dir.clone_from(dir);
        }
        if let Some(durability) = self.durability {
            config.journal.durability = durability;
        }
        config.validate()?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Config(args) => match args.effective_config() {
            Ok(config) => {
                print!("{}", toml::to_string(&config).expect("config serialises"));
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("switchboard: {error}");
                ExitCode::from(2)
            }
        },
        Command::Serve(args) => serve(&args),
        Command::Journal { command } => journal(&command),
    }
}

fn journal(command: &JournalCommand) -> ExitCode {
    let (dir, report) = match command {
        JournalCommand::Inspect { dir } => (dir, switchboard::journal::inspect(dir)),
        JournalCommand::Verify { dir } => (dir, switchboard::journal::verify(dir)),
    };
    match report {
        Ok(report) => {
            print!("{report}");
            if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) => {
            eprintln!("switchboard: cannot read journal {}: {error}", dir.display());
            ExitCode::from(2)
        }
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let config = match args.effective_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("switchboard: {error}");
            return ExitCode::from(2);
        }
    };
    let engine = match switchboard::start(config) {
        Ok(engine) => engine,
        Err(error) => {
            eprintln!("switchboard: {error}");
            return ExitCode::from(1);
        }
    };
    // SIGTERM/SIGINT start a graceful shutdown; a second signal exits at once.
    let trigger = engine.shutdown_trigger();
    let mut signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT]) {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("switchboard: cannot install signal handlers: {error}");
            return ExitCode::from(1);
        }
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut received = 0;
            for signal in signals.forever() {
                received += 1;
                if received > 1 {
                    tracing::warn!(signal, "second signal: exiting now");
                    std::process::exit(130);
                }
                tracing::info!(signal, "shutting down: GOAWAY to every connection, draining");
                trigger.trigger();
            }
        })
        .expect("spawning the signal thread");
    engine.wait();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
