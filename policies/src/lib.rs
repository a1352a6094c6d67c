//! Where a device goes: hub allocation policies (static, hashed, geo-latency, custom webhook).
//!
//! The crate answers one question: given an attested device (its registration id, the hubs its
//! enrollment names, a region hint or source address) and the hubs linked to this instance, which
//! hub gets it? The flow is two steps:
//!
//! 1. [`candidates`] applies the candidate-set rules of dps-protocol §5.1;
//! 2. [`allocate`] runs a synchronous policy over them (`static_hub`, `hashed`, `geo_latency`),
//!    or, for [`Policy::Custom`], the service calls [`webhook::WebhookClient::allocate`].
//!
//! Everything here is a pure, synchronous, deterministic function of its arguments, with one
//! exception: `webhook.rs` does network I/O (an HTTPS POST to the enrollment's webhook).
//!
//! This crate must never touch storage, know about HTTP routes or wire error codes of the
//! device API, read configuration files or the clock, or do I/O outside `webhook.rs`. The
//! service maps every [`AllocationError`] to a `failed` registration (suggested codes are in the
//! docs of each variant).
#![forbid(unsafe_code)]

pub mod geo_latency;
pub mod hashed;
pub mod static_hub;
pub mod webhook;

use std::net::IpAddr;

pub use geo_latency::{CidrError, LatencyMap};
pub use webhook::WebhookError;

/// A hub linked to this instance, as allocation sees it (dps-protocol §4.7 plus health).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hub {
    /// Host name, e.g. `hub1.example.net`. Compared case-insensitively.
    pub name: String,
    /// Region (Azure calls it `location`), e.g. `westus`; used by `geo_latency`.
    pub location: Option<String>,
    /// `allocationWeight`, 1..=1000; the service maps `null` to 1. A 0 here is treated as 1.
    pub weight: u32,
    /// `applyAllocationPolicy`; `false` means the hub only takes devices named on a `static`
    /// enrollment (see [`candidates`]).
    pub apply_allocation_policy: bool,
    /// Heartbeats are current. Unhealthy hubs receive no new devices.
    pub healthy: bool,
}

/// The allocation policy in force for one registration (enrollment's, else the instance default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// The single hub named on the enrollment (`static_hub`).
    Static,
    /// Weighted rendezvous hash of the lower-cased registration id (`hashed`).
    Hashed,
    /// Lowest configured latency from the device's region, ties hashed (`geo_latency`).
    GeoLatency,
    /// The enrollment's webhook (`webhook`); asynchronous, not handled by [`allocate`].
    Custom,
}

/// What allocation knows about one registration attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The registration id as the device sent it (policies lower-case it where it matters).
    pub registration_id: &'a str,
    /// The enrollment's `iotHubs`, or its legacy `iotHubHostName` as a one-element slice;
    /// `None` (or empty) when the enrollment names no hub.
    pub enrollment_hubs: Option<&'a [String]>,
    /// The policy in force.
    pub policy: Policy,
    /// An explicit region hint (e.g. from the device payload), used by `geo_latency`.
    pub region_hint: Option<&'a str>,
    /// The device's source address, mapped to a region by `geo_latency` when there is no hint.
    pub source_address: Option<IpAddr>,
}

impl<'a> Request<'a> {
    /// A request with only the registration id and policy set.
    pub fn new(registration_id: &'a str, policy: Policy) -> Self {
        Self {
            registration_id,
            enrollment_hubs: None,
            policy,
            region_hint: None,
            source_address: None,
        }
    }

    /// The enrollment's hub names, `None` when it names none.
    fn named_hubs(&self) -> Option<&'a [String]> {
        self.enrollment_hubs.filter(|hubs| !hubs.is_empty())
    }
}

/// Why no hub could be chosen. The service turns each into a `failed` registration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocationError {
    /// The candidate set is empty (§5.1) or a `static` enrollment names no usable hub.
    /// Service code: `400208` (the C SDK maps it to HUB_NOT_SPECIFIED).
    #[error("no hub is available for this device")]
    NoHub,
    /// A `static` enrollment names more than one hub. Suggested service code: `400215`.
    #[error("a static allocation must name exactly one hub; the enrollment names {count}")]
    Ambiguous {
        /// How many distinct hubs the enrollment names.
        count: usize,
    },
    /// [`allocate`] was called with [`Policy::Custom`]; use [`webhook::WebhookClient`].
    /// A service bug, not a device error: map it to an internal error.
    #[error("custom allocation is asynchronous and goes through the webhook module")]
    CustomNotSynchronous,
    /// The custom allocation webhook failed; see [`WebhookError`] for the codes.
    #[error("custom allocation webhook: {0}")]
    Webhook(#[from] WebhookError),
}

/// The candidate hubs for a registration (dps-protocol §5.1), in `linked` order.
///
/// - The hubs are the enrollment's (matched to `linked` by name, case-insensitively; names that
///   are not linked are ignored), else every linked hub.
/// - Unhealthy hubs are dropped.
/// - Hubs with `applyAllocationPolicy == false` are dropped, **except** under [`Policy::Static`]
///   when the enrollment names them. The spec leaves this open (\[UNCONF\], §8); we follow the
///   Azure wording that such a hub "can be selected on an enrollment but does not participate"
///   in policy-driven distribution: naming one hub on a static enrollment is an explicit choice,
///   not distribution. Under `Static` with no hub named, nothing is a candidate.
/// - An empty result is [`AllocationError::NoHub`] (service: `failed`, `400208`).
pub fn candidates<'a>(
    linked: &'a [Hub],
    request: &Request,
) -> Result<Vec<&'a Hub>, AllocationError> {
    let named = request.named_hubs();
    let is_named = |hub: &Hub| {
        named.is_some_and(|names| names.iter().any(|n| n.eq_ignore_ascii_case(&hub.name)))
    };
    let result: Vec<&Hub> = linked
        .iter()
        .filter(|hub| hub.healthy)
        .filter(|hub| match (request.policy, named) {
            (Policy::Static, _) => is_named(hub),
            (_, Some(_)) => is_named(hub) && hub.apply_allocation_policy,
            (_, None) => hub.apply_allocation_policy,
        })
        .collect();
    if result.is_empty() {
        Err(AllocationError::NoHub)
    } else {
        Ok(result)
    }
}

/// Runs the synchronous policy of `request.policy` over `candidates` (from [`candidates`]).
///
/// [`Policy::Custom`] is not handled here (it is asynchronous and lives in [`webhook`]); it
/// yields [`AllocationError::CustomNotSynchronous`].
pub fn allocate<'a>(
    candidates: &[&'a Hub],
    request: &Request,
    latency: &LatencyMap,
) -> Result<&'a Hub, AllocationError> {
    match request.policy {
        Policy::Static => static_hub::allocate(candidates, request),
        Policy::Hashed => hashed::allocate(candidates, request.registration_id),
        Policy::GeoLatency => geo_latency::allocate(candidates, request, latency),
        Policy::Custom => Err(AllocationError::CustomNotSynchronous),
    }
}

#[cfg(test)]
pub(crate) fn hub(name: &str) -> Hub {
    Hub {
        name: name.to_owned(),
        location: None,
        weight: 1,
        apply_allocation_policy: true,
        healthy: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(hubs: &[&Hub]) -> Vec<String> {
        hubs.iter().map(|h| h.name.clone()).collect()
    }

    fn linked() -> Vec<Hub> {
        let mut opted_out = hub("c.example");
        opted_out.apply_allocation_policy = false;
        let mut down = hub("d.example");
        down.healthy = false;
        vec![hub("a.example"), hub("b.example"), opted_out, down]
    }

    #[test]
    fn candidate_set_rules() {
        let linked = linked();
        let list = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ab = list(&["B.EXAMPLE", "a.example", "unknown.example"]);
        let c = list(&["c.example"]);
        let d = list(&["d.example"]);
        let ac = list(&["a.example", "c.example"]);
        let empty: Vec<String> = vec![];
        type Case<'a> = (
            Policy,
            Option<&'a [String]>,
            Result<Vec<&'a str>, AllocationError>,
        );
        let cases: Vec<Case> = vec![
            // No hubs on the enrollment: every linked, healthy, participating hub.
            (Policy::Hashed, None, Ok(vec!["a.example", "b.example"])),
            (
                Policy::Hashed,
                Some(&empty),
                Ok(vec!["a.example", "b.example"]),
            ),
            // Named hubs, case-insensitive, linked order, unknown names ignored.
            (
                Policy::Hashed,
                Some(&ab),
                Ok(vec!["a.example", "b.example"]),
            ),
            (Policy::GeoLatency, Some(&ac), Ok(vec!["a.example"])),
            // applyAllocationPolicy=false: only static may pick it.
            (Policy::Hashed, Some(&c), Err(AllocationError::NoHub)),
            (Policy::Custom, Some(&c), Err(AllocationError::NoHub)),
            (Policy::Static, Some(&c), Ok(vec!["c.example"])),
            (
                Policy::Static,
                Some(&ac),
                Ok(vec!["a.example", "c.example"]),
            ),
            // Unhealthy hubs never.
            (Policy::Static, Some(&d), Err(AllocationError::NoHub)),
            (Policy::Hashed, Some(&d), Err(AllocationError::NoHub)),
            // Static with no hub named.
            (Policy::Static, None, Err(AllocationError::NoHub)),
        ];
        for (policy, enrollment_hubs, expected) in cases {
            let request = Request {
                enrollment_hubs,
                ..Request::new("dev", policy)
            };
            let got = candidates(&linked, &request).map(|c| names(&c));
            let expected = expected.map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            assert_eq!(got, expected, "{policy:?} {enrollment_hubs:?}");
        }
    }

    #[test]
    fn allocate_dispatches() {
        let linked = linked();
        let map = LatencyMap::new();
        let request = Request::new("dev", Policy::Hashed);
        let c = candidates(&linked, &request).unwrap();
        assert!(allocate(&c, &request, &map).is_ok());
        let custom = Request::new("dev", Policy::Custom);
        assert_eq!(
            allocate(&c, &custom, &map),
            Err(AllocationError::CustomNotSynchronous)
        );
    }
}
