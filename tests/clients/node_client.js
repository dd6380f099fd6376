#!/usr/bin/env node
// cachefront client compatibility check for ioredis (Node.js).
//
//     node tests/clients/node_client.js <port>
//
// Talks to a cachefront on 127.0.0.1:<port> through ioredis's own API only: plain commands,
// a 100+ command pipeline, MULTI/EXEC, pub/sub and cachefront's own commands through
// `call`. ioredis speaks RESP2 only (it has no RESP3 / HELLO 3 mode), so there is no RESP3
// check here. Prints one line per check ("ok ..." / "FAIL ...") and exits 1 if any check
// failed (2 on bad usage, 3 if ioredis is not installed). Run by tests/clients.rs.
"use strict";

const path = require("path");

const EMP_1 = "Alice Johnson";
const SQL = "SELECT id, name FROM employees ORDER BY id LIMIT 2";
const SQL_JSON = '[{"id": 1, "name": "Alice Johnson"}, {"id": 2, "name": "Bob Smith"}]';

let Redis;
try {
  Redis = require("ioredis");
} catch (e) {
  console.error(
    `FAIL ioredis is not installed (${e.message.split("\n")[0]}); run scripts/deps.sh ` +
      `(it runs npm ci --prefix ${path.relative(process.cwd(), __dirname) || "."})`,
  );
  process.exit(3);
}
const version = require("ioredis/package.json").version;
const label = `ioredis ${version}`;

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error("usage: node_client.js <port>");
  process.exit(2);
}

const failures = [];

function same(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

// Runs one check; fn resolves to [got, expected].
async function check(name, fn) {
  let got, expected;
  try {
    [got, expected] = await fn();
  } catch (e) {
    console.log(`FAIL [${label}] ${name}: threw ${e && e.stack ? e.stack.split("\n")[0] : e}`);
    failures.push(name);
    return;
  }
  if (same(got, expected)) {
    console.log(`ok   [${label}] ${name}`);
  } else if (Array.isArray(got) && Array.isArray(expected) && got.length === expected.length) {
    const i = got.findIndex((g, j) => !same(g, expected[j]));
    console.log(
      `FAIL [${label}] ${name}: reply #${i} (of ${got.length}): ` +
        `expected ${JSON.stringify(expected[i])}, got ${JSON.stringify(got[i])}`,
    );
    failures.push(name);
  } else {
    console.log(
      `FAIL [${label}] ${name}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(got)}`,
    );
    failures.push(name);
  }
}

// [needle, needle] if promise rejects with a Redis error reply containing needle.
async function expectError(promise, needle) {
  try {
    const got = await promise;
    return [`no error, reply ${JSON.stringify(got)}`, needle];
  } catch (e) {
    if (e.name !== "ReplyError") return [`${e.name}: ${e.message}`, needle];
    // An aborted transaction carries the errors of the commands MULTI refused to queue.
    const msg = [e.message, ...(e.previousErrors || []).map((p) => p.message)].join(" / ");
    return [msg.includes(needle) ? needle : `error ${JSON.stringify(msg)}`, needle];
  }
}

function connect() {
  return new Redis({
    host: "127.0.0.1",
    port,
    maxRetriesPerRequest: 1,
    connectTimeout: 5000,
    commandTimeout: 10000,
    retryStrategy: () => null, // fail, don't reconnect forever
  });
}

async function main() {
  const r = connect();
  const pub = connect();
  const k = "cf:ioredis";
  await r.del(`${k}:s`, `${k}:h`, `${k}:n`); // reruns against one server start clean

  // --- plain commands ---------------------------------------------------------------
  await check("ping", async () => [await r.ping(), "PONG"]);
  await check("SET", async () => [await r.set(`${k}:s`, "v1"), "OK"]);
  await check("GET", async () => [await r.get(`${k}:s`), "v1"]);
  await check("GET missing", async () => [await r.get(`${k}:nope`), null]);
  await check("HSET", async () => [await r.hset(`${k}:h`, { a: "1", b: "2" }), 2]);
  await check("HGETALL", async () => [await r.hgetall(`${k}:h`), { a: "1", b: "2" }]);
  await check("INCR", async () => [await r.incr(`${k}:n`), 1]);
  await check("INCR again", async () => [await r.incr(`${k}:n`), 2]);
  await check("DEL", async () => [await r.del(`${k}:s`, `${k}:h`, `${k}:n`), 3]);
  await check("GET after DEL", async () => [await r.get(`${k}:s`), null]);

  // --- cachefront's own commands via the generic command API --------------------------
  await check("EMP.GET 1", async () => [await r.call("EMP.GET", 1), EMP_1]);
  await check("EMP.GET 999", async () => [await r.call("EMP.GET", 999), null]);
  await check("EMP.GET abc", () => expectError(r.call("EMP.GET", "abc"), "invalid employee id"));
  await check("SQL.CACHED", async () => [await r.call("SQL.CACHED", SQL), SQL_JSON]);

  // --- pipeline of 100+ commands, cachefront commands mixed in ------------------------
  await check("pipeline of 204 commands", async () => {
    const p = r.pipeline();
    for (let i = 0; i < 100; i++) p.set(`${k}:p:${i}`, i);
    p.call("EMP.GET", 1);
    for (let i = 0; i < 100; i++) p.get(`${k}:p:${i}`);
    p.call("SQL.CACHED", SQL);
    p.call("EMP.GET", 999);
    p.incr(`${k}:p:99`);
    const res = await p.exec();
    const errs = res.filter(([err]) => err).map(([err]) => err.message);
    const got = errs.length ? { errors: errs } : res.map(([, v]) => v);
    const expected = [
      ...Array(100).fill("OK"),
      EMP_1,
      ...Array.from({ length: 100 }, (_, i) => String(i)),
      SQL_JSON,
      null,
      100,
    ];
    return [got, expected];
  });

  // --- MULTI/EXEC ---------------------------------------------------------------------
  await check("MULTI/EXEC", async () => {
    await r.del(`${k}:tx`, `${k}:txn`);
    const res = await r
      .multi()
      .set(`${k}:tx`, "a")
      .append(`${k}:tx`, "bc")
      .get(`${k}:tx`)
      .incr(`${k}:txn`)
      .incrby(`${k}:txn`, 41)
      .exec();
    return [res, [[null, "OK"], [null, 3], [null, "abc"], [null, 1], [null, 42]]];
  });
  // The spec: cachefront's own commands inside MULTI are refused with a clear error.
  await check("EMP.GET inside MULTI refused", () =>
    expectError(r.multi().set(`${k}:tx2`, "x").call("EMP.GET", 1).exec(), "not allowed inside MULTI"),
  );

  // --- pub/sub ------------------------------------------------------------------------
  await check("pub/sub", async () => {
    const sub = connect();
    const chan = `${k}:chan`;
    const received = new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error("no message within 5 s")), 5000);
      sub.on("message", (channel, message) => {
        clearTimeout(t);
        resolve([channel, message]);
      });
    });
    const count = await sub.subscribe(chan);
    const receivers = await pub.publish(chan, "hello");
    const msg = await received;
    await sub.unsubscribe(chan);
    sub.disconnect();
    return [[count, receivers, ...msg], [1, 1, chan, "hello"]];
  });

  // The connection is still in order after all of the above.
  await check("EMP.GET 1 at the end", async () => [await r.call("EMP.GET", 1), EMP_1]);
  console.log(`-    [${label}] RESP3: not supported by ioredis (RESP2 only), not checked`);

  r.disconnect();
  pub.disconnect();
  if (failures.length) {
    console.error(`${label}: ${failures.length} check(s) failed: ${failures.join(", ")}`);
    process.exit(1);
  }
  console.log(`${label}: all checks passed`);
}

main().catch((e) => {
  console.error(`FAIL [${label}] unexpected error: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
