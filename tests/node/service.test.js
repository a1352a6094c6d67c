'use strict';
// The Node service clients against Zerotouch: azure-iot-provisioning-service 1.11
// (ProvisioningServiceClient) on the management API and azure-iothub 1.16 (Registry, twins)
// on the hub service API.

const assert = require('node:assert');
const { test } = require('node:test');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { Registry } = require('azure-iothub');

const { eachBackend, uniqueId } = require('./harness');

eachBackend('azure-iot-provisioning-service', (server) => {
  test('individual enrollment: create, read, keys, query, update, delete', { timeout: 60000 }, async () => {
    const client = ProvisioningServiceClient.fromConnectionString(server().dpsConnectionString);
    const id = uniqueId('node-ind');
    const created = (await client.createOrUpdateIndividualEnrollment({
      registrationId: id,
      attestation: { type: 'symmetricKey' },
      initialTwin: { tags: { line: '3' }, properties: { desired: { rate: 2 } } },
    })).responseBody;
    assert.strictEqual(created.registrationId, id);
    assert.ok(created.etag);
    const read = (await client.getIndividualEnrollment(id)).responseBody;
    assert.strictEqual(read.registrationId, id);
    // GET strips the keys; the attestation mechanism call returns them.
    assert.strictEqual(read.attestation.symmetricKey, undefined);
    const mechanism = (await client.getIndividualEnrollmentAttestationMechanism(id)).responseBody;
    assert.strictEqual(mechanism.type, 'symmetricKey');
    assert.strictEqual(mechanism.symmetricKey.primaryKey, created.attestation.symmetricKey.primaryKey);
    const page = await client.createIndividualEnrollmentQuery({ query: '*' }).next();
    assert.ok(page.responseBody.some((e) => e.registrationId === id));
    read.provisioningStatus = 'disabled';
    const updated = (await client.createOrUpdateIndividualEnrollment(read)).responseBody;
    assert.strictEqual(updated.provisioningStatus, 'disabled');
    assert.notStrictEqual(updated.etag, created.etag);
    await client.deleteIndividualEnrollment(updated);
    await assert.rejects(client.getIndividualEnrollment(id), (err) => err.response.statusCode === 404);
  });

  test('enrollment group: create, read, keys (POST /enrollmentgroups/{id}/attestationmechanism), query, delete', { timeout: 60000 }, async () => {
    const client = ProvisioningServiceClient.fromConnectionString(server().dpsConnectionString);
    const id = uniqueId('node-grp');
    const created = (await client.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: id,
      attestation: { type: 'symmetricKey' },
    })).responseBody;
    assert.strictEqual(created.enrollmentGroupId, id);
    const read = (await client.getEnrollmentGroup(id)).responseBody;
    assert.strictEqual(read.enrollmentGroupId, id);
    // The SDK spells this path in lower case.
    const mechanism = (await client.getEnrollmentGroupAttestationMechanism(id)).responseBody;
    assert.strictEqual(mechanism.symmetricKey.primaryKey, created.attestation.symmetricKey.primaryKey);
    const page = await client.createEnrollmentGroupQuery({ query: '*' }).next();
    assert.ok(page.responseBody.some((g) => g.enrollmentGroupId === id));
    const members = await client.createEnrollmentGroupDeviceRegistrationStateQuery({ query: '*' }, id).next();
    assert.deepStrictEqual(members.responseBody, []);
    await client.deleteEnrollmentGroup(id);
    await assert.rejects(client.getEnrollmentGroup(id), (err) => err.response.statusCode === 404);
  });

  test('bulk operation and a refused enrollment', { timeout: 60000 }, async () => {
    const client = ProvisioningServiceClient.fromConnectionString(server().dpsConnectionString);
    const ids = [uniqueId('node-bulk'), uniqueId('node-bulk')];
    // The SDK's promise form of this call never settles (it answers only a callback).
    const result = await new Promise((resolve, reject) => client.runBulkEnrollmentOperation({
      mode: 'create',
      enrollments: ids.map((registrationId) => ({ registrationId, attestation: { type: 'symmetricKey' } })),
    }, (err, body) => (err ? reject(err) : resolve(body))));
    assert.strictEqual(result.isSuccessful, true, JSON.stringify(result));
    for (const id of ids) assert.strictEqual((await client.getIndividualEnrollment(id)).responseBody.registrationId, id);
    await assert.rejects(
      client.createOrUpdateIndividualEnrollment({ registrationId: 'bad id!', attestation: { type: 'symmetricKey' } }),
      (err) => err.response.statusCode === 400,
    );
  });
});

eachBackend('azure-iothub Registry', (server) => {
  test('devices: create, get, list (GET /devices/), update, delete', { timeout: 60000 }, async () => {
    const registry = Registry.fromConnectionString(server().hubConnectionString);
    const deviceId = uniqueId('node-dev');
    const created = (await registry.create({ deviceId })).responseBody;
    assert.strictEqual(created.deviceId, deviceId);
    assert.ok(created.authentication.symmetricKey.primaryKey);
    const got = (await registry.get(deviceId)).responseBody;
    assert.strictEqual(got.deviceId, deviceId);
    // The SDK asks for `GET /devices/?api-version=…` (trailing slash).
    const listed = (await registry.list()).responseBody;
    assert.ok(listed.some((d) => d.deviceId === deviceId), JSON.stringify(listed));
    got.status = 'disabled';
    const updated = (await registry.update(got)).responseBody;
    assert.strictEqual(updated.status, 'disabled');
    await registry.delete(deviceId);
    await assert.rejects(registry.get(deviceId), (err) => err.responseBody.includes('DeviceNotFound'));
  });

  test('twins: get, tags and desired update, query', { timeout: 60000 }, async () => {
    const registry = Registry.fromConnectionString(server().hubConnectionString);
    const deviceId = uniqueId('node-twin');
    await registry.create({ deviceId });
    const twin = (await registry.getTwin(deviceId)).responseBody;
    assert.strictEqual(twin.deviceId, deviceId);
    const updated = (await registry.updateTwin(deviceId, {
      tags: { site: 'lab' }, properties: { desired: { rate: 5 } },
    }, twin.etag)).responseBody;
    assert.strictEqual(updated.tags.site, 'lab');
    assert.strictEqual(updated.properties.desired.rate, 5);
    // The Twin object API (get, then update through the twin).
    const viaTwin = (await registry.getTwin(deviceId)).responseBody;
    await viaTwin.update({ tags: { site: 'plant' } });
    assert.strictEqual((await registry.getTwin(deviceId)).responseBody.tags.site, 'plant');
    const query = registry.createQuery(`SELECT * FROM devices WHERE tags.site = 'plant' AND deviceId = '${deviceId}'`);
    const page = await query.nextAsTwin();
    assert.deepStrictEqual(page.result.map((t) => t.deviceId), [deviceId]);
    await registry.delete(deviceId);
  });
});
