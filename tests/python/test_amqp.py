"""The hub's AMQP listener against azure-iot-hub 2.7.0's IoTHubRegistryManager.send_c2d_message,
which speaks AMQP through uamqp (SASL ANONYMOUS, a SAS token put on $cbs, then the
/messages/devicebound link), delivered to an azure-iot-device client connected over MQTT."""

import base64
import os
import queue
import secrets
import uuid

import pytest
from azure.iot.device import IoTHubDeviceClient
from azure.iot.hub import IoTHubRegistryManager


def new_key():
    return base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture(scope="module")
def registry(server):
    os.environ["REQUESTS_CA_BUNDLE"] = server.credentials["caBundlePath"]
    return IoTHubRegistryManager.from_connection_string(server.credentials["hubConnectionString"])


@pytest.fixture(scope="module")
def amqp_registry(server):
    """The same credential with the host name alone: the SDK dials AMQP at {HostName}:5671 and
    would take a port in HostName (ours carries the HTTPS port) for the AMQP one. uamqp finds
    the CA through OpenSSL's SSL_CERT_FILE."""
    os.environ["SSL_CERT_FILE"] = server.credentials["caBundlePath"]
    parts = dict(p.split("=", 1) for p in server.credentials["hubConnectionString"].split(";"))
    cs = f"HostName={server.ip};SharedAccessKeyName={parts['SharedAccessKeyName']};SharedAccessKey={parts['SharedAccessKey']}"
    return IoTHubRegistryManager.from_connection_string(cs)


def test_send_c2d_message_reaches_an_mqtt_device(server, registry, amqp_registry):
    device_id = f"amqp-{uuid.uuid4().hex[:8]}"
    key = new_key()
    registry.create_device_with_sas(device_id, key, new_key(), "enabled")
    client = IoTHubDeviceClient.create_from_connection_string(
        f"HostName={server.ip};DeviceId={device_id};SharedAccessKey={key}",
        server_verification_cert=open(server.credentials["caBundlePath"]).read(),
        connection_retry_interval=1,
    )
    received = queue.Queue()
    client.on_message_received = received.put
    client.connect()
    try:
        amqp_registry.send_c2d_message(
            device_id,
            '{"hello": "over amqp"}',
            properties={"contentType": "application/json", "correlationId": "corr-py", "color": "teal"},
        )
        message = received.get(timeout=20)
        assert message.data == b'{"hello": "over amqp"}'
        assert message.correlation_id == "corr-py"
        assert message.content_type == "application/json"
        assert message.custom_properties["color"] == "teal"
    finally:
        client.shutdown()


def test_send_to_an_unknown_device_fails(server, amqp_registry):
    with pytest.raises(Exception, match="C2D message send failure"):
        amqp_registry.send_c2d_message(f"nobody-{uuid.uuid4().hex[:8]}", "x")


def test_malformed_amqp_input_leaves_the_hub_serving(server, amqp_registry):
    """Garbage at every stage (no TLS, TLS then nonsense, each protocol header then random or
    oversized frames, a connection dropped mid-frame) is closed; the process stays up and the
    next real client is served."""
    import random
    import socket
    import ssl
    import struct

    import requests

    rng = random.Random(16)
    context = ssl.create_default_context(cafile=server.credentials["caBundlePath"])
    context.check_hostname = False

    def exchange(payload, tls=True):
        with socket.create_connection((server.ip, 5671), timeout=5) as raw:
            sock = context.wrap_socket(raw, server_hostname=server.ip) if tls else raw
            try:
                sock.sendall(payload)
                sock.settimeout(2)
                while sock.recv(4096):
                    pass
            except (OSError, ssl.SSLError):
                pass  # closed on us: what we want

    sasl, plain = b"AMQP\x03\x01\x00\x00", b"AMQP\x00\x01\x00\x00"
    cases = [
        (b"\x16\x03\x01\x00\x05hello", False),  # not TLS
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"AMQP\x09\x09\x09\x09", True),
        (plain + struct.pack(">IBBH", 0xFFFFFFFF, 2, 0, 0), True),  # a 4 GiB frame
        (plain + struct.pack(">IBBH", 8, 2, 0, 0), True),  # an empty frame, then EOF
        (sasl + struct.pack(">IBBH", 12, 2, 1, 0) + b"\x00\x53\x41\x45", True),  # bad SASL init
        (plain + struct.pack(">IBBH", 40, 2, 0, 0) + b"\x00\x53\x10", True),  # open, cut short
    ]
    for _ in range(40):
        header = rng.choice([sasl, plain])
        cases.append((header + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))), True))
    for payload, tls in cases:
        exchange(payload, tls)

    assert server.process.poll() is None, "the server exited"
    assert "panicked" not in server.log_path.read_text(errors="replace")
    r = requests.get(f"https://{server.ip}:{server.https_port}/healthz", verify=server.credentials["caBundlePath"], timeout=5)
    assert r.status_code == 200
    with pytest.raises(Exception, match="C2D message send failure"):
        amqp_registry.send_c2d_message(f"after-{uuid.uuid4().hex[:8]}", "x")
