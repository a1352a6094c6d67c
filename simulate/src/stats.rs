//! Counting and summarising for `zerotouch simulate` and the load tools of the `tests`
//! package (`hub_load`, `dps_load`), which re-export these: errors by kind, nearest-rank
//! percentiles, the loopback-only target rule, and a process's memory and CPU time.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

/// Errors by kind, e.g. `connect:tls`, `register:http_401`, `poll:request:timeout`.
#[derive(Debug, Default, Clone)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    pub fn add(&mut self, kind: impl Into<String>) {
        *self.0.entry(kind.into()).or_insert(0) += 1;
    }

    pub fn merge(&mut self, other: Errors) {
        for (k, v) in other.0 {
            *self.0.entry(k).or_insert(0) += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// The kind of a failed request, for error counts.
pub fn reqwest_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "other"
    }
}

/// A random key of `bytes` bytes, standard base64.
pub fn random_key(bytes: usize) -> String {
    let key: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    STANDARD.encode(key)
}

/// Nearest-rank percentile `p` (0–100) of `sorted` values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len() - 1))
        .copied()
}

/// Rounded to two decimals.
pub fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// `{"p50", "p95", "p99", "max"}` of `values`, rounded to two decimals (null when empty).
pub fn percentiles(mut values: Vec<f64>) -> Value {
    values.sort_by(f64::total_cmp);
    let round = |v: Option<f64>| v.map(round2);
    json!({
        "p50": round(percentile(&values, 50.0)),
        "p95": round(percentile(&values, 95.0)),
        "p99": round(percentile(&values, 99.0)),
        "max": round(values.last().copied()),
    })
}

/// `127.0.0.77:18443` → `127.0.0.77`; `[::1]:8443` → `::1`.
pub fn host_without_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => {
            host
        }
        _ => authority,
    }
}

/// The load tools only ever target the local machine; `tool` names the tool in the error.
pub fn require_loopback(host: &str, tool: &str) -> anyhow::Result<()> {
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(());
    }
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => Ok(()),
        Ok(ip) => bail!("{ip} is not a loopback address; {tool} targets loopback only"),
        Err(_) => {
            bail!("{host:?} is not an IP literal or localhost; {tool} targets loopback only")
        }
    }
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

/// User + system CPU seconds of a process (assumes USER_HZ = 100, as on every Linux we run).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ") ".
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_without_ports() {
        assert_eq!(host_without_port("127.0.0.77:18443"), "127.0.0.77");
        assert_eq!(host_without_port("[::1]:8443"), "::1");
        assert_eq!(host_without_port("localhost"), "localhost");
    }

    #[test]
    fn loopback_only() {
        assert!(require_loopback("127.0.0.77", "hub_load").is_ok());
        assert!(require_loopback("::1", "hub_load").is_ok());
        assert!(require_loopback("localhost", "hub_load").is_ok());
        let err = require_loopback("10.0.0.1", "hub_load").expect_err("not loopback");
        assert_eq!(
            err.to_string(),
            "10.0.0.1 is not a loopback address; hub_load targets loopback only"
        );
        let err = require_loopback("dps.example.com", "dps_load").expect_err("not an IP");
        assert_eq!(
            err.to_string(),
            "\"dps.example.com\" is not an IP literal or localhost; dps_load targets loopback only"
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&[7.0], 95.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentiles(vec![])["p50"], Value::Null);
    }

    #[test]
    fn random_keys_have_the_asked_size() {
        for bytes in [32, 64] {
            let key = STANDARD.decode(random_key(bytes)).expect("base64");
            assert_eq!(key.len(), bytes);
        }
    }

    #[test]
    fn errors_merge_and_total() {
        let mut a = Errors::default();
        a.add("x");
        let mut b = Errors::default();
        b.add("x");
        b.add("y");
        a.merge(b);
        assert_eq!(a.0["x"], 2);
        assert_eq!(a.total(), 3);
    }
}
