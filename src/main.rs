//! The `cachefront` binary: parse the command line, load the config, run until signalled.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

use cachefront::config::Config;

/// A Valkey-protocol caching front for PostgreSQL.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). Without one, the documented defaults apply.
    #[arg(long, short, env = "CACHEFRONT_CONFIG")]
    config: Option<PathBuf>,
    /// Check the configuration (file and CACHEFRONT_* variables) and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Manage the PostgreSQL triggers that notify cachefront of writes (run as the tables'
    /// owner; idempotent).
    Triggers {
        #[command(subcommand)]
        action: TriggerAction,
    },
}

#[derive(clap::Subcommand, Debug)]
enum TriggerAction {
    /// Install triggers on the tables named queries read plus `invalidation.tables`.
    Install,
    /// Remove every cachefront trigger, its function and schema.
    Remove,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config =
        Config::load(cli.config.as_deref(), std::env::vars()).with_context(|| {
            match &cli.config {
                Some(p) => format!("invalid configuration in {}", p.display()),
                None => "invalid configuration".to_string(),
            }
        })?;
    if cli.check_config {
        let plain = match config.tls.only {
            true => "off (tls.only)".to_string(),
            false => config.listen.clone(),
        };
        let tls = match config.tls.enabled() {
            true => format!(", tls.listen {}", config.tls.listen),
            false => String::new(),
        };
        println!(
            "configuration OK: listen {plain}{tls}, {} named queries",
            config.named_queries().len()
        );
        return Ok(());
    }
    init_tracing(&config.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.threads > 0 {
        builder.worker_threads(config.threads);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        None => runtime.block_on(run(config)),
        Some(Cmd::Triggers { action }) => runtime.block_on(triggers(config, action)),
    }
}

async fn triggers(config: Config, action: TriggerAction) -> anyhow::Result<()> {
    let shared = cachefront::server::Shared::new(config)?;
    match action {
        TriggerAction::Install => {
            shared
                .invalidation
                .install_configured(&shared.db, &shared.named)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("invalidation triggers installed");
        }
        TriggerAction::Remove => {
            let mut client = shared
                .db
                .client()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let n = cachefront::db::triggers::remove_all(&mut client)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("invalidation triggers removed from {n} table(s)");
        }
    }
    Ok(())
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let server = cachefront::server::Server::bind(config).await?;
    match (server.tls_addr(), config_only_tls(&server)) {
        (Some(tls), true) => tracing::info!(tls = %tls, "cachefront listening (TLS only)"),
        (Some(tls), false) => {
            tracing::info!(addr = %server.local_addr(), tls = %tls, "cachefront listening")
        }
        (None, _) => tracing::info!(addr = %server.local_addr(), "cachefront listening"),
    }
    server.run(shutdown_signal()).await;
    Ok(())
}

fn config_only_tls(server: &cachefront::server::Server) -> bool {
    server.shared().config.tls.only
}

/// SIGTERM or SIGINT (Ctrl-C) starts a graceful shutdown.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot install a SIGTERM handler");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
