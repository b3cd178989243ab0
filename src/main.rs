//! pinhole — a SIP/SDP-aware NAT traversal edge.
//!
//! This binary is the I/O shell: it reads the configuration, binds sockets, reads the
//! clock and moves bytes between the network and the sans-IO cores in `pinhole-sip` and
//! `pinhole-media`.

mod agent;
mod agent_media;
mod cdr;
mod cluster;
mod codec;
mod config;
mod dataplane;
mod faketcp;
mod fastpath;
mod fleet;
mod gather;
mod hep;
mod limits;
mod metrics;
mod mmsg;
mod ng;
mod probe;
mod quality;
mod recording;
mod redis_link;
mod server;
mod store;
mod stun;
mod takeover;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// mimalloc: the ng reply cache and SIP transactions churn through medium-sized buffers
/// across threads, which glibc's allocator spends most of its time coalescing.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "pinhole", version, about = "SIP/SDP-aware NAT traversal edge")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the public edge: SIP proxy/registrar (and, as they land, STUN, relay, ng).
    Server {
        /// Configuration file; without it the embedded config/pinhole.toml is used.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file (server or agent) and print every error with its line and
    /// column.
    CheckConfig { file: PathBuf },
    /// Run the edge helper next to unchanged phones on a LAN: their outbound proxy towards
    /// the pinhole server.
    Agent {
        #[arg(long)]
        config: PathBuf,
    },
    /// Report how the NAT in front of this host behaves (RFC 5780), against a STUN server
    /// with an alternate address (pinhole's, or coturn's).
    Probe {
        /// STUN server IP[:PORT] (port 3478 by default).
        #[arg(long, required_unless_present = "faketcp")]
        server: Option<String>,
        /// Instead: whether fake TCP gets through to this forwarder (IP:PORT); needs root.
        #[arg(long)]
        faketcp: Option<std::net::SocketAddr>,
        /// Datagrams the fake-TCP probe sends (50 a second).
        #[arg(long, default_value_t = 100)]
        count: u32,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
        /// Local address to probe from.
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
        /// Also measure how long an idle mapping lives (takes up to four minutes).
        #[arg(long)]
        lifetime: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Probe { faketcp: Some(fwd), bind, count, .. } => {
            let bind = match bind {
                Some(std::net::IpAddr::V4(ip)) => ip,
                _ => std::net::Ipv4Addr::UNSPECIFIED,
            };
            match faketcp::probe(fwd, bind, count) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("pinhole probe --faketcp: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Probe { server, json, bind, lifetime, .. } => {
            probe::run(server.as_deref().unwrap_or_default(), json, bind, lifetime)
        }
        Command::Server { config } => {
            init_logging();
            exit(load(config.as_deref()).and_then(server::run))
        }
        Command::Agent { config } => {
            init_logging();
            exit(load_agent(&config).and_then(agent::run))
        }
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinhole: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_agent(path: &std::path::Path) -> anyhow::Result<config::AgentFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    config::AgentFile::parse(&text).map_err(|errs| {
        let list: Vec<String> = errs.iter().map(|e| format!("{}: {e}", path.display())).collect();
        anyhow::anyhow!("invalid agent configuration:\n{}", list.join("\n"))
    })
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<config::Config> {
    let Some(path) = path else {
        return Ok(config::Config::embedded());
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    config::Config::parse(&text).map_err(|errs| {
        let list: Vec<String> = errs.iter().map(|e| format!("{}: {e}", path.display())).collect();
        anyhow::anyhow!("invalid configuration:\n{}", list.join("\n"))
    })
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let parsed = if config::is_agent_file(&text) {
        config::AgentFile::parse(&text).map(|_| "agent")
    } else {
        config::Config::parse(&text).map(|_| "server")
    };
    match parsed {
        Ok(role) => {
            println!("{}: ok ({role} configuration)", path.display());
            ExitCode::SUCCESS
        }
        Err(errs) => {
            for e in errs {
                eprintln!("{}:{}:{}: {}", path.display(), e.line, e.column, e.message);
            }
            ExitCode::FAILURE
        }
    }
}
