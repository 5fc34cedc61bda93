// The package as npm would publish it: its contents (`npm pack --dry-run`), its manifest, that
// its entry points resolve by name, and that its README documents what the types declare.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const dir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const pkg = JSON.parse(readFileSync(path.join(dir, "package.json"), "utf8"));
const readme = existsSync(path.join(dir, "README.md")) ? readFileSync(path.join(dir, "README.md"), "utf8") : "";
const types = readFileSync(path.join(dir, "dist/relay.d.ts"), "utf8");

test("npm pack holds the module, its types, the README and the manifest: nothing else", () => {
  const r = spawnSync("npm", ["pack", "--dry-run", "--json", "--ignore-scripts"], { cwd: dir, encoding: "utf8", timeout: 60_000 });
  assert.equal(r.status, 0, r.stderr);
  const [packed] = JSON.parse(r.stdout);
  assert.equal(packed.name, pkg.name);
  assert.deepEqual(packed.files.map((f) => f.path).sort(), ["README.md", "dist/relay.d.ts", "dist/relay.js", "package.json"]);
});

test("the manifest is ready to publish", () => {
  assert.match(pkg.name, /^(@[a-z0-9-]+\/)?[a-z0-9-]+$/);
  assert.match(pkg.version, /^\d+\.\d+\.\d+$/);
  assert.ok(pkg.license && pkg.description && pkg.engines?.node, "license, description, engines");
  assert.equal(pkg.type, "module");
  const main = pkg.exports["."];
  for (const file of [main.types, main.import, pkg.types, pkg.main]) assert.ok(existsSync(path.join(dir, file)), file);
  assert.equal(pkg.private, undefined, "not private");
});

test("the package imports by its name (exports map)", async () => {
  const mod = await import(pkg.name);
  assert.equal(typeof mod.RelayClient, "function");
  assert.equal(typeof mod.RelayError, "function");
  assert.equal(mod.default, mod.RelayClient);
});

test("the README documents every state, event, option and method the types declare", () => {
  assert.ok(readme.includes(`npm install ${pkg.name}`), "install line");
  const union = /export type ConnectionState = ([^;]+);/.exec(types)[1];
  for (const state of union.match(/"[a-z]+"/g)) assert.ok(readme.includes(`\`${state.slice(1, -1)}\``), `state ${state}`);
  const block = (name) => new RegExp(`export (?:interface|declare class) ${name}[^{]*\\{([\\s\\S]*?)\\n\\}`).exec(types)[1];
  for (const [, name] of block("RelayEvents").matchAll(/^\s{4}(\w+):/gm)) assert.ok(readme.includes(`\`${name}\``), `event ${name}`);
  for (const [, name] of block("RelayOptions").matchAll(/^\s{4}(\w+)\?:/gm)) assert.ok(readme.includes(name), `option ${name}`);
  for (const [, name] of block("RelayClient").matchAll(/^\s{4}(?!private|constructor)(\w+)\(/gm)) assert.ok(readme.includes(`${name}(`), `method ${name}()`);
});
