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
from azure.iot.device.common.evented_callback import EventedCallback

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


def register_or_shut_down(client):
    """`client.register()`; a client whose registration failed is shut down. The SDK keeps a
    refused client connected for a retry, and reconnects it whenever its session is taken over,
    so a lingering one fights the next attempt of the same registration id for its client id."""
    try:
        return client.register()
    except Exception:
        done = EventedCallback()
        client._pipeline.shutdown(callback=done)  # the SDK has no public shutdown here
        done.wait_for_completion()
        raise


def register_symmetric(server, registration_id, key):
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=server.ip, registration_id=registration_id,
        id_scope=server.credentials["idScope"], symmetric_key=key, server_verification_cert=ca(server),
    )
    started = time.monotonic()
    result = register_or_shut_down(client)
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


# --- X.509 enrollment group through an intermediate, CA proof of possession (issue 4) ---

import subprocess  # noqa: E402

def dps_request(server, method, path, body=None, headers=None):
    """A management call that returns the response as is (for If-Match flows and refusals)."""
    parts = dict(p.split("=", 1) for p in server.credentials["dpsConnectionString"].split(";"))
    all_headers = {"Authorization": sas_token(parts["HostName"], parts["SharedAccessKey"], parts["SharedAccessKeyName"])}
    all_headers.update(headers or {})
    return requests.request(
        method, f"https://{parts['HostName']}{path}?api-version=2021-10-01", json=body,
        headers=all_headers, verify=server.credentials["caBundlePath"], timeout=30,
    )


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca_chain(tmp_path, registration_id):
    """Root CA, an intermediate signed by it (CA:TRUE, keyCertSign) and a device leaf with
    CN = registration id signed by the intermediate. Returns paths."""
    ext = tmp_path / "ext.cnf"
    ext.write_text(
        "[root]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\n"
        "[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        "[leaf]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    root, root_key = tmp_path / "root.pem", tmp_path / "root.key"
    root_csr = tmp_path / "root.csr"
    openssl("req", "-new", *ec, "-keyout", str(root_key), "-out", str(root_csr), "-subj", "/CN=Python Fleet Root")
    openssl("x509", "-req", "-in", str(root_csr), "-signkey", str(root_key), "-out", str(root), "-days", "7",
            "-extfile", str(ext), "-extensions", "root")

    def signed(name, cn, issuer, issuer_key, section):
        key, csr, cert = (tmp_path / f"{name}.key", tmp_path / f"{name}.csr", tmp_path / f"{name}.pem")
        openssl("req", "-new", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
        openssl("x509", "-req", "-in", str(csr), "-CA", str(issuer), "-CAkey", str(issuer_key),
                "-CAcreateserial", "-out", str(cert), "-days", "7", "-extfile", str(ext), "-extensions", section)
        return cert, key

    intermediate, intermediate_key = signed("intermediate", "Python Fleet Intermediate", root, root_key, "ca")
    leaf, leaf_key = signed("leaf", registration_id, intermediate, intermediate_key, "leaf")
    # What the device loads: its leaf followed by the intermediate.
    chain = tmp_path / "device-chain.pem"
    chain.write_text(leaf.read_text() + intermediate.read_text())
    return {"root": root, "root_key": root_key, "intermediate": intermediate, "chain": chain,
            "key": leaf_key, "ext": ext}


def register_x509(server, registration_id, x509):
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=server.ip, registration_id=registration_id,
        id_scope=server.credentials["idScope"], x509=x509, server_verification_cert=ca(server),
    )
    return register_or_shut_down(client)


def test_x509_group_through_intermediate_after_proof_of_possession(server, tmp_path):
    registration_id = f"x5g-{uuid.uuid4().hex[:8]}"
    pki = make_ca_chain(tmp_path, registration_id)
    # openssl agrees the device chain is a client chain to the root.
    verified = subprocess.run(
        ["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(pki["root"]),
         "-untrusted", str(pki["intermediate"]), str(pki["chain"])],
        capture_output=True, text=True)
    assert verified.stdout.strip().endswith("OK"), verified.stdout + verified.stderr

    ca_name = f"py-root-{uuid.uuid4().hex[:6]}"
    r = dps_request(server, "PUT", f"/certificates/{ca_name}", {"certificate": pki["root"].read_text()})
    assert r.status_code == 200, r.text
    assert r.json()["properties"]["isVerified"] is False
    etag = r.json()["etag"]
    group_id = f"x5grp-{uuid.uuid4().hex[:6]}"
    dps_call(server, "PUT", f"/enrollmentGroups/{group_id}", {
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": ca_name}}}})

    x509 = X509(str(pki["chain"]), str(pki["key"]))
    # The CA has not proved possession: the device is refused, and nothing is recorded.
    with pytest.raises((ClientError, CredentialError)):
        register_x509(server, registration_id, x509)
    assert dps_request(server, "GET", f"/registrations/{registration_id}").status_code == 404

    # Proof of possession: a certificate with CN = the code, signed by the root's key.
    r = dps_request(server, "POST", f"/certificates/{ca_name}/generateVerificationCode", headers={"If-Match": etag})
    assert r.status_code == 200, r.text
    code, etag = r.json()["properties"]["verificationCode"], r.json()["etag"]
    proof_key, proof_csr, proof = tmp_path / "proof.key", tmp_path / "proof.csr", tmp_path / "proof.pem"
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(proof_key), "-out", str(proof_csr), "-subj", f"/CN={code}")
    openssl("x509", "-req", "-in", str(proof_csr), "-CA", str(pki["root"]), "-CAkey", str(pki["root_key"]),
            "-CAcreateserial", "-out", str(proof), "-days", "1")
    r = dps_request(server, "POST", f"/certificates/{ca_name}/verify", {"certificate": proof.read_text()},
                    headers={"If-Match": etag})
    assert r.status_code == 200, r.text
    assert r.json()["properties"]["isVerified"] is True

    result = register_x509(server, registration_id, x509)
    assert result.status == "assigned"
    assert result.registration_state.device_id == registration_id
    record = dps_call(server, "GET", f"/registrations/{registration_id}")
    assert record["status"] == "assigned"
    assert record["x509"]["enrollmentGroupId"] == group_id
    assert record["x509"]["signingCertificateInfo"]["subjectName"] == "CN=Python Fleet Root"
    # The hub accepts the same leaf + intermediate for a certificateAuthority device.
    connect_and_send(server, result, x509=x509)


def test_polling_path_when_assignment_is_not_immediate(tmp_path):
    """With the fast path off, register answers 202 `assigning` and the SDK polls (it waits a
    fixed 2 s first): the same device still ends up assigned."""
    import os
    from conftest import Server
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROTOUCH__")}
    env["ZEROTOUCH__DPS__FAST_PATH_MS"] = "0"
    server = Server(tmp_path / "data", env)
    try:
        server.wait_ready()
        registration_id = f"poll-{uuid.uuid4().hex[:8]}"
        enrollment = dps_call(server, "PUT", f"/enrollments/{registration_id}", {"attestation": {"type": "symmetricKey"}})
        key = enrollment["attestation"]["symmetricKey"]["primaryKey"]
        result, seconds = register_symmetric(server, registration_id, key)
        print(f"time to assigned (MQTT, polling path): {seconds * 1000:.0f} ms")
        assert result.status == "assigned"
        assert seconds >= 2.0, "the SDK waits 2 s before its first poll"
        connect_and_send(server, result, key=key)
    finally:
        server.stop()
