//! Step 6 of a registration: clean-up. A device that moved leaves its old hub once its new
//! assignment is recorded; a removal that fails is kept as a stale identity and retried by a
//! sweep until it succeeds, or until the device comes back.

use std::sync::Arc;

use super::Dps;
use super::allocate::LinkedHubs;
use super::error::Error;
use super::hubs::{self, HubCallError};
use super::record::Registration;
use crate::db::Collection;

impl Dps {
    /// Removes a moved device from its old hub, retrying briefly. When that fails the removal
    /// is recorded and [`Dps::sweep_stale_identities`] retries it until it succeeds.
    pub(super) async fn remove_from_old_hub(
        &self,
        linked: &LinkedHubs,
        old_hub: &str,
        device_id: &str,
        registration_id: &str,
    ) {
        let Some(target) = linked.target(old_hub) else {
            return;
        };
        let Err(error) = target
            .retrying(|| target.remove_device(device_id, "*"))
            .await
        else {
            return;
        };
        self.metrics.stale_identities.inc();
        tracing::warn!(hub = old_hub, device_id, %error, "could not remove a moved device from its old hub; will retry");
        let stale = hubs::StaleIdentity {
            hub: target.name().to_string(),
            device_id: device_id.to_string(),
            registration_id: registration_id.to_string(),
            since_unix: crate::time::now_unix(),
            attempts: 1,
            last_error: error.to_string(),
        };
        if let Err(error) =
            crate::db::blocking(&self.store, move |s| hubs::save_stale(s, &stale)).await
        {
            tracing::error!(hub = old_hub, device_id, %error, "could not record a pending removal; the old identity stays until removed by hand");
        }
    }

    /// Drops a pending removal of `device_id` from `hub` (the device is going back there).
    pub(super) async fn cancel_stale(&self, hub: &str, device_id: &str) -> Result<(), Error> {
        let key = hubs::StaleIdentity::key(hub, device_id);
        let (hub, device_id) = (hub.to_string(), device_id.to_string());
        crate::db::blocking(&self.store, move |s| {
            // A read first: almost always there is nothing to cancel, and reads are cheap.
            if s.get(Collection::StaleIdentities, &key)?.is_some() {
                hubs::forget_stale(s, &hub, &device_id)?;
            }
            Ok(())
        })
        .await
        .map_err(Error::from)
    }

    /// Retries every pending removal of a moved device from its old hub; returns how many
    /// are still pending. Safe against a device moving back at the same time: the identity is
    /// removed only under the etag read before checking that the device is still elsewhere
    /// and the removal still wanted, and registration cancels the removal before it writes
    /// the identity again.
    pub async fn sweep_stale_identities(&self) -> Result<usize, Error> {
        let pending = crate::db::blocking(&self.store, |s| hubs::load_stale(s, None)).await?;
        if pending.is_empty() {
            return Ok(0);
        }
        let linked = self.linked_hubs().await?;
        let mut left = 0;
        for mut stale in pending {
            match self.retry_stale(&linked, &stale).await {
                Ok(()) => {
                    let (hub, device) = (stale.hub.clone(), stale.device_id.clone());
                    crate::db::blocking(&self.store, move |s| hubs::forget_stale(s, &hub, &device))
                        .await?;
                }
                Err(error) => {
                    left += 1;
                    stale.attempts = stale.attempts.saturating_add(1);
                    stale.last_error = error.to_string();
                    // Written only if the record is still there: a registration may have
                    // cancelled it meanwhile.
                    crate::db::blocking(&self.store, move |s| {
                        let key = hubs::StaleIdentity::key(&stale.hub, &stale.device_id);
                        match s.get(Collection::StaleIdentities, &key)? {
                            Some(_) => hubs::save_stale(s, &stale),
                            None => Ok(()),
                        }
                    })
                    .await?;
                }
            }
        }
        Ok(left)
    }

    /// Runs [`Dps::sweep_stale_identities`] every `every`, for as long as the server runs.
    pub async fn sweep_stale_identities_every(self: Arc<Self>, every: std::time::Duration) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match self.sweep_stale_identities().await {
                Ok(0) => {}
                Ok(left) => tracing::debug!(left, "moved devices still to remove from old hubs"),
                Err(error) => tracing::warn!(%error, "cannot retry pending removals"),
            }
        }
    }

    /// One pending removal: `Ok` when nothing is left to do.
    async fn retry_stale(
        &self,
        linked: &LinkedHubs,
        stale: &hubs::StaleIdentity,
    ) -> Result<(), HubCallError> {
        // A hub no longer linked is out of our hands (docs/deployment.md).
        let Some(target) = linked.target(&stale.hub) else {
            return Ok(());
        };
        let Some(etag) = target.device_etag(&stale.device_id).await? else {
            return Ok(());
        };
        let (registration, key) = (
            stale.registration_id.clone(),
            hubs::StaleIdentity::key(&stale.hub, &stale.device_id),
        );
        let (current, wanted) = crate::db::blocking(&self.store, move |s| {
            Ok((
                s.get(Collection::Registrations, &registration)?,
                s.get(Collection::StaleIdentities, &key)?.is_some(),
            ))
        })
        .await
        .map_err(|e| HubCallError::Unreachable(e.to_string()))?;
        // Assigned there, or failed since with that assignment kept.
        let back_there = current
            .as_ref()
            .and_then(|doc| Registration::from_document(doc).ok())
            .is_some_and(|record| {
                record.placed().is_some_and(|(hub, device)| {
                    hub.eq_ignore_ascii_case(&stale.hub) && device == stale.device_id
                })
            });
        if back_there || !wanted {
            return Ok(());
        }
        target.remove_device(&stale.device_id, &etag).await?;
        tracing::info!(hub = %stale.hub, device_id = %stale.device_id, attempts = stale.attempts, "removed a moved device from its old hub");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::hubs::{HubTarget, StaleIdentity, load_stale};
    use super::super::testing::{Fixture, identity};

    #[tokio::test]
    async fn a_moved_device_leaves_its_old_hub() {
        let f = Fixture::new();
        HubTarget::Local(f.hub.clone())
            .ensure_device("dev-1", &identity("dev-1"), None)
            .await
            .unwrap();
        let linked = f.dps.linked_hubs().await.unwrap();
        f.dps
            .remove_from_old_hub(&linked, "localhost", "dev-1", "dev-1")
            .await;
        assert!(f.hub.device_view("dev-1").await.is_err(), "removed");
        assert!(load_stale(f.store.as_ref(), None).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_removal_that_fails_is_retried_until_the_device_comes_back() {
        let f = Fixture::new();
        f.link_dead_hub("dead.example", 1);
        let linked = f.dps.linked_hubs().await.unwrap();
        f.dps
            .remove_from_old_hub(&linked, "dead.example", "dev-1", "dev-1")
            .await;
        let pending = load_stale(f.store.as_ref(), None).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].hub.as_str(), pending[0].attempts),
            ("dead.example", 1)
        );
        // The hub is still down: the sweep keeps it, counting the attempt.
        assert_eq!(f.dps.sweep_stale_identities().await.unwrap(), 1);
        let pending = load_stale(f.store.as_ref(), None).unwrap();
        assert_eq!(pending[0].attempts, 2);
        assert!(!pending[0].last_error.is_empty());
        // The device registers on that hub again: the removal is no longer wanted.
        f.dps.cancel_stale("dead.example", "dev-1").await.unwrap();
        assert!(load_stale(f.store.as_ref(), None).unwrap().is_empty());
        assert_eq!(f.dps.sweep_stale_identities().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_removal_from_an_unlinked_hub_is_dropped() {
        let f = Fixture::new();
        let stale = StaleIdentity {
            hub: "gone.example".into(),
            device_id: "dev-1".into(),
            registration_id: "dev-1".into(),
            since_unix: 0,
            attempts: 3,
            last_error: "unreachable".into(),
        };
        super::hubs::save_stale(f.store.as_ref(), &stale).unwrap();
        assert_eq!(f.dps.sweep_stale_identities().await.unwrap(), 0);
        assert!(load_stale(f.store.as_ref(), None).unwrap().is_empty());
    }
}
