//! Replica mode (`[cluster]`): several `zerotouch` processes on one PostgreSQL database,
//! reaching each other through a private NATS server. A device connected to one replica is
//! reached through another: methods, C2D, desired patches, disconnect orders and takeover.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key;
use zerotouch_tests::cluster::{Api, HTTPS_PORT, Node, address, address_block};
use zerotouch_tests::mqtt::{self, Device, Login};
use zerotouch_tests::nats::NatsServer;
use zerotouch_tests::swtpm::Swtpm;
use zerotouch_tests::{TempPostgres, send};

const HUB_API: &str = "2021-04-12";
const DPS_API: &str = "2021-10-01";
/// The hub name the replicas share (`hub.hostname`); devices and services sign for it and
/// dial a replica's own address.
const HUB: &str = "hub.replicas.test";

/// The tests of this file run one at a time: each starts several servers and NATS, and the
/// one-second bounds (revocation, disable) are about the product, not about a machine
/// running eight clusters at once.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Replicas {
    nodes: Vec<Node>,
    hub_connection_string: String,
    dps_connection_string: String,
    id_scope: String,
    nats: Vec<NatsServer>,
    _turn: std::sync::MutexGuard<'static, ()>,
    _kek: tempfile::TempDir,
    // Dropped last: the replicas stop before their database goes.
    _pg: TempPostgres,
}

impl Replicas {
    fn start(count: u8) -> Replicas {
        Replicas::start_on(count, vec![NatsServer::start()], 1)
    }

    /// `count` replicas on the NATS servers `nats`, streams kept on `stream_replicas` of them.
    fn start_on(count: u8, nats: Vec<NatsServer>, stream_replicas: usize) -> Replicas {
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let urls: Vec<String> = nats.iter().map(NatsServer::url).collect();
        let pg = TempPostgres::create().expect("PostgreSQL is needed for the replica tests");
        let kek = tempfile::tempdir().expect("tempdir");
        let kek_file = kek.path().join("kek");
        let key: [u8; 32] = rand::random();
        std::fs::write(&kek_file, base64_of(&key)).expect("kek");
        let block = address_block();
        let nodes: Vec<Node> = (1..=count)
            .map(|i| {
                let config = format!(
                    "[database]\nurl = \"{}\"\n\n[hub]\nhostname = \"{HUB}\"\n\n\
                     [cluster]\nnats_url = \"{}\"\nreplica = \"r{i}\"\n\
                     stream_replicas = {stream_replicas}\n\n\
                     [ca]\nkek_file = \"{}\"\n\n\
                     [telemetry]\nmax_bytes = 268435456\n",
                    pg.url,
                    urls.join(","),
                    kek_file.display()
                );
                Node::start_replica(&address(block, i), &[HUB], &config, &[])
            })
            .collect();
        let credentials = nodes[0].credentials();
        let text = |key: &str| credentials[key].as_str().expect(key).to_string();
        Replicas {
            nodes,
            hub_connection_string: text("hubConnectionString"),
            dps_connection_string: text("dpsConnectionString"),
            id_scope: text("idScope"),
            nats,
            _turn: turn,
            _kek: kek,
            _pg: pg,
        }
    }

    /// The hub service API of replica `i` (0-based).
    fn api(&self, i: usize) -> Api {
        let node = &self.nodes[i];
        Api::at(
            &self.hub_connection_string,
            &node.ca_bundle(),
            &format!("https://{}:{HTTPS_PORT}", node.ip),
        )
    }

    /// The management API of replica `i`.
    fn dps_api(&self, i: usize) -> Api {
        let node = &self.nodes[i];
        Api::at(
            &self.dps_connection_string,
            &node.ca_bundle(),
            &format!("https://{}:{HTTPS_PORT}", node.ip),
        )
    }

    /// Creates a symmetric-key device through replica `i`; returns its primary key and etag.
    fn create_device(&self, i: usize, id: &str) -> (String, String) {
        let (status, body, _) = send(
            self.api(i)
                .request(Method::PUT, &format!("/devices/{id}"), HUB_API)
                .json(&json!({"deviceId": id})),
        );
        assert_eq!(status, 200, "{body}");
        let key = body["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .expect("key");
        (
            key.to_string(),
            body["etag"].as_str().expect("etag").to_string(),
        )
    }

    /// Connects the device to replica `i` over MQTT, subscribed to methods, C2D and desired
    /// patches.
    fn connect(&self, i: usize, id: &str, key: &str) -> Device {
        let node = &self.nodes[i];
        let credentials = Credentials::new(id, key);
        let mut device = mqtt::connect_to(&node.ip, 8883, &node.ca_bundle(), &credentials.login())
            .unwrap_or_else(|e| panic!("{id} on replica {i}: {e:?}\n{}", node.log_text()));
        for filter in [
            "$iothub/methods/POST/#",
            &format!("devices/{id}/messages/devicebound/#"),
            "$iothub/twin/PATCH/properties/desired/#",
        ] {
            device.subscribe(filter).expect("subscribe");
        }
        device
    }
}

/// A symmetric-key device's MQTT credentials for the shared hub name (token valid an hour).
struct Credentials {
    id: String,
    username: String,
    token: String,
}

impl Credentials {
    fn new(id: &str, key: &str) -> Credentials {
        let expiry = zerotouch_service::time::now_unix() + 3600;
        let token =
            symmetric_key::sign(&format!("{HUB}/devices/{id}"), key, expiry, None).expect("sign");
        Credentials {
            id: id.to_string(),
            username: format!("{HUB}/{id}/?api-version={HUB_API}"),
            token,
        }
    }

    fn login(&self) -> Login<'_> {
        Login {
            client_id: &self.id,
            username: &self.username,
            password: Some(&self.token),
            identity: None,
            clean_session: true,
        }
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Waits until the server closes the device's connection; panics after `limit`.
fn assert_closed_within(device: &mut Device, limit: Duration, what: &str) {
    let start = Instant::now();
    loop {
        match device.receive("never/") {
            Err(e) if !e.starts_with("nothing on") => return,
            _ if start.elapsed() > limit => panic!("{what}: still connected after {limit:?}"),
            _ => {}
        }
    }
}

/// The registry's view of a device's connection, through replica `i`.
fn connection_state(replicas: &Replicas, i: usize, id: &str) -> Value {
    let (status, body, _) = send(replicas.api(i).request(
        Method::GET,
        &format!("/devices/{id}"),
        HUB_API,
    ));
    assert_eq!(status, 200, "{body}");
    body["connectionState"].clone()
}

#[test]
fn a_device_on_one_replica_is_reached_through_another() {
    let replicas = Replicas::start(3);
    // One CA for all, restored from the database by the replicas that started empty.
    let bundle = std::fs::read(replicas.nodes[0].ca_bundle()).expect("bundle");
    for node in &replicas.nodes[1..] {
        assert_eq!(std::fs::read(node.ca_bundle()).expect("bundle"), bundle);
    }

    let (key, etag) = replicas.create_device(0, "dev-b");
    let mut device = replicas.connect(1, "dev-b", &key);
    // Replica 1 holds the connection; replica 0 and 2 report it.
    for i in [0, 2] {
        assert_eq!(connection_state(&replicas, i, "dev-b"), "Connected");
    }

    // A direct method through replica 0, answered by the device on replica 1.
    let call = {
        let request = replicas
            .api(0)
            .request(Method::POST, "/twins/dev-b/methods", HUB_API)
            .json(
                &json!({"methodName": "ping", "responseTimeoutInSeconds": 10,
                          "payload": {"n": 7}}),
            );
        std::thread::spawn(move || send(request))
    };
    let (topic, payload) = device
        .receive("$iothub/methods/POST/ping/")
        .expect("method");
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap(),
        json!({"n": 7})
    );
    let rid = topic.rsplit("$rid=").next().expect("rid");
    device
        .publish(
            &format!("$iothub/methods/res/201/?$rid={rid}"),
            br#"{"pong":7}"#,
        )
        .expect("answer");
    let (status, answer, _) = call.join().expect("call");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"status": 201, "payload": {"pong": 7}}));

    // C2D through replica 2.
    let (status, body, _) = send(
        replicas
            .api(2)
            .request(Method::POST, "/devices/dev-b/messages/deviceBound", HUB_API)
            .body("hello from r3"),
    );
    assert_eq!(status, 204, "{body}");
    let (_, payload) = device
        .receive("devices/dev-b/messages/devicebound/")
        .expect("C2D");
    assert_eq!(payload, b"hello from r3");

    // A desired patch through replica 0.
    let (status, body, _) = send(
        replicas
            .api(0)
            .request(Method::PATCH, "/twins/dev-b", HUB_API)
            .json(&json!({"properties": {"desired": {"fan": "on"}}})),
    );
    assert_eq!(status, 200, "{body}");
    let (_, payload) = device
        .receive("$iothub/twin/PATCH/properties/desired/")
        .expect("desired patch");
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap()["fan"],
        "on"
    );

    // The same device connects to replica 2: the connection on replica 1 is closed.
    let mut newer = replicas.connect(2, "dev-b", &key);
    assert_closed_within(&mut device, Duration::from_secs(5), "the older connection");
    assert_eq!(connection_state(&replicas, 0, "dev-b"), "Connected");

    // Disabled through replica 0: replica 2 drops it within a second.
    let start = Instant::now();
    let (status, body, _) = send(
        replicas
            .api(0)
            .request(Method::PUT, "/devices/dev-b", HUB_API)
            .header("If-Match", format!("\"{etag}\""))
            .json(&json!({"status": "disabled"})),
    );
    assert_eq!(status, 200, "{body}");
    assert_closed_within(&mut newer, Duration::from_secs(1), "a disabled device");
    eprintln!("disabled device dropped after {:?}", start.elapsed());
    assert_eq!(connection_state(&replicas, 1, "dev-b"), "Disconnected");

    // The hub's events, in the events stream: created, connected twice and disconnected
    // twice (on two replicas), the desired patch.
    let subject_id = hex::encode("dev-b");
    let events = || {
        zerotouch_tests::nats::read_stream(
            &replicas.nats[0].url(),
            "ZEROTOUCH_EVENTS",
            &format!("zerotouch.events.*.{subject_id}"),
        )
    };
    let ops = |events: &[zerotouch_tests::nats::StreamedMessage]| -> Vec<String> {
        events.iter().map(|e| e.headers["opType"].clone()).collect()
    };
    eventually(Duration::from_secs(5), "the events are stored", || {
        let ops = ops(&events());
        ops.iter().filter(|o| *o == "deviceDisconnected").count() == 2
    });
    let events = events();
    let ops = ops(&events);
    assert_eq!(
        ops.iter().filter(|o| *o == "deviceConnected").count(),
        2,
        "{ops:?}"
    );
    assert_eq!(ops[0], "createDeviceIdentity", "{ops:?}");
    let created = &events[0];
    assert_eq!(
        created.subject,
        format!("zerotouch.events.lifecycle.{subject_id}")
    );
    assert_eq!(
        created.headers["iothub-message-source"],
        "deviceLifecycleEvents"
    );
    assert_eq!(created.headers["deviceId"], "dev-b");
    assert_eq!(created.headers["hubName"], HUB);
    let twin = events
        .iter()
        .find(|e| e.headers["opType"] == "updateTwin")
        .expect("a twin change event");
    assert_eq!(twin.headers["iothub-message-source"], "twinChangeEvents");
    let change: Value = serde_json::from_slice(&twin.payload).expect("JSON");
    assert_eq!(change["properties"]["desired"]["fan"], "on", "{change}");
}

#[test]
fn a_method_for_a_device_no_replica_holds_is_not_online() {
    let replicas = Replicas::start(2);
    replicas.create_device(0, "sleepy");
    let (status, body, _) = send(
        replicas
            .api(1)
            .request(Method::POST, "/twins/sleepy/methods", HUB_API)
            .json(&json!({"methodName": "ping", "responseTimeoutInSeconds": 5})),
    );
    assert_eq!(
        (status, body["errorCode"].as_u64()),
        (404, Some(404_103)),
        "{body}"
    );
}

/// `PUT /{idScope}/registrations/{id}/register` (or a poll) at replica `i`'s own address.
fn device_request(
    replicas: &Replicas,
    i: usize,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> reqwest::blocking::RequestBuilder {
    let node = &replicas.nodes[i];
    let client = zerotouch_tests::client_trusting(&node.ca_bundle(), None);
    let url = format!(
        "https://{}:{HTTPS_PORT}/{}/registrations/{path}?api-version=2021-06-01",
        node.ip, replicas.id_scope
    );
    let request = client.request(method, url);
    match token {
        Some(token) => request.header("Authorization", token),
        None => request,
    }
}

#[test]
fn a_tpm_challenged_by_one_replica_is_assigned_by_another() {
    let replicas = Replicas::start(3);
    let tpm = Swtpm::start();
    let (ek, srk) = tpm.device_init();
    let id = zerotouch_attestation::tpm::parse_endorsement_key(&ek)
        .expect("EK")
        .registration_id();
    let (status, body, _) = send(
        replicas
            .dps_api(0)
            .request(Method::PUT, &format!("/enrollments/{id}"), DPS_API)
            .json(&json!({"attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}})),
    );
    assert_eq!(status, 200, "{body}");
    let body = json!({"registrationId": id, "tpm": {"endorsementKey": ek, "storageRootKey": srk}});
    let register = format!("{id}/register");

    // The challenge from replica 1.
    let (status, challenge, _) =
        send(device_request(&replicas, 1, Method::PUT, &register, None).json(&body));
    assert_eq!(status, 401, "{challenge}");
    tpm.device_import(challenge["authenticationKey"].as_str().expect("blob"));

    // The answer to replica 2, polled at replica 0.
    let token = tpm.sas_token(
        &format!("{}/registrations/{id}", replicas.id_scope),
        Some("registration"),
    );
    let (status, accepted, _) =
        send(device_request(&replicas, 2, Method::PUT, &register, Some(&token)).json(&body));
    assert_eq!(status, 202, "{accepted}");
    let operation = accepted["operationId"].as_str().expect("operation id");
    let poll = format!("{id}/operations/{operation}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        let (status, answer, _) = send(device_request(
            &replicas,
            0,
            Method::GET,
            &poll,
            Some(&token),
        ));
        assert_eq!(
            status,
            if answer["status"] == "assigning" {
                202
            } else {
                200
            },
            "{answer}"
        );
        if answer["status"] != "assigning" {
            break answer;
        }
        assert!(Instant::now() < deadline, "still assigning: {answer}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(done["status"], "assigned", "{done}");

    // The challenge was spent on replica 2: a replay to replica 1 is refused.
    let (status, replay, _) =
        send(device_request(&replicas, 1, Method::PUT, &register, Some(&token)).json(&body));
    assert_eq!(status, 401, "{replay}");
}

/// Every message of the consumer API through replica `i`, paged from offset 0.
fn read_all_events(replicas: &Replicas, i: usize) -> Vec<Value> {
    let api = replicas.api(i);
    let mut out = Vec::new();
    let mut from = 0;
    let mut unavailable_since: Option<Instant> = None;
    loop {
        let (status, page, _) = send(api.request(
            Method::GET,
            &format!("/messages/events?from={from}&limit=1000"),
            HUB_API,
        ));
        // 503 while JetStream elects a new leader after losing a server: a reader retries.
        if status == 503
            && unavailable_since.get_or_insert_with(Instant::now).elapsed()
                < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        unavailable_since = None;
        assert_eq!(status, 200, "{page}");
        let messages = page["messages"].as_array().expect("messages").clone();
        if messages.is_empty() {
            return out;
        }
        from = page["nextOffset"].as_i64().expect("nextOffset");
        out.extend(messages);
    }
}

fn body_json(message: &Value) -> Value {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(message["body"].as_str().expect("body"))
        .expect("base64");
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

#[test]
fn telemetry_sent_to_one_replica_is_read_through_another() {
    let replicas = Replicas::start(2);
    let (key, _) = replicas.create_device(0, "talker");
    let mut device = replicas.connect(1, "talker", &key);
    for n in 0..3 {
        device
            .publish(
                &format!("devices/talker/messages/events/color=blue&n={n}&flag&%24.mid=m{n}"),
                json!({"n": n}).to_string().as_bytes(),
            )
            .expect("PUBACK");
    }
    let events = read_all_events(&replicas, 0);
    assert_eq!(events.len(), 3, "{events:?}");
    for (n, event) in events.iter().enumerate() {
        assert_eq!(event["deviceId"], "talker");
        assert_eq!(body_json(event), json!({"n": n}));
        assert_eq!(
            event["properties"],
            json!({"color": "blue", "n": n.to_string(), "flag": null})
        );
        assert_eq!(event["systemProperties"]["message-id"], format!("m{n}"));
    }
    // Offsets are the stream's sequence numbers: 1, 2, 3.
    let offsets: Vec<i64> = events
        .iter()
        .map(|e| e["offset"].as_i64().unwrap())
        .collect();
    assert_eq!(offsets, [1, 2, 3]);
}

/// What the telemetry senders of the kill test share.
#[derive(Default)]
struct Acked {
    /// (device, sequence number) of every message the server acknowledged.
    messages: Vec<(String, u64)>,
    /// How long each reconnect after a failure took.
    reconnects: Vec<Duration>,
}

#[test]
fn killing_a_replica_loses_no_acknowledged_telemetry() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    // Three replicas on a three-server NATS cluster, streams on all three.
    let mut replicas = Replicas::start_on(3, NatsServer::cluster3(), 3);
    const DEVICES: usize = 12;
    let keys: Vec<String> = (0..DEVICES)
        .map(|d| replicas.create_device(0, &format!("sender-{d}")).0)
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let targets: Vec<(String, String)> = replicas
        .nodes
        .iter()
        .map(|n| (n.ip.clone(), n.ca_bundle().display().to_string()))
        .collect();
    let senders: Vec<_> = (0..DEVICES)
        .map(|d| {
            let (stop, acked, targets) = (stop.clone(), acked.clone(), targets.clone());
            let key = keys[d].clone();
            std::thread::spawn(move || {
                let id = format!("sender-{d}");
                let credentials = Credentials::new(&id, &key);
                let login = credentials.login();
                // Each device starts on replica d % 3 and moves to the next one when its
                // connection fails, as an SDK behind a load balancer would.
                let mut target = d % targets.len();
                let connect = |target: usize| {
                    let (ip, bundle) = &targets[target];
                    mqtt::connect_to(ip, 8883, std::path::Path::new(bundle), &login).ok()
                };
                let mut device = connect(target).expect("first connection");
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let topic = format!("devices/{id}/messages/events/");
                    match device.publish(&topic, json!({"seq": seq}).to_string().as_bytes()) {
                        Ok(()) => {
                            acked.lock().unwrap().messages.push((id.clone(), seq));
                            seq += 1;
                        }
                        Err(_) => {
                            let failed_at = Instant::now();
                            device = loop {
                                target = (target + 1) % targets.len();
                                if let Some(device) = connect(target) {
                                    break device;
                                }
                                assert!(
                                    failed_at.elapsed() < Duration::from_secs(30),
                                    "{id} could not reconnect"
                                );
                                std::thread::sleep(Duration::from_millis(100));
                            };
                            acked.lock().unwrap().reconnects.push(failed_at.elapsed());
                            seq += 1;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();

    // Registrations keep succeeding through the survivors while a replica dies.
    let registrar = {
        let group_key = symmetric_key::generate_key().expect("key");
        let (status, body, _) = send(
            replicas
                .dps_api(0)
                .request(Method::PUT, "/enrollmentGroups/fleet", DPS_API)
                .json(&json!({"enrollmentGroupId": "fleet",
                    "attestation": {"type": "symmetricKey", "symmetricKey": {
                        "primaryKey": group_key,
                        "secondaryKey": symmetric_key::generate_key().expect("key")}}})),
        );
        assert_eq!(status, 200, "{body}");
        let (ip, bundle) = targets[1].clone();
        let id_scope = replicas.id_scope.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let client = zerotouch_tests::client_trusting(std::path::Path::new(&bundle), None);
            let mut outcomes = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("fleet-{n}");
                let key = symmetric_key::derive_device_key(&group_key, &id).expect("derive");
                let state = zerotouch_tests::cluster::register(
                    &client,
                    &format!("https://{ip}:{HTTPS_PORT}"),
                    &id_scope,
                    &id,
                    &key,
                    None,
                );
                outcomes.push(state["status"].as_str().unwrap_or("none").to_string());
                n += 1;
            }
            outcomes
        })
    };

    std::thread::sleep(Duration::from_secs(2));
    let before = acked.lock().unwrap().messages.len();
    replicas.nodes[2].kill();
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.join().expect("sender");
    }
    let outcomes = registrar.join().expect("registrar");

    // The survivors stop listing the killed replica after three missed heartbeats.
    eventually(Duration::from_secs(15), "the killed replica leaves", || {
        health(&replicas, 0).1["replica"]["replicas"] == json!(["r1", "r2"])
    });
    let acked = acked.lock().unwrap();
    assert!(
        before > 0 && acked.messages.len() > before,
        "telemetry flowed before and after"
    );
    assert!(
        !acked.reconnects.is_empty(),
        "devices of the killed replica reconnected"
    );
    let stored: std::collections::HashSet<(String, u64)> = read_all_events(&replicas, 0)
        .iter()
        .map(|e| {
            let device = e["deviceId"].as_str().expect("deviceId").to_string();
            (device, body_json(e)["seq"].as_u64().expect("seq"))
        })
        .collect();
    let lost: Vec<_> = acked
        .messages
        .iter()
        .filter(|m| !stored.contains(*m))
        .collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    assert!(
        !outcomes.is_empty() && outcomes.iter().all(|o| o == "assigned"),
        "{outcomes:?}"
    );
    let slowest = acked.reconnects.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} acknowledged messages, all stored; {} reconnects, slowest {slowest:?}; {} registrations",
        acked.messages.len(),
        acked.reconnects.len(),
        outcomes.len()
    );
}

#[test]
fn losing_a_nats_server_loses_no_acknowledged_telemetry_and_delivery_goes_on() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let mut replicas = Replicas::start_on(2, NatsServer::cluster3(), 3);
    const DEVICES: usize = 8;
    let keys: Vec<String> = (0..DEVICES)
        .map(|d| replicas.create_device(0, &format!("steady-{d}")).0)
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let senders: Vec<_> = (0..DEVICES)
        .map(|d| {
            let (stop, acked) = (stop.clone(), acked.clone());
            let id = format!("steady-{d}");
            let mut device = replicas.connect(d % 2, &id, &keys[d]);
            let target = d % 2;
            let (ip, bundle) = (
                replicas.nodes[target].ip.clone(),
                replicas.nodes[target].ca_bundle(),
            );
            let key = keys[d].clone();
            std::thread::spawn(move || {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let topic = format!("devices/{id}/messages/events/");
                    match device.publish(&topic, json!({"seq": seq}).to_string().as_bytes()) {
                        Ok(()) => acked.lock().unwrap().push((id.clone(), seq)),
                        // Not acknowledged: the device reconnects (to the same replica) and
                        // goes on, as an SDK does.
                        Err(_) => {
                            let credentials = Credentials::new(&id, &key);
                            let login = credentials.login();
                            let failed_at = Instant::now();
                            device = loop {
                                let refusal = match mqtt::connect_to(&ip, 8883, &bundle, &login) {
                                    Ok(device) => break device,
                                    Err(e) => e,
                                };
                                assert!(
                                    failed_at.elapsed() < Duration::from_secs(30),
                                    "{id} could not reconnect for 30 s: {refusal:?}"
                                );
                                std::thread::sleep(Duration::from_millis(100));
                            };
                        }
                    }
                    seq += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_secs(2));
    replicas.nats[0].kill();
    std::thread::sleep(Duration::from_secs(4));

    // Orders between replicas still flow: C2D through replica 0 reaches a device on replica 1.
    let (key, _) = replicas.create_device(0, "listener");
    let mut listener = replicas.connect(1, "listener", &key);
    let (status, body, _) = send(
        replicas
            .api(0)
            .request(
                Method::POST,
                "/devices/listener/messages/deviceBound",
                HUB_API,
            )
            .body("still here"),
    );
    assert_eq!(status, 204, "{body}");
    let (_, payload) = listener
        .receive("devices/listener/messages/devicebound/")
        .expect("C2D after losing a NATS server");
    assert_eq!(payload, b"still here");

    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.join().expect("sender");
    }
    let acked = acked.lock().unwrap();
    let stored: std::collections::HashSet<(String, u64)> = read_all_events(&replicas, 1)
        .iter()
        .map(|e| {
            let device = e["deviceId"].as_str().expect("deviceId").to_string();
            (device, body_json(e)["seq"].as_u64().expect("seq"))
        })
        .collect();
    let lost: Vec<_> = acked.iter().filter(|m| !stored.contains(*m)).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    eprintln!(
        "{} acknowledged messages with a NATS server killed, all stored",
        acked.len()
    );
}

/// `/healthz` of replica `i`: status code and body.
fn health(replicas: &Replicas, i: usize) -> (u16, Value) {
    let node = &replicas.nodes[i];
    let client = zerotouch_tests::client_trusting(&node.ca_bundle(), None);
    let (status, body, _) = send(client.get(node.url("/healthz")));
    (status, body)
}

/// Polls `check` every 200 ms until it holds; panics after `limit`.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_replica_without_nats_refuses_devices_until_it_is_back() {
    let mut replicas = Replicas::start(2);
    eventually(Duration::from_secs(10), "both replicas listed", || {
        health(&replicas, 0).1["replica"]["replicas"] == json!(["r1", "r2"])
    });
    let (status, body) = health(&replicas, 1);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["replica"]["name"], "r2");
    assert_eq!(body["replica"]["nats"], "connected");
    let (key, _) = replicas.create_device(0, "patient");

    replicas.nats[0].kill();
    eventually(Duration::from_secs(10), "health says NATS is gone", || {
        let (status, body) = health(&replicas, 1);
        status == 503 && body["replica"]["nats"] == "disconnected"
    });
    let node = &replicas.nodes[1];
    let credentials = Credentials::new("patient", &key);
    let login = credentials.login();
    let refused = mqtt::connect_to(&node.ip, 8883, &node.ca_bundle(), &login).err();
    assert_eq!(
        refused,
        Some(mqtt::ConnectFailure::Refused(
            rumqttc::ConnectReturnCode::ServiceUnavailable
        ))
    );

    replicas.nats[0].restart();
    eventually(Duration::from_secs(20), "health recovers with NATS", || {
        health(&replicas, 1).0 == 200
    });
    let device = mqtt::connect_to(&node.ip, 8883, &node.ca_bundle(), &login);
    assert!(device.is_ok(), "{:?}", device.err());
}

#[test]
fn a_certificate_revoked_through_one_replica_drops_its_device_on_another() {
    use base64::Engine as _;
    use zerotouch_tests::pki;
    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    let replicas = Replicas::start(2);
    let id = "x509-dev";
    let (status, enrollment, _) = send(
        replicas
            .dps_api(0)
            .request(Method::PUT, &format!("/enrollments/{id}"), DPS_API)
            .json(&json!({"attestation": {"type": "symmetricKey"}})),
    );
    assert_eq!(status, 200, "{enrollment}");
    let key = enrollment["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("key");
    let (csr, device_key) = pki::csr(id);
    let node = &replicas.nodes[0];
    let state = zerotouch_tests::cluster::register(
        &zerotouch_tests::client_trusting(&node.ca_bundle(), None),
        &format!("https://{}:{HTTPS_PORT}", node.ip),
        &replicas.id_scope,
        id,
        key,
        Some(&json!({"csr": B64.encode(&csr)})),
    );
    assert_eq!(state["status"], "assigned", "{state}");
    let chain: Vec<String> = state["issuedCertificateChain"]
        .as_array()
        .unwrap_or_else(|| panic!("no certificate chain: {state}"))
        .iter()
        .map(|c| pki::pem_of_der(&B64.decode(c.as_str().expect("DER")).expect("base64")))
        .collect();
    let device_key = device_key.serialize_pem();
    let serial = openssl::x509::X509::from_pem(chain[0].as_bytes())
        .and_then(|cert| cert.serial_number().to_bn())
        .and_then(|serial| serial.to_hex_str().map(|s| s.to_string()))
        .expect("serial");

    // The device connects to replica 1 with its certificate.
    let holder = &replicas.nodes[1];
    let username = format!("{HUB}/{id}/?api-version={HUB_API}");
    let mut device = mqtt::connect_to(
        &holder.ip,
        8883,
        &holder.ca_bundle(),
        &Login {
            client_id: id,
            username: &username,
            password: None,
            identity: Some((&chain.concat(), &device_key)),
            clean_session: true,
        },
    )
    .unwrap_or_else(|e| panic!("{e:?}\n{}", holder.log_text()));

    // Revoked through replica 0: replica 1 drops the connection within a second.
    let start = Instant::now();
    let (status, body, _) = send(
        replicas
            .dps_api(0)
            .request(
                Method::POST,
                &format!("/certificates/issued/{serial}/revoke"),
                DPS_API,
            )
            .json(&json!({"reason": "keyCompromise"})),
    );
    assert_eq!(status, 200, "{body}");
    assert_closed_within(&mut device, Duration::from_secs(1), "a revoked certificate");
    eprintln!("revoked device dropped after {:?}", start.elapsed());
}

/// Runs SQL as the PostgreSQL admin (psql).
fn admin_sql(sql: &str) {
    let output = std::process::Command::new("psql")
        .args([
            zerotouch_tests::postgres_admin_url().as_str(),
            "-q",
            "-c",
            sql,
        ])
        .output()
        .expect("psql");
    assert!(
        output.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_replica_without_its_database_refuses_devices_with_0x03_until_it_is_back() {
    let replicas = Replicas::start(2);
    let (key, _) = replicas.create_device(0, "steadfast");
    let database = replicas
        ._pg
        .url
        .rsplit('/')
        .next()
        .expect("name")
        .to_string();
    let node = &replicas.nodes[1];
    let credentials = Credentials::new("steadfast", &key);
    let login = credentials.login();

    admin_sql(&format!(
        "ALTER DATABASE {database} ALLOW_CONNECTIONS false"
    ));
    admin_sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
    ));
    eventually(
        Duration::from_secs(30),
        "health says the database is gone",
        || health(&replicas, 1).0 == 503,
    );
    // Not "not authorized" (0x05, which makes SDKs give up): "server unavailable", retry.
    let refused = mqtt::connect_to(&node.ip, 8883, &node.ca_bundle(), &login).err();
    assert_eq!(
        refused,
        Some(mqtt::ConnectFailure::Refused(
            rumqttc::ConnectReturnCode::ServiceUnavailable
        ))
    );

    admin_sql(&format!("ALTER DATABASE {database} ALLOW_CONNECTIONS true"));
    eventually(
        Duration::from_secs(30),
        "health recovers with the database",
        || health(&replicas, 1).0 == 200,
    );
    let device = mqtt::connect_to(&node.ip, 8883, &node.ca_bundle(), &login);
    assert!(device.is_ok(), "{:?}", device.err());
}

#[test]
fn the_reconnect_limit_counts_connects_on_every_replica() {
    let replicas = Replicas::start(2);
    let (key, _) = replicas.create_device(0, "restless");
    let credentials = Credentials::new("restless", &key);
    let login = credentials.login();
    // The count is per minute: start early in one, so that all connects fall into it.
    let into_minute = zerotouch_service::time::now_unix() % 60;
    if into_minute > 40 {
        std::thread::sleep(Duration::from_secs(61 - into_minute));
    }
    // Alternating, each replica sees 15: under its own limit of 30 a minute.
    let limit = 30;
    for n in 0..limit {
        let node = &replicas.nodes[n % 2];
        let device = mqtt::connect_to(&node.ip, 8883, &node.ca_bundle(), &login)
            .unwrap_or_else(|e| panic!("connect {n}: {e:?}"));
        device.disconnect();
    }
    let node = &replicas.nodes[limit % 2];
    let refused = mqtt::connect_to(&node.ip, 8883, &node.ca_bundle(), &login).err();
    assert_eq!(
        refused,
        Some(mqtt::ConnectFailure::Refused(
            rumqttc::ConnectReturnCode::ServiceUnavailable
        )),
        "connect {} of the minute, across replicas",
        limit + 1
    );
}

#[test]
fn an_intermediate_rotated_on_one_replica_reaches_the_others_at_their_restart() {
    let mut replicas = Replicas::start(2);
    let before = std::fs::read_to_string(replicas.nodes[1].ca_bundle()).expect("bundle");
    let rotated: Value =
        serde_json::from_str(&replicas.nodes[0].cli(&["ca", "rotate-intermediate"])).expect("JSON");
    let after = std::fs::read_to_string(replicas.nodes[0].ca_bundle()).expect("bundle");
    assert_ne!(before, after, "{rotated}");

    // Replica 2 restarts with its old ca/ and takes the rotated CA from the database.
    replicas.nodes[1].kill();
    replicas.nodes[1].spawn();
    let taken = std::fs::read_to_string(replicas.nodes[1].ca_bundle()).expect("bundle");
    assert_eq!(taken, after, "{}", replicas.nodes[1].log_text());
    let current = rotated["current"]["serial"].as_str().expect("serial");
    assert!(
        replicas.nodes[1].log_text().contains("a rotation"),
        "{}",
        replicas.nodes[1].log_text()
    );
    // Its TLS certificate still chains to the bundle the devices trust.
    assert_eq!(health(&replicas, 1).0, 200, "serial {current}");
}
