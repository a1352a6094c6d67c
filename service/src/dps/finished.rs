//! Registrations that ended moments ago, kept for the poll that follows them.
//!
//! An HTTPS register is answered 202 even when its assignment is done before the answer
//! (iot-identity-service rejects 200), so every HTTPS device polls once more for a result the
//! process already holds. A poll presenting the very credential the registration attested (the
//! same SAS token, unexpired, or the same client certificate chain, still not revoked) is
//! answered from here, without attesting again and without reading the record: on PostgreSQL
//! that is three of a registration's round trips, on X.509 a chain verification (decision 50). An entry is used
//! once, and lives [`LIFETIME`] at most.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use zerotouch_attestation::symmetric_key::SasToken;

use super::{Evidence, Outcome};

/// How long an ended registration waits for its poll.
pub const LIFETIME: Duration = Duration::from_secs(60);
/// At most this many are kept (about 1.5 KB each): beyond it the oldest go first, and their
/// polls take the full path.
pub const CAPACITY: usize = 20_000;

/// The credential a request presented, as far as a poll must repeat it.
#[derive(PartialEq, Eq)]
pub enum Presented {
    Sas(SasToken),
    /// The leaf and the intermediates, DER.
    Certificates(Vec<u8>, Vec<Vec<u8>>),
}

impl Presented {
    pub fn of(evidence: &Evidence) -> Presented {
        match evidence {
            Evidence::Sas(token) => Presented::Sas(token.clone()),
            Evidence::Certificate(peer) => {
                Presented::Certificates(peer.leaf.clone(), peer.chain.clone())
            }
        }
    }

    /// Whether `evidence` is this credential, still valid at `now_unix` as far as a SAS token
    /// expires (a certificate's validity was checked by the TLS handshake's attestation).
    fn repeated_by(&self, evidence: &Evidence, now_unix: u64) -> bool {
        match (self, evidence) {
            (Presented::Sas(kept), Evidence::Sas(token)) => kept == token && token.se > now_unix,
            (Presented::Certificates(leaf, chain), Evidence::Certificate(peer)) => {
                *leaf == peer.leaf && *chain == peer.chain
            }
            _ => false,
        }
    }
}

struct Entry {
    kept_at: Instant,
    registration_id: String,
    presented: Presented,
    outcome: Outcome,
}

/// Ended registrations by operation id, oldest first in `order`.
#[derive(Default)]
pub struct Finished {
    by_operation: HashMap<String, Entry>,
    order: VecDeque<(Instant, String)>,
}

impl Finished {
    /// Keeps the outcome of `registration_id`'s operation for its poll.
    pub fn keep(&mut self, registration_id: &str, presented: Presented, outcome: Outcome) {
        let now = Instant::now();
        while let Some((at, id)) = self.order.front() {
            if now.duration_since(*at) < LIFETIME && self.order.len() < CAPACITY {
                break;
            }
            self.by_operation.remove(id);
            self.order.pop_front();
        }
        self.order.push_back((now, outcome.operation_id.clone()));
        self.by_operation.insert(
            outcome.operation_id.clone(),
            Entry {
                kept_at: now,
                registration_id: registration_id.to_ascii_lowercase(),
                presented,
                outcome,
            },
        );
    }

    /// The kept outcome of `operation_id`, once, if `evidence` repeats the credential that
    /// registered. Anything else (another id, another credential, too late) leaves the entry
    /// and takes the full path.
    pub fn take(
        &mut self,
        registration_id: &str,
        operation_id: &str,
        evidence: &Evidence,
        now_unix: u64,
    ) -> Option<Outcome> {
        let entry = self.by_operation.get(operation_id)?;
        if entry.kept_at.elapsed() >= LIFETIME
            || !entry.registration_id.eq_ignore_ascii_case(registration_id)
            || !entry.presented.repeated_by(evidence, now_unix)
        {
            return None;
        }
        // Its place in `order` goes when it reaches the front.
        self.by_operation.remove(operation_id).map(|e| e.outcome)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_operation.len()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::dps::RegistrationStatus;
    use crate::tls::PeerCertificates;

    fn token(sig: &str, se: u64) -> SasToken {
        SasToken {
            sr: "scope%2Fregistrations%2Fdev-1".into(),
            sig: sig.into(),
            se,
            skn: Some("registration".into()),
        }
    }

    fn outcome(operation_id: &str) -> Outcome {
        Outcome {
            operation_id: operation_id.into(),
            status: RegistrationStatus::Assigned,
            registration_state: json!({"registrationId": "dev-1", "assignedHub": "h"}),
        }
    }

    fn certificate(leaf: &[u8]) -> Evidence {
        Evidence::Certificate(PeerCertificates {
            leaf: leaf.to_vec(),
            chain: vec![b"intermediate".to_vec()],
        })
    }

    #[test]
    fn the_same_token_gets_the_outcome_once() {
        let mut finished = Finished::default();
        finished.keep(
            "Dev-1",
            Presented::Sas(token("c2ln", 2_000)),
            outcome("op-1"),
        );
        let same = Evidence::Sas(token("c2ln", 2_000));
        let got = finished.take("dev-1", "op-1", &same, 1_000).unwrap();
        assert_eq!(got.operation_id, "op-1");
        assert!(finished.take("dev-1", "op-1", &same, 1_000).is_none());
        assert_eq!(finished.len(), 0);
    }

    #[test]
    fn another_credential_an_expired_token_or_another_id_gets_nothing() {
        let mut finished = Finished::default();
        finished.keep(
            "dev-1",
            Presented::Sas(token("c2ln", 2_000)),
            outcome("op-1"),
        );
        let other = Evidence::Sas(token("b3RoZXI=", 2_000));
        assert!(finished.take("dev-1", "op-1", &other, 1_000).is_none());
        let same = Evidence::Sas(token("c2ln", 2_000));
        assert!(
            finished.take("dev-1", "op-1", &same, 2_000).is_none(),
            "expired"
        );
        assert!(finished.take("dev-2", "op-1", &same, 1_000).is_none());
        assert!(finished.take("dev-1", "op-2", &same, 1_000).is_none());
        assert!(
            finished
                .take("dev-1", "op-1", &certificate(b"leaf"), 1_000)
                .is_none()
        );
        // None of that used the entry up.
        assert!(finished.take("dev-1", "op-1", &same, 1_000).is_some());
    }

    #[test]
    fn a_certificate_must_be_the_same_chain() {
        let mut finished = Finished::default();
        finished.keep(
            "dev-1",
            Presented::of(&certificate(b"leaf")),
            outcome("op-1"),
        );
        assert!(
            finished
                .take("dev-1", "op-1", &certificate(b"other leaf"), 0)
                .is_none()
        );
        let mut other_chain = certificate(b"leaf");
        if let Evidence::Certificate(peer) = &mut other_chain {
            peer.chain.clear();
        }
        assert!(finished.take("dev-1", "op-1", &other_chain, 0).is_none());
        assert!(
            finished
                .take("dev-1", "op-1", &certificate(b"leaf"), 0)
                .is_some()
        );
    }

    #[test]
    fn beyond_capacity_the_oldest_go() {
        let mut finished = Finished::default();
        let same = Evidence::Sas(token("c2ln", 2_000));
        for n in 0..CAPACITY + 5 {
            finished.keep(
                "dev-1",
                Presented::Sas(token("c2ln", 2_000)),
                outcome(&format!("op-{n}")),
            );
        }
        assert_eq!(finished.len(), CAPACITY);
        assert!(finished.take("dev-1", "op-0", &same, 0).is_none());
        assert!(finished.take("dev-1", "op-4", &same, 0).is_none());
        assert!(finished.take("dev-1", "op-5", &same, 0).is_some());
    }
}
