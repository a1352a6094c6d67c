'use strict';
// The hub's AMQP listener (port 5671) against azure-iothub 1.16's Client, which speaks AMQP
// (rhea) as it does to IoT Hub: anonymous connection, a SAS token put on $cbs, then
// cloud-to-device messages on /messages/devicebound, delivered here to a device connected
// over MQTT with azure-iot-device-mqtt.

const assert = require('node:assert');
const { test } = require('node:test');
const { Client: ServiceClient, Registry } = require('azure-iothub');
const { Message } = require('azure-iot-common');
const { Client: DeviceClient } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

const { eachBackend, request, sasToken, uniqueId, sleep, eventually } = require('./harness');

async function mqttDevice(server, prefix) {
  const registry = Registry.fromConnectionString(server.hubConnectionString);
  const deviceId = uniqueId(prefix);
  const device = (await registry.create({ deviceId })).responseBody;
  const key = device.authentication.symmetricKey.primaryKey;
  const client = DeviceClient.fromConnectionString(`HostName=${server.ip};DeviceId=${deviceId};SharedAccessKey=${key}`, Mqtt);
  await client.setOptions({ ca: server.ca });
  return { registry, deviceId, client };
}

eachBackend('azure-iothub over AMQP', (server) => {
  test('Client.send() delivers a C2D message with its properties to an MQTT device', { timeout: 60000 }, async () => {
    const device = await mqttDevice(server(), 'node-amqp-c2d');
    const received = [];
    device.client.on('message', (msg) => {
      received.push(msg);
      device.client.complete(msg, () => {});
    });
    await device.client.open();
    const service = ServiceClient.fromConnectionString(server().hubConnectionString);
    try {
      await service.open();
      await sleep(300); // the device's subscription
      const message = new Message('hello over amqp');
      message.messageId = 'amqp-c2d-1';
      message.correlationId = 'corr-amqp';
      message.ack = 'full';
      message.properties.add('color', 'green');
      await service.send(device.deviceId, message);
      await eventually(() => received.length > 0, 15000, 'the C2D message');
      const [got] = received;
      assert.strictEqual(got.getData().toString(), 'hello over amqp');
      assert.strictEqual(got.messageId, 'amqp-c2d-1');
      assert.strictEqual(got.correlationId, 'corr-amqp');
      assert.strictEqual(got.properties.getValue('color'), 'green');
    } finally {
      await service.close();
      await device.client.close();
    }
  });

  test('getFeedbackReceiver() gets Success for a completed message and Rejected for a rejected one', { timeout: 60000 }, async () => {
    const device = await mqttDevice(server(), 'node-amqp-fb');
    const service = ServiceClient.fromConnectionString(server().hubConnectionString);
    const records = [];
    try {
      await service.open();
      const receiver = (await service.getFeedbackReceiver()).result;
      receiver.on('message', (msg) => {
        assert.strictEqual(msg.contentType, 'application/vnd.microsoft.iothub.feedback.json');
        records.push(...JSON.parse(msg.getData().toString()));
        receiver.complete(msg, () => {});
      });
      // Completed over MQTT (the PUBACK): Success.
      device.client.on('message', (msg) => device.client.complete(msg, () => {}));
      await device.client.open();
      await sleep(300);
      const ok = new Message('feedback, please');
      ok.messageId = uniqueId('fb-ok');
      ok.ack = 'full';
      await service.send(device.deviceId, ok);
      await eventually(() => records.some((r) => r.originalMessageId === ok.messageId), 20000, 'the Success record');
      const success = records.find((r) => r.originalMessageId === ok.messageId);
      assert.strictEqual(success.statusCode, 'Success');
      assert.strictEqual(success.deviceId, device.deviceId);
      assert.ok(success.deviceGenerationId, JSON.stringify(success));
      assert.ok(!Number.isNaN(Date.parse(success.enqueuedTimeUtc)), success.enqueuedTimeUtc);
      await device.client.close();

      // Over HTTPS the device rejects one (Rejected) and completes another whose negative ack
      // asks for failures only (no record).
      const bad = new Message('reject me');
      bad.messageId = uniqueId('fb-rejected');
      bad.ack = 'negative';
      await service.send(device.deviceId, bad);
      const quiet = new Message('no record for this one');
      quiet.messageId = uniqueId('fb-quiet');
      quiet.ack = 'negative';
      await service.send(device.deviceId, quiet);
      const key = (await device.registry.get(device.deviceId)).responseBody.authentication.symmetricKey.primaryKey;
      const asDevice = (method, path) => request(method, `https://${server().ip}${path}${path.includes('?') ? '&' : '?'}api-version=2021-04-12`, {
        headers: { Authorization: sasToken(`${server().ip}/devices/${device.deviceId}`, key) },
      });
      for (let i = 0; i < 2; i++) {
        const r = await asDevice('GET', `/devices/${device.deviceId}/messages/deviceBound`);
        assert.strictEqual(r.status, 200, r.body);
        const lock = r.headers.etag.replace(/"/g, '');
        await asDevice('DELETE', `/devices/${device.deviceId}/messages/deviceBound/${lock}${i === 0 ? '?reject' : ''}`);
      }
      await eventually(() => records.some((r) => r.originalMessageId === bad.messageId), 20000, 'the Rejected record');
      assert.strictEqual(records.find((r) => r.originalMessageId === bad.messageId).statusCode, 'Rejected');
      await sleep(1500);
      assert.ok(!records.some((r) => r.originalMessageId === quiet.messageId), 'a completed message with a negative ack leaves no record');
    } finally {
      await service.close();
    }
  });

  test('a message to an unknown device is refused with DeviceNotFoundError', { timeout: 60000 }, async () => {
    const service = ServiceClient.fromConnectionString(server().hubConnectionString);
    try {
      await service.open();
      await assert.rejects(service.send(uniqueId('nobody'), 'x'), (err) => {
        assert.strictEqual(err.constructor.name, 'DeviceNotFoundError', `${err.constructor.name}: ${err.message}`);
        return true;
      });
    } finally {
      await service.close();
    }
  });

  test('a wrong key is refused at $cbs', { timeout: 60000 }, async () => {
    const wrong = server().hubConnectionString.replace(/SharedAccessKey=[^;]+/, 'SharedAccessKey=d3Jvbmcga2V5IGZvciB0aGUgaHVi');
    const service = ServiceClient.fromConnectionString(wrong);
    await assert.rejects(service.open(), (err) => {
      // The SDK wraps the $cbs answer (status 401 and our description) in its own error.
      const cause = err.amqpError;
      assert.strictEqual(cause && cause.constructor.name, 'UnauthorizedError', `${err}: ${cause}`);
      assert.match(cause.message, /signature does not verify/);
      return true;
    });
  });
});
