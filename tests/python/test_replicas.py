"""Replica mode with the unmodified Azure SDKs: three `zerotouch` processes on one PostgreSQL
database and a private three-server NATS cluster with JetStream (`[cluster]`), each on a loopback address of its own. Python
SDK devices are spread over the replicas; the `azure-iot-hub` service SDK talks to one replica
only, and its methods, desired patches and C2D reach the devices on the other two. Telemetry of
every device is read back through that one replica."""

import base64
import os
import queue
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from azure.iot.device import Message, MethodResponse
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties

from conftest import BINARY, PG_ADMIN_URL, Server, psql
from test_hub_sdk import device_client, new_key, service, stored_messages, wait_for


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nats_cluster(directory: Path, size=3):
    """`size` nats-servers with JetStream, routed to each other; returns (processes, URLs)."""
    ports = [free_port() for _ in range(size)]
    routes = [free_port() for _ in range(size)]
    processes = []
    for i in range(size):
        config = directory / f"nats-{i}.conf"
        config.write_text(
            f"server_name: n{i}\nlisten: 127.0.0.1:{ports[i]}\n"
            f'jetstream {{ store_dir: "{directory / f"js-{i}"}", max_file_store: 4GB }}\n'
            f"cluster {{ name: zt, listen: 127.0.0.1:{routes[i]}, routes: ["
            + ", ".join(f'"nats-route://127.0.0.1:{r}"' for r in routes)
            + "] }\n"
        )
        log = open(directory / f"nats-{i}.log", "ab")
        processes.append(subprocess.Popen(["nats-server", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + 20
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    for p in processes:
                        p.kill()
                    raise RuntimeError("nats-server did not start")
                time.sleep(0.1)
    return processes, [f"nats://127.0.0.1:{p}" for p in ports]


@pytest.fixture(scope="module")
def replicas():
    if BINARY.exists() is False:
        pytest.fail(f"{BINARY} is missing: build it with cargo build --bin zerotouch")
    if os.environ.get("ZEROTOUCH_TEST_SKIP_PG") == "1":
        pytest.skip("replica mode needs PostgreSQL (ZEROTOUCH_TEST_SKIP_PG=1)")
    database = f"zt_py_{uuid.uuid4().hex[:12]}"
    psql(f"CREATE DATABASE {database}")
    nodes = []
    with tempfile.TemporaryDirectory() as tmp:
        nats, nats_urls = start_nats_cluster(Path(tmp))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROTOUCH__")}
        env["ZEROTOUCH__DATABASE__URL"] = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database
        env["ZEROTOUCH__CLUSTER__NATS_URL"] = ",".join(nats_urls)
        env["ZEROTOUCH__CLUSTER__STREAM_REPLICAS"] = "3"
        env["ZEROTOUCH__TELEMETRY__MAX_BYTES"] = str(256 << 20)
        env["ZEROTOUCH_CA_KEK"] = base64.b64encode(os.urandom(32)).decode()
        try:
            for i in range(3):
                (Path(tmp) / f"r{i}").mkdir()
                node = Server(Path(tmp) / f"r{i}" / "data", {**env, "ZEROTOUCH__CLUSTER__REPLICA": f"r{i}"})
                node.wait_ready()
                nodes.append(node)
            yield nodes
        finally:
            for node in nodes:
                node.stop()
            for process in nats:
                process.kill()
                process.wait()
            psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def test_the_service_sdk_on_one_replica_reaches_devices_on_the_others(replicas):
    front = replicas[0]
    # One CA for all three: a replica with an empty data dir took it from the database.
    bundles = {Path(r.credentials["caBundlePath"]).read_text() for r in replicas}
    assert len(bundles) == 1
    os.environ["REQUESTS_CA_BUNDLE"] = front.credentials["caBundlePath"]
    registry = IoTHubRegistryManager.from_connection_string(front.credentials["hubConnectionString"])

    clients = []
    try:
        for i, replica in enumerate(replicas):
            device_id = f"spread-{i}-{uuid.uuid4().hex[:6]}"
            key = new_key()
            registry.create_device_with_sas(device_id, key, new_key(), "enabled")
            # Each device dials its own replica (HostName is the replica's address).
            client = device_client(replica, device_id, key)
            desired, methods, c2d = queue.Queue(), queue.Queue(), queue.Queue()
            client.on_twin_desired_properties_patch_received = desired.put

            def on_method(request, client=client, methods=methods):
                methods.put(request.name)
                client.send_method_response(
                    MethodResponse.create_from_method_request(request, 200, {"echo": request.payload})
                )

            client.on_method_request_received = on_method
            client.on_message_received = c2d.put
            client.connect()
            client.send_message(Message(f'{{"replica": {i}}}', message_id=f"m-{i}"))
            clients.append((device_id, client, desired, methods, c2d))

        for i, (device_id, client, desired, methods, c2d) in enumerate(clients):
            # Reported through the device's replica, visible through the front one.
            client.patch_twin_reported_properties({"replica": i})
            deadline = time.time() + 10
            while registry.get_twin(device_id).properties.reported.get("replica") != i:
                assert time.time() < deadline, f"{device_id}: reported patch not visible"
                time.sleep(0.2)

            # Direct method.
            response = registry.invoke_device_method(
                device_id, CloudToDeviceMethod(method_name="where", payload={"ask": i}, response_timeout_in_seconds=10)
            )
            assert response.status == 200
            assert response.payload == {"echo": {"ask": i}}
            assert wait_for(methods) == "where"

            # Desired patch.
            twin = registry.get_twin(device_id)
            registry.update_twin(device_id, Twin(properties=TwinProperties(desired={"rate": 10 + i})), twin.etag)
            patch = wait_for(desired, match=lambda p: "rate" in p)
            assert patch["rate"] == 10 + i

            # C2D (HTTPS service endpoint of the front replica).
            r = service(front, "POST", f"/devices/{device_id}/messages/deviceBound", data=f"to-{i}".encode())
            assert r.status_code == 204, r.text
            assert wait_for(c2d).data == f"to-{i}".encode()

            # Connected, as seen from the front replica.
            assert registry.get_device(device_id).connection_state == "Connected"

            # Telemetry, read back through the front replica from the shared stream.
            stored = stored_messages(front, device_id)
            assert len(stored) == 1, stored
            assert base64.b64decode(stored[0]["body"]) == f'{{"replica": {i}}}'.encode()
            assert stored[0]["systemProperties"]["message-id"] == f"m-{i}"
    finally:
        for _, client, *_ in clients:
            client.shutdown()


def test_event_hubs_and_amqp_c2d_work_through_any_replica(replicas):
    """The Event Hubs endpoint of one replica reads the shared telemetry stream, devices on every
    replica included; C2D sent over AMQP to another replica reaches a device on a third."""
    from azure.eventhub import EventHubConsumerClient
    import threading

    front = replicas[0]
    os.environ["REQUESTS_CA_BUNDLE"] = front.credentials["caBundlePath"]
    registry = IoTHubRegistryManager.from_connection_string(front.credentials["hubConnectionString"])
    tag = uuid.uuid4().hex[:6]
    clients = []
    try:
        for i, replica in enumerate(replicas):
            device_id = f"eh-{i}-{tag}"
            key = new_key()
            registry.create_device_with_sas(device_id, key, new_key(), "enabled")
            client = device_client(replica, device_id, key)
            c2d = queue.Queue()
            client.on_message_received = c2d.put
            client.connect()
            client.send_message(Message(f'{{"replica": {i}}}', message_id=f"eh-{i}-{tag}"))
            clients.append((device_id, client, c2d))

        reader = replicas[2]
        consumer = EventHubConsumerClient.from_connection_string(
            reader.credentials["eventHubsConnectionString"], consumer_group="$Default",
            connection_verify=reader.credentials["caBundlePath"], retry_total=1)
        seen, done = {}, threading.Event()

        def on_event(_partition, event):
            device = (event.system_properties.get(b"iothub-connection-device-id") or b"").decode()
            if device.endswith(tag):
                seen[device] = event.body_as_str()
                if len(seen) == len(replicas):
                    done.set()

        worker = threading.Thread(target=consumer.receive, daemon=True, kwargs={
            "on_event": on_event, "starting_position": "-1", "max_wait_time": 1})
        worker.start()
        done.wait(30)
        consumer.close()
        worker.join(10)
        assert seen == {f"eh-{i}-{tag}": f'{{"replica": {i}}}' for i in range(len(replicas))}

        # AMQP C2D through replica 1 (its host name alone: uamqp dials {HostName}:5671).
        os.environ["SSL_CERT_FILE"] = replicas[1].credentials["caBundlePath"]
        parts = dict(p.split("=", 1) for p in replicas[1].credentials["hubConnectionString"].split(";"))
        amqp = IoTHubRegistryManager.from_connection_string(
            f"HostName={replicas[1].ip};SharedAccessKeyName={parts['SharedAccessKeyName']};"
            f"SharedAccessKey={parts['SharedAccessKey']}")
        device_id, _, c2d = clients[0]
        amqp.send_c2d_message(device_id, "over amqp, across replicas")
        assert wait_for(c2d).data == b"over amqp, across replicas"
    finally:
        for _, client, _ in clients:
            client.shutdown()
