// The client in Node 20 (no global WebSocket: the `ws` package, a devDependency used by tests
// only) against a real relay: JSON and binary. Skipped when the relay binary is not built.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { WebSocket } from "ws";
import { RelayClient } from "../dist/relay.js";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const BIN = process.env.RELAY_BIN || path.join(root, "target/debug/relay");
const skip = existsSync(BIN) ? false : `relay binary not built (${BIN})`;

let relay;
let addr;
before(async () => {
  if (skip) return;
  relay = spawn(BIN, ["serve", "--listen", "127.0.0.1:0", "--shards", "1"], { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, RUST_LOG: "warn" } });
  addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("relay did not start within 10 s")), 10_000);
    let buf = "";
    relay.stdout.on("data", (d) => {
      const m = /listening on http:\/\/(\S+)/.exec((buf += d));
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
  });
});
after(() => relay?.kill("SIGTERM"));

for (const protocol of ["json", "binary"]) {
  test(`node + ws: subscribe, publish, receive, resume (${protocol})`, { skip, timeout: 15_000 }, async () => {
    const c = new RelayClient({ url: `http://${addr}`, WebSocket, protocol, backoff: { baseMs: 50, capMs: 200 } });
    try {
      const got = [];
      c.on("message", (m) => got.push(m));
      const channel = `node:${protocol}`;
      const sub = await c.subscribe(channel);
      assert.equal(sub.seq, 0);
      assert.equal((await c.publish(channel, { n: 1 })).seq, 1);
      const r = await fetch(`http://${addr}/api/publish`, { method: "POST", body: JSON.stringify({ channel, data: [2] }) });
      assert.equal(r.status, 200);
      while (got.length < 2) await c.once("message", 5000);
      // A binary client's publication reaches binary subscribers as the bytes it sent (here
      // the JSON text); JSON publications (the HTTP API) arrive as JSON values.
      const first = protocol === "binary" ? new TextEncoder().encode('{"n":1}') : { n: 1 };
      assert.deepEqual(got.map((m) => [m.seq, m.data]), [[1, first], [2, [2]]]);
      // Away, publish, back: the missed message is replayed.
      c.close();
      await fetch(`http://${addr}/api/publish`, { method: "POST", body: JSON.stringify({ channel, data: "missed" }) });
      const resumed = c.once("subscribed", 5000);
      c.connect();
      const s = await resumed;
      assert.ok(s.resumed && s.recovered, JSON.stringify(s));
      while (got.length < 3) await c.once("message", 5000);
      assert.deepEqual(got[2], { channel, seq: 3, data: "missed" });
    } finally {
      c.close();
    }
  });
}
