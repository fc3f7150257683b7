#!/usr/bin/env node
// Peer: the chat recipe's plain-text contract as a minimal Node `ws` relay.
//
// Usage: node bench/peers/ws_relay.js PORT
//
// Each connection gets an id; the others hear `Client N connected.` and `Client N
// disconnected.` (while the room has at most PRESENCE_LIMIT members, as in chat.py) and
// `Client N says "text"` for each text frame. The broadcast is the loop of the ws README,
// with the relayed text encoded once per message.
'use strict';
const { WebSocketServer, WebSocket } = require('ws');

const PRESENCE_LIMIT = 1000;
const port = Number(process.argv[2] || 8080);
const wss = new WebSocketServer({ host: '127.0.0.1', port, path: '/ws', maxPayload: 65536 });
let nextId = 1;

function broadcast(from, text) {
  const data = Buffer.from(text);
  for (const client of wss.clients) {
    if (client !== from && client.readyState === WebSocket.OPEN) client.send(data, { binary: false });
  }
}

wss.on('connection', (ws) => {
  const id = nextId++;
  if (wss.clients.size <= PRESENCE_LIMIT) broadcast(ws, `Client ${id} connected.`);
  ws.on('message', (data, isBinary) => {
    if (isBinary) { ws.close(1003, 'binary frames are not supported'); return; }
    const text = data.toString();
    if (text) broadcast(ws, `Client ${id} says "${text}"`);
  });
  ws.on('close', () => {
    if (wss.clients.size < PRESENCE_LIMIT) broadcast(ws, `Client ${id} disconnected.`);
  });
  ws.on('error', () => {});
});
wss.on('listening', () => console.log(`listening on ${wss.address().port}`));
process.on('SIGTERM', () => process.exit(0));
