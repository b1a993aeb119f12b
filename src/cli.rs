//! The command line: `serve`, `check-config`, `dev certs` (and more as gridgate grows).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;

/// gridgate: an auth-first gRPC gateway for build infrastructure.
///
/// It terminates TLS (optionally requiring client certificates), checks every
/// call's credentials (JWT with an HMAC secret, a PEM public key or JWKS URLs;
/// trusted headers; client certificates) against per-instance ACLs, and only
/// then lets it reach the Build Event Service or Remote Execution API services
/// behind it. Its config takes BuildGrid's `server:` and `authorization:`
/// sections as they are.
#[derive(Debug, Parser)]
#[command(name = "gridgate", version, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info`, `debug`, `gridgate=debug,info` (RUST_LOG also works).
    #[arg(long, global = true, env = "GRIDGATE_LOG")]
    pub log: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// gridgate's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    ///
    /// Without --config it runs an embedded default: plaintext on 127.0.0.1:50051,
    /// no authorization, in-memory stores; good for a first look, not for a
    /// shared endpoint. Stops on SIGTERM or SIGINT after in-flight requests finish.
    ///
    /// Example: gridgate serve --config gridgate.yaml
    Serve {
        /// The YAML config file (see the README's config reference).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Write the Gate's audit lines (one per decision: who, what, which
        /// instance, allow or deny and why, the request id) to FILE as JSON
        /// lines, appended, instead of stderr.
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
    },
    /// Validate a config file and print what it would run; exits 1 on errors.
    ///
    /// Every error names the file, the key path and the reason, e.g.
    /// `gridgate.yaml: server[0].credentials.tls-server-key: cannot read certs/server.key: No such file or directory`.
    CheckConfig {
        /// The YAML config file.
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
    /// Check ACL policy files, or explain a decision.
    Policy {
        /// `check` or `explain`.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Read build events stored in a running gateway.
    Events {
        /// `query`.
        #[command(subcommand)]
        command: crate::bes::cli::EventsCommand,
    },
    /// Read invocations (what happened in each build) from a running gateway.
    Invocations {
        /// `list`, `show` or `log`.
        #[command(subcommand)]
        command: crate::bes::invocation::cli::InvocationsCommand,
    },
    /// Helpers for development and trying gridgate out.
    Dev {
        /// `certs`.
        #[command(subcommand)]
        command: DevCommand,
    },
}

/// `gridgate policy ...`: ACL policy files.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file or a directory of per-team files.
    ///
    /// Errors (exit 1) name the file, line, key and reason. Warnings (exit 0) point at
    /// rules whose meaning differs between whole-value and BuildGrid's prefix matching,
    /// unknown RPC names, patterns that match an empty value, and dry-run entries.
    ///
    /// Example: gridgate policy check policies/
    Check {
        /// A policy file or a directory of *.yaml files.
        #[arg(value_name = "PATH")]
        path: PathBuf,
        /// How patterns match, as the config's `acl-match` (whole or prefix).
        #[arg(long = "match", value_name = "MODE", default_value = "whole")]
        match_mode: String,
    },
    /// Print the decision for one call, and the rule or reason behind it.
    ///
    /// The identity comes from a token (verified with the config's keys, JWKS
    /// included) or from claims given as JSON (not verified: for trying rules out).
    ///
    /// Example: gridgate policy explain --config gridgate.yaml --claims '{"sub":"ci","aud":"build"}' --instance team-a --rpc Write
    Explain {
        /// The gateway config (its authorization section and ACL files).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// A JWT to verify and decide for.
        #[arg(
            long,
            value_name = "TOKEN",
            conflicts_with = "claims",
            required_unless_present = "claims"
        )]
        token: Option<String>,
        /// Token claims as a JSON object, e.g. '{"sub":"alice","act":"ci-bot"}'.
        #[arg(long, value_name = "JSON")]
        claims: Option<String>,
        /// The instance name ("" for the unnamed instance).
        #[arg(long, value_name = "NAME")]
        instance: String,
        /// The RPC name as ACLs write it, e.g. FindMissingBlobs, Write.
        #[arg(long, value_name = "RPC")]
        rpc: String,
    },
}

/// `gridgate dev ...`: helpers for development.
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Make a throwaway CA, a server certificate for localhost and client certificates.
    ///
    /// Writes ca.crt, ca.key, server.crt, server.key and NAME.crt / NAME.key for each
    /// --client into DIR. Keys are mode 0600. Never use these in production, and never
    /// commit the keys.
    ///
    /// Example: gridgate dev certs --out certs/dev --client ci-bot --client alice
    Certs {
        /// Directory to write into (created if needed).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A client certificate to make, by common name (repeatable).
        #[arg(long = "client", value_name = "NAME", default_values_t = vec!["client".to_string()])]
        clients: Vec<String>,
        /// Extra DNS names or IPs for the server certificate (repeatable).
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// The target of the Gate's audit lines.
pub const AUDIT_TARGET: &str = "gridgate::audit";

/// Sets up logging on stderr (and the audit lines in `audit`, when given).
pub fn init_logging(format: LogFormat, filter: Option<&str>, audit: Option<std::fs::File>) {
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    use std::io::IsTerminal;
    let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let to_file = audit.is_some();
    let not_audit = filter_fn(move |m| !(to_file && m.target() == AUDIT_TARGET));
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(color)
        .with_writer(std::io::stderr);
    let stderr = match format {
        LogFormat::Text => stderr.with_filter(not_audit).boxed(),
        LogFormat::Json => stderr
            .json()
            .flatten_event(true)
            .with_filter(not_audit)
            .boxed(),
    };
    let audit = audit.map(|file| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::sync::Mutex::new(file))
            .with_filter(filter_fn(|m| m.target() == AUDIT_TARGET))
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(audit)
        .try_init();
}

/// Runs the command line; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let audit = match &cli.command {
        Command::Serve {
            audit_log: Some(path),
            ..
        } => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("error: --audit-log: cannot open {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    init_logging(cli.log_format, cli.log.as_deref(), audit);
    match cli.command {
        Command::Serve { config, .. } => serve(config),
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                // The authorization section too: key material and ACL files.
                match crate::gate::Gate::from_config(&c) {
                    Ok(gate) => {
                        print!("{}", c.summary());
                        if let Some(p) = gate.policy() {
                            let p = p.current();
                            println!(
                                "policy: version {}, instances {:?}",
                                p.version(),
                                p.instances()
                            );
                        }
                        println!("ok");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {}: {e}", c.source);
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Policy {
            command: PolicyCommand::Check { path, match_mode },
        } => policy_check(&path, &match_mode),
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    config,
                    token,
                    claims,
                    instance,
                    rpc,
                },
        } => crate::gate::explain::run(
            &config,
            token.as_deref(),
            claims.as_deref(),
            &instance,
            &rpc,
        ),
        Command::Events { command } => crate::bes::cli::run(command),
        Command::Invocations { command } => crate::bes::invocation::cli::run(command),
        Command::Dev {
            command:
                DevCommand::Certs {
                    out,
                    clients,
                    server_names,
                    force,
                },
        } => match crate::devcerts::write_dev_certs(&out, &clients, &server_names, force) {
            Ok(files) => {
                println!("CA certificate:     {}", files.ca_cert.display());
                println!(
                    "server certificate: {} (key {})",
                    files.server_cert.display(),
                    files.server_key.display()
                );
                for (name, crt, key) in &files.clients {
                    println!(
                        "client {name}:{}{} (key {})",
                        " ".repeat(12usize.saturating_sub(name.len())),
                        crt.display(),
                        key.display()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn policy_check(path: &std::path::Path, mode: &str) -> ExitCode {
    use crate::gate::policy::{check, MatchMode, PolicyOptions};
    let match_mode = match mode {
        "whole" => MatchMode::Whole,
        "prefix" => MatchMode::Prefix,
        other => {
            eprintln!("error: --match {other:?}: expected whole or prefix");
            return ExitCode::FAILURE;
        }
    };
    let opts = PolicyOptions { match_mode };
    let known = crate::gate::route::RouteTable::rpc_names();
    match check(path, &opts, &known) {
        Ok(warnings) => {
            for w in &warnings {
                println!("warning: {w}");
            }
            match crate::gate::policy::Policy::load(path, &opts) {
                Ok(p) => println!(
                    "ok: {} file(s), {} instance entr{}, version {}, {} warning(s)",
                    p.files().len().max(1),
                    p.instances().len(),
                    if p.instances().len() == 1 { "y" } else { "ies" },
                    p.version(),
                    warnings.len()
                ),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Option<PathBuf>) -> ExitCode {
    let loaded = match &config {
        Some(path) => Config::load(path),
        None => Config::embedded_default(),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = crate::server::shutdown_signal();
        tracing::info!(config = %config.source, version = env!("CARGO_PKG_VERSION"), "starting gridgate");
        let gateway = match crate::server::Gateway::bind(config).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        match gateway.serve(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}
