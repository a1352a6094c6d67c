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

const { eachBackend, uniqueId, sleep, eventually } = require('./harness');

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
