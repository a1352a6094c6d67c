//! DPS in replica mode: what a device may continue on another replica lives in JetStream
//! key-value buckets, not only in this process. A registration operation is polled wherever the
//! load balancer sends the poll; a TPM answers its challenge to any replica.
//!
//! - `{prefix}_operations`: operations still running (and which replica runs them), and the
//!   error of one that failed after its requester stopped waiting. A finished operation is
//!   found through its registration record, as in single-process mode.
//! - `{prefix}_tpm_challenges`: the TPM challenges handed out, by lower-cased registration id.
//!
//! The in-process maps stay the working set: a replica writes through to the buckets and reads
//! from them on a miss.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::attest::Challenge;
use super::{Dps, Error};
use crate::cluster::{Bucket, Cluster};

/// Operations are polled for minutes at most.
const OPERATION_AGE: Duration = Duration::from_secs(15 * 60);

pub(crate) struct Shared {
    operations: Bucket,
    challenges: Bucket,
    cluster: Arc<Cluster>,
}

/// An operation as the replicas share it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub(super) enum SharedOperation {
    #[serde(rename_all = "camelCase")]
    Running {
        registration_id: String,
        replica: String,
    },
    #[serde(rename_all = "camelCase")]
    Failed {
        registration_id: String,
        error: RelayedError,
    },
}

impl SharedOperation {
    pub(super) fn registration_id(&self) -> &str {
        match self {
            SharedOperation::Running {
                registration_id, ..
            }
            | SharedOperation::Failed {
                registration_id, ..
            } => registration_id,
        }
    }
}

/// A registration error carried to another replica: its kind and text.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RelayedError {
    kind: String,
    message: String,
}

impl From<&Error> for RelayedError {
    fn from(error: &Error) -> RelayedError {
        let kind = match error {
            Error::Unauthorized(_) => "unauthorized",
            Error::Throttled => "throttled",
            Error::HubRefused(_) => "hubRefused",
            Error::RenewalNotAllowed(_) => "renewalNotAllowed",
            Error::Revoked { .. } => "revoked",
            Error::IdMismatch => "idMismatch",
            // Whatever else broke on the other replica is worth a retry here.
            _ => "unavailable",
        };
        let message = match error {
            Error::Unauthorized(text)
            | Error::HubRefused(text)
            | Error::RenewalNotAllowed(text)
            | Error::Unavailable(text) => text.clone(),
            Error::Revoked { serial } => serial.clone(),
            other => other.to_string(),
        };
        RelayedError {
            kind: kind.to_string(),
            message,
        }
    }
}

impl From<RelayedError> for Error {
    fn from(relayed: RelayedError) -> Error {
        let RelayedError { kind, message } = relayed;
        match kind.as_str() {
            "unauthorized" => Error::Unauthorized(message),
            "throttled" => Error::Throttled,
            "hubRefused" => Error::HubRefused(message),
            "renewalNotAllowed" => Error::RenewalNotAllowed(message),
            "revoked" => Error::Revoked { serial: message },
            "idMismatch" => Error::IdMismatch,
            _ => Error::Unavailable(message),
        }
    }
}

impl Dps {
    /// Turns replica mode on for DPS: operations and TPM challenges are shared.
    pub async fn join_replicas(
        &self,
        cluster: Arc<Cluster>,
        stream_replicas: usize,
    ) -> anyhow::Result<()> {
        let challenge_age = Duration::from_secs(self.challenge_lifetime.max(1));
        let shared = Shared {
            operations: cluster
                .bucket("operations", OPERATION_AGE, stream_replicas)
                .await?,
            challenges: cluster
                .bucket("tpm_challenges", challenge_age, stream_replicas)
                .await?,
            cluster,
        };
        if self.shared.set(shared).is_err() {
            anyhow::bail!("DPS already runs in replica mode");
        }
        Ok(())
    }

    /// Records a started operation for the other replicas.
    pub(super) async fn share_running(&self, operation_id: &str, registration_id: &str) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        let state = SharedOperation::Running {
            registration_id: registration_id.to_ascii_lowercase(),
            replica: shared.cluster.replica().to_string(),
        };
        put_json(&shared.operations, operation_id, &state).await;
    }

    /// Records how an operation ended: a failure is kept for polls; a success is in the
    /// registration record already.
    pub(super) async fn share_finished(
        &self,
        operation_id: &str,
        registration_id: &str,
        error: Option<&Error>,
    ) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        match error {
            Some(error) => {
                let state = SharedOperation::Failed {
                    registration_id: registration_id.to_ascii_lowercase(),
                    error: error.into(),
                };
                put_json(&shared.operations, operation_id, &state).await;
            }
            None => {
                if let Err(e) = shared.operations.delete(operation_id).await {
                    tracing::warn!(operation_id, "forgetting a shared operation failed: {e}");
                }
            }
        }
    }

    /// Whether the replica `name` is alive (heard from lately).
    pub(super) fn replica_alive(&self, name: &str) -> bool {
        self.shared
            .get()
            .is_none_or(|shared| shared.cluster.members().iter().any(|m| m == name))
    }

    /// An operation another replica runs or ran.
    pub(super) async fn shared_operation(&self, operation_id: &str) -> Option<SharedOperation> {
        let shared = self.shared.get()?;
        match shared.operations.get(operation_id).await {
            Ok(Some(body)) => serde_json::from_slice(&body).ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(operation_id, "reading a shared operation failed: {e}");
                None
            }
        }
    }

    /// Shares this replica's challenge of the registration (new, or now used).
    pub(super) async fn share_challenge(&self, registration_id: &str) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        let key = registration_id.to_ascii_lowercase();
        let challenge = self.lock_challenges().get(&key).cloned();
        if let Some(challenge) = challenge {
            put_json(&shared.challenges, &key, &challenge).await;
        }
    }

    /// Takes the registration's challenge from the bucket when this replica has none (or an
    /// older one): another replica may have challenged the device.
    pub(super) async fn fetch_challenge(&self, registration_id: &str) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        let key = registration_id.to_ascii_lowercase();
        let stored = match shared.challenges.get(&key).await {
            Ok(Some(body)) => serde_json::from_slice::<Challenge>(&body).ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(
                    registration_id,
                    "reading a shared TPM challenge failed: {e}"
                );
                None
            }
        };
        let Some(stored) = stored else { return };
        let mut challenges = self.lock_challenges();
        let newer = challenges
            .get(&key)
            .is_none_or(|local| stored.expires_at > local.expires_at || stored.used);
        if newer {
            challenges.insert(key, stored);
        }
    }
}

async fn put_json(bucket: &Bucket, key: &str, value: &impl Serialize) {
    match serde_json::to_vec(value) {
        Ok(body) => {
            if let Err(e) = bucket.put(key, body.into()).await {
                tracing::warn!(key, "sharing state with the other replicas failed: {e}");
            }
        }
        Err(e) => tracing::warn!(key, "encoding shared state failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_errors_keep_their_kind() {
        for error in [
            Error::Unauthorized("no".into()),
            Error::Throttled,
            Error::HubRefused("x".into()),
            Error::Revoked {
                serial: "0a".into(),
            },
            Error::Unavailable("later".into()),
        ] {
            let relayed = RelayedError::from(&error);
            let text = serde_json::to_string(&relayed).unwrap();
            let back: Error = serde_json::from_str::<RelayedError>(&text).unwrap().into();
            assert_eq!(back.to_string(), error.to_string());
            assert_eq!(
                std::mem::discriminant(&back),
                std::mem::discriminant(&error)
            );
        }
        let internal = Error::Internal("disk".into());
        let back: Error = RelayedError::from(&internal).into();
        assert!(matches!(back, Error::Unavailable(_)));
    }
}
