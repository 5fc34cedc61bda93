#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/corpus/<target>/) from real frames: the binary frames are the
worked examples of docs/protocol.md (unit tests check the encoder produces exactly these bytes),
the JSON commands and SSE cursors are what clients and the server send. Run from anywhere."""
import os

HERE = os.path.dirname(os.path.abspath(__file__))

BINARY = {
    "subscribe": "01 01 01 07 06 72 6f 6f 6d 3a 31",
    "subscribe_resume": "01 01 03 08 06 72 6f 6f 6d 3a 31 9f 2c 61 d3 a0 b4 e5 f7 29",
    "subscribe_presence": "01 01 10 01 61 02 75 31 07 7b 22 61 22 3a 31 7d",
    "publish": "01 03 01 ac 02 06 72 6f 6f 6d 3a 31 68 69",
    "unsubscribe": "01 02 00 06 72 6f 6f 6d 3a 31",
    "heartbeat": "01 04 00",
    "presence": "01 05 01 03 01 61",
    "subscribed": "01 81 05 08 06 72 6f 6f 6d 3a 31 9f 2c 61 d3 a0 b4 e5 f7 29",
    "message": "01 85 00 06 72 6f 6f 6d 3a 31 2a 68 69",
    "message_json": "01 85 08 06 72 6f 6f 6d 3a 31 2b 7b 22 74 22 3a 31 7d",
    "published": "01 83 01 ac 02 06 72 6f 6f 6d 3a 31 9f 2c 61 d3 a0 b4 e5 f7 2a",
    "unsubscribed": "01 82 00 06 72 6f 6f 6d 3a 31",
    "heartbeat_reply": "01 84 01 05",
    "error": "01 86 01 04 0f 69 6e 76 61 6c 69 64 5f 63 68 61 6e 6e 65 6c 62 61 64",
    "presence_state": "01 87 01 03 01 61 09 02 02 63 31 02 75 31 07 7b 22 61 22 3a 31 7d 02 63 32 02 63 32 00",
    "presence_event": "01 88 20 01 61 09 02 63 31 02 75 31 07 7b 22 61 22 3a 31 7d",
    "gap": "01 89 00 06 72 6f 6f 6d 3a 31 78 bb 01",
}

JSON = {
    "subscribe": '{"type":"subscribe","channel":"room:1","id":1}',
    "subscribe_resume": '{"type":"subscribe","channel":"room:1","since":41,"epoch":"9f2c61d3a0b4e5f7","id":"r"}',
    "subscribe_presence": '{"type":"subscribe","channel":"room:1","presence":{"user":"u1","info":{"name":"Ann"}}}',
    "publish": '{"type":"publish","channel":"room:1","data":{"text":"hi","n":[1,2.5,-3e2,true,null]},"id":2}',
    "publish_multiline": '{"type":"publish",\n "channel":"room:1",\r\n "data":{\n  "a":"x\\ny\\u00e9"\n}}',
    "unsubscribe": '{"type":"unsubscribe","channel":"room:1","id":3}',
    "heartbeat": '{"type":"heartbeat"}',
    "presence": '{"type":"presence","channel":"room:1"}',
    "bad_channel": '{"type":"subscribe","channel":"a b","id":4}',
    "unknown_type": '{"type":"dance","id":5}',
}

SSE = {
    # First byte: the most positions allowed; the rest: the cursor.
    "one": "\x80" + "9f2c61d3a0b4e5f7:42",
    "two": "\x80" + "9f2c61d3a0b4e5f7:42,1a2b3c4d5e6f7081:7",
    "spaces": "\x02" + " ff:0 ",
    "too_many": "\x01" + "1:1,2:2",
}


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


for name, h in BINARY.items():
    b = bytes.fromhex(h)
    write("binary_decode", name, b)
    # The round trip target reads structure from any bytes; real frames are as good a start.
    write("roundtrip", name, b)
for name, j in JSON.items():
    write("json_command", name, j.encode())
for name, s in SSE.items():
    write("sse_cursor", name, s.encode("latin-1"))
