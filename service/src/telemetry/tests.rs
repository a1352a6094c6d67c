//! The telemetry engine, run against both backends.
//!
//! Every test in `both!` runs twice: in `telemetry::tests::sqlite` on a file in a fresh
//! temporary directory, and in `telemetry::tests::postgres` on a fresh database (the helpers of
//! `db/tests.rs`: `ZEROTOUCH_TEST_PG_URL`, `ZEROTOUCH_TEST_SKIP_PG=1`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use crate::db::telemetry::TestDatabase;

/// Runs `f` on a multi-threaded runtime, as the service does.
fn run<F: Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Each test is an `async fn(url: String)`.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() {
                if let Some(db) = super::TestDatabase::sqlite() {
                    super::run(super::$name(db.url.clone()));
                    drop(db);
                }
            })*
        }
        mod postgres {
            $(#[test] fn $name() {
                if let Some(db) = super::TestDatabase::postgres() {
                    super::run(super::$name(db.url.clone()));
                    drop(db);
                }
            })*
        }
    };
}

both! {
    appends_get_increasing_offsets,
    reads_by_offset_limit_and_device,
    properties_and_bodies_round_trip,
    stored_message_json_shape,
    concurrent_appends_are_group_committed,
    callers_on_several_event_loops_get_their_own_offsets,
    wait_for_wakes_on_append_and_times_out,
    retention_by_age,
    retention_by_size,
    the_writer_enforces_retention_by_itself,
    shutdown_flushes_what_is_queued,
    dropping_every_handle_flushes_too,
    offsets_keep_increasing_across_restarts,
    nul_in_ids_is_refused_without_failing_others,
    a_failed_batch_fails_every_caller_then_recovers,
    large_messages_flow_through_the_byte_budget,
    acknowledged_messages_survive_sigkill,
    throughput,
}

fn keep_all() -> Retention {
    Retention::default()
}

fn message(device: &str, n: usize) -> NewMessage {
    NewMessage {
        device_id: device.to_owned(),
        module_id: None,
        body: format!("{{\"n\":{n}}}").into_bytes(),
        system: BTreeMap::from([("message-id".to_owned(), format!("m-{n}"))]),
        properties: vec![("n".to_owned(), Some(n.to_string()))],
    }
}

/// Every stored message, by paging through `read`.
async fn read_all(telemetry: &Telemetry) -> Vec<StoredMessage> {
    let mut all = Vec::new();
    let mut from = 0;
    loop {
        let page = telemetry.read(from, MAX_READ, None).await.unwrap();
        match page.last() {
            Some(last) => from = last.offset + 1,
            None => return all,
        }
        all.extend(page);
    }
}

async fn appends_get_increasing_offsets(url: String) {
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    assert_eq!(telemetry.last_offset(), 0);
    let mut previous = 0;
    for n in 0..20 {
        let offset = telemetry.append(message("dev1", n)).await.unwrap();
        assert!(offset > previous, "{offset} after {previous}");
        assert_eq!(telemetry.last_offset(), offset);
        previous = offset;
    }
    let stats = telemetry.stats();
    assert_eq!(stats.messages, 20);
    assert_eq!(stats.batches, 20, "sequential appends: one batch each");
    assert_eq!(stats.failed_batches, 0);
    assert_eq!(stats.queued, 0);
    let expected: u64 = (0..20).map(|n| message("dev1", n).size()).sum();
    assert_eq!(stats.bytes, expected);
    telemetry.shutdown();
}

async fn reads_by_offset_limit_and_device(url: String) {
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let mut offsets = Vec::new();
    for n in 0..30 {
        let device = ["a", "b", "c"][n % 3];
        offsets.push((device, telemetry.append(message(device, n)).await.unwrap()));
    }
    let all: Vec<i64> = offsets.iter().map(|(_, o)| *o).collect();

    let read = async |from: i64, limit: usize, device: Option<&str>| {
        telemetry
            .read(from, limit, device)
            .await
            .unwrap()
            .iter()
            .map(|m| m.offset)
            .collect::<Vec<_>>()
    };
    assert_eq!(read(0, 1000, None).await, all);
    assert_eq!(read(all[10], 5, None).await, all[10..15]);
    assert_eq!(read(all[29] + 1, 10, None).await, Vec::<i64>::new());
    assert_eq!(read(i64::MIN, 3, None).await, all[..3]);
    // The limit is clamped to 1..=1000.
    assert_eq!(read(0, 0, None).await, all[..1]);
    assert_eq!(read(0, usize::MAX, None).await, all);

    let of_b: Vec<i64> = offsets
        .iter()
        .filter(|(d, _)| *d == "b")
        .map(|(_, o)| *o)
        .collect();
    assert_eq!(read(0, 1000, Some("b")).await, of_b);
    assert_eq!(read(of_b[3], 2, Some("b")).await, of_b[3..5]);
    // Device ids are case-sensitive, as in IoT Hub.
    assert_eq!(read(0, 1000, Some("B")).await, Vec::<i64>::new());
    assert_eq!(read(0, 1000, Some("nobody")).await, Vec::<i64>::new());
    // Hostile device ids are bound, not interpolated.
    assert_eq!(read(0, 1000, Some("b' OR '1'='1")).await, Vec::<i64>::new());

    let m = &telemetry.read(all[4], 1, None).await.unwrap()[0];
    assert_eq!((m.device_id.as_str(), m.offset), ("b", all[4]));
    telemetry.shutdown();
}

async fn properties_and_bodies_round_trip(url: String) {
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let every_byte: Vec<u8> = (0..=255).collect();
    let sent = NewMessage {
        device_id: "Dev-1".to_owned(),
        module_id: Some("mod/1".to_owned()),
        body: every_byte.clone(),
        system: BTreeMap::from([
            ("message-id".to_owned(), "mid-1".to_owned()),
            ("correlation-id".to_owned(), "cid-1".to_owned()),
            ("content-type".to_owned(), "application/json".to_owned()),
            ("content-encoding".to_owned(), "utf-8".to_owned()),
            ("iothub-connection-device-id".to_owned(), "Dev-1".to_owned()),
            (
                "iothub-connection-auth-method".to_owned(),
                r#"{"scope":"device","type":"sas","issuer":"iothub"}"#.to_owned(),
            ),
        ]),
        // Arrival order is not sorted order; a repeated name; no value vs empty value; JSON-
        // and SQL-looking text; NUL and non-ASCII.
        properties: vec![
            ("zeta".to_owned(), Some("last?".to_owned())),
            ("alert level".to_owned(), Some("high/1".to_owned())),
            ("flag".to_owned(), None),
            ("empty".to_owned(), Some(String::new())),
            ("zeta".to_owned(), Some("again".to_owned())),
            (
                "quote".to_owned(),
                Some(r#"a"b\c'); DROP TABLE telemetry;--"#.to_owned()),
            ),
            ("nul".to_owned(), Some("a\0b".to_owned())),
            ("ünï".to_owned(), Some("温度 🌡".to_owned())),
        ],
    };
    let before = time::OffsetDateTime::now_utc() - Duration::from_secs(1);
    let offset = telemetry.append(sent.clone()).await.unwrap();
    let empty = NewMessage {
        device_id: "Dev-1".to_owned(),
        ..NewMessage::default()
    };
    let empty_offset = telemetry.append(empty).await.unwrap();

    let got = telemetry.read(offset, 10, None).await.unwrap();
    assert_eq!(got.len(), 2);
    let m = &got[0];
    assert_eq!(m.offset, offset);
    assert_eq!(m.device_id, "Dev-1");
    assert_eq!(m.module_id.as_deref(), Some("mod/1"));
    assert_eq!(m.system_properties, sent.system);
    assert_eq!(m.properties_in_order, sent.properties);
    assert_eq!(m.size, sent.size());
    use base64::Engine as _;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&m.body)
            .unwrap(),
        every_byte
    );
    assert_eq!(m.properties["flag"], Value::Null);
    assert_eq!(m.properties["empty"], json!(""));
    assert_eq!(
        m.properties["zeta"],
        json!("again"),
        "the last of repeated names"
    );
    assert_eq!(m.properties["nul"], json!("a\0b"));
    assert_eq!(m.properties["ünï"], json!("温度 🌡"));
    assert_eq!(m.properties.len(), 7);

    let enqueued = time::OffsetDateTime::parse(
        &m.enqueued_time_utc,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(enqueued > before && enqueued < before + Duration::from_secs(60));
    assert_eq!(
        m.enqueued_time_utc.len(),
        "2022-08-31T22:02:50.5163352Z".len()
    );

    let e = &got[1];
    assert_eq!(e.offset, empty_offset);
    assert_eq!((e.body.as_str(), e.size), ("", 0));
    assert!(e.system_properties.is_empty() && e.properties.is_empty());
    assert_eq!(e.module_id, None);
    telemetry.shutdown();
}

async fn stored_message_json_shape(url: String) {
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let offset = telemetry
        .append(NewMessage {
            device_id: "d".to_owned(),
            module_id: None,
            body: b"hi".to_vec(),
            system: BTreeMap::from([("message-id".to_owned(), "m".to_owned())]),
            properties: vec![
                ("k".to_owned(), None),
                ("a".to_owned(), Some("v".to_owned())),
            ],
        })
        .await
        .unwrap();
    let m = telemetry.read(offset, 1, None).await.unwrap().remove(0);
    assert_eq!(
        serde_json::to_value(&m).unwrap(),
        json!({
            "offset": offset,
            "enqueuedTimeUtc": m.enqueued_time_utc,
            "deviceId": "d",
            "moduleId": null,
            "systemProperties": {"message-id": "m"},
            "properties": {"k": null, "a": "v"},
            "body": "aGk=",
        })
    );
    telemetry.shutdown();
}

async fn concurrent_appends_are_group_committed(url: String) {
    const TASKS: usize = 200;
    const EACH: usize = 10;
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let telemetry = telemetry.clone();
            tokio::spawn(async move {
                let mut offsets = Vec::new();
                for i in 0..EACH {
                    let device = format!("dev-{}", t % 7);
                    let sent = message(&device, t * EACH + i);
                    let offset = telemetry.append(sent.clone()).await.unwrap();
                    offsets.push((offset, sent));
                }
                offsets
            })
        })
        .collect();
    let mut sent = BTreeMap::new();
    for task in tasks {
        for (offset, message) in task.await.unwrap() {
            assert!(
                sent.insert(offset, message).is_none(),
                "offset {offset} twice"
            );
        }
    }
    assert_eq!(sent.len(), TASKS * EACH);

    let stored = read_all(&telemetry).await;
    assert_eq!(stored.len(), TASKS * EACH);
    for m in &stored {
        let original = &sent[&m.offset];
        assert_eq!(m.device_id, original.device_id);
        assert_eq!(m.system_properties, original.system);
        assert_eq!(m.properties_in_order, original.properties);
    }
    let stats = telemetry.stats();
    eprintln!(
        "group commit: {} messages in {} transactions",
        stats.messages, stats.batches
    );
    assert_eq!(stats.messages, 2000);
    assert!(
        stats.batches < stats.messages / 4,
        "{} transactions for {} messages",
        stats.batches,
        stats.messages
    );
    telemetry.shutdown();
}

/// As the MQTT workers call it: each thread runs an event loop of its own (a current-thread
/// runtime) with many callers waiting at once, so a batch holds several callers of each loop
/// and their answers go out through one task spawned there.
async fn callers_on_several_event_loops_get_their_own_offsets(url: String) {
    const LOOPS: usize = 3;
    const TASKS: usize = 100;
    const EACH: usize = 5;
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let loops: Vec<_> = (0..LOOPS)
        .map(|l| {
            let telemetry = telemetry.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let tasks: Vec<_> = (0..TASKS)
                        .map(|t| {
                            let telemetry = telemetry.clone();
                            tokio::spawn(async move {
                                let mut offsets = Vec::new();
                                for i in 0..EACH {
                                    let n = (l * TASKS + t) * EACH + i;
                                    let sent = message(&format!("loop-{l}-{t}"), n);
                                    let offset = telemetry.append(sent.clone()).await.unwrap();
                                    offsets.push((offset, sent));
                                }
                                offsets
                            })
                        })
                        .collect();
                    let mut all = Vec::new();
                    for task in tasks {
                        let answered = tokio::time::timeout(Duration::from_secs(60), task).await;
                        all.extend(answered.expect("an append was never answered").unwrap());
                    }
                    all
                })
            })
        })
        .collect();
    let mut sent = BTreeMap::new();
    for handle in loops {
        for (offset, message) in handle.join().unwrap() {
            assert!(
                sent.insert(offset, message).is_none(),
                "offset {offset} twice"
            );
        }
    }
    assert_eq!(sent.len(), LOOPS * TASKS * EACH);
    let stored = read_all(&telemetry).await;
    assert_eq!(stored.len(), sent.len());
    for m in &stored {
        let original = &sent[&m.offset];
        assert_eq!(m.device_id, original.device_id);
        assert_eq!(m.properties_in_order, original.properties);
    }
    // Each device's messages are stored in the order it sent them.
    let mut last: HashMap<&str, i64> = HashMap::new();
    for m in &stored {
        let n: i64 = sent[&m.offset].properties[0]
            .1
            .as_deref()
            .unwrap()
            .parse()
            .unwrap();
        if let Some(previous) = last.insert(m.device_id.as_str(), n) {
            assert!(
                previous < n,
                "{}: {previous} stored before {n}",
                m.device_id
            );
        }
    }
    let stats = telemetry.stats();
    assert!(
        stats.batches < stats.messages / 4,
        "{} transactions for {} messages",
        stats.batches,
        stats.messages
    );
    telemetry.shutdown();
}

async fn wait_for_wakes_on_append_and_times_out(url: String) {
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let first = telemetry.append(message("d", 0)).await.unwrap();
    // Already committed: at once.
    assert!(telemetry.wait_for(first, Duration::ZERO).await);
    // Nothing new: times out.
    let started = Instant::now();
    assert!(
        !telemetry
            .wait_for(first + 1, Duration::from_millis(200))
            .await
    );
    assert!(started.elapsed() >= Duration::from_millis(200));

    let waiter = {
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let woke = telemetry.wait_for(first + 1, Duration::from_secs(30)).await;
            (woke, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished());
    let second = telemetry.append(message("d", 1)).await.unwrap();
    assert!(second > first);
    let (woke, waited) = waiter.await.unwrap();
    assert!(woke);
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    telemetry.shutdown();
    // After shutdown: answers from what was committed.
    assert!(telemetry.wait_for(second, Duration::from_secs(5)).await);
    assert!(!telemetry.wait_for(second + 1, Duration::from_secs(5)).await);
}

async fn retention_by_age(url: String) {
    // The young messages must stay younger than `max_age` until the check, however slowly a
    // busy machine appends them: a wide margin (300 ms once proved too little on 2 cores).
    let retention = Retention {
        max_age: Duration::from_secs(3),
        ..Retention::default()
    };
    let telemetry = Telemetry::start(&url, retention).unwrap();
    for n in 0..5 {
        telemetry.append(message("old", n)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let mut young = Vec::new();
    for n in 0..3 {
        young.push(telemetry.append(message("young", n)).await.unwrap());
    }
    assert_eq!(telemetry.enforce_retention().unwrap(), 5);
    let left: Vec<i64> = read_all(&telemetry)
        .await
        .iter()
        .map(|m| m.offset)
        .collect();
    assert_eq!(left, young);
    assert_eq!(telemetry.enforce_retention().unwrap(), 0);
    assert_eq!(telemetry.stats().deleted, 5);
    telemetry.shutdown();
}

async fn retention_by_size(url: String) {
    let body = vec![7u8; 1000];
    let sized = |n: usize| NewMessage {
        device_id: "d".to_owned(),
        body: body.clone(),
        // 1000 + 1 + 2 = 1003 bytes each.
        properties: vec![("n".to_owned(), Some(format!("{n:02}")))],
        ..NewMessage::default()
    };
    assert_eq!(sized(0).size(), 1003);
    let retention = Retention {
        max_bytes: 5 * 1003 + 500,
        ..Retention::default()
    };
    let telemetry = Telemetry::start(&url, retention).unwrap();
    let mut offsets = Vec::new();
    for n in 0..12 {
        offsets.push(telemetry.append(sized(n)).await.unwrap());
    }
    // The oldest go until what is left fits: 5 of 12 messages.
    assert_eq!(telemetry.enforce_retention().unwrap(), 7);
    let left: Vec<i64> = read_all(&telemetry)
        .await
        .iter()
        .map(|m| m.offset)
        .collect();
    assert_eq!(left, offsets[7..]);
    assert_eq!(telemetry.enforce_retention().unwrap(), 0);
    telemetry.shutdown();

    // More than one delete chunk, and a limit of zero.
    let telemetry = Telemetry::start(
        &url,
        Retention {
            max_bytes: 0,
            ..Retention::default()
        },
    )
    .unwrap();
    let appends: Vec<_> = (0..2500)
        .map(|n| {
            let telemetry = telemetry.clone();
            tokio::spawn(async move { telemetry.append(message("d", n)).await.unwrap() })
        })
        .collect();
    for append in appends {
        append.await.unwrap();
    }
    assert_eq!(telemetry.enforce_retention().unwrap(), 2505);
    assert!(read_all(&telemetry).await.is_empty());
    telemetry.shutdown();
}

async fn the_writer_enforces_retention_by_itself(url: String) {
    let retention = Retention {
        max_age: Duration::ZERO,
        check_every: Duration::from_millis(50),
        ..Retention::default()
    };
    let telemetry = Telemetry::start(&url, retention).unwrap();
    let offset = telemetry.append(message("d", 0)).await.unwrap();
    assert!(offset > 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while telemetry.stats().deleted == 0 {
        assert!(Instant::now() < deadline, "retention never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(telemetry.read(0, 10, None).await.unwrap().is_empty());
    telemetry.shutdown();
}

async fn shutdown_flushes_what_is_queued(url: String) {
    const QUEUED: usize = 3000;
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    // Queue directly, so that every message is known to be queued before the shutdown.
    let mut answers = Vec::new();
    for n in 0..QUEUED {
        let sent = message("d", n);
        let (reply, answer) = oneshot::channel();
        let request = Request {
            bytes: sent.size(),
            row: encode(sent).unwrap(),
            reply,
            waiter: None,
            _room: None,
        };
        telemetry.table().queue.send(request).await.unwrap();
        answers.push(answer);
    }
    let stopping = telemetry.clone();
    tokio::task::spawn_blocking(move || stopping.shutdown())
        .await
        .unwrap();
    let mut offsets = HashSet::new();
    for answer in answers {
        // Answered by the time shutdown returns.
        let mut answer = answer;
        let offset = answer.try_recv().unwrap().unwrap();
        assert!(offsets.insert(offset));
    }
    assert_eq!(telemetry.stats().messages, QUEUED as u64);
    assert_eq!(
        telemetry.append(message("d", 0)).await,
        Err(StoreError::Unavailable(
            "the telemetry store is shut down".to_owned()
        ))
    );
    // Idempotent.
    telemetry.shutdown();

    let reopened = Telemetry::start(&url, keep_all()).unwrap();
    let stored: HashSet<i64> = read_all(&reopened).await.iter().map(|m| m.offset).collect();
    assert_eq!(stored, offsets);
    reopened.shutdown();
}

async fn dropping_every_handle_flushes_too(url: String) {
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let tasks: Vec<_> = (0..100)
        .map(|n| {
            let telemetry = telemetry.clone();
            tokio::spawn(async move { telemetry.append(message("d", n)).await })
        })
        .collect();
    drop(telemetry);
    let mut acked = HashSet::new();
    for task in tasks {
        acked.insert(task.await.unwrap().unwrap());
    }
    let reopened = Telemetry::start(&url, keep_all()).unwrap();
    let stored: HashSet<i64> = read_all(&reopened).await.iter().map(|m| m.offset).collect();
    assert_eq!(stored, acked);
    reopened.shutdown();
}

async fn offsets_keep_increasing_across_restarts(url: String) {
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let mut last = 0;
    for n in 0..3 {
        last = telemetry.append(message("d", n)).await.unwrap();
    }
    telemetry.shutdown();

    // The database (and the document store) may be opened before or after.
    crate::db::open(&url).unwrap();
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    assert_eq!(telemetry.last_offset(), last);
    let next = telemetry.append(message("d", 3)).await.unwrap();
    assert!(next > last);
    telemetry.shutdown();

    // Even after everything was deleted, offsets are not reused.
    let telemetry = Telemetry::start(
        &url,
        Retention {
            max_bytes: 0,
            ..Retention::default()
        },
    )
    .unwrap();
    assert_eq!(telemetry.enforce_retention().unwrap(), 4);
    telemetry.shutdown();
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    assert!(telemetry.append(message("d", 4)).await.unwrap() > next);
    telemetry.shutdown();
}

async fn nul_in_ids_is_refused_without_failing_others(url: String) {
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let bad = NewMessage {
        device_id: "d\0".to_owned(),
        ..NewMessage::default()
    };
    let bad_module = NewMessage {
        device_id: "d".to_owned(),
        module_id: Some("m\0".to_owned()),
        ..NewMessage::default()
    };
    let tasks: Vec<_> = (0..50)
        .map(|n| {
            let telemetry = telemetry.clone();
            tokio::spawn(async move { telemetry.append(message("d", n)).await })
        })
        .collect();
    assert!(matches!(
        telemetry.append(bad).await,
        Err(StoreError::Backend(_))
    ));
    assert!(matches!(
        telemetry.append(bad_module).await,
        Err(StoreError::Backend(_))
    ));
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(telemetry.stats().failed_batches, 0);
    assert_eq!(read_all(&telemetry).await.len(), 50);
    telemetry.shutdown();
}

async fn large_messages_flow_through_the_byte_budget(url: String) {
    // 80 MiB in flight at once, more than QUEUE_MAX_BYTES: some appends wait for room.
    const COUNT: usize = 40;
    let body = vec![0xa5_u8; 2 * 1024 * 1024];
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let tasks: Vec<_> = (0..COUNT)
        .map(|n| {
            let telemetry = telemetry.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let sent = NewMessage {
                    body,
                    ..message("big", n)
                };
                telemetry.append(sent).await.unwrap()
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let stats = telemetry.stats();
    assert_eq!(stats.messages, COUNT as u64);
    // MAX_BATCH_BYTES stops a batch at 4 MiB: two of these per transaction at most.
    assert!(stats.batches >= (COUNT / 2) as u64, "{stats:?}");
    assert_eq!(
        telemetry.table().room.available_permits(),
        queue_max_bytes()
    );
    let stored = telemetry.read(0, 1, Some("big")).await.unwrap().remove(0);
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&stored.body)
        .unwrap();
    assert_eq!(decoded, body);
    telemetry.shutdown();
}

/// Runs `sql` on a connection of its own, as an operator (or a failure) would.
fn execute_elsewhere(url: &str, sql: &str) {
    use diesel::Connection as _;
    use diesel::connection::SimpleConnection as _;
    match url.strip_prefix("sqlite://") {
        Some(path) => diesel::sqlite::SqliteConnection::establish(path)
            .unwrap()
            .batch_execute(sql)
            .unwrap(),
        None => diesel::pg::PgConnection::establish(url)
            .unwrap()
            .batch_execute(sql)
            .unwrap(),
    }
}

async fn a_failed_batch_fails_every_caller_then_recovers(url: String) {
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let first = telemetry.append(message("d", 0)).await.unwrap();
    execute_elsewhere(&url, "ALTER TABLE telemetry RENAME TO telemetry_away");
    let tasks: Vec<_> = (0..200)
        .map(|n| {
            let telemetry = telemetry.clone();
            tokio::spawn(async move { telemetry.append(message("d", n)).await })
        })
        .collect();
    let mut errors = Vec::new();
    for task in tasks {
        errors.push(task.await.unwrap().unwrap_err());
    }
    assert!(
        errors.iter().all(|e| matches!(e, StoreError::Backend(_))),
        "{errors:?}"
    );
    let stats = telemetry.stats();
    assert_eq!(stats.messages, 1);
    assert!(stats.failed_batches >= 1);
    assert!(
        stats.failed_batches < 200,
        "failures are batched too: {}",
        stats.failed_batches
    );
    assert_eq!(telemetry.last_offset(), first);

    execute_elsewhere(&url, "ALTER TABLE telemetry_away RENAME TO telemetry");
    let next = telemetry.append(message("d", 1)).await.unwrap();
    assert!(next > first);
    let stored: Vec<i64> = read_all(&telemetry)
        .await
        .iter()
        .map(|m| m.offset)
        .collect();
    assert_eq!(
        stored,
        [first, next],
        "nothing of the failed batches was stored"
    );
    telemetry.shutdown();
}

/// Set to a database URL, [`durability_child_process`] appends until it is killed.
const CHILD_ENV: &str = "ZT_TELEMETRY_CHILD";
const CHILD_TEST: &str = "telemetry::tests::durability_child_process";

/// Not a test by itself: the body of the child process of `acknowledged_messages_survive_sigkill`.
/// Returns at once unless [`CHILD_ENV`] is set.
#[test]
fn durability_child_process() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return;
    };
    run(async move {
        let telemetry = Telemetry::start(&url, keep_all()).unwrap();
        let tasks: Vec<_> = (0..50)
            .map(|t| {
                let telemetry = telemetry.clone();
                tokio::spawn(async move {
                    // Bounded, in case the parent dies without killing us.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let mut n = 0;
                    while Instant::now() < deadline {
                        let offset = telemetry.append(message("child", t * 1_000_000 + n)).await;
                        let mut out = std::io::stdout().lock();
                        // Straight to the pipe, not through libtest's capture, and flushed
                        // before the next append: a printed offset is an acknowledged one.
                        writeln!(out, "acked {}", offset.unwrap()).unwrap();
                        out.flush().unwrap();
                        n += 1;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
}

async fn acknowledged_messages_survive_sigkill(url: String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(offset) = line.strip_prefix("acked ") {
                lines_tx
                    .send(offset.trim().parse::<i64>().unwrap())
                    .unwrap();
            }
        }
    });
    // Kill it mid-stream, once it has acknowledged a good number of messages.
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 2000 {
        assert!(
            Instant::now() < deadline,
            "child acknowledged only {}",
            acked.len()
        );
        if let Ok(offset) = lines.recv_timeout(Duration::from_millis(100)) {
            acked.push(offset);
        }
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    reader.join().unwrap();
    acked.extend(lines.try_iter());

    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let stored: HashSet<i64> = read_all(&telemetry)
        .await
        .iter()
        .map(|m| m.offset)
        .collect();
    let missing: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|o| !stored.contains(o))
        .collect();
    eprintln!(
        "durability: {} acknowledged, {} stored, {} missing",
        acked.len(),
        stored.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert!(stored.len() >= acked.len());
    // The reopened writer continues after the newest committed offset.
    let next = telemetry.append(message("d", 0)).await.unwrap();
    assert!(stored.iter().all(|o| *o < next));
    telemetry.shutdown();
}

/// Not an assertion: messages/s for 10k appends from 100 tasks, for the lead to quote.
async fn throughput(url: String) {
    const TASKS: usize = 100;
    const EACH: usize = 100;
    let telemetry = Telemetry::start(&url, keep_all()).unwrap();
    let backend = if url.starts_with("sqlite") {
        "sqlite"
    } else {
        "postgres"
    };
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let telemetry = telemetry.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    let mut sent = message(&format!("dev-{t}"), t * EACH + i);
                    sent.body = vec![b'x'; 200];
                    telemetry.append(sent).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let stats = telemetry.stats();
    eprintln!(
        "telemetry throughput ({backend}): {} appends from {TASKS} tasks in {:.2?} = {:.0} \
         messages/s, {} transactions (avg {:.1} messages each)",
        stats.messages,
        elapsed,
        stats.messages as f64 / elapsed.as_secs_f64(),
        stats.batches,
        stats.messages as f64 / stats.batches.max(1) as f64,
    );
    assert_eq!(stats.messages, (TASKS * EACH) as u64);
    telemetry.shutdown();
}

#[test]
fn sqlite_writer_commits_with_fsync() {
    let db = TestDatabase::sqlite().unwrap();
    let mut writer = Writer::open(&db.url).unwrap();
    assert_eq!(
        writer.sqlite_pragmas().unwrap(),
        Some((2, "wal".to_owned())),
        "synchronous = FULL in WAL mode"
    );
}

// A message's share of the byte budget is a u32 of semaphore permits, and the largest D2C
// message Azure accepts (256 KB) fits many times over.
const _: () = assert!(QUEUE_MAX_BYTES <= u32::MAX as u64);
const _: () = assert!(QUEUE_MAX_BYTES >= 100 * 256 * 1024);

#[test]
fn the_byte_budget_fits_a_semaphore() {
    assert!(queue_max_bytes() <= Semaphore::MAX_PERMITS);
}

#[test]
fn extreme_retention_settings_do_not_panic() {
    for every in [Duration::ZERO, Duration::MAX] {
        let retention = Retention {
            max_age: every,
            max_bytes: u64::MAX,
            check_every: every,
        };
        let next = next_check(&retention);
        assert!(next > Instant::now().into());
        let (cutoff, max_bytes) = retention_bounds(&retention).unwrap();
        assert_eq!(max_bytes, i64::MAX);
        assert!(cutoff <= now_micros().unwrap());
    }
}

#[test]
fn default_retention() {
    let r = Retention::default();
    assert_eq!(r.max_age, Duration::from_secs(604_800));
    assert_eq!(r.max_bytes, 1 << 30);
    assert_eq!(r.check_every, Duration::from_secs(60));
}

#[test]
fn size_counts_body_and_properties() {
    let m = NewMessage {
        device_id: "ignored".to_owned(),
        module_id: Some("ignored".to_owned()),
        body: vec![0; 10],
        system: BTreeMap::from([("ab".to_owned(), "cde".to_owned())]),
        properties: vec![
            ("f".to_owned(), None),
            ("gh".to_owned(), Some("i".to_owned())),
        ],
    };
    assert_eq!(m.size(), 10 + 5 + 1 + 3);
}

#[test]
fn bad_urls_fail_to_start() {
    for url in ["", "mysql://x/y", "sqlite://"] {
        assert!(matches!(
            Telemetry::start(url, Retention::default()),
            Err(StoreError::InvalidUrl(_))
        ));
    }
}
