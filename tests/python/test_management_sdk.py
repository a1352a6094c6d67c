"""The real `azure-iot-deviceprovisioning` service client, given only the owner connection
string, manages enrollments and enrollment groups on Zerotouch."""

import uuid

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.iot.deviceprovisioning import DeviceProvisioningClient


@pytest.fixture(scope="module")
def client(server):
    creds = server.credentials
    assert creds["idScope"].startswith("0ne") and len(creds["idScope"]) == 11
    assert f"HostName={server.ip}:{server.https_port};" in creds["dpsConnectionString"]
    return DeviceProvisioningClient.from_connection_string(
        creds["dpsConnectionString"], connection_verify=creds["caBundlePath"]
    )


def test_individual_enrollment_create_read_query_update_delete(client):
    rid = f"py-dev-{uuid.uuid4().hex[:8]}"
    created = client.enrollment.create_or_update(
        id=rid,
        enrollment={
            "registrationId": rid,
            "attestation": {"type": "symmetricKey"},
            "initialTwin": {"tags": {"line": "3"}, "properties": {"desired": {"rate": 5}}},
        },
    )
    assert created["registrationId"] == rid
    assert created["attestation"]["symmetricKey"]["primaryKey"]
    assert created["provisioningStatus"] == "enabled"
    etag = created["etag"]

    with pytest.raises(ResourceExistsError):
        client.enrollment.create_or_update(id=rid, enrollment={"attestation": {"type": "symmetricKey"}})

    got = client.enrollment.get(id=rid)
    assert got["etag"] == etag
    assert "symmetricKey" not in got["attestation"]
    keys = client.enrollment.get_attestation_mechanism(id=rid)
    assert keys["symmetricKey"]["primaryKey"] == created["attestation"]["symmetricKey"]["primaryKey"]

    ids = [e["registrationId"] for e in client.enrollment.query(query_specification={"query": "*"}, top=1)]
    assert rid in ids

    got["provisioningStatus"] = "disabled"
    updated = client.enrollment.create_or_update(id=rid, enrollment=got, if_match=etag)
    assert updated["provisioningStatus"] == "disabled"
    assert updated["etag"] != etag

    with pytest.raises(HttpResponseError) as stale:
        client.enrollment.create_or_update(id=rid, enrollment=got, if_match=etag)
    assert stale.value.status_code == 412

    with pytest.raises(HttpResponseError) as stale_delete:
        client.enrollment.delete(id=rid, if_match=etag)
    assert stale_delete.value.status_code == 412
    client.enrollment.delete(id=rid, if_match=updated["etag"])
    with pytest.raises(ResourceNotFoundError):
        client.enrollment.get(id=rid)


def test_enrollment_group_create_read_query_update_delete(client):
    gid = f"py-group-{uuid.uuid4().hex[:8]}"
    created = client.enrollment_group.create_or_update(
        id=gid, enrollment_group={"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}}
    )
    assert created["enrollmentGroupId"] == gid
    etag = created["etag"]

    got = client.enrollment_group.get(id=gid)
    assert got["etag"] == etag
    groups = [g["enrollmentGroupId"] for g in client.enrollment_group.query(query_specification={"query": "*"})]
    assert gid in groups

    got["reprovisionPolicy"] = {"updateHubAssignment": True, "migrateDeviceData": False}
    updated = client.enrollment_group.create_or_update(id=gid, enrollment_group=got, if_match=etag)
    assert updated["reprovisionPolicy"]["migrateDeviceData"] is False
    # The keys were kept through the read-modify-write.
    mechanism = client.enrollment_group.get_attestation_mechanism(id=gid)
    assert mechanism["symmetricKey"]["primaryKey"] == created["attestation"]["symmetricKey"]["primaryKey"]

    assert list(client.device_registration_state.query(id=gid)) == []

    client.enrollment_group.delete(id=gid, if_match=updated["etag"])
    with pytest.raises(ResourceNotFoundError):
        client.enrollment_group.get(id=gid)


def test_bulk_operation(client):
    ids = [f"py-bulk-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    result = client.enrollment.run_bulk_operation(
        bulk_operation={
            "mode": "create",
            "enrollments": [{"registrationId": i, "attestation": {"type": "symmetricKey"}} for i in ids],
        }
    )
    assert result["isSuccessful"] is True
    result = client.enrollment.run_bulk_operation(
        bulk_operation={"mode": "delete", "enrollments": [{"registrationId": i} for i in ids]}
    )
    assert result["isSuccessful"] is True


def test_bad_input_is_a_400_with_an_error_code(client):
    with pytest.raises(HttpResponseError) as bad:
        client.enrollment.create_or_update(
            id="py-bad",
            enrollment={"attestation": {"type": "tpm", "tpm": {"endorsementKey": "bm90IGEgVFBN"}}},
        )
    assert bad.value.status_code == 400
    assert bad.value.response.json()["errorCode"] == 400006
