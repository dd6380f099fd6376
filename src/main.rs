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
    /// Manage what cachefront installs in PostgreSQL so that writes reach it: the triggers or
    /// publication of the change source and the DDL event trigger (run as the tables' owner,
    /// and as a superuser for the event trigger; idempotent).
    Triggers {
        #[command(subcommand)]
        action: TriggerAction,
    },
}

#[derive(clap::Subcommand, Debug)]
enum TriggerAction {
    /// Install the DDL event trigger, and make the tables named queries read plus
    /// `invalidation.tables` report their writes (triggers, or the publication with
    /// `invalidation.source = "wal"`).
    Install,
    /// Remove everything cachefront installed in the database: every trigger, the DDL event
    /// triggers, their functions and schema, and the publication of the WAL change source.
    Remove,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref(), std::env::vars())
        .and_then(|c| cachefront::server::check_config(&c).map(|()| c))
        .with_context(|| match &cli.config {
            Some(p) => format!("invalid configuration in {}", p.display()),
            None => "invalid configuration".to_string(),
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
        let upstream = match config.valkey.cluster.len() {
            0 => String::new(),
            1 => ", Valkey Cluster (1 seed node)".to_string(),
            n => format!(", Valkey Cluster ({n} seed nodes)"),
        };
        let replicas = match config.postgres.replicas.len() {
            0 => String::new(),
            1 => ", 1 PostgreSQL replica".to_string(),
            n => format!(", {n} PostgreSQL replicas"),
        };
        println!(
            "configuration OK: listen {plain}{tls}, {} named queries{upstream}{replicas}",
            config.named_queries().len()
        );
        return Ok(());
    }
    init_tracing(&config.log_format);
    // Clients are served on threads of their own (`cachefront::cores`: by default one per CPU
    // but one); this runtime only accepts them and runs the background work (invalidation,
    // the lease, metrics, the verifier), which one thread keeps up with.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        None => runtime.block_on(run(config, cli.config)),
        Some(Cmd::Triggers { action }) => runtime.block_on(triggers(config, action)),
    }
}

async fn triggers(config: Config, action: TriggerAction) -> anyhow::Result<()> {
    let shared = cachefront::server::Shared::new(config)?;
    match action {
        TriggerAction::Install => {
            shared
                .invalidation
                .install_configured(&shared.db)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let unwatched = shared.invalidation.unwatched();
            if !unwatched.is_empty() {
                anyhow::bail!("could not make these tables (by OID) report their writes: {unwatched:?}; see the log above");
            }
            if let Some(why) = shared.invalidation.ddl_hook_missing() {
                eprintln!("warning: the DDL event trigger is {why}");
            }
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
            cachefront::db::wal::drop_publication(
                &client,
                &shared.config().invalidation.publication,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("invalidation triggers removed from {n} table(s); publication dropped if there was one");
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

async fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let server = cachefront::server::Server::bind(config).await?;
    tokio::spawn(reload_on_sighup(server.shared(), path));
    let threads = server.threads();
    match (server.tls_addr(), config_only_tls(&server)) {
        (Some(tls), true) => {
            tracing::info!(tls = %tls, threads, "cachefront listening (TLS only)")
        }
        (Some(tls), false) => {
            tracing::info!(addr = %server.local_addr(), tls = %tls, threads, "cachefront listening")
        }
        (None, _) => tracing::info!(addr = %server.local_addr(), threads, "cachefront listening"),
    }
    server.run(shutdown_signal()).await;
    Ok(())
}

/// `SIGHUP` re-reads the configuration (file and `CACHEFRONT_*` variables) and applies what
/// can change while running; a bad file is refused and the running configuration kept.
async fn reload_on_sighup(
    shared: std::sync::Arc<cachefront::server::Shared>,
    path: Option<PathBuf>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install a SIGHUP handler; reloading is off");
        return;
    };
    while hup.recv().await.is_some() {
        let loaded = Config::load(path.as_deref(), std::env::vars());
        match loaded
            .map_err(|e| e.to_string())
            .and_then(|c| shared.reload(c))
        {
            Ok(kept) => {
                tracing::info!(
                    named_queries = shared.named().len(),
                    "configuration reloaded (named queries, TTLs, SQL settings, limits)"
                );
                if !kept.is_empty() {
                    tracing::warn!(keys = ?kept, "these settings changed but need a restart; the running values are kept");
                }
                let shared = std::sync::Arc::clone(&shared);
                tokio::spawn(async move {
                    if let Err(e) = shared.invalidation.install_configured(&shared.db).await {
                        tracing::warn!(error = %e, "cannot put triggers on the reloaded queries' tables yet");
                    }
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the running configuration is kept")
            }
        }
    }
}

fn config_only_tls(server: &cachefront::server::Server) -> bool {
    server.shared().config().tls.only
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
