//! One provisioning service and several hubs, each a separate `zerotouch` process on its own
//! loopback address (with an IP SAN in the certificate the provisioning service's CA issues it
//! at join): weighted hashed allocation, adding a hub, a hub killed with SIGKILL and restarted,
//! and the custom-allocation webhook.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key;
use zerotouch_tests::cluster::{Api, Node, address, address_block, register};

const DPS_API: &str = "2021-10-01";
const HUB_API: &str = "2021-04-12";

struct Cluster {
    dps: Node,
    api: Api,
    id_scope: String,
    block: [u8; 3],
}

impl Cluster {
    fn start(dps_config: &str) -> Cluster {
        let block = address_block();
        let dps = Node::start(
            &address(block, 1),
            "dps",
            &format!(
                "[dps]\nhub_heartbeat_seconds = 1\nhub_heartbeat_timeout_seconds = 3\n{dps_config}"
            ),
            &[],
        );
        let credentials = dps.credentials();
        let api = Api::new(
            credentials["dpsConnectionString"].as_str().expect("cs"),
            &dps.ca_bundle(),
        );
        let id_scope = credentials["idScope"].as_str().expect("scope").to_string();
        Cluster {
            dps,
            api,
            id_scope,
            block,
        }
    }

    /// Starts a hub at `.host` and joins it with a fresh token.
    fn join(&self, host: u8, weight: u32) -> Node {
        let token = self.dps.cli(&["hub", "join-token", "--ttl", "5m"]);
        Node::start(
            &address(self.block, host),
            "hub",
            &format!("[hub]\nallocation_weight = {weight}\n"),
            &["--dps-url", &self.dps.url(""), "--join-token", token.trim()],
        )
    }

    /// A symmetric-key enrollment group; returns its primary key.
    fn group(&self, id: &str, extra: Value) -> String {
        let key = symmetric_key::generate_key().expect("key");
        let mut body = json!({
            "enrollmentGroupId": id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {
                "primaryKey": key, "secondaryKey": symmetric_key::generate_key().expect("key")}},
        });
        merge(&mut body, extra);
        let (status, answer, _) = zerotouch_tests::send(
            self.api
                .request(Method::PUT, &format!("/enrollmentGroups/{id}"), DPS_API)
                .json(&body),
        );
        assert_eq!(status, 200, "{answer}");
        key
    }

    /// An individual symmetric-key enrollment; returns its primary key.
    fn individual(&self, id: &str, extra: Value) -> String {
        let key = symmetric_key::generate_key().expect("key");
        let mut body = json!({
            "registrationId": id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {
                "primaryKey": key, "secondaryKey": symmetric_key::generate_key().expect("key")}},
        });
        merge(&mut body, extra);
        let (status, answer, _) = zerotouch_tests::send(
            self.api
                .request(Method::PUT, &format!("/enrollments/{id}"), DPS_API)
                .json(&body),
        );
        assert_eq!(status, 200, "{answer}");
        key
    }

    /// Registers group members `ids` from `threads` threads; returns id → registration state.
    fn register_group(
        &self,
        group_key: &str,
        ids: &[String],
        threads: usize,
    ) -> HashMap<String, Value> {
        let client = zerotouch_tests::client_trusting(&self.dps.ca_bundle(), None);
        let dps = self.dps.url("");
        let next = Arc::new(Mutex::new(ids.to_vec()));
        let results = Arc::new(Mutex::new(HashMap::new()));
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let (client, dps, next, results) =
                    (client.clone(), dps.clone(), next.clone(), results.clone());
                let scope_id = self.id_scope.clone();
                scope.spawn(move || {
                    loop {
                        let Some(id) = next.lock().expect("lock").pop() else {
                            return;
                        };
                        let key = symmetric_key::derive_device_key(group_key, &id).expect("derive");
                        let state = register(&client, &dps, &scope_id, &id, &key, None);
                        results.lock().expect("lock").insert(id, state);
                    }
                });
            }
        });
        Arc::try_unwrap(results)
            .expect("threads done")
            .into_inner()
            .expect("lock")
    }

    fn hub_health(&self, name: &str) -> String {
        let (status, hub, _) = zerotouch_tests::send(self.api.request(
            Method::GET,
            &format!("/hubs/{name}"),
            DPS_API,
        ));
        assert_eq!(status, 200, "{hub}");
        hub["health"].as_str().unwrap_or_default().to_string()
    }
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(into), Value::Object(extra)) = (into.as_object_mut(), extra) {
        into.extend(extra);
    }
}

/// The service API of a joined hub (its certificate comes from the provisioning CA).
fn hub_api(hub: &Node, cluster: &Cluster) -> Api {
    let credentials = hub.credentials();
    Api::new(
        credentials["hubConnectionString"].as_str().expect("hub cs"),
        &cluster.dps.ca_bundle(),
    )
}

/// The warning lines of a node's log (for assertion messages).
fn warnings(node: &Node) -> String {
    node.log_text()
        .lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until a moved device is gone from its old hub: at once, or when the provisioning
/// service's retry of a failed removal gets through (every heartbeat interval, 1 s here).
fn wait_gone(api: &Api, id: &str, hub: &str, cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, answer, _) =
            zerotouch_tests::send(api.request(Method::GET, &format!("/devices/{id}"), HUB_API));
        if status == 404 {
            return;
        }
        assert_eq!(status, 200, "{answer}");
        assert!(
            Instant::now() < deadline,
            "{id} is still on its old hub {hub}; provisioning service warnings:\n{}",
            warnings(&cluster.dps)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn assigned_hub(state: &Value) -> String {
    assert_eq!(state["status"], "assigned", "{state}");
    state["assignedHub"]
        .as_str()
        .expect("assignedHub")
        .to_string()
}

#[test]
fn hashed_allocation_follows_weights_and_a_new_hub_takes_only_its_share() {
    let cluster = Cluster::start("");
    let hubs = [cluster.join(2, 1), cluster.join(3, 2), cluster.join(4, 3)];
    let weights = [1.0, 2.0, 3.0];
    let key = cluster.group("fleet", json!({}));
    let ids: Vec<String> = (0..3000).map(|i| format!("dev-{i:05}")).collect();

    let started = Instant::now();
    let first = cluster.register_group(&key, &ids, 24);
    println!(
        "3,000 registrations across 3 hubs in {:?}",
        started.elapsed()
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    for state in first.values() {
        *counts.entry(assigned_hub(state)).or_default() += 1;
    }
    for (hub, weight) in hubs.iter().zip(weights) {
        let share = counts.get(&hub.ip).copied().unwrap_or(0) as f64 / 3000.0;
        let expected = weight / 6.0;
        assert!(
            (share - expected).abs() <= 0.05,
            "hub {} got {share:.3} of the devices, its weight is {expected:.3}: {counts:?}",
            hub.ip
        );
    }

    // Every device exists on its hub; tag 100 of them there, to see the tags travel.
    let apis: HashMap<String, Api> = hubs
        .iter()
        .map(|h| (h.ip.clone(), hub_api(h, &cluster)))
        .collect();
    let tagged: Vec<&String> = ids.iter().take(100).collect();
    for id in &tagged {
        let hub = assigned_hub(&first[*id]);
        let (status, answer, _) = zerotouch_tests::send(
            apis[&hub]
                .request(Method::PATCH, &format!("/twins/{id}"), HUB_API)
                .json(&json!({"tags": {"mark": id}})),
        );
        assert_eq!(status, 200, "{answer}");
    }

    // A fourth hub (weight 1 of 7): re-registration moves about 1/7 of the devices, all to it.
    let fourth = cluster.join(5, 1);
    let started = Instant::now();
    let second = cluster.register_group(&key, &ids, 24);
    println!(
        "3,000 re-registrations across 4 hubs in {:?}",
        started.elapsed()
    );
    let moved: Vec<&String> = ids
        .iter()
        .filter(|id| assigned_hub(&first[*id]) != assigned_hub(&second[*id]))
        .collect();
    println!("{} of 3,000 devices moved to the new hub", moved.len());
    assert!(
        moved.len() <= 900,
        "{} devices moved (more than 30 %)",
        moved.len()
    );
    assert!(!moved.is_empty(), "the new hub got no device");
    for id in &moved {
        assert_eq!(
            assigned_hub(&second[*id]),
            fourth.ip,
            "{id} moved elsewhere"
        );
        assert_eq!(second[*id]["substatus"], "deviceDataMigrated");
    }
    for id in ids.iter().filter(|id| !moved.contains(id)) {
        assert_eq!(second[id]["substatus"], "deviceDataMigrated", "{id}");
    }
    // Moved devices are gone from their old hub, exist on the new one, with their tags.
    let new_api = hub_api(&fourth, &cluster);
    let mut tagged_moves = 0;
    for id in &moved {
        let old = assigned_hub(&first[*id]);
        wait_gone(&apis[&old], id, &old, &cluster);
        let (status, twin, _) =
            zerotouch_tests::send(new_api.request(Method::GET, &format!("/twins/{id}"), HUB_API));
        assert_eq!(status, 200, "{id} is not on the new hub: {twin}");
        if tagged.contains(id) {
            tagged_moves += 1;
            assert_eq!(
                twin["tags"]["mark"],
                json!(id),
                "{id}'s twin was not migrated"
            );
        }
    }
    assert!(tagged_moves > 0, "none of the 100 tagged devices moved");
}

#[test]
fn a_killed_hub_gets_no_devices_until_it_is_back() {
    let cluster = Cluster::start("");
    let first = cluster.join(2, 1);
    let mut second = cluster.join(3, 1);
    let key = cluster.group("fleet", json!({}));
    let batch = |from: usize, n: usize| -> Vec<String> {
        (from..from + n).map(|i| format!("dev-{i:04}")).collect()
    };
    let count_on = |states: &HashMap<String, Value>, hub: &Node| {
        states
            .values()
            .filter(|s| assigned_hub(s) == hub.ip)
            .count()
    };

    let before = cluster.register_group(&key, &batch(0, 40), 8);
    assert!(count_on(&before, &first) > 0 && count_on(&before, &second) > 0);

    second.kill();
    // Right away, before the heartbeat timeout: nothing fails, nothing goes to the dead hub.
    let during = cluster.register_group(&key, &batch(100, 60), 8);
    assert_eq!(count_on(&during, &first), 60, "{during:?}");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(cluster.hub_health(&second.ip), "unhealthy");
    let later = cluster.register_group(&key, &batch(200, 30), 8);
    assert_eq!(count_on(&later, &first), 30);
    // Half the dead hub's devices register again and move: their old identities cannot be
    // removed now, so the provisioning service keeps the removals pending.
    let on_second: Vec<String> = before
        .iter()
        .filter(|(_, s)| assigned_hub(s) == second.ip)
        .map(|(id, _)| id.clone())
        .collect();
    let (moving, staying) = on_second.split_at(on_second.len() / 2);
    assert!(!moving.is_empty(), "{on_second:?}");
    let moved = cluster.register_group(&key, moving, 4);
    assert_eq!(count_on(&moved, &first), moving.len(), "{moved:?}");
    let (status, view, _) = zerotouch_tests::send(cluster.api.request(
        Method::GET,
        &format!("/hubs/{}", second.ip),
        DPS_API,
    ));
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["pendingRemovalCount"], json!(moving.len()), "{view}");

    // Back (same data dir, no token needed): heartbeats make it healthy, devices come again.
    second.spawn();
    let deadline = Instant::now() + Duration::from_secs(15);
    while cluster.hub_health(&second.ip) != "healthy" {
        assert!(Instant::now() < deadline, "{}", second.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = cluster.register_group(&key, &batch(300, 60), 8);
    assert_eq!(after.len(), 60);
    assert!(
        count_on(&after, &second) > 0,
        "the restarted hub gets no device"
    );
    // Its devices survived the kill; those that moved meanwhile are removed from it now.
    let api = hub_api(&second, &cluster);
    for id in staying {
        let (status, _, _) =
            zerotouch_tests::send(api.request(Method::GET, &format!("/devices/{id}"), HUB_API));
        assert_eq!(status, 200, "{id} was lost");
    }
    for id in moving {
        wait_gone(&api, id, &second.ip, &cluster);
    }
    let (_, view, _) = zerotouch_tests::send(cluster.api.request(
        Method::GET,
        &format!("/hubs/{}", second.ip),
        DPS_API,
    ));
    assert_eq!(view["pendingRemovalCount"], 0, "{view}");
}

/// A webhook on its own address: answers by path, records what it was sent.
struct Webhook {
    url: String,
    seen: Arc<Mutex<Vec<Value>>>,
}

type Answer = dyn Fn(&str) -> (u16, Value, Duration) + Send + Sync;

fn serve_one(mut stream: std::net::TcpStream, record: &Mutex<Vec<Value>>, answer: &Answer) {
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(clone);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    record
        .lock()
        .expect("lock")
        .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
    let (status, reply, delay) = answer(&path);
    std::thread::sleep(delay);
    let text = reply.to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    );
}

impl Webhook {
    fn start(
        ip: &str,
        answer: impl Fn(&str) -> (u16, Value, Duration) + Send + Sync + 'static,
    ) -> Webhook {
        let listener = TcpListener::bind((ip, 0)).expect("bind webhook");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let answer = Arc::new(answer);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (record, answer) = (record.clone(), answer.clone());
                // One thread per request: a slow answer must not hold up the next one.
                std::thread::spawn(move || serve_one(stream, &record, answer.as_ref()));
            }
        });
        Webhook { url, seen }
    }
}

#[test]
fn custom_allocation_webhook_picks_the_hub_and_fails_clearly() {
    let cluster = Cluster::start("webhook_allow_http = true\nwebhook_timeout_ms = 1000\n");
    let first = cluster.join(2, 1);
    let second = cluster.join(3, 1);
    let chosen = second.ip.clone();
    let webhook = Webhook::start(&address(cluster.block, 9), move |path| match path {
        "/pick" => (
            200,
            json!({"iotHubHostName": chosen, "payload": {"welcome": "aboard"},
                   "initialTwin": {"tags": {"pickedBy": "webhook"},
                                   "properties": {"desired": {"interval": 5}}}}),
            Duration::ZERO,
        ),
        "/fail" => (500, json!({"error": "boom"}), Duration::ZERO),
        "/slow" => (200, json!({}), Duration::from_secs(3)),
        _ => (
            200,
            json!({"iotHubHostName": "elsewhere.example"}),
            Duration::ZERO,
        ),
    });
    let client = zerotouch_tests::client_trusting(&cluster.dps.ca_bundle(), None);
    let dps = cluster.dps.url("");
    let custom = |path: &str| {
        json!({"allocationPolicy": "custom", "customAllocationDefinition": {
            "webhookUrl": format!("{}{path}", webhook.url), "apiVersion": "2021-10-01"}})
    };

    let key = cluster.individual("picked", custom("/pick"));
    let state = register(
        &client,
        &dps,
        &cluster.id_scope,
        "picked",
        &key,
        Some(&json!({"payload": {"model": "m1"}})),
    );
    assert_eq!(assigned_hub(&state), second.ip);
    assert_eq!(state["payload"], json!({"welcome": "aboard"}));
    let (status, twin, _) = zerotouch_tests::send(hub_api(&second, &cluster).request(
        Method::GET,
        "/twins/picked",
        HUB_API,
    ));
    assert_eq!(status, 200, "{twin}");
    assert_eq!(twin["tags"]["pickedBy"], "webhook");
    assert_eq!(twin["properties"]["desired"]["interval"], 5);
    let request = webhook.seen.lock().expect("lock")[0].clone();
    assert_eq!(request["deviceRuntimeContext"]["registrationId"], "picked");
    assert_eq!(
        request["deviceRuntimeContext"]["payload"],
        json!({"model": "m1"})
    );
    let mut linked: Vec<String> =
        serde_json::from_value(request["linkedHubs"].clone()).expect("hubs");
    linked.sort();
    let mut expected = vec![first.ip.clone(), second.ip.clone()];
    expected.sort();
    assert_eq!(linked, expected);
    assert!(
        !request.to_string().contains(&key),
        "the webhook was sent the device's key"
    );

    for (id, path, code) in [
        ("failing", "/fail", 400_212),
        ("slow", "/slow", 400_211),
        ("foreign", "/foreign", 400_214),
    ] {
        let key = cluster.individual(id, custom(path));
        let state = register(&client, &dps, &cluster.id_scope, id, &key, None);
        assert_eq!(state["status"], "failed", "{id}: {state}");
        assert_eq!(state["errorCode"], code, "{id}: {state}");
    }
}

#[test]
fn join_tokens_are_single_use_and_hubs_can_be_drained_and_removed() {
    let cluster = Cluster::start("");
    let hub = cluster.join(2, 1);
    let token = cluster.dps.cli(&["hub", "join-token", "--ttl", "5m"]);
    let token = token.trim();
    let join = |token: &str| {
        let client = zerotouch_tests::client_trusting(&cluster.dps.ca_bundle(), None);
        zerotouch_tests::send(
            client
                .post(cluster.dps.url("/hubs/join"))
                .bearer_auth(token)
                .json(
                    &json!({"hostName": "127.9.9.9", "serviceUrl": "https://127.9.9.9:18443",
                    "credential": {"keyName": "provisioningservice",
                                   "key": symmetric_key::generate_key().expect("key")}}),
                ),
        )
    };
    let (status, _, _) = join(token);
    assert_eq!(status, 200);
    let (status, answer, _) = join(token);
    assert_eq!((status, answer["errorCode"].clone()), (401, json!(401_004)));
    // A management token is not a join token.
    let (status, _, _) = join("not-a-token");
    assert_eq!(status, 401);

    // Remove the fake hub; then a drained hub keeps its devices but gets no new ones.
    let key = cluster.group("fleet", json!({}));
    let client = zerotouch_tests::client_trusting(&cluster.dps.ca_bundle(), None);
    let (status, _, _) = zerotouch_tests::send(cluster.api.request(
        Method::DELETE,
        "/hubs/127.9.9.9",
        DPS_API,
    ));
    assert_eq!(status, 204);
    let drained = cluster.dps.cli(&["hub", "drain", &hub.ip]);
    assert!(drained.contains("draining"), "{drained}");
    let device_key = symmetric_key::derive_device_key(&key, "d1").expect("derive");
    let state = register(
        &client,
        &cluster.dps.url(""),
        &cluster.id_scope,
        "d1",
        &device_key,
        None,
    );
    assert_eq!(state["status"], "failed");
    assert_eq!(state["errorCode"], 400_208);
    cluster.dps.cli(&["hub", "activate", &hub.ip]);
    let state = register(
        &client,
        &cluster.dps.url(""),
        &cluster.id_scope,
        "d1",
        &device_key,
        None,
    );
    assert_eq!(assigned_hub(&state), hub.ip);

    let listed: Value = serde_json::from_str(&cluster.dps.cli(&["hub", "list"])).expect("json");
    assert_eq!(
        listed["value"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    cluster.dps.cli(&["hub", "remove", &hub.ip]);
    let (status, answer, _) = zerotouch_tests::send(cluster.api.request(
        Method::GET,
        &format!("/hubs/{}", hub.ip),
        DPS_API,
    ));
    assert_eq!((status, answer["errorCode"].clone()), (404, json!(404_206)));
}

#[test]
fn a_revocation_on_the_provisioning_side_reaches_joined_hubs() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let cluster = Cluster::start("");
    let hub = cluster.join(2, 1);
    let key = cluster.individual("cert-dev", json!({}));
    let (csr, device_key) = zerotouch_tests::pki::csr("cert-dev");
    let client = zerotouch_tests::client_trusting(&cluster.dps.ca_bundle(), None);
    let state = register(
        &client,
        &cluster.dps.url(""),
        &cluster.id_scope,
        "cert-dev",
        &key,
        Some(&json!({"csr": b64.encode(&csr)})),
    );
    assert_eq!(assigned_hub(&state), hub.ip);
    let chain: Vec<String> = state["issuedCertificateChain"]
        .as_array()
        .expect("issued chain")
        .iter()
        .map(|c| {
            zerotouch_tests::pki::pem_of_der(&b64.decode(c.as_str().expect("b64")).expect("der"))
        })
        .collect();
    let identity = format!("{}{}", chain[0], chain[1]);
    let device = zerotouch_tests::client_trusting(
        &cluster.dps.ca_bundle(),
        Some((&identity, &device_key.serialize_pem())),
    );
    let telemetry = || {
        zerotouch_tests::send(
            device
                .post(hub.url("/devices/cert-dev/messages/events"))
                .body("hello"),
        )
        .0
    };
    assert_eq!(telemetry(), 204, "{}", hub.log_text());

    let serial = state["issuedCertificate"]["serialNumber"]
        .as_str()
        .expect("serial")
        .to_string();
    let (status, answer, _) = zerotouch_tests::send(
        cluster
            .api
            .request(
                Method::POST,
                &format!("/certificates/issued/{serial}/revoke"),
                DPS_API,
            )
            .json(&json!({"reason": "keyCompromise"})),
    );
    assert_eq!(status, 200, "{answer}");
    // The hub learns it from the CRL with its next heartbeat (every second here).
    let deadline = Instant::now() + Duration::from_secs(10);
    while telemetry() != 401 {
        assert!(
            Instant::now() < deadline,
            "the hub still accepts a revoked certificate: {}",
            hub.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
