//! Shared pieces of the load tools in src/bin (`hub_load`, `dps_load`): the target's
//! connection string and the tool's `main`. Error counting, percentiles, the loopback-only
//! check and a process's memory and CPU time come from `zerotouch_simulate::stats`,
//! which `zerotouch simulate` uses too.

use std::time::Duration;

use serde_json::Value;
use zerotouch_attestation::symmetric_key;

pub use zerotouch_service::time::now_unix;
pub use zerotouch_simulate::stats::{
    Errors, cpu_seconds, host_without_port, percentile, percentiles, random_key, require_loopback,
    reqwest_kind, round2, rss_kib,
};

/// What a service connection string says.
pub struct ConnectionString {
    /// `HostName`: the target's `IP:PORT` (or `localhost:PORT`).
    pub host: String,
    /// `SharedAccessKeyName`: the policy the token is signed for.
    pub policy: String,
    /// `SharedAccessKey`: the policy's key (standard base64).
    pub key: String,
}

impl ConnectionString {
    /// A SAS token for the service API (audience `host`, the policy's name as `skn`), valid
    /// for `ttl_secs` seconds.
    pub fn service_token(&self, ttl_secs: u64) -> anyhow::Result<String> {
        symmetric_key::sign(
            &self.host,
            &self.key,
            now_unix() + ttl_secs,
            Some(&self.policy),
        )
        .map_err(|e| anyhow::anyhow!("signing the service token: {e:?}"))
    }
}

/// `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…` (keys in any case, in any order).
pub fn parse_connection_string(cs: &str) -> anyhow::Result<ConnectionString> {
    let (host, policy, key) =
        zerotouch_service::bootstrap::parse_connection_string(cs).map_err(anyhow::Error::msg)?;
    Ok(ConnectionString { host, policy, key })
}

/// A tool's `main`: runs `run` on a multi-threaded runtime, then prints its report as one
/// JSON object (`json`) or as text through `print_text`. Tasks still running after the hard
/// deadline are abandoned, not awaited.
pub fn run_and_report(
    run: impl Future<Output = anyhow::Result<Value>>,
    json: bool,
    print_text: fn(&Value),
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings() {
        let hub = parse_connection_string(
            "HostName=127.0.0.77:18443;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5=",
        )
        .expect("parses");
        assert_eq!(hub.host, "127.0.0.77:18443");
        assert_eq!(hub.policy, "iothubowner");
        assert_eq!(hub.key, "a2V5=");
        let dps = parse_connection_string(
            "HostName=127.0.0.78:18443;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=a2V5=",
        )
        .expect("parses");
        assert_eq!(dps.host, "127.0.0.78:18443");
        assert_eq!(dps.policy, "provisioningserviceowner");
        assert!(parse_connection_string("HostName=x").is_err());
    }
}
