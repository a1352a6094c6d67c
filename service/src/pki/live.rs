//! Live hub connections by the serial number of the certificate they authenticated with, so
//! that revoking a certificate can close the sessions that use it.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::mqtt::Outbound;

/// Connections authenticated with an X.509 certificate, by serial (normalised hex, see
/// [`super::serial_key`]). Closed connections are pruned whenever a connection is added.
#[derive(Default)]
pub struct LiveCertificates {
    by_serial: Mutex<HashMap<String, Vec<Outbound>>>,
}

impl LiveCertificates {
    /// Remembers that `outbound` authenticated with the certificate `leaf_der`.
    pub fn track(&self, leaf_der: &[u8], outbound: Outbound) {
        let Some(identity) = super::leaf_identity(leaf_der) else {
            return;
        };
        let mut map = self.lock();
        map.retain(|_, connections| {
            connections.retain(|c| !c.is_closed());
            !connections.is_empty()
        });
        map.entry(identity.serial).or_default().push(outbound);
    }

    /// Closes every live connection that authenticated with the certificate `serial`;
    /// returns how many were closed.
    pub fn close(&self, serial: &str) -> usize {
        let Some(key) = super::serial_key(serial) else {
            return 0;
        };
        let connections = self.lock().remove(&key).unwrap_or_default();
        let mut closed = 0;
        for connection in connections {
            if !connection.is_closed() {
                connection.close();
                closed += 1;
            }
        }
        closed
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<Outbound>>> {
        // A poisoned lock only means a panic elsewhere mid-update of a plain map.
        self.by_serial
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
