// MQTT.js (npm `mqtt` 5) against a running Roost, for tests/test_mqtt_thirdparty.py.
//
//   node tests/mqttjs_interop.mjs <folder holding node_modules/mqtt> <port> <protocolVersion 5|4|3> <user> <password>
//
// Prints one JSON line per check ({"check", "ok", "detail"}) and exits 1 if any
// failed. MQTT.js is installed by the test into a cache folder, never into this
// repository; it is loaded from there (createRequire), so this file needs no
// package.json.
import { createRequire } from 'node:module';
import path from 'node:path';

const [dir, port, versionArg, user, password] = process.argv.slice(2);
const mqtt = createRequire(path.join(path.resolve(dir), 'loader.js'))('mqtt');
const version = Number(versionArg);
const v5 = version === 5;
const base = `js${version}`;
let failed = 0;

function check(name, ok, detail) {
  if (!ok) failed += 1;
  console.log(JSON.stringify({ check: name, ok: Boolean(ok), detail: detail ?? null }));
}

function options(label, extra = {}) {
  const opts = {
    clientId: `${user}.${base}${label}`, // Roost's identity rule: <principal>.<label>
    username: user, password, protocolVersion: version,
    reconnectPeriod: 0, connectTimeout: 5000, clean: true, ...extra,
  };
  if (version === 3) opts.protocolId = 'MQIsdp';
  return opts;
}

// The next message matching `match`, listening from now on (call before publishing).
function nextMessage(client, match, what, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      client.off('message', onMessage);
      reject(new Error(`no ${what} within ${ms} ms`));
    }, ms);
    function onMessage(topic, payload, packet) {
      if (!match(topic, payload, packet)) return;
      clearTimeout(timer);
      client.off('message', onMessage);
      resolve({ topic, payload, packet });
    }
    client.on('message', onMessage);
  });
}

async function main() {
  const url = `mqtt://127.0.0.1:${port}`;
  // v5: topic aliases both ways (ours assigned automatically, the broker's accepted)
  const a = await mqtt.connectAsync(url, options('a', v5 ? { properties: { topicAliasMaximum: 5 }, autoAssignTopicAlias: true } : {}));
  check('connect', a.connected, `protocolVersion ${version}`);
  const responder = await mqtt.connectAsync(url, options('b'));
  try {
    const granted = await a.subscribeAsync(`${base}/#`, { qos: 1 });
    check('subscribe granted QoS 1', granted.length === 1 && granted[0].qos === 1, granted);

    // QoS 1 with properties, received back (twice: the second through topic aliases on v5)
    const props = { userProperties: { k: 'v', room: 'kitchen' }, contentType: 'text/plain',
      messageExpiryInterval: 60, payloadFormatIndicator: true };
    for (const round of [1, 2]) {
      const got = nextMessage(a, (t, p) => t === `${base}/hello` && p.toString() === `hello ${round}`, `hello ${round}`);
      const ack = await a.publishAsync(`${base}/hello`, `hello ${round}`, { qos: 1, ...(v5 ? { properties: props } : {}) });
      check(`publish QoS 1 acked (${round})`, !v5 || (ack?.reasonCode ?? 0) === 0, ack?.reasonCode ?? null);
      const { packet } = await got;
      check(`received QoS 1 (${round})`, packet.qos === 1, packet.qos);
      if (v5) {
        const p = packet.properties ?? {};
        check(`user properties passed through (${round})`, p.userProperties?.k === 'v' && p.userProperties?.room === 'kitchen', p.userProperties);
        // the broker gives the topic an alias (we set Topic Alias Maximum); MQTT.js
        // resolved it, or this message would not have matched its topic
        check(`broker's topic alias (${round})`, Number.isInteger(p.topicAlias), p.topicAlias ?? null);
        check(`content type passed through (${round})`, p.contentType === 'text/plain', p.contentType);
        check(`payload format indicator passed through (${round})`, p.payloadFormatIndicator === true, p.payloadFormatIndicator);
        check(`message expiry: time left sent (${round})`, p.messageExpiryInterval > 0 && p.messageExpiryInterval <= 60, p.messageExpiryInterval);
      } else {
        check(`no properties on v${version} (${round})`, packet.properties === undefined, packet.properties ?? null);
      }
    }

    if (v5) {
      // plain MQTT request/response between two clients: Response Topic + Correlation Data
      await responder.subscribeAsync(`${base}/service`, { qos: 1 });
      responder.on('message', (topic, payload, packet) => {
        const rt = packet.properties?.responseTopic;
        if (topic !== `${base}/service` || !rt) return;
        responder.publish(rt, `re: ${payload}`, { qos: 1, properties: { correlationData: packet.properties.correlationData } });
      });
      const reply = nextMessage(a, (t) => t === `${base}/reply`, 'reply');
      await a.publishAsync(`${base}/service`, 'ping', { qos: 1,
        properties: { responseTopic: `${base}/reply`, correlationData: Buffer.from('corr-7') } });
      const { payload, packet } = await reply;
      check('request/response: reply on the Response Topic', payload.toString() === 're: ping', payload.toString());
      check('request/response: Correlation Data passed through', packet.properties?.correlationData?.toString() === 'corr-7',
        packet.properties?.correlationData?.toString() ?? null);

      // the IM protocol: a request on roost/req/<client id> answered on its Response Topic
      const answer = nextMessage(a, (t) => t === `${base}/im-answers`, 'IM answer');
      const ack = await a.publishAsync(`roost/req/${a.options.clientId}`, JSON.stringify({ id: 'im1', op: 'convs' }),
        { qos: 1, properties: { responseTopic: `${base}/im-answers`, correlationData: Buffer.from('im-1') } });
      check('IM request acked 0x00', (ack?.reasonCode ?? 0) === 0, ack?.reasonCode ?? null);
      const im = await answer;
      const body = JSON.parse(im.payload.toString());
      check('IM answer', body.id === 'im1' && body.ok === true, body);
      check('IM answer carries the Correlation Data', im.packet.properties?.correlationData?.toString() === 'im-1',
        im.packet.properties?.correlationData?.toString() ?? null);

      // a request refused before it runs: PUBACK 0x99, MQTT.js rejects the publish
      try {
        await a.publishAsync(`roost/req/${a.options.clientId}`, 'not json', { qos: 1 });
        check('refused IM request: PUBACK 0x99', false, 'acked 0x00');
      } catch (err) {
        check('refused IM request: PUBACK 0x99', err.code === 0x99, `${err.code} ${err.message}`);
      }
    } else {
      // the IM protocol on a 3.1.x connection: answered on roost/resp/<client id>
      const cid = a.options.clientId;
      await a.subscribeAsync(`roost/resp/${cid}`, { qos: 1 });
      const answer = nextMessage(a, (t) => t === `roost/resp/${cid}`, 'IM answer');
      await a.publishAsync(`roost/req/${cid}`, JSON.stringify({ id: 'im1', op: 'convs' }), { qos: 1 });
      const body = JSON.parse((await answer).payload.toString());
      check('IM answer on roost/resp/', body.id === 'im1' && body.ok === true, body);
    }
  } finally {
    await Promise.all([a.endAsync(), responder.endAsync()]);
  }
}

try {
  await main();
} catch (err) {
  check('script', false, String(err?.stack ?? err));
}
process.exit(failed ? 1 : 0);
