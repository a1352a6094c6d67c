'use strict';
// azure-iot-provisioning-device 1.9 over MQTT and HTTP against Zerotouch: symmetric keys
// (individual and group), X.509, then the assigned device connects and sends; and failed
// registrations surface DPS's errorCode, on the fast path and through polling.

const assert = require('node:assert');
const { test } = require('node:test');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt: ProvisioningMqtt } = require('azure-iot-provisioning-device-mqtt');
const { Http: ProvisioningHttp } = require('azure-iot-provisioning-device-http');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { X509Security } = require('azure-iot-security-x509');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

const { eachBackend, uniqueId, selfSigned, deriveKey } = require('./harness');

const TRANSPORTS = { mqtt: () => new ProvisioningMqtt(), http: () => new ProvisioningHttp() };

function registerSymmetric(server, transport, registrationId, key) {
  const client = ProvisioningDeviceClient.create(server.ip, server.idScope, TRANSPORTS[transport](),
    new SymmetricKeySecurityClient(registrationId, key));
  return client.register();
}

function registerX509(server, transport, registrationId, identity) {
  const client = ProvisioningDeviceClient.create(server.ip, server.idScope, TRANSPORTS[transport](),
    new X509Security(registrationId, identity));
  return client.register();
}

/** Connects to the assigned hub over MQTT and sends one message, found in the store after. */
async function connectAndSend(server, state, credentials) {
  assert.strictEqual(state.assignedHub, server.ip);
  const cs = credentials.key
    ? `HostName=${state.assignedHub};DeviceId=${state.deviceId};SharedAccessKey=${credentials.key}`
    : `HostName=${state.assignedHub};DeviceId=${state.deviceId};x509=true`;
  const client = Client.fromConnectionString(cs, Mqtt);
  await client.setOptions({ ca: server.ca, ...(credentials.x509 || {}) });
  await client.open();
  try {
    await client.sendEvent(new Message(`hello from ${state.deviceId}`));
  } finally {
    await client.close();
  }
  const stored = await server.storedMessages(state.deviceId);
  assert.strictEqual(Buffer.from(stored[0].body, 'base64').toString(), `hello from ${state.deviceId}`);
}

for (const transport of Object.keys(TRANSPORTS)) {
  eachBackend(`provisioning over ${transport}`, (server) => {
    test('symmetric key, individual enrollment', { timeout: 60000 }, async () => {
      const registrationId = uniqueId(`node-sk-${transport}`);
      const enrollment = (await server().dps('PUT', `/enrollments/${registrationId}`, {
        attestation: { type: 'symmetricKey' },
        initialTwin: { properties: { desired: { rate: 3 } } },
      })).json;
      const key = enrollment.attestation.symmetricKey.primaryKey;
      const state = await registerSymmetric(server(), transport, registrationId, key);
      assert.strictEqual(state.status, 'assigned');
      assert.strictEqual(state.deviceId, registrationId);
      assert.strictEqual(state.substatus, 'initialAssignment');
      await connectAndSend(server(), state, { key });
      const record = (await server().dps('GET', `/registrations/${registrationId}`)).json;
      assert.strictEqual(record.status, 'assigned');
    });

    test('symmetric key, enrollment group with a derived key', { timeout: 60000 }, async () => {
      const groupId = uniqueId(`node-grp-${transport}`);
      const group = (await server().dps('PUT', `/enrollmentGroups/${groupId}`, { attestation: { type: 'symmetricKey' } })).json;
      const registrationId = uniqueId('member');
      const key = deriveKey(group.attestation.symmetricKey.primaryKey, registrationId);
      const state = await registerSymmetric(server(), transport, registrationId, key);
      assert.strictEqual(state.status, 'assigned');
      await connectAndSend(server(), state, { key });
      const members = (await server().dps('POST', `/registrations/${groupId}/query`)).json;
      assert.deepStrictEqual(members.map((m) => m.registrationId), [registrationId]);
    });

    test('X.509, individual enrollment with a self-signed certificate', { timeout: 60000 }, async () => {
      const registrationId = uniqueId(`node-x5-${transport}`);
      const identity = selfSigned(registrationId);
      const put = await server().dps('PUT', `/enrollments/${registrationId}`, {
        attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: identity.cert } } } },
      });
      assert.strictEqual(put.status, 200, put.body);
      const state = await registerX509(server(), transport, registrationId, identity);
      assert.strictEqual(state.status, 'assigned');
      await connectAndSend(server(), state, { x509: identity });
    });

    test('a failed registration shows its errorCode (answered at once)', { timeout: 60000 }, async () => {
      await failedRegistration(server(), transport);
    });
  });

}

// With `dps.fast_path_ms = 0` an MQTT register always answers `assigning` and the device
// polls: the failure must be kept for the poll. (An HTTPS register waits up to 5 s for the
// outcome, so the SDK gets it at once; the HTTPS poll of a failed operation is tested in
// tests/tests/dps_device_api.rs.)
eachBackend('failed registrations over mqtt, polled', (server) => {
  test('a failed registration shows its errorCode through the operation poll', { timeout: 60000 }, async () => {
    await failedRegistration(server(), 'mqtt');
  });
}, '[dps]\nfast_path_ms = 0\n');

/** An enrollment naming a hub that is not linked fails with 400208 (no hub). */
async function failedRegistration(server, transport) {
  const registrationId = uniqueId(`node-fail-${transport}`);
  const enrollment = (await server.dps('PUT', `/enrollments/${registrationId}`, {
    attestation: { type: 'symmetricKey' },
    iotHubs: ['elsewhere.example.com'],
  })).json;
  const key = enrollment.attestation.symmetricKey.primaryKey;
  await assert.rejects(registerSymmetric(server, transport, registrationId, key), (err) => {
    // The SDK's DeviceRegistrationFailedError names itself so.
    assert.strictEqual(err.name, 'ProvisioningRegistrationFailedError', `${err.name}: ${err.message}`);
    const state = err.result.registrationState;
    assert.strictEqual(err.result.status, 'failed');
    assert.strictEqual(state.status, 'failed');
    assert.strictEqual(state.errorCode, 400208);
    assert.match(state.errorMessage, /no hub/);
    return true;
  });
  // Kept as DPS keeps it: the registration state says why.
  const record = await server.dps('GET', `/registrations/${registrationId}`);
  assert.strictEqual(record.status, 200, record.body);
  assert.strictEqual(record.json.status, 'failed');
  assert.strictEqual(record.json.errorCode, 400208);
  assert.ok(record.json.lastUpdatedDateTimeUtc);
}
