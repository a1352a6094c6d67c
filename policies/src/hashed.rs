//! `hashed` ("evenly weighted distribution"): weighted rendezvous hashing (dps-protocol §5.2).
//!
//! For each candidate hub `h` with weight `w` (0 is treated as 1):
//!
//! ```text
//! digest = SHA-256(lowercase(h.name) || 0x00 || lowercase(registration_id))
//! x      = first 8 bytes of digest, big-endian u64
//! u      = ((x >> 11) + 0.5) / 2^53                  -- uniform in the open interval (0, 1)
//! score  = -w / ln(u)                                -- "logarithmic method" of weighted HRW
//! ```
//!
//! and the hub with the highest score wins (ties, which need equal 53-bit hashes, go to the
//! lexicographically smaller lower-cased name). This is the standard weighted rendezvous hash
//! (Schindelhauer & Schomaker, "Weighted distributed hash tables", 2005): `-ln(u)/w` is an
//! exponential variable with rate `w`, so hub `h` wins with probability `w_h / Σw`.
//!
//! Properties the tests pin:
//! - **Stable**: the choice depends only on the id and the candidates' names and weights, not on
//!   their order, the process or the platform. Only `f64::ln` is floating point; IEEE-754
//!   implementations differ by at most an ulp there, which could only flip a choice between two
//!   scores already equal to ~1e-16.
//! - **Minimal disruption**: adding a hub moves only the ids the new hub now wins (its weight
//!   share), all to it; removing a hub moves only the ids it held.
//! - **Case-insensitive** in the registration id (DPS registration ids are).

use ring::digest::{SHA256, digest};

use crate::{AllocationError, Hub};

/// The candidate with the highest weighted rendezvous score for `registration_id`.
///
/// Empty `candidates` is [`AllocationError::NoHub`].
pub fn allocate<'a>(
    candidates: &[&'a Hub],
    registration_id: &str,
) -> Result<&'a Hub, AllocationError> {
    let id = registration_id.to_lowercase();
    let mut best: Option<(f64, String, &'a Hub)> = None;
    for &hub in candidates {
        let name = hub.name.to_ascii_lowercase();
        let s = score(&name, &id, hub.weight);
        let better = match &best {
            None => true,
            Some((best_score, best_name, _)) => {
                s > *best_score || (s == *best_score && name < *best_name)
            }
        };
        if better {
            best = Some((s, name, hub));
        }
    }
    best.map(|(_, _, hub)| hub).ok_or(AllocationError::NoHub)
}

/// `-w / ln(u)`: positive, larger is better. Inputs are already lower-cased.
fn score(hub_name: &str, registration_id: &str, weight: u32) -> f64 {
    let mut input = Vec::with_capacity(hub_name.len() + 1 + registration_id.len());
    input.extend_from_slice(hub_name.as_bytes());
    input.push(0);
    input.extend_from_slice(registration_id.as_bytes());
    let hash = digest(&SHA256, &input);
    let mut first = [0u8; 8];
    for (dst, src) in first.iter_mut().zip(hash.as_ref()) {
        *dst = *src;
    }
    let x = u64::from_be_bytes(first) >> 11;
    // x < 2^53 is exact in f64; +0.5 keeps u strictly inside (0, 1), so ln(u) < 0.
    let u = (x as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight.max(1)) / u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub;

    fn weighted(name: &str, weight: u32) -> Hub {
        Hub {
            weight,
            ..hub(name)
        }
    }

    fn ids() -> impl Iterator<Item = String> {
        (0..10_000).map(|i| format!("device-{i:05}"))
    }

    fn assign<'a>(hubs: &[&'a Hub]) -> Vec<&'a str> {
        ids()
            .map(|id| allocate(hubs, &id).unwrap().name.as_str())
            .collect()
    }

    #[test]
    fn stable_and_order_independent() {
        let (a, b, c) = (hub("a"), hub("b"), hub("c"));
        let first = assign(&[&a, &b, &c]);
        assert_eq!(first, assign(&[&a, &b, &c]));
        assert_eq!(first, assign(&[&c, &a, &b]));
        // Pinned values: a change of algorithm must be deliberate (it re-homes devices).
        let hubs = [&a, &b, &c];
        let pinned: Vec<&str> = ["dev-01", "dev-02", "dev-03", "dev-04", "dev-05"]
            .iter()
            .map(|id| allocate(&hubs, id).unwrap().name.as_str())
            .collect();
        assert_eq!(pinned, PINNED);
    }

    // Cross-checked with an independent Python implementation of the formula above.
    const PINNED: [&str; 5] = ["a", "a", "c", "c", "b"];

    #[test]
    fn case_insensitive() {
        let (a, b, c) = (hub("a.example"), hub("b.example"), hub("c.example"));
        let hubs = [&a, &b, &c];
        for id in ids().take(500) {
            let upper = id.to_uppercase();
            assert_eq!(allocate(&hubs, &id), allocate(&hubs, &upper));
        }
        // Hub names too: they are host names.
        let upper_a = hub("A.EXAMPLE");
        let upper = [&upper_a, &b, &c];
        for id in ids().take(500) {
            assert_eq!(
                allocate(&hubs, &id).unwrap().name.to_lowercase(),
                allocate(&upper, &id).unwrap().name.to_lowercase()
            );
        }
    }

    #[test]
    fn weights_share() {
        let (light, heavy) = (weighted("light", 1), weighted("heavy", 3));
        let got = assign(&[&light, &heavy]);
        let heavy_share = got.iter().filter(|n| **n == "heavy").count() as f64 / 10_000.0;
        assert!(
            (heavy_share - 0.75).abs() < 0.02,
            "heavy share {heavy_share}"
        );

        let (w1, w2, w3) = (weighted("w1", 1), weighted("w2", 2), weighted("w3", 3));
        let got = assign(&[&w1, &w2, &w3]);
        for (name, expected) in [("w1", 1.0 / 6.0), ("w2", 2.0 / 6.0), ("w3", 3.0 / 6.0)] {
            let share = got.iter().filter(|n| **n == name).count() as f64 / 10_000.0;
            assert!((share - expected).abs() < 0.02, "{name} share {share}");
        }
    }

    #[test]
    fn adding_a_hub_moves_only_to_it() {
        let (a, b, c, d) = (hub("a"), hub("b"), hub("c"), hub("d"));
        let before = assign(&[&a, &b, &c]);
        let after = assign(&[&a, &b, &c, &d]);
        let mut moved = 0;
        for (old, new) in before.iter().zip(&after) {
            if old != new {
                assert_eq!(*new, "d", "an id moved between old hubs");
                moved += 1;
            }
        }
        let share = f64::from(moved) / 10_000.0;
        assert!((share - 0.25).abs() < 0.02, "moved {share}");
    }

    #[test]
    fn removing_a_hub_moves_only_its_ids() {
        let (a, b, c, d) = (hub("a"), hub("b"), hub("c"), hub("d"));
        let before = assign(&[&a, &b, &c, &d]);
        let after = assign(&[&a, &b, &d]);
        for (old, new) in before.iter().zip(&after) {
            if *old != "c" {
                assert_eq!(old, new, "an id not on the removed hub moved");
            } else {
                assert_ne!(*new, "c");
            }
        }
    }

    #[test]
    fn empty_is_no_hub() {
        assert_eq!(allocate(&[], "dev"), Err(AllocationError::NoHub));
    }

    #[test]
    fn zero_weight_counts_as_one() {
        let (zero, one) = (weighted("z", 0), weighted("o", 1));
        let got = assign(&[&zero, &one]);
        let share = got.iter().filter(|n| **n == "z").count() as f64 / 10_000.0;
        assert!((share - 0.5).abs() < 0.02, "share {share}");
    }
}
