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
        target
            .retrying(|| async move {
                target.ensure_device(device_id, identity).await?;
                if let Some(twin) = twin {
                    let body = json!({
                        "tags": twin.get("tags").cloned().unwrap_or(json!({})),
                        "properties": {"desired": twin
                            .pointer("/properties/desired")
                            .cloned()
                            .unwrap_or(json!({}))},
                    });
                    target.replace_twin(device_id, &body).await?;
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
