//! The storage suite, run against both backends.
//!
//! Every test in `suite!` runs twice: in `db::tests::sqlite` on a file in a fresh temporary
//! directory, and in `db::tests::postgres` on a fresh database `zt_<random hex>`, created from
//! the database named by `ZEROTOUCH_TEST_PG_URL` (default [`DEFAULT_PG_URL`]) and dropped when
//! the test ends, passed or failed. An unreachable PostgreSQL fails the PostgreSQL tests
//! unless `ZEROTOUCH_TEST_SKIP_PG=1`.

use std::collections::HashSet;
use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use diesel::connection::SimpleConnection as _;
use diesel::pg::PgConnection;
use diesel::sqlite::SqliteConnection;
use diesel::{Connection as _, RunQueryDsl as _};
use serde_json::json;

use super::*;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const C: Collection = Collection::IndividualEnrollments;
const THREADS: usize = 8;

/// A database nobody has opened yet. Also used by the telemetry tests (re-exported as
/// `db::telemetry::TestDatabase`).
pub(crate) struct Empty {
    pub(crate) url: String,
    pub(crate) cleanup: Cleanup,
}

/// An opened database.
struct Fixture {
    // Declared before `_cleanup` so that the pool closes before the database goes.
    db: Database,
    url: String,
    _cleanup: Cleanup,
}

/// Held for its `Drop`: a [`tempfile::TempDir`] or a [`PgDatabase`].
pub(crate) type Cleanup = Box<dyn std::any::Any>;

/// Drops the PostgreSQL database, even when the test panicked.
struct PgDatabase {
    admin_url: String,
    name: String,
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let dropped = PgConnection::establish(&self.admin_url)
            .map_err(|e| e.to_string())
            .and_then(|mut admin| {
                diesel::sql_query(format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .execute(&mut admin)
                .map_err(|e| e.to_string())
            });
        if let Err(e) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

impl Empty {
    pub(crate) fn sqlite() -> Option<Empty> {
        let dir = tempfile::tempdir().unwrap();
        // A nested path: open() must create the directories.
        let url = format!("sqlite://{}/state/db/zerotouch.db", dir.path().display());
        Some(Empty {
            url,
            cleanup: Box::new(dir),
        })
    }

    pub(crate) fn postgres() -> Option<Empty> {
        if std::env::var("ZEROTOUCH_TEST_SKIP_PG").is_ok_and(|v| v == "1") {
            eprintln!("PostgreSQL test skipped: ZEROTOUCH_TEST_SKIP_PG=1");
            return None;
        }
        let admin_url =
            std::env::var("ZEROTOUCH_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
        let mut admin = PgConnection::establish(&admin_url).unwrap_or_else(|e| {
            panic!(
                "PostgreSQL for tests is unreachable ({e}). Start it, point ZEROTOUCH_TEST_PG_URL \
                 at it (default {DEFAULT_PG_URL}), or set ZEROTOUCH_TEST_SKIP_PG=1"
            )
        });
        let name = format!("zt_{:016x}", rand::random::<u64>());
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .unwrap();
        let guard = PgDatabase {
            admin_url: admin_url.clone(),
            name: name.clone(),
        };
        let mut url = url::Url::parse(&admin_url).unwrap();
        url.set_path(&name);
        Some(Empty {
            url: url.into(),
            cleanup: Box::new(guard),
        })
    }

    fn open(self) -> Fixture {
        let db = open(&self.url).unwrap();
        Fixture {
            db,
            url: self.url,
            _cleanup: self.cleanup,
        }
    }
}

impl Fixture {
    /// Through the trait object, as the service uses it.
    fn store(&self) -> &dyn DocumentStore {
        &self.db
    }
}

/// `opened` tests get a migrated [`Fixture`], `empty` ones an [`Empty`] database.
macro_rules! suite {
    (opened: [$($opened:ident),* $(,)?], empty: [$($empty:ident),* $(,)?] $(,)?) => {
        mod sqlite {
            $(#[test] fn $opened() { if let Some(e) = super::Empty::sqlite() { super::$opened(&e.open()) } })*
            $(#[test] fn $empty() { if let Some(e) = super::Empty::sqlite() { super::$empty(e) } })*
        }
        mod postgres {
            $(#[test] fn $opened() { if let Some(e) = super::Empty::postgres() { super::$opened(&e.open()) } })*
            $(#[test] fn $empty() { if let Some(e) = super::Empty::postgres() { super::$empty(e) } })*
        }
    };
}

suite! {
    opened: [
        create_and_get_ignore_id_case,
        create_conflicts_in_any_case,
        upsert_creates_then_overwrites,
        if_match_updates_only_the_current_version,
        if_match_on_missing_is_not_found,
        if_match_star_overwrites_any_version,
        delete_with_and_without_etag,
        paging_is_complete_and_stable,
        parent_filter_ignores_case,
        bad_continuation_is_rejected,
        page_size_is_clamped,
        every_collection_has_its_own_table,
        settings_init_keeps_the_first_value,
        concurrent_setting_init_agrees,
        concurrent_if_match_has_one_winner,
        concurrent_create_has_one_winner,
        reopening_is_idempotent,
        ping_answers,
        update_creates_changes_keeps_and_deletes,
        concurrent_updates_lose_nothing,
        update_gives_up_when_always_contended,
        update_from_a_stale_read_reads_again,
        update_each_applies_a_batch_in_order,
        batches_racing_single_updates_lose_nothing,
    ],
    empty: [concurrent_first_open_migrates_once],
}

fn put(store: &dyn DocumentStore, id: &str, body: serde_json::Value, write: Write) -> Document {
    store.put(C, id, None, &body, write).unwrap()
}

fn ids(page: &Page) -> Vec<String> {
    page.items.iter().map(|d| d.id.clone()).collect()
}

/// Runs `f(i)` on [`THREADS`] threads released together and returns the results in order.
fn race<T: Send>(f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let barrier = Barrier::new(THREADS);
    thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (barrier, f) = (&barrier, &f);
                scope.spawn(move || {
                    barrier.wait();
                    f(i)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn create_and_get_ignore_id_case(f: &Fixture) {
    let store = f.store();
    let before = time::OffsetDateTime::now_utc() - Duration::from_secs(1);
    let body = json!({"registrationId": "Device-One", "attestation": {"type": "symmetricKey"}});
    let created = store
        .put(C, "Device-One", None, &body, Write::Create)
        .unwrap();

    assert_eq!(created.id, "Device-One");
    assert_eq!(created.parent, None);
    assert_eq!(created.body, body);
    assert!(created.etag.len() > 2 && created.etag.starts_with('"') && created.etag.ends_with('"'));
    assert_eq!(created.created_at, created.updated_at);
    assert!(created.created_at > before);
    assert!(created.created_at < time::OffsetDateTime::now_utc() + Duration::from_secs(1));

    for id in ["Device-One", "device-one", "DEVICE-ONE"] {
        assert_eq!(store.get(C, id).unwrap(), Some(created.clone()), "{id}");
    }
    assert_eq!(store.get(C, "device-two").unwrap(), None);
}

fn create_conflicts_in_any_case(f: &Fixture) {
    let store = f.store();
    let first = put(store, "dev", json!({"v": 1}), Write::Create);
    for id in ["dev", "DEV", "Dev"] {
        assert_eq!(
            store.put(C, id, None, &json!({"v": 2}), Write::Create),
            Err(StoreError::Conflict)
        );
    }
    assert_eq!(store.get(C, "dev").unwrap(), Some(first));
}

fn upsert_creates_then_overwrites(f: &Fixture) {
    let store = f.store();
    let first = store
        .put(C, "Dev", Some("Group-1"), &json!({"v": 1}), Write::Upsert)
        .unwrap();
    assert_eq!(first.id, "Dev");
    assert_eq!(first.parent.as_deref(), Some("Group-1"));

    let second = store
        .put(C, "DEV", None, &json!({"v": 2}), Write::Upsert)
        .unwrap();
    assert_eq!(second.id, "Dev", "the first-written case stays");
    assert_eq!(second.parent, None);
    assert_eq!(second.body, json!({"v": 2}));
    assert_ne!(second.etag, first.etag);
    assert_eq!(second.created_at, first.created_at);
    assert!(second.updated_at >= first.updated_at);
    assert_eq!(store.get(C, "dev").unwrap(), Some(second));
}

fn if_match_updates_only_the_current_version(f: &Fixture) {
    let store = f.store();
    let v1 = put(store, "Dev", json!({"v": 1}), Write::Create);
    let v2 = put(
        store,
        "dev",
        json!({"v": 2}),
        Write::IfMatch(v1.etag.clone()),
    );
    assert_ne!(v2.etag, v1.etag);
    assert_eq!(v2.id, "Dev");
    assert_eq!(v2.body, json!({"v": 2}));
    assert_eq!(v2.created_at, v1.created_at);

    // The weak and unquoted spellings of the current etag match too.
    let v3 = put(
        store,
        "dev",
        json!({"v": 3}),
        Write::IfMatch(format!(" W/{} ", v2.etag)),
    );
    let bare = v3.etag.trim_matches('"').to_owned();
    let v4 = put(store, "dev", json!({"v": 4}), Write::IfMatch(bare));

    for stale in [&v1.etag, &v2.etag, &v3.etag, "\"\"", "", "garbage"] {
        assert_eq!(
            store.put(
                C,
                "dev",
                None,
                &json!({"v": 0}),
                Write::IfMatch(stale.to_owned())
            ),
            Err(StoreError::PreconditionFailed),
            "{stale:?}"
        );
    }
    assert_eq!(store.get(C, "dev").unwrap(), Some(v4));
}

fn if_match_on_missing_is_not_found(f: &Fixture) {
    let store = f.store();
    for tag in ["\"abc\"", "*"] {
        assert_eq!(
            store.put(C, "ghost", None, &json!({}), Write::IfMatch(tag.to_owned())),
            Err(StoreError::NotFound),
            "{tag}"
        );
    }
    assert_eq!(store.get(C, "ghost").unwrap(), None);
}

fn if_match_star_overwrites_any_version(f: &Fixture) {
    let store = f.store();
    let v1 = put(store, "dev", json!({"v": 1}), Write::Create);
    let v2 = put(
        store,
        "DEV",
        json!({"v": 2}),
        Write::IfMatch("*".to_owned()),
    );
    assert_ne!(v2.etag, v1.etag);
    assert_eq!(store.get(C, "dev").unwrap(), Some(v2));
}

fn delete_with_and_without_etag(f: &Fixture) {
    let store = f.store();
    let a = put(store, "A", json!({"a": 1}), Write::Create);
    let b = put(store, "B", json!({"b": 1}), Write::Create);
    let c = put(store, "C", json!({"c": 1}), Write::Create);

    assert_eq!(store.delete(C, "a", None), Ok(a));
    assert_eq!(store.get(C, "a").unwrap(), None);
    assert_eq!(store.delete(C, "a", None), Err(StoreError::NotFound));

    assert_eq!(
        store.delete(C, "b", Some("\"stale\"")),
        Err(StoreError::PreconditionFailed)
    );
    assert_eq!(store.get(C, "b").unwrap(), Some(b.clone()));
    let weak = format!("W/{}", b.etag);
    assert_eq!(store.delete(C, "b", Some(&weak)), Ok(b.clone()));
    assert_eq!(
        store.delete(C, "b", Some(&b.etag)),
        Err(StoreError::NotFound)
    );

    assert_eq!(store.delete(C, "c", Some("*")), Ok(c));
    assert_eq!(store.delete(C, "c", Some("*")), Err(StoreError::NotFound));
}

fn paging_is_complete_and_stable(f: &Fixture) {
    let store = f.store();
    // Written out of order and in mixed case; listed by lower-cased id.
    for i in 0..25 {
        let n = (i * 7) % 25;
        let id = if n % 2 == 0 {
            format!("dev-{n:02}")
        } else {
            format!("DEV-{n:02}")
        };
        put(store, &id, json!({"n": n}), Write::Create);
    }

    let walk = || {
        let mut pages = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = store.list(C, None, 10, token.as_deref()).unwrap();
            pages.push(ids(&page));
            match page.continuation {
                Some(next) => token = Some(next),
                None => break,
            }
            assert!(pages.len() < 10, "paging does not end");
        }
        pages
    };
    let pages = walk();
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![10, 10, 5]
    );
    let all: Vec<String> = pages.concat();
    let keys: Vec<String> = all.iter().map(|id| id.to_lowercase()).collect();
    let expected: Vec<String> = (0..25).map(|n| format!("dev-{n:02}")).collect();
    assert_eq!(keys, expected, "sorted by lower-cased id, no duplicates");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 25);
    assert_eq!(walk(), pages, "the same walk gives the same pages");
}

fn parent_filter_ignores_case(f: &Fixture) {
    let store = f.store();
    let r = Collection::Registrations;
    for i in 0..12 {
        let group = if i % 2 == 0 { "Group-A" } else { "group-a" };
        store
            .put(
                r,
                &format!("a-{i:02}"),
                Some(group),
                &json!({}),
                Write::Create,
            )
            .unwrap();
    }
    for i in 0..5 {
        store
            .put(
                r,
                &format!("b-{i:02}"),
                Some("GROUP-B"),
                &json!({}),
                Write::Create,
            )
            .unwrap();
    }
    for i in 0..3 {
        store
            .put(r, &format!("c-{i:02}"), None, &json!({}), Write::Create)
            .unwrap();
    }

    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.list(r, Some("GROUP-a"), 5, token.as_deref()).unwrap();
        pages += 1;
        assert!(
            page.items
                .iter()
                .all(|d| d.parent.as_deref().map(str::to_lowercase).as_deref() == Some("group-a"))
        );
        seen.extend(ids(&page));
        match page.continuation {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen,
        (0..12).map(|i| format!("a-{i:02}")).collect::<Vec<_>>()
    );

    let b = store.list(r, Some("group-b"), 100, None).unwrap();
    assert_eq!(
        ids(&b),
        (0..5).map(|i| format!("b-{i:02}")).collect::<Vec<_>>()
    );
    assert_eq!(b.continuation, None);
    let none = store.list(r, Some("group-z"), 10, None).unwrap();
    assert_eq!(
        none,
        Page {
            items: vec![],
            continuation: None
        }
    );
    assert_eq!(store.list(r, None, 1000, None).unwrap().items.len(), 20);
}

fn bad_continuation_is_rejected(f: &Fixture) {
    let store = f.store();
    put(store, "dev", json!({}), Write::Create);
    let huge = "x".repeat(100_000);
    for token in ["", "garbage!", "dGVzdA", "%%%", "\u{0}", huge.as_str()] {
        assert_eq!(
            store.list(C, None, 10, Some(token)),
            Err(StoreError::BadContinuation),
            "{token:.20?}"
        );
    }
}

fn page_size_is_clamped(f: &Fixture) {
    let store = f.store();
    for id in ["a", "b", "c"] {
        put(store, id, json!({}), Write::Create);
    }
    let one = store.list(C, None, 0, None).unwrap();
    assert_eq!(ids(&one), vec!["a"]);
    assert!(one.continuation.is_some());
    let all = store.list(C, None, usize::MAX, None).unwrap();
    assert_eq!(ids(&all), vec!["a", "b", "c"]);
    assert_eq!(all.continuation, None);
}

fn every_collection_has_its_own_table(f: &Fixture) {
    let store = f.store();
    for (n, c) in Collection::ALL.into_iter().enumerate() {
        let doc = store
            .put(c, "shared-id", Some("P"), &json!({"n": n}), Write::Create)
            .unwrap();
        if c.case_sensitive() {
            // IoT Hub ids: "SHARED-ID" is another device, and the parent matches exactly.
            assert_eq!(store.get(c, "SHARED-ID").unwrap(), None, "{c:?}");
            assert_eq!(
                store.get(c, "shared-id").unwrap(),
                Some(doc.clone()),
                "{c:?}"
            );
            assert!(
                store.list(c, Some("p"), 10, None).unwrap().items.is_empty(),
                "{c:?}"
            );
            assert_eq!(
                ids(&store.list(c, Some("P"), 10, None).unwrap()),
                vec!["shared-id"]
            );
            let other = store
                .put(c, "SHARED-ID", None, &json!({}), Write::Create)
                .unwrap();
            assert_ne!(other.etag, doc.etag, "{c:?}: a second, distinct entry");
            continue;
        }
        assert_eq!(
            store.get(c, "SHARED-ID").unwrap(),
            Some(doc.clone()),
            "{c:?}"
        );
        assert_eq!(
            ids(&store.list(c, Some("p"), 10, None).unwrap()),
            vec!["shared-id"]
        );
    }
    for c in Collection::ALL {
        assert!(store.delete(c, "shared-id", None).is_ok(), "{c:?}");
        if c.case_sensitive() {
            assert!(store.delete(c, "SHARED-ID", None).is_ok(), "{c:?}");
        }
        assert_eq!(store.list(c, None, 10, None).unwrap().items, vec![]);
    }
}

fn settings_init_keeps_the_first_value(f: &Fixture) {
    let store = f.store();
    assert_eq!(store.setting_get("id_scope").unwrap(), None);
    assert_eq!(
        store.setting_init("id_scope", "0ne0001").unwrap(),
        "0ne0001"
    );
    assert_eq!(
        store.setting_init("id_scope", "0ne0002").unwrap(),
        "0ne0001"
    );
    assert_eq!(
        store.setting_get("id_scope").unwrap().as_deref(),
        Some("0ne0001")
    );

    store.setting_set("id_scope", "0ne0003").unwrap();
    assert_eq!(
        store.setting_get("id_scope").unwrap().as_deref(),
        Some("0ne0003")
    );
    assert_eq!(
        store.setting_init("id_scope", "0ne0004").unwrap(),
        "0ne0003"
    );

    store.setting_set("other", "x").unwrap();
    assert_eq!(store.setting_get("other").unwrap().as_deref(), Some("x"));
    assert_eq!(
        store.setting_get("id_scope").unwrap().as_deref(),
        Some("0ne0003")
    );
}

fn concurrent_setting_init_agrees(f: &Fixture) {
    let store = f.store();
    let results = race(|i| store.setting_init("jwt_secret", &format!("secret-{i}")));
    let stored = store.setting_get("jwt_secret").unwrap().unwrap();
    for result in results {
        assert_eq!(result.as_ref(), Ok(&stored));
    }
}

fn concurrent_if_match_has_one_winner(f: &Fixture) {
    let store = f.store();
    let mut current = put(store, "contended", json!({"round": -1}), Write::Create);
    for round in 0..3 {
        let etag = current.etag.clone();
        let results = race(|i| {
            store.put(
                C,
                "contended",
                None,
                &json!({"round": round, "writer": i}),
                Write::IfMatch(etag.clone()),
            )
        });
        let winners: Vec<&Document> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for result in &results {
            if let Err(e) = result {
                assert_eq!(e, &StoreError::PreconditionFailed, "round {round}");
            }
        }
        current = winners[0].clone();
        assert_eq!(store.get(C, "contended").unwrap().as_ref(), Some(&current));
    }
}

fn concurrent_create_has_one_winner(f: &Fixture) {
    let store = f.store();
    let results = race(|i| {
        // Same id, different case per writer.
        let id = if i % 2 == 0 { "Racer" } else { "RACER" };
        store.put(C, id, None, &json!({"writer": i}), Write::Create)
    });
    let winners: Vec<&Document> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    assert_eq!(
        results
            .iter()
            .filter(|r| **r == Err(StoreError::Conflict))
            .count(),
        THREADS - 1
    );
    assert_eq!(store.get(C, "racer").unwrap().as_ref(), Some(winners[0]));
}

/// A counter in a document, as `update` sees it.
fn count_of(doc: Option<&Document>) -> i64 {
    doc.and_then(|d| d.body["count"].as_i64()).unwrap_or(0)
}

fn update_creates_changes_keeps_and_deletes(f: &Fixture) {
    let store = f.store();
    let created = store
        .update::<_, StoreError>(C, "Counter", |doc| {
            assert!(doc.is_none());
            Ok(Change::Put {
                body: json!({"count": 1}),
                parent: Some("Parent".into()),
                result: "created",
            })
        })
        .unwrap();
    assert_eq!(created.result, "created");
    let first = created.document.unwrap();
    assert_eq!(
        (first.id.as_str(), first.parent.as_deref()),
        ("Counter", Some("Parent"))
    );

    // In another case: ids stay case-insensitive, and the write is under the etag read.
    let changed = store
        .update::<_, StoreError>(C, "counter", |doc| {
            Ok(Change::put(
                json!({"count": count_of(doc) + 1}),
                count_of(doc),
            ))
        })
        .unwrap();
    assert_eq!(changed.result, 1);
    let second = changed.document.unwrap();
    assert_eq!(
        (second.body["count"].as_i64(), second.id.as_str()),
        (Some(2), "Counter")
    );
    assert_ne!(second.etag, first.etag);

    let kept = store
        .update::<_, StoreError>(C, "counter", |doc| Ok(Change::Keep(count_of(doc))))
        .unwrap();
    assert_eq!((kept.result, kept.document.as_ref()), (2, Some(&second)));

    // A domain error from the change comes back as it is, and nothing is written.
    #[derive(Debug, PartialEq)]
    enum Refused {
        Store(StoreError),
        TooBig,
    }
    impl From<StoreError> for Refused {
        fn from(e: StoreError) -> Self {
            Refused::Store(e)
        }
    }
    let refused = store.update::<(), Refused>(C, "counter", |_| Err(Refused::TooBig));
    assert_eq!(refused.unwrap_err(), Refused::TooBig);
    assert_eq!(store.get(C, "counter").unwrap().as_ref(), Some(&second));

    let deleted = store
        .update::<_, StoreError>(C, "counter", |doc| Ok(Change::Delete(doc.is_some())))
        .unwrap();
    assert!(deleted.result && deleted.document.is_none());
    assert_eq!(store.get(C, "counter").unwrap(), None);
    let nothing = store
        .update::<_, StoreError>(C, "counter", |doc| Ok(Change::Delete(doc.is_some())))
        .unwrap();
    assert!(!nothing.result);

    // The async door to the same store.
    let shared: std::sync::Arc<dyn DocumentStore> = std::sync::Arc::new(open(&f.url).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let read = runtime
        .block_on(blocking(&shared, |s| s.get(C, "counter")))
        .unwrap();
    assert_eq!(read, None);
}

fn concurrent_updates_lose_nothing(f: &Fixture) {
    let store = f.store();
    const ROUNDS: i64 = 10;
    race(|_| {
        for _ in 0..ROUNDS {
            store
                .update::<_, StoreError>(C, "shared-counter", |doc| {
                    Ok(Change::put(json!({"count": count_of(doc) + 1}), ()))
                })
                .unwrap();
        }
    });
    let doc = store.get(C, "shared-counter").unwrap();
    assert_eq!(count_of(doc.as_ref()), THREADS as i64 * ROUNDS);
}

fn update_gives_up_when_always_contended(f: &Fixture) {
    let store = f.store();
    put(store, "hot", json!({"count": 0}), Write::Create);
    let mut calls = 0;
    let outcome = store.update::<(), StoreError>(C, "hot", |doc| {
        calls += 1;
        // Another writer gets in between every read and write.
        let doc = doc.expect("present");
        store.put(
            C,
            "hot",
            None,
            &json!({"count": calls}),
            Write::IfMatch(doc.etag.clone()),
        )?;
        Ok(Change::put(json!({"count": -1}), ()))
    });
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "{outcome:?}"
    );
    assert_eq!(calls, UPDATE_ATTEMPTS);
    assert_ne!(count_of(store.get(C, "hot").unwrap().as_ref()), -1);
}

fn update_from_a_stale_read_reads_again(f: &Fixture) {
    let store = f.store();
    // Starting from what the caller read: no read of its own, the change sees that document.
    let created = store
        .update_from::<_, StoreError>(C, "known", Read::Was(None), |doc| {
            Ok(Change::put(
                json!({"count": count_of(doc) + 1}),
                count_of(doc),
            ))
        })
        .unwrap();
    assert_eq!(created.result, 0);
    let first = created.document.unwrap();
    let next = store
        .update_from::<_, StoreError>(C, "known", Read::Was(Some(first.clone())), |doc| {
            Ok(Change::put(
                json!({"count": count_of(doc) + 1}),
                count_of(doc),
            ))
        })
        .unwrap();
    assert_eq!(next.result, 1);

    // Stale: "missing" (a create conflicts) and an old etag (the write is refused). Either
    // way the next attempt reads the document as it is, and nothing is lost.
    let mut seen = Vec::new();
    let from_nothing = store
        .update_from::<_, StoreError>(C, "known", Read::Was(None), |doc| {
            seen.push(count_of(doc));
            Ok(Change::put(json!({"count": count_of(doc) + 1}), ()))
        })
        .unwrap();
    assert_eq!(seen, [0, 2]);
    assert_eq!(count_of(from_nothing.document.as_ref()), 3);
    seen.clear();
    store
        .update_from::<_, StoreError>(C, "known", Read::Was(Some(first)), |doc| {
            seen.push(count_of(doc));
            Ok(Change::put(json!({"count": count_of(doc) + 1}), ()))
        })
        .unwrap();
    assert_eq!(seen, [1, 3]);
    assert_eq!(count_of(store.get(C, "known").unwrap().as_ref()), 4);
}

fn update_each_applies_a_batch_in_order(f: &Fixture) {
    let store = f.store();
    let before = put(store, "a", json!({"count": 1}), Write::Create);
    // "A" is "a" in another case; "b" does not exist yet; "z" is left alone.
    let ids = ["z", "a", "b", "A", "b"];
    let mut seen = Vec::new();
    let outcomes = store
        .update_each(C, &ids, &mut |i, doc| {
            seen.push((i, count_of(doc)));
            (ids[i] != "z").then(|| json!({"count": count_of(doc) + 10}))
        })
        .unwrap();
    // By key, and in arrival order for one key: each change saw the batch's earlier writes.
    assert_eq!(seen, [(1, 1), (3, 11), (2, 0), (4, 10), (0, 0)]);
    let counts: Vec<Option<i64>> = outcomes
        .iter()
        .map(|o| o.as_ref().unwrap().as_ref().map(|d| count_of(Some(d))))
        .collect();
    assert_eq!(counts, [None, Some(11), Some(10), Some(21), Some(20)]);

    // What the outcomes say is what is stored, under the etags they give.
    let a = store.get(C, "a").unwrap().unwrap();
    let last_a = outcomes[3].as_ref().unwrap().as_ref().unwrap();
    assert_eq!(
        (&a.body, &a.etag, a.id.as_str()),
        (&last_a.body, &last_a.etag, "a")
    );
    assert_eq!(a.created_at, before.created_at);
    assert_ne!(a.etag, before.etag);
    let b = store.get(C, "b").unwrap().unwrap();
    assert_eq!(Some(&b), outcomes[4].as_ref().unwrap().as_ref());
    assert_eq!(store.get(C, "z").unwrap(), None);

    // All of them exist now (on PostgreSQL: the batch is read, locked and written at once).
    let outcomes = store
        .update_each(C, &["b", "A", "a", "b"], &mut |i, doc| {
            (i != 3).then(|| json!({"count": count_of(doc) + 100}))
        })
        .unwrap();
    let counts: Vec<Option<i64>> = outcomes
        .iter()
        .map(|o| o.as_ref().unwrap().as_ref().map(|d| count_of(Some(d))))
        .collect();
    assert_eq!(counts, [Some(120), Some(121), Some(221), Some(120)]);
    let a = store.get(C, "a").unwrap().unwrap();
    assert_eq!(Some(&a), outcomes[2].as_ref().unwrap().as_ref());
    let b = store.get(C, "b").unwrap().unwrap();
    assert_eq!(Some(&b), outcomes[0].as_ref().unwrap().as_ref());
    store.update_each(C, &["a"], &mut |_, _| None).unwrap();
    assert_eq!(store.get(C, "a").unwrap().unwrap(), a);
    put(store, "a", json!({"count": 21}), Write::Upsert);

    // A stored body that is not JSON fails its own entry only.
    let path = f.url.trim_start_matches("sqlite://").to_owned();
    let corrupt = "UPDATE individual_enrollments SET body = 'not json' WHERE id_key = 'b'";
    if f.url.starts_with("sqlite://") {
        SqliteConnection::establish(&path)
            .unwrap()
            .batch_execute(corrupt)
            .unwrap();
    } else {
        PgConnection::establish(&f.url)
            .unwrap()
            .batch_execute(corrupt)
            .unwrap();
    }
    let outcomes = store
        .update_each(C, &["b", "a"], &mut |_, doc| {
            Some(json!({"count": count_of(doc) + 1}))
        })
        .unwrap();
    assert!(
        matches!(outcomes[0], Err(StoreError::Backend(_))),
        "{outcomes:?}"
    );
    assert_eq!(count_of(store.get(C, "a").unwrap().as_ref()), 22);
}

/// One thread writes in batches without taking turns (as another process would), the others
/// read-modify-write one at a time: the etag condition makes every increment count.
fn batches_racing_single_updates_lose_nothing(f: &Fixture) {
    let store = f.store();
    const ROUNDS: i64 = 10;
    const BATCH: usize = 5;
    race(|thread| {
        for _ in 0..ROUNDS {
            if thread == 0 {
                let ids = ["shared"; BATCH];
                let outcomes = store
                    .update_batch(C, &ids, &mut |_, doc| {
                        Some(json!({"count": count_of(doc) + 1}))
                    })
                    .unwrap();
                assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
            } else {
                store
                    .update::<_, StoreError>(C, "shared", |doc| {
                        Ok(Change::put(json!({"count": count_of(doc) + 1}), ()))
                    })
                    .unwrap();
            }
        }
    });
    let doc = store.get(C, "shared").unwrap();
    let expected = ROUNDS * (BATCH as i64 + THREADS as i64 - 1);
    assert_eq!(count_of(doc.as_ref()), expected);
}

fn reopening_is_idempotent(f: &Fixture) {
    let doc = put(f.store(), "dev", json!({"kept": true}), Write::Create);
    f.store().setting_set("k", "v").unwrap();
    drop(open(&f.url).unwrap());
    let again = open(&f.url).unwrap();
    assert_eq!(again.get(C, "dev").unwrap(), Some(doc));
    assert_eq!(again.setting_get("k").unwrap().as_deref(), Some("v"));
}

fn ping_answers(f: &Fixture) {
    f.store().ping().unwrap();
}

fn concurrent_first_open_migrates_once(empty: Empty) {
    let url = empty.url.clone();
    let opened = race(|_| open(&url));
    for db in &opened {
        assert!(db.is_ok(), "{db:?}");
    }
    let fixture = empty.open();
    put(fixture.store(), "dev", json!({}), Write::Create);
    drop(opened);
}

#[test]
fn unknown_scheme_is_a_typed_error() {
    assert!(matches!(
        open("mysql://localhost/zt"),
        Err(StoreError::InvalidUrl(_))
    ));
    assert!(matches!(
        open("zerotouch.db"),
        Err(StoreError::InvalidUrl(_))
    ));
}

#[test]
fn unreachable_postgres_is_unavailable() {
    let options = Options {
        connection_timeout: Duration::from_secs(2),
        ..Options::default()
    };
    // Port 1 on loopback refuses connections at once.
    match open_with("postgres://postgres@127.0.0.1:1/zt", &options) {
        Err(StoreError::Unavailable(message)) => assert!(!message.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sqlite_uses_wal_and_reports_corrupt_rows_as_errors() {
    let empty = Empty::sqlite().unwrap();
    let fixture = empty.open();
    put(fixture.store(), "dev", json!({"ok": true}), Write::Create);

    let path = fixture.url.trim_start_matches("sqlite://").to_owned();
    let mut raw = SqliteConnection::establish(&path).unwrap();
    let mode: Vec<JournalMode> = diesel::sql_query("PRAGMA journal_mode")
        .load(&mut raw)
        .unwrap();
    assert_eq!(mode[0].journal_mode, "wal");
    raw.batch_execute("UPDATE individual_enrollments SET body = 'not json'")
        .unwrap();
    assert!(matches!(
        fixture.db.get(C, "dev"),
        Err(StoreError::Backend(_))
    ));
    assert!(matches!(
        fixture.db.list(C, None, 10, None),
        Err(StoreError::Backend(_))
    ));

    raw.batch_execute(
        "UPDATE individual_enrollments SET body = '{}', created_at = 9223372036854775807",
    )
    .unwrap();
    assert!(matches!(
        fixture.db.get(C, "dev"),
        Err(StoreError::Backend(_))
    ));
}

/// `.cargo/config.toml` builds SQLite with the query planner stability guarantee: without it
/// every statement with a `LIMIT ?` (each `.first()`) is parsed again on every execution.
#[test]
fn sqlite_is_built_with_stable_query_plans() {
    let empty = Empty::sqlite().unwrap();
    let fixture = empty.open();
    let path = fixture.url.trim_start_matches("sqlite://").to_owned();
    let mut raw = SqliteConnection::establish(&path).unwrap();
    let options: Vec<CompileOption> = diesel::sql_query("PRAGMA compile_options")
        .load(&mut raw)
        .unwrap();
    assert!(
        options.iter().any(|o| o.compile_options == "ENABLE_QPSG"),
        "SQLite was built without SQLITE_ENABLE_QPSG (LIBSQLITE3_FLAGS overridden?)"
    );
}

#[derive(diesel::QueryableByName)]
struct CompileOption {
    #[diesel(sql_type = diesel::sql_types::Text)]
    compile_options: String,
}

#[derive(diesel::QueryableByName)]
struct JournalMode {
    #[diesel(sql_type = diesel::sql_types::Text)]
    journal_mode: String,
}

/// A connection back from the pool within [`connection::TRUSTED_FOR`] is handed out without a
/// ping (no round trip per store call under load); one idle longer is pinged, so a connection
/// that died meanwhile is noticed at checkout, not by the caller's query.
#[test]
fn recently_returned_connections_skip_the_checkout_ping_and_idle_ones_are_tested() {
    use diesel::r2d2::ManageConnection as _;

    #[derive(diesel::QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let Some(empty) = Empty::postgres() else {
        return;
    };
    let manager = connection::Manager {
        target: connection::Target::parse(&empty.url, Duration::from_secs(5)).unwrap(),
    };
    let mut conn = manager.connect().unwrap();
    // A new connection is pinged.
    manager.is_valid(&mut conn).unwrap();
    let connection::AnyConnection::Postgresql(pg) = &mut *conn else {
        panic!("not PostgreSQL");
    };
    let pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(pg)
        .unwrap()
        .pid;
    assert!(!manager.has_broken(&mut conn), "returned healthy");

    let admin_url =
        std::env::var("ZEROTOUCH_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
    let mut admin = PgConnection::establish(&admin_url).unwrap();
    diesel::sql_query(format!("SELECT pg_terminate_backend({pid})"))
        .execute(&mut admin)
        .unwrap();

    // Just returned: trusted without a round trip, although the server has closed it.
    manager.is_valid(&mut conn).unwrap();
    thread::sleep(connection::TRUSTED_FOR + Duration::from_millis(100));
    // Idle past the window: the ping finds it dead, and r2d2 would open another.
    assert!(manager.is_valid(&mut conn).is_err());
}
