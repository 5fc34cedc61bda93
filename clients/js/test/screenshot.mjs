// Takes docs/demo.png: the demo (relay serve --demo) open in two browser tabs side by side,
// with a third visitor, each moving its mouse. Not part of CI (it rewrites a committed file):
//
//   cargo build && node clients/js/test/screenshot.mjs [OUT.png]
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../../..");
const out = path.resolve(process.argv[2] || path.join(root, "docs/demo.png"));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const deadline = setTimeout(() => {
  console.error("screenshot: timed out");
  process.exit(1);
}, 60_000);

const relay = spawn(process.env.RELAY_BIN || path.join(root, "target/debug/relay"), ["serve", "--listen", "127.0.0.1:0", "--demo"], {
  stdio: ["ignore", "pipe", "inherit"],
});
const addr = await new Promise((resolve, reject) => {
  let buf = "";
  relay.stdout.on("data", (d) => {
    const m = /listening on http:\/\/(\S+)/.exec((buf += d));
    if (m) resolve(m[1]);
  });
  relay.once("exit", () => reject(new Error("relay exited")));
});
const dir = mkdtempSync(path.join(tmpdir(), "relay-shot-"));
const context = await chromium.launchPersistentContext(dir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 760, height: 520 },
  deviceScaleFactor: 1,
  args: ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const open = async (name) => {
    const p = await context.newPage();
    await p.goto(`http://${addr}/?name=${encodeURIComponent(name)}`);
    await p.waitForFunction(() => document.getElementById("status").className === "open", null, { timeout: 10_000 });
    return p;
  };
  const a = await open("Alice");
  const b = await open("Bob");
  const c = await open("Carol");
  await a.waitForFunction(() => document.getElementById("count").textContent === "3", null, { timeout: 10_000 });
  // Each visitor moves to a spot; the others see the cursor arrive.
  const glide = async (p, from, to) => {
    await p.mouse.move(from[0], from[1]);
    await p.mouse.move(to[0], to[1], { steps: 8 });
  };
  await glide(a, [100, 100], [190, 170]);
  await glide(b, [400, 300], [330, 330]);
  await glide(c, [200, 400], [420, 150]);
  await sleep(600);
  const shots = [await a.screenshot(), await b.screenshot()];
  const board = await context.newPage();
  await board.setViewportSize({ width: 760 * 2 + 30, height: 520 + 56 });
  const img = (buf, label) =>
    `<figure><figcaption>${label}</figcaption><img src="data:image/png;base64,${buf.toString("base64")}"></figure>`;
  await board.setContent(`<!doctype html><style>
      body{margin:0;background:#2b303b;display:flex;gap:10px;padding:10px;font:13px system-ui,sans-serif;color:#cfd6e4}
      figure{margin:0} figcaption{padding:0 0 6px 2px} img{display:block;border-radius:6px;box-shadow:0 2px 10px rgba(0,0,0,.4)}
    </style>${img(shots[0], "Tab 1: Alice sees Bob's and Carol's cursors")}${img(shots[1], "Tab 2: Bob sees Alice's and Carol's cursors")}`);
  await board.screenshot({ path: out });
  console.log(`wrote ${out}`);
} finally {
  await context.close();
  rmSync(dir, { recursive: true, force: true });
  relay.kill("SIGTERM");
  clearTimeout(deadline);
}
