"""The unmodified Azure SDKs against the Zerotouch hub: `azure-iot-device` 2.14.0
(IoTHubDeviceClient over MQTT, SAS and X.509) and `azure-iot-hub` 2.7.0 (IoTHubRegistryManager
over HTTPS), plus raw MQTT (paho, as the SDK uses it) for what the SDK cannot be made to do."""

import base64
import hashlib
import hmac
import os
import queue
import socket
import ssl
import subprocess
import time
import urllib.parse
import uuid

import paho.mqtt.client as paho
import pytest
import requests
from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse, X509
from azure.iot.device.exceptions import ClientError, CredentialError, ServiceError
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, QuerySpecification, Twin, TwinProperties
from msrest.exceptions import HttpOperationError


def new_key():
    return base64.b64encode(os.urandom(32)).decode()


def sas_token(resource, key, policy=None, ttl=3600):
    expiry = int(time.time() + ttl)
    sr = urllib.parse.quote(resource, safe="")
    signed = hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    token = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(base64.b64encode(signed).decode(), safe='')}&se={expiry}"
    return token + (f"&skn={policy}" if policy else "")


def owner(server):
    parts = dict(p.split("=", 1) for p in server.credentials["hubConnectionString"].split(";"))
    return parts["HostName"], parts["SharedAccessKey"]


def service(server, method, path, **kwargs):
    host, key = owner(server)
    headers = kwargs.pop("headers", {})
    headers["Authorization"] = sas_token(host, key, "iothubowner")
    url = f"https://{host}{path}"
    return requests.request(method, url, headers=headers, verify=server.credentials["caBundlePath"], timeout=30, **kwargs)


def stored_messages(server, device_id, want=1, wait=10):
    deadline = time.time() + wait
    messages = []
    while time.time() < deadline:
        r = service(server, "GET", f"/messages/events?from=0&limit=1000&deviceId={urllib.parse.quote(device_id)}&wait=2")
        assert r.status_code == 200, r.text
        messages = r.json()["messages"]
        if len(messages) >= want:
            break
    return messages


@pytest.fixture(scope="module")
def registry(server):
    os.environ["REQUESTS_CA_BUNDLE"] = server.credentials["caBundlePath"]
    assert server.credentials["hubHostName"] == server.ip
    return IoTHubRegistryManager.from_connection_string(server.credentials["hubConnectionString"])


def device_client(server, device_id, key):
    ca = open(server.credentials["caBundlePath"]).read()
    cs = f"HostName={server.ip};DeviceId={device_id};SharedAccessKey={key}"
    return IoTHubDeviceClient.create_from_connection_string(
        cs, server_verification_cert=ca, connection_retry_interval=1
    )


def wait_for(q, timeout=15, match=lambda item: True):
    """The first queued item that matches. The SDK also feeds the desired handler on its own
    (after connecting it GETs the twin and hands over the desired section), so skip those."""
    deadline = time.time() + timeout
    while True:
        try:
            item = q.get(timeout=max(0.01, deadline - time.time()))
        except queue.Empty:
            pytest.fail("timed out waiting for the device to receive it")
        if match(item):
            return item


def test_sas_device_full_cycle_and_restart(server, registry):
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    key = new_key()
    created = registry.create_device_with_sas(device_id, key, new_key(), "enabled")
    assert created.device_id == device_id
    assert created.authentication.type == "sas"

    client = device_client(server, device_id, key)
    desired, methods, c2d = queue.Queue(), queue.Queue(), queue.Queue()
    client.on_twin_desired_properties_patch_received = desired.put

    def on_method(request):
        methods.put(request.name)
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, {"echo": request.payload}))

    client.on_method_request_received = on_method
    client.on_message_received = c2d.put
    client.connect()
    try:
        # Telemetry with system and custom properties arrives in the store with them.
        message = Message('{"t": 21}', message_id="m-1", content_encoding="utf-8", content_type="application/json")
        message.custom_properties["alert level"] = "high/1"
        client.send_message(message)
        stored = stored_messages(server, device_id)
        assert len(stored) == 1, stored
        assert base64.b64decode(stored[0]["body"]) == b'{"t": 21}'
        assert stored[0]["systemProperties"]["message-id"] == "m-1"
        assert stored[0]["systemProperties"]["content-type"] == "application/json"
        assert stored[0]["properties"] == {"alert level": "high/1"}

        # Twin: device GET and reported patch, service read and desired patch with etag.
        twin = client.get_twin()
        assert twin["desired"]["$version"] == 1
        client.patch_twin_reported_properties({"temperature": 21.5, "fw": {"version": "1.2"}})
        service_twin = registry.get_twin(device_id)
        assert service_twin.properties.reported["temperature"] == 21.5
        assert service_twin.properties.reported["fw"]["version"] == "1.2"
        updated = registry.update_twin(
            device_id,
            Twin(tags={"site": "plant-7"}, properties=TwinProperties(desired={"rate": 5})),
            service_twin.etag,
        )
        assert updated.tags == {"site": "plant-7"}
        patch = wait_for(desired, match=lambda p: "rate" in p)
        assert patch["rate"] == 5 and patch["$version"] == 2
        with pytest.raises(HttpOperationError) as stale:
            registry.update_twin(device_id, Twin(tags={"x": 1}), service_twin.etag)
        assert stale.value.response.status_code == 412, stale.value.response.text

        # Query by tag.
        result = registry.query_iot_hub(QuerySpecification(query="SELECT * FROM devices WHERE tags.site = 'plant-7'"))
        assert device_id in [t.device_id for t in result.items]

        # Direct method.
        response = registry.invoke_device_method(
            device_id, CloudToDeviceMethod(method_name="reboot", payload={"delay": 1}, response_timeout_in_seconds=10)
        )
        assert response.status == 200
        assert response.payload == {"echo": {"delay": 1}}
        assert wait_for(methods) == "reboot"

        # Cloud-to-device through the HTTPS endpoint (the SDK's own C2D call needs AMQP).
        r = service(
            server, "POST", f"/devices/{device_id}/messages/deviceBound",
            data=b"hello", headers={"iothub-app-color": "red", "iothub-messageid": "c2d-1"},
        )
        assert r.status_code == 204, r.text
        received = wait_for(c2d)
        assert received.data == b"hello"
        assert received.message_id == "c2d-1"
        assert received.custom_properties == {"color": "red"}

        # The server restarts; the device reconnects on its own, never re-subscribes, and still
        # gets desired patches, method calls and C2D.
        server.restart()
        deadline = time.time() + 30
        while registry.get_service_statistics().connected_device_count < 1 and time.time() < deadline:
            time.sleep(0.5)
        assert registry.get_service_statistics().connected_device_count >= 1
        twin = registry.get_twin(device_id)
        registry.update_twin(device_id, Twin(properties=TwinProperties(desired={"rate": 9})), twin.etag)
        patch = wait_for(desired, timeout=30, match=lambda p: p.get("rate") == 9)
        assert patch["$version"] == 3
        response = registry.invoke_device_method(
            device_id, CloudToDeviceMethod(method_name="after-restart", payload=None, response_timeout_in_seconds=10)
        )
        assert response.status == 200
    finally:
        client.shutdown()

    registry.delete_device(device_id)
    with pytest.raises(HttpOperationError) as gone:
        registry.get_device(device_id)
    assert gone.value.response.status_code == 404


def make_self_signed(tmp_path, cn):
    cert, key = tmp_path / f"{cn}.pem", tmp_path / f"{cn}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}"],
        check=True, capture_output=True,
    )
    out = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha1"],
                         check=True, capture_output=True, text=True).stdout
    thumbprint = out.strip().split("=", 1)[1].replace(":", "")
    return cert, key, thumbprint


def test_x509_self_signed_device(server, registry, tmp_path):
    device_id = f"x509-{uuid.uuid4().hex[:8]}"
    cert, key, thumbprint = make_self_signed(tmp_path, device_id)
    registry.create_device_with_x509(device_id, thumbprint, thumbprint, "enabled")
    ca = open(server.credentials["caBundlePath"]).read()
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(cert), str(key)), hostname=server.ip, device_id=device_id, server_verification_cert=ca
    )
    client.connect()
    try:
        client.send_message(Message("x509 hello"))
        assert client.get_twin()["reported"]["$version"] == 1
        stored = stored_messages(server, device_id)
        assert base64.b64decode(stored[0]["body"]) == b"x509 hello"
        assert '"type":"x509"' in stored[0]["systemProperties"]["iothub-connection-auth-method"]
    finally:
        client.shutdown()

    # Another certificate with the same CN does not match the thumbprint.
    (tmp_path / "other").mkdir()
    other_cert, other_key, _ = make_self_signed(tmp_path / "other", device_id)
    impostor = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(other_cert), str(other_key)), hostname=server.ip, device_id=device_id, server_verification_cert=ca
    )
    with pytest.raises((CredentialError, ClientError)):
        impostor.connect()
    impostor.shutdown()


def raw_client(server, client_id, password):
    """paho, configured the way the SDK configures it, for requests the SDK would not send."""
    connack = queue.Queue()
    client = paho.Client(client_id=client_id, clean_session=False, protocol=paho.MQTTv311)
    client.username_pw_set(f"{server.ip}/{client_id}/?api-version=2019-10-01", password)
    context = ssl.create_default_context(cafile=server.credentials["caBundlePath"])
    client.tls_set_context(context)
    client.on_connect = lambda c, u, f, rc: connack.put(rc)
    client.connect(server.ip, 8883, keepalive=30)
    client.loop_start()
    return client, connack


def test_refusals_leave_the_hub_unharmed(server, registry):
    device_id = f"neg-{uuid.uuid4().hex[:8]}"
    other_id = f"other-{uuid.uuid4().hex[:8]}"
    key = new_key()
    registry.create_device_with_sas(device_id, key, new_key(), "enabled")
    registry.create_device_with_sas(other_id, new_key(), new_key(), "enabled")
    resource = f"{server.ip}/devices/{device_id}"

    # Wrong key, through the SDK: CredentialError (CONNACK 5), not retried.
    with pytest.raises(CredentialError):
        wrong = device_client(server, device_id, new_key())
        try:
            wrong.connect()
        finally:
            wrong.shutdown()

    # Expired token: CONNACK 5.
    client, connack = raw_client(server, device_id, sas_token(resource, key, ttl=-120))
    assert connack.get(timeout=10) == 5
    client.loop_stop()

    # A disabled device is refused too.
    disabled_id = f"off-{uuid.uuid4().hex[:8]}"
    disabled_key = new_key()
    registry.create_device_with_sas(disabled_id, disabled_key, new_key(), "disabled")
    with pytest.raises(CredentialError):
        off = device_client(server, disabled_id, disabled_key)
        try:
            off.connect()
        finally:
            off.shutdown()

    # Another device's topics: SUBACK 0x80, and publishing there disconnects; nothing stored.
    client, connack = raw_client(server, device_id, sas_token(resource, key))
    assert connack.get(timeout=10) == 0
    granted = queue.Queue()
    client.on_subscribe = lambda c, u, mid, qos: granted.put(qos)
    client.subscribe(f"devices/{other_id}/messages/devicebound/#", qos=1)
    assert granted.get(timeout=10) == (128,)
    disconnected = queue.Queue()
    client.on_disconnect = lambda c, u, rc: disconnected.put(rc)
    client.publish(f"devices/{other_id}/messages/events/", b"not mine", qos=1)
    disconnected.get(timeout=10)
    client.loop_stop()
    assert stored_messages(server, other_id, want=1, wait=1) == []

    # A malformed property bag disconnects; nothing stored.
    client, connack = raw_client(server, device_id, sas_token(resource, key))
    assert connack.get(timeout=10) == 0
    disconnected = queue.Queue()
    client.on_disconnect = lambda c, u, rc: disconnected.put(rc)
    client.publish(f"devices/{device_id}/messages/events/%ZZ=1", b"bad bag", qos=1)
    disconnected.get(timeout=10)
    client.loop_stop()
    assert stored_messages(server, device_id, want=1, wait=1) == []

    # An oversize reported patch is a 400 on the response topic (the SDK raises), not a disconnect.
    sdk = device_client(server, device_id, key)
    sdk.connect()
    try:
        with pytest.raises(ClientError) as oversize:
            sdk.patch_twin_reported_properties({f"k{i}": "x" * 3000 for i in range(12)})
        # The SDK wraps the hub's answer: a ServiceError for status 400.
        assert isinstance(oversize.value.__cause__, ServiceError)
        assert "400" in str(oversize.value.__cause__)
        sdk.patch_twin_reported_properties({"ok": True})
    finally:
        sdk.shutdown()
    assert registry.get_twin(device_id).properties.reported["ok"] is True

    # Garbage bytes on the MQTT port close that connection; the hub keeps serving.
    raw = socket.create_connection((server.ip, 8883), timeout=10)
    tls = ssl.create_default_context(cafile=server.credentials["caBundlePath"]).wrap_socket(raw, server_hostname=server.ip)
    tls.sendall(b"\x00\xffgarbage\x00" * 64)
    tls.settimeout(10)
    assert tls.recv(1024) == b""
    tls.close()
    client, connack = raw_client(server, device_id, sas_token(resource, key))
    assert connack.get(timeout=10) == 0
    client.disconnect()
    client.loop_stop()
    assert server.process.poll() is None


def test_acknowledged_telemetry_survives_sigkill(server, registry):
    device_id = f"durable-{uuid.uuid4().hex[:8]}"
    key = new_key()
    registry.create_device_with_sas(device_id, key, new_key(), "enabled")
    client, connack = raw_client(server, device_id, sas_token(f"{server.ip}/devices/{device_id}", key))
    assert connack.get(timeout=10) == 0
    acked = set()
    index_of = {}
    client.on_publish = lambda c, u, mid: acked.add(index_of.get(mid))
    for i in range(300):
        info = client.publish(f"devices/{device_id}/messages/events/", f"msg-{i}".encode(), qos=1)
        index_of[info.mid] = i
    deadline = time.time() + 20
    while len(acked) < 150 and time.time() < deadline:
        time.sleep(0.01)
    server.restart(kill=True)
    client.loop_stop()
    snapshot = {i for i in acked if i is not None}
    assert len(snapshot) >= 150, len(snapshot)
    stored = stored_messages(server, device_id, want=len(snapshot))
    bodies = {base64.b64decode(m["body"]).decode() for m in stored}
    missing = [i for i in snapshot if f"msg-{i}" not in bodies]
    assert missing == [], f"acknowledged but lost after SIGKILL: {missing[:10]}"


def make_ca_and_leaf(tmp_path, ca_name, cn):
    ca_key, ca_cert = tmp_path / f"{ca_name}.key", tmp_path / f"{ca_name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "2", "-subj", f"/CN={ca_name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        check=True, capture_output=True,
    )
    key, csr, cert = tmp_path / f"{cn}.key", tmp_path / f"{cn}.csr", tmp_path / f"{cn}.pem"
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-out", str(cert), "-days", "1"], check=True, capture_output=True)
    return ca_cert, cert, key


def test_certificate_authority_device(server, registry, tmp_path):
    device_id = f"ca-{uuid.uuid4().hex[:8]}"
    ca_cert, cert, key = make_ca_and_leaf(tmp_path, f"fleet-{device_id}", device_id)
    # Trust the CA through the provisioning API (auto-verified on upload).
    parts = dict(p.split("=", 1) for p in server.credentials["dpsConnectionString"].split(";"))
    r = requests.put(
        f"https://{parts['HostName']}/certificates/fleet-{device_id}?api-version=2021-10-01",
        json={"certificate": ca_cert.read_text(), "isVerified": True},
        headers={"Authorization": sas_token(parts["HostName"], parts["SharedAccessKey"], parts["SharedAccessKeyName"])},
        verify=server.credentials["caBundlePath"], timeout=30,
    )
    assert r.status_code == 200, r.text
    registry.create_device_with_certificate_authority(device_id, "enabled")
    ca = open(server.credentials["caBundlePath"]).read()
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(cert), str(key)), hostname=server.ip, device_id=device_id, server_verification_cert=ca
    )
    client.connect()
    try:
        client.send_message(Message("signed by the fleet CA"))
        assert base64.b64decode(stored_messages(server, device_id)[0]["body"]) == b"signed by the fleet CA"
    finally:
        client.shutdown()

    # The same CN from a CA nobody uploaded is refused.
    (tmp_path / "rogue").mkdir()
    _, rogue_cert, rogue_key = make_ca_and_leaf(tmp_path / "rogue", f"rogue-{device_id}", device_id)
    rogue = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(rogue_cert), str(rogue_key)), hostname=server.ip, device_id=device_id, server_verification_cert=ca
    )
    with pytest.raises((CredentialError, ClientError)):
        rogue.connect()
    rogue.shutdown()
