use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// dex's bitbucket-cloud connector as a gRPC service (connector.v1.ConnectorService).
#[derive(Parser)]
#[command(name = "bitbucket-connector", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC until SIGTERM/SIGINT, then drain and exit 0.
    Serve {
        /// The YAML config file.
        #[arg(short, long, env = "BITBUCKET_CONNECTOR_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file: print every problem and exit 1, or a summary and exit 0.
    CheckConfig {
        /// The YAML config file.
        #[arg(short, long, env = "BITBUCKET_CONNECTOR_CONFIG")]
        config: PathBuf,
    },
    /// Run the whole login against a built-in fake Bitbucket Cloud; no credentials needed.
    #[cfg(feature = "demo")]
    Demo {
        /// Where the service listens.
        #[arg(long, default_value = "127.0.0.1:5557")]
        addr: std::net::SocketAddr,
        /// Also serve /metrics, /healthz and /readyz here (e.g. 127.0.0.1:5558).
        #[arg(long)]
        telemetry: Option<std::net::SocketAddr>,
        /// Do a whole login and refresh at once, print each step, and exit
        /// (0 when both worked).
        #[arg(long)]
        walkthrough: bool,
        /// The fake Bitbucket user the walkthrough logs in as (alice or bob).
        #[arg(long, default_value = "alice", requires = "walkthrough")]
        login_as: String,
    },
    /// Serve the fake Bitbucket Cloud alone, for end-to-end tests.
    ///
    /// Prints `fake-bitbucket listening on http://127.0.0.1:PORT` once
    /// listening, serves until SIGTERM/SIGINT, then exits 0. Tests drive it
    /// through its unauthenticated control API under /_fake/ (see README).
    #[cfg(feature = "demo")]
    FakeBitbucket(fake_bitbucket::StandaloneArgs),
}

fn main() -> ExitCode {
    // A usage mistake (a missing --config, say) is a problem like any other:
    // exit 1, as check-config and serve do; --help and --version exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::CheckConfig { config } => bitbucket_connector::cli::check_config(&config),
        Command::Serve { config } => bitbucket_connector::cli::serve(&config),
        #[cfg(feature = "demo")]
        Command::Demo {
            addr,
            telemetry,
            walkthrough,
            login_as,
        } => bitbucket_connector::cli::exit(bitbucket_connector::cli::demo(
            addr,
            telemetry,
            walkthrough,
            &login_as,
        )),
        #[cfg(feature = "demo")]
        Command::FakeBitbucket(args) => {
            bitbucket_connector::cli::exit(fake_bitbucket::serve_standalone(args))
        }
    }
}
