//! Step 3 of a registration: where the device goes (dps-protocol §5). The enrollment's
//! allocation policy (else the instance default) over the linked hubs, the built-in one and
//! every joined hub; `custom` asks the enrollment's webhook (§5.3). The reprovision policy
//! (§5.5) decides whether a device that registered before stays, and what its twin becomes.

use serde_json::{Value, json};
use zerotouch_attestation::{AttestedIdentity, EnrollmentRef, Mechanism};
use zerotouch_policies::{self as policies, Policy};

use super::error::{Error, FailureCode};
use super::hubs::{self, HubTarget};
use super::record::Substatus;
use super::{Dps, RegisterBody};
use crate::enrollment::Enrollment;

/// The hubs one registration may go to, and how to reach each.
#[derive(Default)]
pub(super) struct LinkedHubs {
    pub hubs: Vec<policies::Hub>,
    pub targets: Vec<HubTarget>,
}

impl LinkedHubs {
    pub fn target(&self, name: &str) -> Option<HubTarget> {
        self.targets
            .iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
            .cloned()
    }
}

/// The hub allocation chose, and what the webhook (if any) said with it.
pub(super) struct Choice {
    pub hub: String,
    /// The webhook's twin: replaces the enrollment's initial twin and resets the device's.
    pub webhook_twin: Option<Value>,
    /// The webhook's payload, echoed to the device.
    pub webhook_payload: Option<Value>,
}

/// What happens to the device's twin on the hub it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TwinPlan {
    /// Written from the initial twin (the enrollment's or the webhook's).
    Initial(Substatus),
    /// Left as it is on the hub.
    Keep,
    /// Copied from the old hub; the initial twin when that cannot be read.
    FromOldHub,
}

/// The reprovision policy's answer (dps-protocol §5.5). `placed`: the device was on a hub
/// before; `stays`: it stays there (`updateHubAssignment: false`); `reset`: the webhook sent a
/// twin or `migrateDeviceData` is false; `moved`: it goes to another hub.
pub(super) fn twin_plan(placed: bool, stays: bool, reset: bool, moved: bool) -> TwinPlan {
    if !placed {
        TwinPlan::Initial(Substatus::InitialAssignment)
    } else if stays && !moved {
        TwinPlan::Keep
    } else if reset {
        TwinPlan::Initial(Substatus::DeviceDataReset)
    } else if !moved {
        TwinPlan::Keep
    } else {
        TwinPlan::FromOldHub
    }
}

impl Dps {
    /// The hubs devices can be assigned to: the built-in hub of this process (if it runs one)
    /// and every joined hub, with their health as of now.
    pub(super) async fn linked_hubs(&self) -> Result<LinkedHubs, Error> {
        let remote = crate::db::blocking(&self.store, hubs::load_all).await?;
        Ok(self.linked_hubs_of(remote))
    }

    /// [`linked_hubs`](Self::linked_hubs) from the joined hubs' records, read by the caller.
    pub(super) fn linked_hubs_of(&self, remote: Vec<hubs::LinkedHub>) -> LinkedHubs {
        let mut linked = LinkedHubs::default();
        if let Some(hub) = &self.hub {
            let own = &self.allocation.own_hub;
            linked.hubs.push(policies::Hub {
                name: hub.hostname.clone(),
                location: own.location.clone(),
                weight: own.allocation_weight,
                apply_allocation_policy: own.apply_allocation_policy,
                healthy: true,
            });
            linked.targets.push(HubTarget::Local(hub.clone()));
        }
        let now = crate::time::now_unix();
        for record in remote {
            if linked.target(&record.name).is_some() {
                continue;
            }
            linked.hubs.push(policies::Hub {
                name: record.name.clone(),
                location: record.location.clone(),
                weight: record.allocation_weight,
                apply_allocation_policy: record.apply_allocation_policy,
                healthy: record.health(now, self.allocation.heartbeat_timeout)
                    == hubs::Health::Healthy,
            });
            linked.targets.push(HubTarget::Remote(hubs::RemoteHub::new(
                &record,
                self.hub_client.clone(),
            )));
        }
        linked
    }

    /// Runs the allocation policy over the linked hubs not `excluded`. `Ok(Err(…))` is an
    /// allocation failure the registration records; `Err` is an error answer.
    pub(super) async fn choose(
        &self,
        registering: &super::Registering<'_>,
        linked: &LinkedHubs,
        excluded: &[String],
    ) -> Result<Result<Choice, (FailureCode, String)>, Error> {
        let enrollment = registering.enrollment;
        let hubs: Vec<policies::Hub> = linked
            .hubs
            .iter()
            .filter(|h| !excluded.iter().any(|x| x.eq_ignore_ascii_case(&h.name)))
            .cloned()
            .collect();
        let named = enrollment.named_hubs();
        let policy = enrollment
            .allocation_policy
            .map_or(self.allocation.default_policy, Policy::from);
        let request = policies::Request {
            registration_id: registering.registration_id,
            enrollment_hubs: (!named.is_empty()).then_some(named.as_slice()),
            policy,
            region_hint: registering
                .body
                .payload
                .as_ref()
                .and_then(|p| p.get("region"))
                .and_then(Value::as_str),
            source_address: registering.body.source_address,
        };
        let failed = |error: policies::AllocationError| {
            Ok(Err((FailureCode::of_allocation(&error), error.to_string())))
        };
        let candidates = match policies::candidates(&hubs, &request) {
            Ok(c) => c,
            Err(_) if !excluded.is_empty() => {
                return Err(Error::Unavailable(
                    "no hub for this device can be reached right now; retry".into(),
                ));
            }
            Err(error) => return failed(error),
        };
        if policy != Policy::Custom {
            return match policies::allocate(&candidates, &request, &self.allocation.latency) {
                Ok(hub) => Ok(Ok(Choice {
                    hub: hub.name.clone(),
                    webhook_twin: None,
                    webhook_payload: None,
                })),
                Err(error) => failed(error),
            };
        }
        match self.custom_allocation(registering, &candidates).await {
            Ok(assignment) => Ok(Ok(Choice {
                hub: assignment.hub.name.clone(),
                webhook_twin: assignment.initial_twin,
                webhook_payload: assignment.payload,
            })),
            Err(error) => {
                tracing::warn!(registration_id = registering.registration_id, %error, "custom allocation failed");
                failed(policies::AllocationError::Webhook(error))
            }
        }
    }

    /// Asks the enrollment's webhook (dps-protocol §5.3).
    async fn custom_allocation<'a>(
        &self,
        registering: &super::Registering<'_>,
        candidates: &[&'a policies::Hub],
    ) -> Result<policies::webhook::Assignment<'a>, policies::WebhookError> {
        let enrollment = registering.enrollment;
        let url = enrollment
            .custom_allocation_definition
            .as_ref()
            .map(|c| c.webhook_url.as_str())
            .ok_or_else(|| {
                policies::WebhookError::Config("the enrollment has no webhookUrl".into())
            })?;
        let client = self
            .webhook
            .as_ref()
            .map_err(|e| policies::WebhookError::Config(e.clone()))?;
        let body = registering.body;
        let attestation = runtime_attestation(registering.attested, enrollment, body);
        let placed = registering.previous.as_ref().and_then(|p| p.placed());
        let context = policies::webhook::DeviceRuntimeContext {
            registration_id: registering.registration_id,
            current_hub: placed.map(|(hub, _)| hub),
            current_device_id: placed.map(|(_, device)| device),
            attestation,
            payload: body.payload.as_ref(),
        };
        let view = enrollment.clone().without_secrets().to_json();
        let kind = match registering.attested.matched {
            EnrollmentRef::Group(_) => policies::webhook::Enrollment::Group(&view),
            EnrollmentRef::Individual(_) => policies::webhook::Enrollment::Individual(&view),
        };
        let request = policies::webhook::build_request(kind, &context, candidates);
        client.allocate(url, &request, candidates).await
    }
}

/// How the device attested, as the webhook's `deviceRuntimeContext` tells it.
fn runtime_attestation(
    attested: &AttestedIdentity,
    enrollment: &Enrollment,
    body: &RegisterBody,
) -> policies::webhook::RuntimeAttestation {
    use policies::webhook::RuntimeAttestation;
    match attested.mechanism {
        Mechanism::SymmetricKey => RuntimeAttestation::SymmetricKey,
        Mechanism::X509 => RuntimeAttestation::X509(json!({
            "certificateInfo": attested.certificate_info,
            "signingCertificateInfo": attested.signing_certificate_info,
        })),
        Mechanism::Tpm => RuntimeAttestation::Tpm {
            endorsement_key: enrollment
                .tpm_keys()
                .map(|(ek, _)| ek.to_string())
                .or_else(|| body.tpm.as_ref().and_then(|t| t.endorsement_key.clone()))
                .unwrap_or_default(),
            storage_root_key: body.tpm.as_ref().and_then(|t| t.storage_root_key.clone()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_registration_gets_the_initial_twin() {
        for (stays, reset, moved) in [(false, false, false), (true, true, true)] {
            assert_eq!(
                twin_plan(false, stays, reset, moved),
                TwinPlan::Initial(Substatus::InitialAssignment)
            );
        }
    }

    #[test]
    fn the_reprovision_policy_decides_a_repeat_registration() {
        // updateHubAssignment false: the device stays, its twin too.
        assert_eq!(twin_plan(true, true, true, false), TwinPlan::Keep);
        // Reset (migrateDeviceData false, or a webhook twin) on the same or another hub.
        assert_eq!(
            twin_plan(true, false, true, false),
            TwinPlan::Initial(Substatus::DeviceDataReset)
        );
        assert_eq!(
            twin_plan(true, false, true, true),
            TwinPlan::Initial(Substatus::DeviceDataReset)
        );
        // Migrate: nothing to copy on the same hub; from the old hub on a move.
        assert_eq!(twin_plan(true, false, false, false), TwinPlan::Keep);
        assert_eq!(twin_plan(true, false, false, true), TwinPlan::FromOldHub);
        // A device meant to stay whose hub is gone moves like any other.
        assert_eq!(twin_plan(true, true, false, true), TwinPlan::FromOldHub);
    }
}
