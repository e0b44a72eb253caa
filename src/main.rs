#![forbid(unsafe_code)]
//! The `audience-sync` binary: parses the command line and hands over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = audience_sync::cli::Cli::parse();
    audience_sync::wigzo::install_crypto_provider();
    let quiet = matches!(cli.command, audience_sync::cli::Command::Demo(_));
    audience_sync::telemetry::init(cli.log_format, cli.verbose, quiet);
    match audience_sync::cli::run(cli).await {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
