'use strict';
// azure-iot-device 1.18 against the Zerotouch hub: over MQTT (telemetry with properties, twin,
// desired patches, direct methods, C2D), over HTTP (telemetry, batches, C2D receive with
// complete, reject and abandon) and over AMQP (telemetry, C2D), with the service side through azure-iothub 1.16 where it
// works over HTTPS (registry, twins, methods) and the hub's own C2D send endpoint (IoT Hub's
// is AMQP).

const assert = require('node:assert');
const { test } = require('node:test');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { Http } = require('azure-iot-device-http');
const { Amqp: AmqpDevice } = require('azure-iot-device-amqp');
const { Registry, Client: ServiceClient } = require('azure-iothub');

const crypto = require('node:crypto');
const { eachBackend, uniqueId, sleep, eventually, request, sasToken, selfSigned } = require('./harness');

async function createDevice(server, prefix) {
  const registry = Registry.fromConnectionString(server.hubConnectionString);
  const deviceId = uniqueId(prefix);
  const device = (await registry.create({ deviceId })).responseBody;
  return { registry, deviceId, key: device.authentication.symmetricKey.primaryKey };
}

async function deviceClient(server, { deviceId, key }, transport) {
  const client = Client.fromConnectionString(`HostName=${server.ip};DeviceId=${deviceId};SharedAccessKey=${key}`, transport);
  // The device clients take the CA as an option (a PEM string or a file name). The HTTP
  // transport answers setOptions only when a receive policy is among the options.
  const options = transport === Http ? { ca: server.ca, http: { receivePolicy: { interval: 1 } } } : { ca: server.ca };
  await client.setOptions(options);
  return client;
}

/** The service's C2D send (our HTTPS endpoint: IoT Hub's is AMQP). */
async function sendC2d(server, deviceId, body, headers = {}) {
  const r = await server.hub('POST', `/devices/${encodeURIComponent(deviceId)}/messages/deviceBound`, { headers, body });
  assert.strictEqual(r.status, 204, r.body);
}

/** A device-side HTTPS call with the device's own SAS token, as the SDKs make it. */
function asDevice(server, { deviceId, key }, method, path) {
  const resource = `${server.ip}/devices/${deviceId}`;
  return request(method, `https://${server.ip}${path}${path.includes('?') ? '&' : '?'}api-version=2021-04-12`, {
    headers: { Authorization: sasToken(resource, key) },
  });
}

eachBackend('device over MQTT', (server) => {
  test('telemetry with properties', { timeout: 60000 }, async () => {
    const device = await createDevice(server(), 'node-mqtt-tel');
    const client = await deviceClient(server(), device, Mqtt);
    await client.open();
    try {
      const message = new Message(JSON.stringify({ t: 21.5 }));
      message.messageId = 'tel-1';
      message.contentType = 'application/json';
      message.contentEncoding = 'utf-8';
      message.properties.add('level', 'high');
      await client.sendEvent(message);
    } finally {
      await client.close();
    }
    const [stored] = await server().storedMessages(device.deviceId);
    assert.deepStrictEqual(JSON.parse(Buffer.from(stored.body, 'base64')), { t: 21.5 });
    assert.strictEqual(stored.properties.level, 'high');
    assert.strictEqual(stored.systemProperties['message-id'], 'tel-1');
  });

  test('twin: reported patch, desired patch, direct method', { timeout: 60000 }, async () => {
    const device = await createDevice(server(), 'node-mqtt-twin');
    const client = await deviceClient(server(), device, Mqtt);
    await client.open();
    try {
      const twin = await client.getTwin();
      await new Promise((resolve, reject) => twin.properties.reported.update({ fw: '1.2.3' }, (e) => (e ? reject(e) : resolve())));
      const serviceTwin = (await device.registry.getTwin(device.deviceId)).responseBody;
      assert.strictEqual(serviceTwin.properties.reported.fw, '1.2.3');

      const desired = [];
      twin.on('properties.desired', (delta) => desired.push(delta));
      await device.registry.updateTwin(device.deviceId, { properties: { desired: { rate: 7 } } }, serviceTwin.etag);
      await eventually(() => desired.some((d) => d.rate === 7), 15000, 'the desired patch');

      client.onDeviceMethod('reboot', (req, res) => {
        res.send(200, { rebooting: true, delay: req.payload.delay }, () => {});
      });
      const service = ServiceClient.fromConnectionString(server().hubConnectionString);
      const answer = (await service.invokeDeviceMethod(device.deviceId, {
        methodName: 'reboot', payload: { delay: 3 }, responseTimeoutInSeconds: 15,
      })).result;
      assert.strictEqual(answer.status, 200);
      assert.deepStrictEqual(answer.payload, { rebooting: true, delay: 3 });
    } finally {
      await client.close();
    }
  });

  test('C2D with properties, completed by the PUBACK', { timeout: 60000 }, async () => {
    const device = await createDevice(server(), 'node-mqtt-c2d');
    const client = await deviceClient(server(), device, Mqtt);
    const received = [];
    client.on('message', (msg) => {
      received.push(msg);
      client.complete(msg, () => {});
    });
    await client.open();
    try {
      await sleep(500); // the subscription
      await sendC2d(server(), device.deviceId, 'hello mqtt', {
        'iothub-messageid': 'c2d-1', 'iothub-correlationid': 'corr-1', 'iothub-app-color': 'red',
      });
      await eventually(() => received.length > 0, 15000, 'the C2D message');
      const [msg] = received;
      assert.strictEqual(msg.getData().toString(), 'hello mqtt');
      assert.strictEqual(msg.messageId, 'c2d-1');
      assert.strictEqual(msg.correlationId, 'corr-1');
      assert.strictEqual(msg.properties.getValue('color'), 'red');
      await eventually(async () => (await device.registry.get(device.deviceId)).responseBody.cloudToDeviceMessageCount === 0,
        15000, 'the completed message to leave the queue');
    } finally {
      await client.close();
    }
  });

  test('one queue for MQTT and HTTPS: a message locked over HTTPS waits, abandoned it goes to MQTT', { timeout: 60000 }, async () => {
    const device = await createDevice(server(), 'node-shared');
    await sendC2d(server(), device.deviceId, 'shared');
    const locked = await asDevice(server(), device, 'GET', `/devices/${device.deviceId}/messages/devicebound`);
    assert.strictEqual(locked.status, 200, locked.body);
    assert.strictEqual(locked.headers['iothub-deliverycount'], '1');
    const client = await deviceClient(server(), device, Mqtt);
    const received = [];
    client.on('message', (msg) => {
      received.push(msg);
      client.complete(msg, () => {});
    });
    await client.open();
    try {
      await sleep(1500);
      assert.strictEqual(received.length, 0, 'a locked message is invisible to MQTT');
      const lockToken = locked.headers.etag.replace(/"/g, '');
      const abandoned = await asDevice(server(), device, 'POST', `/devices/${device.deviceId}/messages/devicebound/${lockToken}/abandon`);
      assert.strictEqual(abandoned.status, 204, abandoned.body);
      await eventually(() => received.length > 0, 15000, 'the abandoned message over MQTT');
      assert.strictEqual(received[0].getData().toString(), 'shared');
      await sleep(500);
      const empty = await asDevice(server(), device, 'GET', `/devices/${device.deviceId}/messages/devicebound`);
      assert.strictEqual(empty.status, 204, 'completed over MQTT, gone for HTTPS too');
    } finally {
      await client.close();
    }
  });
});

eachBackend('device over HTTP', (server) => {
  test('telemetry with properties, and a batch', { timeout: 60000 }, async () => {
    const device = await createDevice(server(), 'node-http-tel');
    const client = await deviceClient(server(), device, Http);
    await client.open();
    try {
      const single = new Message('single');
      single.messageId = 'h-1';
      single.properties.add('level', 'low');
      await client.sendEvent(single);
      const batch = ['first of batch', 'second of batch'].map((text, i) => {
        const m = new Message(text);
        m.properties.add('index', String(i));
        return m;
      });
      await client.sendEventBatch(batch);
    } finally {
      await client.close();
    }
    const stored = await server().storedMessages(device.deviceId, 3);
    const bodies = stored.map((m) => Buffer.from(m.body, 'base64').toString());
    // The batch bodies are the messages, not their base64 text.
    assert.deepStrictEqual(bodies, ['single', 'first of batch', 'second of batch']);
    assert.strictEqual(stored[0].properties.level, 'low');
    assert.strictEqual(stored[0].systemProperties['message-id'], 'h-1');
    assert.strictEqual(stored[1].properties.index, '0');
    assert.strictEqual(stored[2].properties.index, '1');
  });

  test('C2D: receive by polling, complete, reject, abandon', { timeout: 60000 }, async () => {
    const device = await createDevice(server(), 'node-http-c2d');
    for (const text of ['complete me', 'reject me', 'abandon me once']) {
      await sendC2d(server(), device.deviceId, text, { 'iothub-app-kind': text.split(' ')[0] });
    }
    const client = await deviceClient(server(), device, Http);
    const seen = [];
    const settled = [];
    const errors = [];
    const settle = (how, msg) => client[how](msg, (err) => (err ? errors.push(err) : settled.push(`${how}:${msg.getData()}`)));
    client.on('message', (msg) => {
      const text = msg.getData().toString();
      seen.push({ text, kind: msg.properties.getValue('iothub-app-kind'), messageId: msg.messageId });
      if (text === 'complete me') settle('complete', msg);
      else if (text === 'reject me') settle('reject', msg);
      else if (seen.filter((s) => s.text === text).length === 1) settle('abandon', msg);
      else settle('complete', msg);
    });
    client.on('error', (err) => errors.push(err));
    await client.open();
    try {
      await eventually(() => settled.length >= 4 || errors.length > 0, 30000, 'four settlements');
      assert.deepStrictEqual(errors, []);
      assert.deepStrictEqual(settled.sort(), [
        'abandon:abandon me once', 'complete:abandon me once', 'complete:complete me', 'reject:reject me',
      ]);
      assert.strictEqual(seen.find((s) => s.text === 'complete me').kind, 'complete');
      assert.ok(seen.every((s) => s.messageId), JSON.stringify(seen));
    } finally {
      await client.close();
    }
    const empty = await asDevice(server(), device, 'GET', `/devices/${device.deviceId}/messages/deviceBound`);
    assert.strictEqual(empty.status, 204, empty.body);
    assert.strictEqual((await device.registry.get(device.deviceId)).responseBody.cloudToDeviceMessageCount, 0);
  });
});

eachBackend('device over AMQP', (server) => {
  test('telemetry with properties, and C2D from the service client completed by the device', { timeout: 60000 }, async () => {
    const device = await createDevice(server(), 'node-amqp-dev');
    const client = await deviceClient(server(), device, AmqpDevice);
    const received = [];
    client.on('message', (msg) => {
      received.push(msg);
      client.complete(msg, () => {});
    });
    await client.open();
    const service = ServiceClient.fromConnectionString(server().hubConnectionString);
    try {
      const message = new Message(JSON.stringify({ t: 3 }));
      message.messageId = 'amqp-tel-1';
      message.contentType = 'application/json';
      message.properties.add('level', 'mid');
      await client.sendEvent(message); // resolves once the hub accepted it: stored
      const [stored] = await server().storedMessages(device.deviceId);
      assert.deepStrictEqual(JSON.parse(Buffer.from(stored.body, 'base64')), { t: 3 });
      assert.strictEqual(stored.properties.level, 'mid');
      assert.strictEqual(stored.systemProperties['message-id'], 'amqp-tel-1');
      assert.strictEqual(stored.systemProperties['content-type'], 'application/json');

      await service.open();
      const down = new Message('down over amqp');
      down.messageId = 'amqp-c2d-1';
      down.properties.add('color', 'blue');
      await service.send(device.deviceId, down);
      await eventually(() => received.length > 0, 15000, 'the C2D message');
      assert.strictEqual(received[0].data.toString(), 'down over amqp');
      assert.strictEqual(received[0].messageId, 'amqp-c2d-1');
      assert.strictEqual(received[0].properties.getValue('color'), 'blue');
      // Completed: the queue is empty.
      await eventually(async () => {
        const r = await asDevice(server(), device, 'GET', `/devices/${device.deviceId}/messages/deviceBound`);
        return r.status === 204;
      }, 10000, 'the completed message gone from the queue');
    } finally {
      await service.close();
      await client.close();
    }
    // The closed connection's C2D link no longer takes messages: the next one waits untouched.
    await sendC2d(server(), device.deviceId, 'after close');
    await sleep(1500);
    const waiting = await asDevice(server(), device, 'GET', `/devices/${device.deviceId}/messages/deviceBound`);
    assert.strictEqual(waiting.status, 200, waiting.body);
    assert.strictEqual(waiting.body, 'after close');
    assert.strictEqual(waiting.headers['iothub-deliverycount'], '1');
  });

  test('twin: GET, reported patch, desired patches pushed to the device; a direct method', { timeout: 60000 }, async () => {
    const device = await createDevice(server(), 'node-amqp-twin');
    const client = await deviceClient(server(), device, AmqpDevice);
    await client.open();
    try {
      const twin = await client.getTwin();
      await new Promise((resolve, reject) => twin.properties.reported.update({ fw: '2.0.1', nested: { a: 1 } }, (e) => (e ? reject(e) : resolve())));
      const serviceTwin = (await device.registry.getTwin(device.deviceId)).responseBody;
      assert.strictEqual(serviceTwin.properties.reported.fw, '2.0.1');
      assert.deepStrictEqual(serviceTwin.properties.reported.nested, { a: 1 });

      const desired = [];
      twin.on('properties.desired', (delta) => desired.push(delta));
      await eventually(() => desired.length > 0, 15000, 'the desired section after subscribing');
      await device.registry.updateTwin(device.deviceId, { properties: { desired: { rate: 9 } } }, serviceTwin.etag);
      await eventually(() => desired.some((d) => d.rate === 9), 15000, 'the desired patch');
      assert.strictEqual(twin.properties.desired.rate, 9);
      // Read back through the device's own GET.
      const again = await client.getTwin();
      assert.strictEqual(again.properties.reported.fw, '2.0.1');

      client.onDeviceMethod('blink', (req, res) => {
        res.send(201, { blinked: req.payload.times }, () => {});
      });
      await sleep(500); // the method links
      const service = ServiceClient.fromConnectionString(server().hubConnectionString);
      const answer = (await service.invokeDeviceMethod(device.deviceId, {
        methodName: 'blink', payload: { times: 4 }, responseTimeoutInSeconds: 15,
      })).result;
      assert.strictEqual(answer.status, 201);
      assert.deepStrictEqual(answer.payload, { blinked: 4 });
    } finally {
      await client.close();
    }
  });

  test('an X.509 device (self-signed) sends telemetry and reads its twin; another certificate is refused', { timeout: 60000 }, async () => {
    const registry = Registry.fromConnectionString(server().hubConnectionString);
    const deviceId = uniqueId('node-amqp-x509');
    const identity = selfSigned(deviceId);
    const thumbprint = new crypto.X509Certificate(identity.cert).fingerprint.replace(/:/g, '');
    await registry.create({ deviceId, authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: thumbprint } } });
    const client = Client.fromConnectionString(`HostName=${server().ip};DeviceId=${deviceId};x509=true`, AmqpDevice);
    await client.setOptions({ ca: server().ca, cert: identity.cert, key: identity.key });
    await client.open();
    try {
      await client.sendEvent(new Message('x509 over amqp'));
      const [stored] = await server().storedMessages(deviceId);
      assert.strictEqual(Buffer.from(stored.body, 'base64').toString(), 'x509 over amqp');
      const twin = await client.getTwin();
      assert.ok(twin.properties.reported);
    } finally {
      await client.close();
    }

    const stranger = selfSigned(deviceId);
    const impostor = Client.fromConnectionString(`HostName=${server().ip};DeviceId=${deviceId};x509=true`, AmqpDevice);
    await impostor.setOptions({ ca: server().ca, cert: stranger.cert, key: stranger.key });
    try {
      await assert.rejects(async () => {
        await impostor.open();
        await impostor.sendEvent(new Message('not mine'));
      });
    } finally {
      await impostor.close().catch(() => {});
    }
    assert.strictEqual((await server().storedMessages(deviceId)).length, 1);
  });

  test('a wrong key is refused at open', { timeout: 60000 }, async () => {
    const device = await createDevice(server(), 'node-amqp-bad');
    const wrong = { ...device, key: Buffer.alloc(32, 7).toString('base64') };
    const client = await deviceClient(server(), wrong, AmqpDevice);
    await assert.rejects(client.open(), (err) => /Unauthorized|401|refused/i.test(`${err.name} ${err.message}`));
  });
});
