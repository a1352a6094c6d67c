"""The unmodified azure-iot-device 2.14.0 ProvisioningDeviceClient registers against Zerotouch
over MQTT, then connects to the assigned hub with IoTHubDeviceClient."""

import base64
import hashlib
import hmac
import time
import uuid

import pytest
import requests
from azure.iot.device import IoTHubDeviceClient, Message, ProvisioningDeviceClient, X509
from azure.iot.device.exceptions import ClientError, CredentialError

from test_hub_sdk import make_self_signed, sas_token, stored_messages


def dps_call(server, method, path, body=None):
    parts = dict(p.split("=", 1) for p in server.credentials["dpsConnectionString"].split(";"))
    r = requests.request(
        method, f"https://{parts['HostName']}{path}?api-version=2021-10-01", json=body,
        headers={"Authorization": sas_token(parts["HostName"], parts["SharedAccessKey"], parts["SharedAccessKeyName"])},
        verify=server.credentials["caBundlePath"], timeout=30,
    )
    assert r.status_code in (200, 204), r.text
    return r.json() if r.content else None


def ca(server):
    return open(server.credentials["caBundlePath"]).read()


def register_symmetric(server, registration_id, key):
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=server.ip, registration_id=registration_id,
        id_scope=server.credentials["idScope"], symmetric_key=key, server_verification_cert=ca(server),
    )
    started = time.monotonic()
    result = client.register()
    return result, time.monotonic() - started


def connect_and_send(server, result, **credentials):
    state = result.registration_state
    assert state.assigned_hub == server.ip
    if "key" in credentials:
        device = IoTHubDeviceClient.create_from_symmetric_key(
            symmetric_key=credentials["key"], hostname=state.assigned_hub, device_id=state.device_id,
            server_verification_cert=ca(server),
        )
    else:
        device = IoTHubDeviceClient.create_from_x509_certificate(
            x509=credentials["x509"], hostname=state.assigned_hub, device_id=state.device_id,
            server_verification_cert=ca(server),
        )
    device.connect()
    try:
        device.send_message(Message(f"hello from {state.device_id}"))
    finally:
        device.shutdown()
    stored = stored_messages(server, state.device_id)
    assert base64.b64decode(stored[0]["body"]).decode() == f"hello from {state.device_id}"


def test_symmetric_key_individual(server):
    registration_id = f"sk-{uuid.uuid4().hex[:8]}"
    enrollment = dps_call(server, "PUT", f"/enrollments/{registration_id}", {
        "attestation": {"type": "symmetricKey"},
        "initialTwin": {"tags": {"line": "7"}, "properties": {"desired": {"rate": 3}}},
    })
    key = enrollment["attestation"]["symmetricKey"]["primaryKey"]
    result, seconds = register_symmetric(server, registration_id, key)
    print(f"time to assigned (MQTT fast path): {seconds * 1000:.0f} ms")
    assert result.status == "assigned"
    assert result.registration_state.device_id == registration_id
    assert result.registration_state.sub_status == "initialAssignment"
    connect_and_send(server, result, key=key)
    record = dps_call(server, "GET", f"/registrations/{registration_id}")
    assert record["assignedHub"] == server.ip and record["status"] == "assigned"
    # The enrollment's initial twin was applied on the hub.
    device = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=key, hostname=server.ip, device_id=registration_id, server_verification_cert=ca(server))
    device.connect()
    try:
        assert device.get_twin()["desired"]["rate"] == 3
    finally:
        device.shutdown()


def test_symmetric_key_group_with_derived_key(server):
    group_id = f"grp-{uuid.uuid4().hex[:8]}"
    group = dps_call(server, "PUT", f"/enrollmentGroups/{group_id}", {"attestation": {"type": "symmetricKey"}})
    group_key = group["attestation"]["symmetricKey"]["primaryKey"]
    registration_id = f"member-{uuid.uuid4().hex[:8]}"
    derived = base64.b64encode(
        hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256).digest()).decode()
    result, _ = register_symmetric(server, registration_id, derived)
    assert result.status == "assigned"
    connect_and_send(server, result, key=derived)
    members = dps_call(server, "POST", f"/registrations/{group_id}/query")
    assert [m["registrationId"] for m in members] == [registration_id]


def test_x509_individual_self_signed(server, tmp_path):
    registration_id = f"x5-{uuid.uuid4().hex[:8]}"
    cert, key, _ = make_self_signed(tmp_path, registration_id)
    dps_call(server, "PUT", f"/enrollments/{registration_id}", {
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": cert.read_text()}}}},
    })
    x509 = X509(str(cert), str(key))
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=server.ip, registration_id=registration_id,
        id_scope=server.credentials["idScope"], x509=x509, server_verification_cert=ca(server),
    )
    result = client.register()
    assert result.status == "assigned"
    connect_and_send(server, result, x509=x509)


def test_refusals(server):
    registration_id = f"off-{uuid.uuid4().hex[:8]}"
    enrollment = dps_call(server, "PUT", f"/enrollments/{registration_id}", {
        "attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"})
    key = enrollment["attestation"]["symmetricKey"]["primaryKey"]
    with pytest.raises(ClientError):
        register_symmetric(server, registration_id, key)
    with pytest.raises(CredentialError):
        register_symmetric(server, f"nobody-{uuid.uuid4().hex[:6]}", key)
    # Nothing was recorded for either.
    parts = dict(p.split("=", 1) for p in server.credentials["dpsConnectionString"].split(";"))
    r = requests.get(
        f"https://{parts['HostName']}/registrations/{registration_id}?api-version=2021-10-01",
        headers={"Authorization": sas_token(parts["HostName"], parts["SharedAccessKey"], parts["SharedAccessKeyName"])},
        verify=server.credentials["caBundlePath"], timeout=30)
    assert r.status_code == 404
