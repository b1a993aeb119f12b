//! `gridgate policy explain`: the decision the Gate would make for one call,
//! and the rule or reason behind it.

use std::path::Path;
use std::process::ExitCode;

use serde_json::{Map, Value};

use super::identity::Identity;
use super::{jwt, Gate};
use crate::config::Config;

/// Exit code when the call would be denied (0: allowed, 1: error).
pub const DENIED: u8 = 2;

/// Runs the command; prints to stdout, errors to stderr.
pub fn run(
    config: &Path,
    token: Option<&str>,
    claims: Option<&str>,
    instance: &str,
    rpc: &str,
) -> ExitCode {
    match explain(config, token, claims, instance, rpc) {
        Ok((allowed, text)) => {
            print!("{text}");
            if allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(DENIED)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn explain(
    config_path: &Path,
    token: Option<&str>,
    claims: Option<&str>,
    instance: &str,
    rpc: &str,
) -> anyhow::Result<(bool, String)> {
    let config = Config::load(config_path)?;
    let gate = Gate::from_config(&config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let identity = match (token, claims) {
        (Some(token), _) => {
            let Some(verifier) = gate.jwt() else {
                anyhow::bail!(
                    "--token needs authorization method jwt in {}",
                    config.source
                );
            };
            runtime
                .block_on(async {
                    gate.start().await;
                    verifier.authenticate(token.trim()).await
                })
                .map_err(|e| anyhow::anyhow!("the token is refused (UNAUTHENTICATED): {e}"))?
        }
        (None, Some(json)) => {
            let value: Value = serde_json::from_str(json)
                .map_err(|e| anyhow::anyhow!("--claims is not JSON: {e}"))?;
            let Value::Object(map) = value else {
                anyhow::bail!("--claims must be a JSON object");
            };
            identity_from(&config, map)
        }
        (None, None) => anyhow::bail!("give --token or --claims"),
    };

    let mut out = String::new();
    let fmt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    out.push_str(&format!(
        "identity: actor={} subject={} workflow={}\n",
        fmt(&identity.actor),
        fmt(&identity.subject),
        fmt(&identity.workflow)
    ));
    let exempt = config
        .authorization
        .allow_unauthenticated_instances
        .iter()
        .any(|i| i == instance);
    if exempt {
        out.push_str(&format!(
            "note: {instance:?} is in allow-unauthenticated-instances: callers without credentials are decided as anonymous\n"
        ));
    }
    if let Some(live) = gate.policy() {
        out.push_str(&format!("policy version: {}\n", live.current().version()));
    }
    let verdict = gate.decide(Some(instance), rpc, &identity);
    if let Some(would) = &verdict.dry_run_denied {
        out.push_str(&format!("dry-run: would deny: {would}\n"));
    }
    let (allowed, reason, rule) = (verdict.allowed, verdict.reason, verdict.rule);
    out.push_str(&format!(
        "decision: {} {rpc} on {instance:?}\nreason: {reason}\n",
        if allowed {
            "ALLOW"
        } else {
            "DENY (PERMISSION_DENIED)"
        }
    ));
    if let Some(rule) = rule {
        out.push_str(&format!("rule: {rule}\n"));
    }
    Ok((allowed, out))
}

/// The identity unverified claims would give, with the config's claim mapping.
fn identity_from(config: &Config, claims: Map<String, Value>) -> Identity {
    let (mapping, audience) = match &config.authorization.jwt {
        Some(j) => (
            jwt::ClaimMapping {
                actor: j.claims.actor.clone(),
                subject: j.claims.subject.clone(),
                workflow: j.claims.workflow.clone(),
            },
            j.providers
                .first()
                .and_then(|p| p.audiences.first().cloned()),
        ),
        None => (jwt::ClaimMapping::default(), None),
    };
    jwt::identity_from_claims(&mapping, claims, audience.as_deref())
}
