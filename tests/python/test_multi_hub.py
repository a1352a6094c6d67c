"""A provisioning service and a hub as separate processes (`--role dps`, `--role hub` joined
with a token). The unmodified Python SDKs provision through a custom allocation webhook, receive
its payload, then connect to the hub they were assigned and exchange telemetry and twin updates."""

import http.server
import json
import os
import queue
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest
from azure.iot.device import IoTHubDeviceClient, Message, ProvisioningDeviceClient
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import Twin, TwinProperties

from conftest import BINARY, Server
from test_hub_sdk import stored_messages, wait_for
from test_provisioning_sdk import dps_call


@pytest.fixture(scope="module")
def cluster():
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: build it with cargo build --bin zerotouch")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROTOUCH__")}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dps").mkdir()
        (Path(tmp) / "hub").mkdir()
        dps_env = {**env, "ZEROTOUCH__SERVICE__ROLE": "dps", "ZEROTOUCH__DPS__WEBHOOK_ALLOW_HTTP": "true"}
        dps = Server(Path(tmp) / "dps" / "data", dps_env)
        hub = None
        try:
            dps.wait_ready()
            token = subprocess.run(
                [str(BINARY), "hub", "join-token", "--ttl", "5m", "--config", str(dps.config),
                 "--data-dir", str(dps.data_dir)],
                check=True, capture_output=True, env=dps_env, text=True,
            ).stdout.strip()
            hub_env = {
                **env,
                "ZEROTOUCH__SERVICE__ROLE": "hub",
                "ZEROTOUCH__HUB__DPS_URL": f"https://{dps.ip}:{dps.https_port}",
                "ZEROTOUCH__HUB__JOIN_TOKEN": token,
            }
            hub = Server(Path(tmp) / "hub" / "data", hub_env)
            hub.wait_ready()
            yield dps, hub
        finally:
            for server in (hub, dps):
                if server is not None:
                    server.stop()


class Webhook(http.server.BaseHTTPRequestHandler):
    """Picks the hub named by the server's `hub` attribute and records what it was sent."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(body)
        answer = json.dumps({
            "iotHubHostName": self.server.hub,
            "initialTwin": {"tags": {"line": "b"}, "properties": {"desired": {"interval": 5}}},
            "payload": {"greeting": "hello", "model": body["deviceRuntimeContext"]["payload"]["model"]},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook(cluster):
    _, hub = cluster
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    server.hub, server.seen = hub.ip, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_webhook_payload_reaches_the_device_which_then_uses_its_hub(cluster, webhook):
    dps, hub = cluster
    registration_id = f"wh-{uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{webhook.server_address[1]}/allocate?code=secret"
    enrollment = dps_call(dps, "PUT", f"/enrollments/{registration_id}", {
        "attestation": {"type": "symmetricKey"},
        "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"},
    })
    key = enrollment["attestation"]["symmetricKey"]["primaryKey"]
    ca = open(dps.credentials["caBundlePath"]).read()

    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=dps.ip, registration_id=registration_id,
        id_scope=dps.credentials["idScope"], symmetric_key=key, server_verification_cert=ca,
    )
    client.provisioning_payload = {"model": "thermo-2"}
    result = client.register()
    assert result.status == "assigned"
    state = result.registration_state
    assert state.assigned_hub == hub.ip != dps.ip
    # The SDK hands the payload over as the JSON text it received.
    assert json.loads(state.response_payload) == {"greeting": "hello", "model": "thermo-2"}
    sent = webhook.seen[0]
    assert sent["linkedHubs"] == [hub.ip]
    assert sent["deviceRuntimeContext"]["registrationId"] == registration_id
    assert key not in json.dumps(sent), "the webhook must not see the device's key"

    # The device talks to the hub process it was assigned; the hub's certificate comes from the
    # provisioning service's CA, which the device already trusts.
    device = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=key, hostname=state.assigned_hub, device_id=state.device_id,
        server_verification_cert=ca,
    )
    desired = queue.Queue()
    device.on_twin_desired_properties_patch_received = desired.put
    device.connect()
    try:
        device.send_message(Message('{"t": 20.5}'))
        stored = stored_messages(hub, state.device_id)
        assert len(stored) == 1, stored

        twin = device.get_twin()
        assert twin["desired"]["interval"] == 5, twin
        device.patch_twin_reported_properties({"temperature": 20.5})

        os.environ["REQUESTS_CA_BUNDLE"] = hub.credentials["caBundlePath"]
        registry = IoTHubRegistryManager.from_connection_string(hub.credentials["hubConnectionString"])
        service_twin = registry.get_twin(state.device_id)
        assert service_twin.tags == {"line": "b"}
        assert service_twin.properties.reported["temperature"] == 20.5
        registry.update_twin(
            state.device_id, Twin(properties=TwinProperties(desired={"interval": 9})), service_twin.etag
        )
        patch = wait_for(desired, match=lambda p: p.get("interval") == 9)
        assert patch["interval"] == 9
    finally:
        device.shutdown()
