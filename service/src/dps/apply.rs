//! Step 4 of a registration: the identity on the chosen hub. Allocation and the hub write run
//! in one loop: a hub that cannot be reached is marked unhealthy and allocation runs again
//! without it, so a dead hub fails no registration.

use serde_json::{Value, json};

use super::allocate::{Choice, LinkedHubs, TwinPlan, twin_plan};
use super::error::{Error, FailureCode};
use super::hubs::{self, HubCallError, HubTarget};
use super::record::Substatus;
use super::{Dps, Registering};

/// Where the device went.
#[derive(Debug)]
pub(super) struct Placed {
    pub hub: String,
    pub substatus: Substatus,
    pub webhook_payload: Option<Value>,
    /// It left another hub (which loses it once the record is written).
    pub moved: bool,
}

impl Dps {
    /// Chooses a hub and writes the device's identity (and twin) there. `Ok(Err(…))` is an
    /// allocation failure the registration records.
    pub(super) async fn place(
        &self,
        registering: &Registering<'_>,
        linked: &LinkedHubs,
        identity: &Value,
    ) -> Result<Result<Placed, (FailureCode, String)>, Error> {
        let placed = registering.previous.as_ref().and_then(|p| p.placed());
        let previous_hub = placed.map(|(hub, _)| hub);
        let policy = registering.enrollment.reprovision_policy;
        let stays = !policy.update_hub_assignment
            && previous_hub.is_some_and(|h| linked.target(h).is_some());
        let mut excluded: Vec<String> = Vec::new();
        let mut old_twin: Option<Option<Value>> = None;
        loop {
            let choice = match (stays && excluded.is_empty(), previous_hub) {
                (true, Some(hub)) => Choice {
                    hub: hub.to_string(),
                    webhook_twin: None,
                    webhook_payload: None,
                },
                _ => match self.choose(registering, linked, &excluded).await? {
                    Ok(choice) => choice,
                    Err(failure) => return Ok(Err(failure)),
                },
            };
            let Some(target) = linked.target(&choice.hub) else {
                return Err(Error::Internal(format!(
                    "allocation chose {}, which is not linked",
                    choice.hub
                )));
            };
            let moved = previous_hub.is_some_and(|h| !h.eq_ignore_ascii_case(&choice.hub));
            let reset = choice.webhook_twin.is_some() || !policy.migrate_device_data;
            let initial = || {
                choice
                    .webhook_twin
                    .clone()
                    .or_else(|| registering.enrollment.initial_twin.clone())
                    .unwrap_or(json!({}))
            };
            let (twin, substatus) = match twin_plan(placed.is_some(), stays, reset, moved) {
                TwinPlan::Initial(substatus) => (Some(initial()), substatus),
                TwinPlan::Keep => (None, Substatus::DeviceDataMigrated),
                TwinPlan::FromOldHub => {
                    if old_twin.is_none() {
                        old_twin = Some(self.read_old_twin(linked, placed).await);
                    }
                    match old_twin.clone().flatten() {
                        Some(twin) => (Some(twin), Substatus::DeviceDataMigrated),
                        None => (Some(initial()), Substatus::DeviceDataReset),
                    }
                }
            };
            // A removal still pending on this hub (the device left it earlier) no longer is.
            // Only a device coming to this hub can have one: a move, or a first registration
            // after its record was deleted. Re-registering on the same hub skips the read.
            if moved || placed.is_none() {
                self.cancel_stale(&choice.hub, &registering.device_id)
                    .await?;
            }
            match self
                .apply_on_hub(&target, &registering.device_id, identity, twin.as_ref())
                .await
            {
                Ok(()) => {
                    return Ok(Ok(Placed {
                        hub: choice.hub,
                        substatus,
                        webhook_payload: choice.webhook_payload,
                        moved,
                    }));
                }
                Err(HubCallError::Unreachable(message)) => {
                    tracing::warn!(hub = %choice.hub, %message, "hub unreachable; allocating again without it");
                    self.hub_failed(&target).await;
                    excluded.push(choice.hub);
                }
                Err(HubCallError::Refused(message)) => return Err(Error::HubRefused(message)),
                Err(other) => {
                    return Err(Error::Unavailable(format!(
                        "the device identity is being changed concurrently ({other}); retry"
                    )));
                }
            }
        }
    }

    /// Creates or updates the identity on `target` and, when `twin` is given, replaces its tags
    /// and desired properties. Transport failures are retried briefly on the same hub.
    async fn apply_on_hub(
        &self,
        target: &HubTarget,
        device_id: &str,
        identity: &Value,
        twin: Option<&Value>,
    ) -> Result<(), HubCallError> {
        let twin = twin.map(|twin| {
            json!({
                "tags": twin.get("tags").cloned().unwrap_or(json!({})),
                "properties": {"desired": twin
                    .pointer("/properties/desired")
                    .cloned()
                    .unwrap_or(json!({}))},
            })
        });
        let twin = twin.as_ref();
        target
            .retrying(|| async move {
                let twin_written = target.ensure_device(device_id, identity, twin).await?;
                if let Some(twin) = twin.filter(|_| !twin_written) {
                    target.replace_twin(device_id, twin).await?;
                }
                Ok(())
            })
            .await
    }

    /// The twin (tags, desired) a moving device has on its old hub; `None` when the old hub is
    /// gone or unreachable, or the device is not there.
    async fn read_old_twin(
        &self,
        linked: &LinkedHubs,
        placed: Option<(&str, &str)>,
    ) -> Option<Value> {
        let (old_hub, device_id) = placed?;
        let target = linked.target(old_hub)?;
        match target.retrying(|| target.twin(device_id)).await {
            Ok(twin) => twin,
            Err(error) => {
                tracing::warn!(hub = target.name(), %error, "cannot read the twin to migrate; resetting it");
                None
            }
        }
    }

    /// Records that a call to a remote hub failed: it gets no devices until its next heartbeat.
    async fn hub_failed(&self, target: &HubTarget) {
        let HubTarget::Remote(remote) = target else {
            return;
        };
        let name = remote.name.clone();
        let now = crate::time::now_unix();
        let result = crate::db::blocking(&self.store, move |s| {
            hubs::update(s, &name, |h| {
                h.last_failure_unix = now;
                true
            })
        })
        .await;
        if let Err(error) = result {
            tracing::warn!(hub = %remote.name, %error, "could not record the hub failure");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use zerotouch_policies::{self as policies, Policy};

    use super::super::record::{Registration, RegistrationStatus, Substatus};
    use super::super::testing::{Fixture, attested, enrollment, identity, registering};
    use super::super::{Error, RegisterBody};

    #[tokio::test]
    async fn a_first_registration_writes_the_identity_and_the_initial_twin() {
        let f = Fixture::new();
        let enrollment = enrollment(
            "dev-1",
            json!({"initialTwin": {"tags": {"site": "plant-7"},
                "properties": {"desired": {"interval": 30}}}}),
        );
        let (attested, body) = (attested("dev-1"), RegisterBody::default());
        let registering = registering(&enrollment, &attested, &body);
        let linked = f.dps.linked_hubs().await.unwrap();
        let placed = f
            .dps
            .place(&registering, &linked, &identity("dev-1"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(placed.hub, "localhost");
        assert_eq!(placed.substatus, Substatus::InitialAssignment);
        assert!(!placed.moved);
        let twin = f.hub.twin_view("dev-1").await.unwrap();
        assert_eq!(twin["tags"], json!({"site": "plant-7"}));
        assert_eq!(twin["properties"]["desired"]["interval"], 30);
        // Written with the device, but versioned as a new twin whose tags and desired
        // properties were then replaced (what a joined hub's twin PUT gives).
        assert_eq!(twin["version"], 3, "{twin}");
        assert_eq!(twin["properties"]["desired"]["$version"], 2);
        assert_eq!(twin["properties"]["reported"]["$version"], 1);
    }

    /// A device that exists already keeps its identity's twin until the initial one replaces
    /// it: the twin is not written with the identity then.
    #[tokio::test]
    async fn an_existing_device_gets_the_initial_twin_by_a_replace() {
        let f = Fixture::new();
        f.hub
            .put_device("dev-1", identity("dev-1"), None)
            .await
            .unwrap();
        f.hub
            .replace_twin_quietly("dev-1", &json!({"tags": {"old": true}}))
            .await
            .unwrap();
        let enrollment = enrollment(
            "dev-1",
            json!({"initialTwin": {"tags": {"site": "plant-7"}}}),
        );
        let (attested, body) = (attested("dev-1"), RegisterBody::default());
        let linked = f.dps.linked_hubs().await.unwrap();
        f.dps
            .place(
                &registering(&enrollment, &attested, &body),
                &linked,
                &identity("dev-1"),
            )
            .await
            .unwrap()
            .unwrap();
        let twin = f.hub.twin_view("dev-1").await.unwrap();
        assert_eq!(twin["tags"], json!({"site": "plant-7"}));
        assert_eq!(twin["version"], 4, "{twin}");
    }

    #[tokio::test]
    async fn a_device_that_stays_keeps_its_twin() {
        let f = Fixture::new();
        let first = enrollment("dev-1", json!({"initialTwin": {"tags": {"v": 1}}}));
        let (attested, body) = (attested("dev-1"), RegisterBody::default());
        let linked = f.dps.linked_hubs().await.unwrap();
        let identity = identity("dev-1");
        f.dps
            .place(&registering(&first, &attested, &body), &linked, &identity)
            .await
            .unwrap()
            .unwrap();
        // The enrollment changed its initial twin and does not move devices: a repeat
        // registration leaves the twin alone.
        let again = enrollment(
            "dev-1",
            json!({"initialTwin": {"tags": {"v": 2}}, "reprovisionPolicy":
                {"updateHubAssignment": false, "migrateDeviceData": false}}),
        );
        let mut repeat = registering(&again, &attested, &body);
        repeat.previous = Some(Registration {
            assigned_hub: Some("localhost".into()),
            device_id: Some("dev-1".into()),
            ..Registration::new("dev-1", RegistrationStatus::Assigned, "t0")
        });
        let placed = f
            .dps
            .place(&repeat, &linked, &identity)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(placed.substatus, Substatus::DeviceDataMigrated);
        assert_eq!(f.hub.twin_view("dev-1").await.unwrap()["tags"]["v"], 1);
    }

    #[tokio::test]
    async fn a_hub_that_cannot_be_reached_is_left_out_and_marked() {
        let f = Fixture::new();
        f.link_dead_hub("dead.example", 1);
        let linked = f.dps.linked_hubs().await.unwrap();
        // A registration id the hashed policy sends to the dead hub.
        let id = (0..200)
            .map(|i| format!("dev-{i}"))
            .find(|id| {
                let request = policies::Request {
                    registration_id: id,
                    enrollment_hubs: None,
                    policy: Policy::Hashed,
                    region_hint: None,
                    source_address: None,
                };
                let candidates = policies::candidates(&linked.hubs, &request).unwrap();
                policies::allocate(&candidates, &request, &Default::default())
                    .is_ok_and(|hub| hub.name == "dead.example")
            })
            .expect("some id hashes to the dead hub");
        let enrollment = enrollment(&id, json!({"allocationPolicy": "hashed"}));
        let (attested, body) = (attested(&id), RegisterBody::default());
        let placed = f
            .dps
            .place(
                &registering(&enrollment, &attested, &body),
                &linked,
                &identity(&id),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(placed.hub, "localhost");
        assert!(f.hub.device_view(&id).await.is_ok());
        let dead = super::hubs::load(f.store.as_ref(), "dead.example")
            .unwrap()
            .unwrap();
        assert!(dead.last_failure_unix > 0, "the failure is recorded");
    }

    #[tokio::test]
    async fn a_device_whose_only_hub_is_down_is_told_to_retry() {
        let f = Fixture::new();
        f.link_dead_hub("dead.example", 1);
        let linked = f.dps.linked_hubs().await.unwrap();
        let enrollment = enrollment("dev-1", json!({"iotHubs": ["dead.example"]}));
        let (attested, body) = (attested("dev-1"), RegisterBody::default());
        let result = f
            .dps
            .place(
                &registering(&enrollment, &attested, &body),
                &linked,
                &identity("dev-1"),
            )
            .await;
        assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
    }

    #[tokio::test]
    async fn an_enrollment_naming_no_linked_hub_fails_the_registration() {
        let f = Fixture::new();
        let linked = f.dps.linked_hubs().await.unwrap();
        let enrollment = enrollment("dev-1", json!({"iotHubs": ["elsewhere.example"]}));
        let (attested, body) = (attested("dev-1"), RegisterBody::default());
        let failure = f
            .dps
            .place(
                &registering(&enrollment, &attested, &body),
                &linked,
                &identity("dev-1"),
            )
            .await
            .unwrap()
            .expect_err("an allocation failure");
        assert_eq!(failure.0.number(), 400_208, "{}", failure.1);
    }
}
