//! `geoLatency`: the hub closest to the device by configured latency (dps-protocol §5.2).
//!
//! Self-hosted, there is no Azure network map, so the operator configures a [`LatencyMap`]:
//! latencies in milliseconds between regions, and source-address ranges (CIDR, IPv4 and IPv6)
//! that say which region a device is in. Region names compare case-insensitively.
//!
//! The device's region is the explicit [`Request::region_hint`] if present, else the region of
//! the most specific range containing [`Request::source_address`] (IPv4-mapped IPv6 addresses
//! count as IPv4). The latency from region `a` to `b` is the configured `a → b`, else `b → a`
//! (latency is taken as symmetric), else 0 when `a == b`, else unknown.
//!
//! Choice: among candidates with a `location` and a known latency from the device's region, keep
//! those with the lowest latency and break ties with [`crate::hashed`]. If the device's
//! region is unknown, or no candidate has a known latency, fall back to `hashed` over all
//! candidates (so with no map configured the policy behaves like `hashed`, as §5.2 suggests).
//! Candidates with unknown latency lose to any candidate with a known one.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::{AllocationError, Hub, Request, hashed};

/// Configured region-to-region latencies and source-address ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyMap {
    /// from region → to region → milliseconds; keys lower-cased.
    latencies: HashMap<String, HashMap<String, u32>>,
    /// Source-address ranges and their (lower-cased) region.
    ranges: Vec<(Cidr, String)>,
}

/// A source-address range that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CidrError {
    /// Not `address/prefix` with a valid IPv4 or IPv6 address and a decimal prefix.
    #[error("`{0}` is not an address range (expected e.g. 10.0.0.0/8 or 2001:db8::/32)")]
    Syntax(String),
    /// The prefix is longer than the address (32 for IPv4, 128 for IPv6).
    #[error("prefix /{prefix} is too long in `{range}`")]
    PrefixTooLong {
        /// The range as given.
        range: String,
        /// The prefix length given.
        prefix: u8,
    },
}

impl LatencyMap {
    /// An empty map: every device's region is unknown, so the policy behaves like `hashed`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the latency from region `from` to region `to`, in milliseconds.
    pub fn insert_latency(&mut self, from: &str, to: &str, milliseconds: u32) {
        self.latencies
            .entry(from.to_lowercase())
            .or_default()
            .insert(to.to_lowercase(), milliseconds);
    }

    /// Maps source addresses in `range` (`10.0.0.0/8`, `2001:db8::/32`; a bare address is a
    /// single-host range) to `region`. Host bits in the address are ignored.
    pub fn insert_range(&mut self, range: &str, region: &str) -> Result<(), CidrError> {
        let cidr = Cidr::parse(range)?;
        self.ranges.push((cidr, region.to_lowercase()));
        Ok(())
    }

    /// The device's region: the hint if given, else the most specific range holding `source`.
    pub fn region_of(&self, hint: Option<&str>, source: Option<IpAddr>) -> Option<String> {
        if let Some(hint) = hint.filter(|h| !h.trim().is_empty()) {
            return Some(hint.trim().to_lowercase());
        }
        let source = source?.to_canonical();
        self.ranges
            .iter()
            .filter(|(cidr, _)| cidr.contains(source))
            .max_by_key(|(cidr, _)| cidr.prefix)
            .map(|(_, region)| region.clone())
    }

    /// The latency between two regions (see the module docs for symmetry and same-region rules).
    pub fn latency(&self, from: &str, to: &str) -> Option<u32> {
        let (from, to) = (from.to_lowercase(), to.to_lowercase());
        let lookup = |a: &str, b: &str| self.latencies.get(a).and_then(|m| m.get(b)).copied();
        lookup(&from, &to)
            .or_else(|| lookup(&to, &from))
            .or((from == to).then_some(0))
    }
}

/// The candidate(s) with the lowest latency from the device's region, ties hashed.
pub fn allocate<'a>(
    candidates: &[&'a Hub],
    request: &Request,
    map: &LatencyMap,
) -> Result<&'a Hub, AllocationError> {
    let Some(region) = map.region_of(request.region_hint, request.source_address) else {
        return hashed::allocate(candidates, request.registration_id);
    };
    let known: Vec<(u32, &'a Hub)> = candidates
        .iter()
        .filter_map(|&hub| {
            let location = hub.location.as_deref()?;
            Some((map.latency(&region, location)?, hub))
        })
        .collect();
    let Some(lowest) = known.iter().map(|(ms, _)| *ms).min() else {
        return hashed::allocate(candidates, request.registration_id);
    };
    let closest: Vec<&'a Hub> = known
        .into_iter()
        .filter(|(ms, _)| *ms == lowest)
        .map(|(_, hub)| hub)
        .collect();
    hashed::allocate(&closest, request.registration_id)
}

/// An address range, parsed with `std::net` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(range: &str) -> Result<Self, CidrError> {
        let syntax = || CidrError::Syntax(range.to_owned());
        let trimmed = range.trim();
        let (address, prefix) = match trimmed.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (trimmed, None),
        };
        let network: IpAddr = address.parse().map_err(|_| syntax())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| syntax())?
            }
            Some(_) => return Err(syntax()),
        };
        if prefix > max {
            return Err(CidrError::PrefixTooLong {
                range: range.to_owned(),
                prefix,
            });
        }
        Ok(Self { network, prefix })
    }

    fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address) {
            (IpAddr::V4(net), IpAddr::V4(addr)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(addr) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(addr)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(addr) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Policy, hub};

    fn located(name: &str, location: Option<&str>) -> Hub {
        Hub {
            location: location.map(str::to_owned),
            ..hub(name)
        }
    }

    fn map() -> LatencyMap {
        let mut map = LatencyMap::new();
        map.insert_latency("westeurope", "westeurope", 5);
        map.insert_latency("westeurope", "northeurope", 20);
        map.insert_latency("westeurope", "eastus", 90);
        map.insert_latency("EastUS", "westus", 60);
        map.insert_latency("asia", "westeurope", 150);
        map.insert_latency("asia", "eastus", 150);
        map.insert_range("10.0.0.0/8", "westeurope").unwrap();
        map.insert_range("10.20.0.0/16", "eastus").unwrap();
        map.insert_range("192.0.2.7", "asia").unwrap();
        map.insert_range("2001:db8::/32", "WestUS").unwrap();
        map
    }

    #[test]
    fn table() {
        let map = map();
        let we = located("we", Some("westeurope"));
        let ne = located("ne", Some("northeurope"));
        let eus = located("eus", Some("eastus"));
        let eus2 = located("eus2", Some("EASTUS"));
        let wus = located("wus", Some("westus"));
        let nowhere = located("nowhere", None);
        let mars = located("mars", Some("mars"));
        let all = [&we, &ne, &eus, &eus2, &wus, &nowhere, &mars];
        let hashed_over =
            |hubs: &[&Hub], id: &str| hashed::allocate(hubs, id).unwrap().name.clone();

        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        struct Case<'a> {
            what: &'a str,
            candidates: &'a [&'a Hub],
            hint: Option<&'a str>,
            source: Option<IpAddr>,
            expected: String,
        }
        let id = "device-7";
        let cases = [
            Case {
                what: "hint: same region wins",
                candidates: &all,
                hint: Some("WestEurope"),
                source: ip("10.20.0.1"),
                expected: "we".into(),
            },
            Case {
                what: "source range, most specific wins; tie between two eastus hubs is hashed",
                candidates: &all,
                hint: None,
                source: ip("10.20.3.4"),
                expected: hashed_over(&[&eus, &eus2], id),
            },
            Case {
                what: "reverse direction of a configured latency (westus -> eastus)",
                candidates: &[&eus, &we],
                hint: None,
                source: ip("2001:db8::1"),
                expected: "eus".into(),
            },
            Case {
                what: "same region without an entry is 0 ms",
                candidates: &[&eus, &wus],
                hint: Some("westus"),
                source: None,
                expected: "wus".into(),
            },
            Case {
                what: "IPv4-mapped IPv6 source matches the IPv4 range",
                candidates: &[&we, &ne],
                hint: None,
                source: ip("::ffff:10.1.2.3"),
                expected: "we".into(),
            },
            Case {
                what: "single-host range; equal latency to two hubs is hashed",
                candidates: &[&we, &eus, &nowhere],
                hint: None,
                source: ip("192.0.2.7"),
                expected: hashed_over(&[&we, &eus], id),
            },
            Case {
                what: "hubs with unknown location or latency lose to a known one",
                candidates: &[&nowhere, &mars, &ne],
                hint: Some("westeurope"),
                source: None,
                expected: "ne".into(),
            },
            Case {
                what: "device region unknown (no hint, unmapped source): hashed over all",
                candidates: &all,
                hint: None,
                source: ip("198.51.100.1"),
                expected: hashed_over(&all, id),
            },
            Case {
                what: "device region unknown (no hint, no source): hashed over all",
                candidates: &all,
                hint: None,
                source: None,
                expected: hashed_over(&all, id),
            },
            Case {
                what: "no candidate with a known latency: hashed over all",
                candidates: &[&nowhere, &mars, &wus],
                hint: Some("asia"),
                source: None,
                expected: hashed_over(&[&nowhere, &mars, &wus], id),
            },
            Case {
                what: "blank hint is ignored in favour of the source",
                candidates: &[&we, &eus],
                hint: Some("  "),
                source: ip("10.20.0.9"),
                expected: "eus".into(),
            },
        ];
        for case in cases {
            let request = Request {
                region_hint: case.hint,
                source_address: case.source,
                ..Request::new(id, Policy::GeoLatency)
            };
            let got = allocate(case.candidates, &request, &map).unwrap();
            assert_eq!(got.name, case.expected, "{}", case.what);
        }
    }

    #[test]
    fn empty_candidates_is_no_hub() {
        let request = Request {
            region_hint: Some("westeurope"),
            ..Request::new("d", Policy::GeoLatency)
        };
        assert_eq!(allocate(&[], &request, &map()), Err(AllocationError::NoHub));
        let request = Request::new("d", Policy::GeoLatency);
        assert_eq!(allocate(&[], &request, &map()), Err(AllocationError::NoHub));
    }

    #[test]
    fn cidr_parsing() {
        let ok = |s: &str| Cidr::parse(s).unwrap();
        assert_eq!(ok("10.0.0.0/8").prefix, 8);
        assert_eq!(ok("10.1.2.3").prefix, 32);
        assert_eq!(ok("::/0").prefix, 0);
        assert_eq!(ok("2001:db8::/128").prefix, 128);
        assert!(ok("0.0.0.0/0").contains("203.0.113.9".parse().unwrap()));
        assert!(ok("10.1.2.3/8").contains("10.200.0.1".parse().unwrap()));
        assert!(!ok("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(!ok("10.0.0.0/8").contains("::a00:1".parse().unwrap()));
        assert!(ok("2001:db8::/32").contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!ok("2001:db8::/32").contains("2001:db9::1".parse().unwrap()));
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0.0/+8",
            "nope/8",
            "10.0.0/8",
            "10.0.0.0/999",
        ] {
            assert_eq!(
                Cidr::parse(bad),
                Err(CidrError::Syntax(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            Cidr::parse("10.0.0.0/33"),
            Err(CidrError::PrefixTooLong {
                range: "10.0.0.0/33".into(),
                prefix: 33
            })
        );
        assert!(matches!(
            Cidr::parse("::/129"),
            Err(CidrError::PrefixTooLong { prefix: 129, .. })
        ));
    }

    #[test]
    fn latency_lookup() {
        let map = map();
        assert_eq!(map.latency("WESTEUROPE", "eastus"), Some(90));
        assert_eq!(map.latency("eastus", "westeurope"), Some(90));
        assert_eq!(map.latency("mars", "mars"), Some(0));
        assert_eq!(map.latency("mars", "eastus"), None);
    }
}
