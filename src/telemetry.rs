//! Logging: `tracing` with key=value fields on stderr, as text for people or JSON for machines.

use tracing_subscriber::EnvFilter;

/// How logs are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for production.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level (`info`, or `warn`
/// when `quiet`: commands such as `demo` that tell their own story on stdout).
pub fn init(format: LogFormat, verbose: bool, quiet: bool) {
    let default = if verbose {
        "debug,sqlx=warn,hyper=info,reqwest=info"
    } else if quiet {
        "warn"
    } else {
        "info,sqlx=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never into files or journals.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
