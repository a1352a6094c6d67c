//! The verbs that act on the local data dir and database. They open an existing instance
//! (`bootstrap::open_existing`) and never create one: only `serve` does.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{CaLocalCommand, HubLocalCommand, Local, ServeArgs, TokenCommand, print_json};
use crate::auth::{self, Rights};
use crate::bootstrap;
use crate::config::Settings;
use crate::db;

/// `zerotouch serve`: runs until SIGINT/SIGTERM.
pub(super) fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut settings = args.local.settings()?;
    if let Some(role) = args.role {
        settings.service.role = role;
    }
    if let Some(url) = args.dps_url {
        settings.hub.dps_url = Some(url);
    }
    if let Some(token) = args.join_token {
        settings.hub.join_token = Some(token);
    }
    settings.validate()?;
    // Held until the server stops, so the last lines are flushed.
    let _log = crate::logging::init(&settings.log);
    crate::server::serve(settings)
}

/// `zerotouch credentials`.
pub(super) fn print_credentials(local: &Local) -> anyhow::Result<()> {
    let settings = local.settings()?;
    print_json(&credentials(&settings)?)
}

/// `zerotouch config`: the settings in force, secrets redacted.
pub(super) fn config(local: &Local) -> anyhow::Result<()> {
    let settings = local.settings()?;
    print_json(&serde_json::to_value(settings.redacted())?)
}

/// The local instance, as `serve` created it; creates nothing (see `bootstrap::open_existing`).
pub(super) fn open_local(
    settings: &Settings,
) -> anyhow::Result<(db::Database, bootstrap::Instance)> {
    bootstrap::open_existing(settings)
}

/// The operator contract of `zerotouch credentials --json`.
pub fn credentials(settings: &Settings) -> anyhow::Result<Value> {
    let (store, instance) = open_local(settings)?;
    let owner = bootstrap::owner_policy(&store)?;
    let hub_owner = bootstrap::hub_owner_policy(&store)?;
    // A joined hub presents a certificate from its provisioning service's CA: clients trust
    // the bundle that service handed over, not this data dir's own CA.
    // Whatever the configured role: `serve --role hub` may have overridden it.
    let join = crate::hub::join::JoinPaths::new(&settings.service.data_dir);
    let bundle_path = if join.state.exists() {
        join.trust_bundle
    } else {
        instance.paths.ca_bundle.clone()
    };
    let ca_bundle = std::fs::canonicalize(&bundle_path).unwrap_or(bundle_path);
    let mut out = json!({
        "idScope": instance.id_scope,
        "dpsConnectionString": bootstrap::connection_string(&settings.public_host(), &owner),
        "caBundlePath": ca_bundle,
        "httpsEndpoint": format!("https://{}", settings.public_host()),
        "mqttPort": settings.listen.mqtt.port(),
    });
    if settings.service.role.runs_hub() {
        out["hubConnectionString"] = json!(bootstrap::connection_string(
            &settings.hub_public_host(),
            &hub_owner
        ));
        out["hubHostName"] = json!(settings.hub_hostname());
        // Every hub policy (iothubowner, service, device, registryRead, registryReadWrite).
        let mut policies = serde_json::Map::new();
        for (name, _) in crate::hub::auth::DEFAULT_POLICIES {
            if let Some(policy) = crate::hub::auth::policy(&store, name)? {
                policies.insert(
                    name.to_string(),
                    json!(bootstrap::connection_string(
                        &settings.hub_public_host(),
                        &policy
                    )),
                );
            }
        }
        out["hubPolicies"] = serde_json::Value::Object(policies);
        // The Event Hubs-compatible endpoint (docs/hub.md): the `service` policy, on AMQP.
        if let Some(service) = crate::hub::auth::policy(&store, "service")? {
            out["eventHubsConnectionString"] = json!(event_hubs_connection_string(
                &settings.hub_hostname(),
                settings.listen.amqp().0.port(),
                &service
            ));
        }
    }
    Ok(out)
}

/// The Event Hubs-compatible connection string of the hub's telemetry (`amqp::eventhubs`):
/// the AMQP port appears only when it is not 5671, which the Event Hubs SDKs assume.
fn event_hubs_connection_string(
    host: &str,
    amqp_port: u16,
    policy: &crate::auth::AuthorizationPolicy,
) -> String {
    let endpoint = if amqp_port == 5671 {
        host.to_string()
    } else {
        format!("{host}:{amqp_port}")
    };
    format!(
        "Endpoint=sb://{endpoint}/;SharedAccessKeyName={};SharedAccessKey={};EntityPath={}",
        policy.key_name,
        policy.primary_key,
        crate::amqp::eventhubs::ENTITY
    )
}

pub(super) fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            local,
            rights,
            ttl,
            subject,
        } => {
            let settings = local.settings()?;
            let rights = Rights::parse(&rights).map_err(anyhow::Error::msg)?;
            let ttl = parse_duration(&ttl)?;
            let (_, instance) = open_local(&settings)?;
            let token = auth::mint_token(
                &instance.token_secret,
                &instance.id_scope,
                &subject,
                rights,
                crate::time::now_unix(),
                ttl.as_secs(),
            )
            .map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(())
        }
        TokenCommand::RotateSecret(local) => {
            let settings = local.settings()?;
            let (store, _) = open_local(&settings)?;
            db::DocumentStore::setting_set(
                &store,
                bootstrap::TOKEN_SECRET_KEY,
                &auth::generate_token_secret(),
            )?;
            eprintln!("token secret replaced: tokens minted before now are refused");
            Ok(())
        }
    }
}

/// `zerotouch hub join-token`.
pub(super) fn hub(command: HubLocalCommand) -> anyhow::Result<()> {
    match command {
        HubLocalCommand::JoinToken { local, ttl } => {
            let settings = local.settings()?;
            let ttl = parse_duration(&ttl)?;
            let (store, instance) = open_local(&settings)?;
            let secret = db::DocumentStore::setting_get(&store, bootstrap::TOKEN_SECRET_KEY)?
                .unwrap_or(instance.token_secret.clone());
            let token = crate::dps::hubs::mint_join_token(
                &secret,
                &instance.id_scope,
                instance.ca.root_cert_pem(),
                crate::time::now_unix(),
                ttl.as_secs(),
            )
            .map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(())
        }
    }
}

/// `zerotouch ca rotate-intermediate`, `retire-intermediate` and `import-to-pkcs11`.
pub(super) fn ca(command: CaLocalCommand) -> anyhow::Result<()> {
    match command {
        CaLocalCommand::RotateIntermediate { local } => print_json(
            &crate::pki::rotation::rotate_intermediate(&local.settings()?)?,
        ),
        CaLocalCommand::RetireIntermediate { local } => print_json(
            &crate::pki::rotation::retire_intermediate(&local.settings()?)?,
        ),
        CaLocalCommand::ImportToPkcs11 { local, move_key_to } => print_json(
            &crate::pki::token::import_to_pkcs11(&local.settings()?, move_key_to.as_deref())?,
        ),
    }
}

/// Parses `90`, `90s`, `30m`, `1h`, `7d`.
fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&text[..i], &text[i..]),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 30m, 1h or 7d"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => bail!("{text:?}: the unit must be s, m, h or d"),
    };
    if seconds == 0 {
        bail!("a duration must be positive");
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("h").is_err());
    }
}
