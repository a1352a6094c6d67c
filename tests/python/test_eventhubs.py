"""The hub's Event Hubs-compatible endpoint against azure-eventhub 5.15's EventHubConsumerClient,
unmodified, with the connection string `zerotouch credentials` prints: telemetry sent by
azure-iot-device clients over MQTT, read with its properties, and read again from a checkpointed
offset after a restart of the server and of the consumer."""

import base64
import datetime
import json
import os
import secrets
import threading
import uuid

import pytest
from azure.eventhub import EventHubConsumerClient
from azure.eventhub.exceptions import AuthenticationError
from azure.iot.device import IoTHubDeviceClient, Message
from azure.iot.hub import IoTHubRegistryManager


def new_key():
    return base64.b64encode(secrets.token_bytes(32)).decode()


def consumer(server, connection_string=None):
    return EventHubConsumerClient.from_connection_string(
        connection_string or server.credentials["eventHubsConnectionString"],
        consumer_group="$Default",
        connection_verify=server.credentials["caBundlePath"],
        retry_total=1,
    )


def send(server, device_id, key, messages):
    client = IoTHubDeviceClient.create_from_connection_string(
        f"HostName={server.ip};DeviceId={device_id};SharedAccessKey={key}",
        server_verification_cert=open(server.credentials["caBundlePath"]).read(),
    )
    client.connect()
    try:
        for body, properties in messages:
            message = Message(json.dumps(body), message_id=body["id"], content_encoding="utf-8",
                              content_type="application/json")
            message.custom_properties.update(properties)
            client.send_message(message)  # returns once the hub acknowledged (PUBACK)
    finally:
        client.shutdown()


def read(server, starting_position, count, device_id, timeout=30):
    """The first `count` events of `device_id` from `starting_position`, by a fresh client."""
    events, done = [], threading.Event()
    client = consumer(server)

    def on_event(_partition, event):
        if event is None:
            return
        if event.system_properties.get(b"iothub-connection-device-id") == device_id.encode():
            events.append(event)
            if len(events) >= count:
                done.set()

    worker = threading.Thread(
        target=client.receive,
        kwargs={"on_event": on_event, "starting_position": starting_position, "max_wait_time": 1},
        daemon=True,
    )
    worker.start()
    done.wait(timeout)
    client.close()
    worker.join(10)
    return events


@pytest.fixture(scope="module")
def device(server):
    os.environ["REQUESTS_CA_BUNDLE"] = server.credentials["caBundlePath"]
    registry = IoTHubRegistryManager.from_connection_string(server.credentials["hubConnectionString"])
    device_id = f"eh-{uuid.uuid4().hex[:8]}"
    key = new_key()
    registry.create_device_with_sas(device_id, key, new_key(), "enabled")
    return device_id, key


def test_the_connection_string_names_an_event_hub_with_one_partition(server):
    text = server.credentials["eventHubsConnectionString"]
    assert text.startswith(f"Endpoint=sb://{server.ip}/;SharedAccessKeyName=service;"), text
    assert text.endswith(";EntityPath=zerotouch"), text
    with consumer(server) as client:
        assert client.get_eventhub_properties()["partition_ids"] == ["0"]
        assert client.get_partition_ids() == ["0"]
        partition = client.get_partition_properties("0")
        assert partition["id"] == "0"
        assert partition["eventhub_name"] == "zerotouch"


def test_telemetry_is_read_with_its_properties_and_again_from_a_checkpoint_after_restarts(server, device):
    device_id, key = device
    first = [({"id": f"{device_id}-{n}", "n": n}, {"color": "red", "n": str(n)}) for n in range(3)]
    send(server, device_id, key, first)

    events = read(server, "-1", 3, device_id)
    assert [json.loads(e.body_as_str()) for e in events] == [body for body, _ in first]
    event = events[0]
    assert event.properties == {b"color": b"red", b"n": b"0"}
    assert event.system_properties[b"message-id"] == f"{device_id}-0".encode()
    assert event.system_properties[b"content-type"] == b"application/json"
    assert event.system_properties[b"content-encoding"] == b"utf-8"
    assert b"iothub-enqueuedtime" in event.system_properties
    offsets = [int(e.offset) for e in events]
    assert offsets == sorted(offsets) and len(set(offsets)) == 3
    assert [e.sequence_number for e in events] == offsets
    partition = consumer(server).get_partition_properties("0")
    assert partition["last_enqueued_sequence_number"] >= offsets[-1]
    assert not partition["is_empty"]

    # The consumer checkpoints after the second event, then it and the server go away.
    checkpoint = events[1].offset
    server.restart()

    later = [({"id": f"{device_id}-{n}", "n": n}, {}) for n in range(3, 5)]
    send(server, device_id, key, later)
    resumed = read(server, checkpoint, 3, device_id)
    assert [json.loads(e.body_as_str())["n"] for e in resumed] == [2, 3, 4]

    # By sequence number (inclusive) and by enqueued time.
    by_sequence = read(server, events[2].sequence_number, 2, device_id)
    assert [json.loads(e.body_as_str())["n"] for e in by_sequence] == [3, 4]
    inclusive = []
    client = consumer(server)
    done = threading.Event()

    def on_event(_p, event):
        if event is not None and event.system_properties.get(b"iothub-connection-device-id") == device_id.encode():
            inclusive.append(event)
            done.set()

    worker = threading.Thread(target=client.receive, kwargs={
        "on_event": on_event, "starting_position": events[2].sequence_number,
        "starting_position_inclusive": True, "max_wait_time": 1}, daemon=True)
    worker.start()
    done.wait(30)
    client.close()
    worker.join(10)
    assert json.loads(inclusive[0].body_as_str())["n"] == 2

    since = events[2].enqueued_time - datetime.timedelta(milliseconds=1)
    by_time = read(server, since, 3, device_id)
    assert [json.loads(e.body_as_str())["n"] for e in by_time] == [2, 3, 4]


def test_a_wrong_key_is_refused(server):
    parts = dict(p.split("=", 1) for p in server.credentials["eventHubsConnectionString"].split(";") if p)
    parts["SharedAccessKey"] = new_key()
    wrong = ";".join(f"{k}={v}" for k, v in parts.items())
    with pytest.raises(AuthenticationError):
        with consumer(server, wrong) as client:
            client.get_eventhub_properties()


def test_a_device_policy_cannot_read_events(server):
    device_policy = dict(p.split("=", 1) for p in server.credentials["hubPolicies"]["device"].split(";"))
    parts = dict(p.split("=", 1) for p in server.credentials["eventHubsConnectionString"].split(";") if p)
    parts["SharedAccessKeyName"] = device_policy["SharedAccessKeyName"]
    parts["SharedAccessKey"] = device_policy["SharedAccessKey"]
    text = ";".join(f"{k}={v}" for k, v in parts.items())
    with pytest.raises(Exception, match="(?i)ServiceConnect|unauthorized|401"):
        with consumer(server, text) as client:
            client.get_eventhub_properties()
