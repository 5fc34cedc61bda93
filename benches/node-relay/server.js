// The relay a typical developer would write with the `ws` package: an HTTP publish endpoint and
// WebSocket clients subscribed with the same JSON commands as relay. A comparator for
// benches/compare.sh, not part of relay.
//
//   node server.js [port] [host]     prints "listening on http://HOST:PORT"
//
// POST /api/publish {"channel","data"} -> {"channel","seq"}; WebSocket on any path:
// {"type":"subscribe","channel"} -> {"type":"subscribed",...}, then
// {"type":"message","channel","seq","data"} per publish; {"type":"publish","channel","data"}
// -> {"type":"published",...}.
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 8090);
const host = process.argv[3] || '127.0.0.1';
const channels = new Map(); // name -> { seq, subs: Set<WebSocket> }

function channel(name) {
  let ch = channels.get(name);
  if (!ch) {
    ch = { seq: 0, subs: new Set() };
    channels.set(name, ch);
  }
  return ch;
}

function publish(name, data) {
  const ch = channel(name);
  ch.seq += 1;
  const msg = JSON.stringify({ type: 'message', channel: name, seq: ch.seq, data });
  for (const ws of ch.subs) ws.send(msg);
  return ch.seq;
}

const server = http.createServer((req, res) => {
  if (req.method === 'POST' && req.url === '/api/publish') {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (c) => { body += c; });
    req.on('end', () => {
      let msg;
      try { msg = JSON.parse(body); } catch (e) { msg = null; }
      if (!msg || typeof msg.channel !== 'string') {
        res.writeHead(400, { 'content-type': 'application/json' });
        res.end('{"error":{"code":"bad_request"}}');
        return;
      }
      const seq = publish(msg.channel, msg.data);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ channel: msg.channel, seq }));
    });
    return;
  }
  res.writeHead(404);
  res.end();
});
server.keepAliveTimeout = 60000;

const wss = new WebSocketServer({ server });
wss.on('connection', (ws) => {
  ws.channels = new Set();
  ws.on('message', (raw) => {
    let cmd;
    try { cmd = JSON.parse(raw); } catch (e) { return; }
    const id = cmd.id;
    if (cmd.type === 'subscribe') {
      const ch = channel(cmd.channel);
      ch.subs.add(ws);
      ws.channels.add(cmd.channel);
      ws.send(JSON.stringify({ type: 'subscribed', id, channel: cmd.channel, seq: ch.seq }));
    } else if (cmd.type === 'unsubscribe') {
      const ch = channels.get(cmd.channel);
      if (ch) ch.subs.delete(ws);
      ws.channels.delete(cmd.channel);
      ws.send(JSON.stringify({ type: 'unsubscribed', id, channel: cmd.channel }));
    } else if (cmd.type === 'publish') {
      const seq = publish(cmd.channel, cmd.data);
      ws.send(JSON.stringify({ type: 'published', id, channel: cmd.channel, seq }));
    }
  });
  ws.on('close', () => {
    for (const name of ws.channels) {
      const ch = channels.get(name);
      if (ch) ch.subs.delete(ws);
    }
  });
});

server.listen(port, host, () => {
  console.log(`listening on http://${host}:${server.address().port}`);
});
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
