//! `/messages/servicebound/feedback`: delivery feedback of cloud-to-device messages sent with
//! an `ack` (hub-protocol §7), as IoT Hub batches it.
//!
//! Each AMQP message is a JSON array of up to [`BATCH`] records (`originalMessageId`,
//! `description`, `deviceGenerationId`, `deviceId`, `enqueuedTimeUtc`, `statusCode`), with
//! content type `application/vnd.microsoft.iothub.feedback.json`. Records stay stored
//! (`c2d_feedback`) until the service accepts the message that carries them; a released or
//! modified message is sent again, a rejected one is dropped. One batch is in flight per
//! process at a time, so two service clients of one process never get the same record; two
//! replicas may (docs/hub.md).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fe2o3_amqp::link::Sender;
use fe2o3_amqp_types::messaging::{Body, Data, Message, MessageId, Outcome, Properties};
use fe2o3_amqp_types::primitives::{Binary, Value};

use crate::db::{Collection, Document};
use crate::hub::Hub;

/// The address of the link (the Node SDK writes `serviceBound`).
pub const ADDRESS: &str = "/messages/servicebound/feedback";
/// Records per message.
pub const BATCH: usize = 100;
/// The content type IoT Hub gives feedback messages.
pub const CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";
/// How often an idle link looks for new records.
const POLL: Duration = Duration::from_millis(500);

fn in_flight() -> &'static tokio::sync::Mutex<()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
}

/// Whether `address` names the feedback node (case-insensitively, as IoT Hub).
pub fn is_feedback(address: &str) -> bool {
    address.eq_ignore_ascii_case(ADDRESS)
}

fn batch_message(records: &[Document]) -> Message<Body<Value>> {
    let bodies: Vec<&serde_json::Value> = records.iter().map(|d| &d.body).collect();
    let json = serde_json::to_vec(&bodies).unwrap_or_else(|_| b"[]".to_vec());
    let properties = Properties {
        message_id: Some(MessageId::String(uuid::Uuid::new_v4().to_string())),
        content_type: Some(CONTENT_TYPE.into()),
        content_encoding: Some("utf-8".into()),
        ..Properties::default()
    };
    Message::builder()
        .properties(properties)
        .body(Body::Data(vec![Data(Binary::from(json))].into()))
        .build()
}

/// Sends feedback on `sender` until the link or the connection goes away, or the grant
/// that allowed it expires (`allowed` says whether it still holds).
pub async fn serve(mut sender: Sender, hub: Arc<Hub>, allowed: impl Fn() -> bool) {
    loop {
        if !allowed() {
            let _ = sender
                .close_with_error(super::c2d::error(
                    fe2o3_amqp_types::definitions::ErrorCondition::AmqpError(
                        fe2o3_amqp_types::definitions::AmqpError::UnauthorizedAccess,
                    ),
                    "the token that allowed this link has expired",
                ))
                .await;
            return;
        }
        let guard = in_flight().lock().await;
        let records = match crate::db::blocking(hub.store(), |s| {
            s.list(Collection::C2dFeedback, None, BATCH, None)
        })
        .await
        {
            Ok(page) => page.items,
            Err(e) => {
                tracing::warn!(error = %e, "AMQP feedback: reading the records failed");
                Vec::new()
            }
        };
        if records.is_empty() {
            drop(guard);
            tokio::time::sleep(POLL).await;
            continue;
        }
        let outcome = match super::send(&mut sender, batch_message(&records)).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::info!(error = %e, "AMQP feedback link ended");
                return;
            }
        };
        let done = match outcome {
            Outcome::Accepted(_) | Outcome::Rejected(_) => true,
            Outcome::Released(_) | Outcome::Modified(_) => false,
            #[allow(unreachable_patterns)]
            _ => false,
        };
        if done {
            let removed = crate::db::blocking(hub.store(), move |s| {
                for record in &records {
                    match s.delete(Collection::C2dFeedback, &record.id, Some(&record.etag)) {
                        Ok(_)
                        | Err(
                            crate::db::StoreError::NotFound
                            | crate::db::StoreError::PreconditionFailed,
                        ) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })
            .await;
            if let Err(e) = removed {
                tracing::warn!(error = %e, "AMQP feedback: removing delivered records failed");
            }
        } else {
            drop(guard);
            tokio::time::sleep(POLL).await;
        }
    }
}
