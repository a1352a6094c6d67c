'use strict';
// The hub's Event Hubs-compatible endpoint against @azure/event-hubs 6's EventHubConsumerClient,
// unmodified, with the connection string `zerotouch credentials` prints: telemetry sent by an
// azure-iot-device-mqtt client, read with its properties, from the start and from an offset.

const assert = require('node:assert');
const { test } = require('node:test');
const { EventHubConsumerClient, earliestEventPosition } = require('@azure/event-hubs');
const { Registry } = require('azure-iothub');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

const { eachBackend, uniqueId } = require('./harness');

/// The first `count` events of `deviceId` from `startPosition`.
async function read(server, startPosition, count, deviceId) {
  const client = new EventHubConsumerClient('$Default', server.credentials.eventHubsConnectionString);
  const events = [];
  try {
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`only ${events.length} of ${count} events in 30 s`)), 30000);
      const subscription = client.subscribe({
        processEvents: async (batch) => {
          for (const event of batch) {
            if (event.systemProperties['iothub-connection-device-id'] === deviceId) events.push(event);
          }
          if (events.length >= count) {
            clearTimeout(timer);
            await subscription.close();
            resolve();
          }
        },
        processError: async () => {},
      }, { startPosition, maxWaitTimeInSeconds: 1 });
    });
  } finally {
    await client.close();
  }
  return events;
}

eachBackend('@azure/event-hubs', (server) => {
  test('EventHubConsumerClient reads device telemetry with its properties, from the start and from an offset', { timeout: 90000 }, async () => {
    const registry = Registry.fromConnectionString(server().hubConnectionString);
    const deviceId = uniqueId('node-eh');
    const key = (await registry.create({ deviceId })).responseBody.authentication.symmetricKey.primaryKey;
    const device = DeviceClient.fromConnectionString(`HostName=${server().ip};DeviceId=${deviceId};SharedAccessKey=${key}`, Mqtt);
    await device.setOptions({ ca: server().ca });
    await device.open();
    try {
      for (let n = 0; n < 3; n++) {
        const message = new Message(JSON.stringify({ n }));
        message.messageId = `${deviceId}-${n}`;
        message.contentType = 'application/json';
        message.contentEncoding = 'utf-8';
        message.properties.add('shape', 'round');
        await device.sendEvent(message);
      }
    } finally {
      await device.close();
    }

    const client = new EventHubConsumerClient('$Default', server().credentials.eventHubsConnectionString);
    try {
      assert.deepStrictEqual(await client.getPartitionIds(), ['0']);
      const properties = await client.getEventHubProperties();
      assert.strictEqual(properties.name, 'zerotouch');
    } finally {
      await client.close();
    }

    const events = await read(server(), earliestEventPosition, 3, deviceId);
    const bodies = events.map((e) => (Buffer.isBuffer(e.body) ? JSON.parse(e.body.toString()) : e.body));
    assert.deepStrictEqual(bodies, [{ n: 0 }, { n: 1 }, { n: 2 }]);
    assert.strictEqual(events[0].properties.shape, 'round');
    assert.strictEqual(events[0].messageId, `${deviceId}-0`);
    assert.strictEqual(events[0].contentType, 'application/json');
    assert.ok(events[0].enqueuedTimeUtc instanceof Date);
    assert.ok(events[0].sequenceNumber < events[1].sequenceNumber);

    const resumed = await read(server(), { offset: events[0].offset }, 2, deviceId);
    assert.deepStrictEqual(resumed.map((e) => e.messageId), [`${deviceId}-1`, `${deviceId}-2`]);
  });
});
