"""Revocation seen through the unmodified azure-iot-device 2.14.0 SDK (issue 7).

A device gets a certificate from our CA over EST, registers with it through an enrollment group
on our own intermediate (ProvisioningDeviceClient) and connects to the hub (IoTHubDeviceClient).
Revoking the certificate through the management API disconnects the live client, and both a new
registration and a new hub connection are refused."""

import base64
import subprocess
import time
import uuid

import pytest
import requests
from azure.iot.device import IoTHubDeviceClient, Message, X509
from azure.iot.device.exceptions import ClientError, CredentialError

from test_hub_sdk import stored_messages
from test_provisioning_sdk import ca, dps_call, dps_request, register_symmetric, register_x509


def openssl(*args, **kwargs):
    return subprocess.run(["openssl", *args], check=True, capture_output=True, **kwargs)


def est_enroll(server, tmp_path, registration_id, device_key):
    """A new P-256 key and a certificate for it from EST simpleenroll, authenticated with HTTP
    Basic `registrationId:deviceKey`. Returns (chain path: leaf + intermediate, key path, leaf PEM)."""
    key, csr = tmp_path / "device.key", tmp_path / "device.csr"
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-outform", "DER", "-subj", f"/CN={registration_id}")
    r = requests.post(
        f"https://{server.ip}:{server.https_port}/.well-known/est/simpleenroll",
        data=base64.b64encode(csr.read_bytes()),
        headers={"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"},
        auth=(registration_id, device_key), verify=server.credentials["caBundlePath"], timeout=30,
    )
    assert r.status_code == 200, r.text
    pkcs7 = tmp_path / "issued.p7"
    pkcs7.write_bytes(base64.b64decode(r.content))
    leaf = openssl("pkcs7", "-inform", "DER", "-in", str(pkcs7), "-print_certs", text=True).stdout
    leaf = "".join(line + "\n" for line in leaf.splitlines() if not line.startswith(("subject=", "issuer=")) and line)
    intermediate = (server.data_dir / "ca" / "intermediate.pem").read_text()
    chain = tmp_path / "device-chain.pem"
    chain.write_text(leaf.strip() + "\n" + intermediate)
    return chain, key, leaf


def serial_of(pem_path):
    out = openssl("x509", "-in", str(pem_path), "-noout", "-serial", text=True).stdout
    return out.strip().split("=", 1)[1]


def wait_until(predicate, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_revoked_certificate_is_dropped_and_refused(server, tmp_path):
    registration_id = f"rev-{uuid.uuid4().hex[:8]}"
    # A symmetric-key device registers, then asks EST for a certificate from our CA.
    enrollment = dps_call(server, "PUT", f"/enrollments/{registration_id}", {"attestation": {"type": "symmetricKey"}})
    device_key = enrollment["attestation"]["symmetricKey"]["primaryKey"]
    result, _ = register_symmetric(server, registration_id, device_key)
    assert result.status == "assigned"
    chain, key, _ = est_enroll(server, tmp_path, registration_id, device_key)
    serial = serial_of(chain)
    verified = subprocess.run(
        ["openssl", "verify", "-purpose", "sslclient", "-CAfile", server.credentials["caBundlePath"], str(chain)],
        capture_output=True, text=True)
    assert verified.stdout.strip().endswith("OK"), verified.stdout + verified.stderr

    # An X.509 enrollment group on our own intermediate admits it.
    ca_name = f"own-{uuid.uuid4().hex[:6]}"
    intermediate = (server.data_dir / "ca" / "intermediate.pem").read_text()
    r = dps_request(server, "PUT", f"/certificates/{ca_name}", {"certificate": intermediate, "isVerified": True})
    assert r.status_code == 200, r.text
    dps_call(server, "PUT", f"/enrollmentGroups/grp-{ca_name}", {
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": ca_name}}}})

    x509 = X509(str(chain), str(key))
    result = register_x509(server, registration_id, x509)
    assert result.status == "assigned"
    assert result.registration_state.device_id == registration_id
    record = dps_call(server, "GET", f"/registrations/{registration_id}")
    assert record["x509"]["enrollmentGroupId"] == f"grp-{ca_name}"

    # The device connects to the hub with the certificate and sends telemetry.
    states = []
    device = IoTHubDeviceClient.create_from_x509_certificate(
        x509=x509, hostname=result.registration_state.assigned_hub, device_id=registration_id,
        server_verification_cert=ca(server), connection_retry_interval=1,
    )

    def on_connection_state_change():
        states.append(device.connected)

    device.on_connection_state_change = on_connection_state_change
    device.connect()
    try:
        assert device.connected
        device.send_message(Message("before revocation"))
        stored = stored_messages(server, registration_id)
        assert base64.b64decode(stored[0]["body"]) == b"before revocation"

        # Revoke.
        revoked = dps_call(server, "POST", f"/certificates/issued/{serial}/revoke", {"reason": "keyCompromise"})
        assert revoked["status"] == "revoked" and revoked["reason"] == "keyCompromise"

        # The live connection is closed, and the SDK's automatic reconnects are refused: it
        # stays disconnected.
        assert wait_until(lambda: not device.connected), "the revoked device stayed connected"
        assert wait_until(lambda: False in states), states
        time.sleep(3)
        assert not device.connected, "a reconnect with a revoked certificate was accepted"
    finally:
        device.shutdown()

    # A new registration is refused: DPS answers 401 CertificateRevoked on
    # $dps/registrations/res/401/…, which the SDK raises as a ClientError ("Unexpected
    # failure") caused by a ServiceError naming the 401.
    with pytest.raises(ClientError) as refused:
        register_x509(server, registration_id, x509)
    cause = refused.value.__cause__
    print(f"register after revocation: {refused.value!r} caused by {cause!r}")
    assert "401" in str(cause), repr(cause)

    # A new hub connection is refused (CONNACK 5, not authorized).
    fresh = IoTHubDeviceClient.create_from_x509_certificate(
        x509=x509, hostname=server.ip, device_id=registration_id, server_verification_cert=ca(server),
        connection_retry=False,
    )
    try:
        with pytest.raises(CredentialError):
            fresh.connect()
        assert not fresh.connected
    finally:
        fresh.shutdown()

    # The registration itself is untouched; the certificate is recorded as revoked.
    issued = dps_request(server, "GET", f"/certificates/issued/{serial}")
    assert issued.status_code == 200, issued.text
    assert issued.json()["status"] == "revoked"
