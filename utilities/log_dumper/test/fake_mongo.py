"""Two MongoDB servers that misbehave, for the observer's error pages.

usage: fake_mongo.py silent PORT   accepts connections and never answers
       fake_mongo.py slow PORT     answers the handshake, then fails every command
                                   with MaxTimeMSExpired (code 50), as a query past maxTimeMS does"""
import socket
import struct
import sys
import threading
from datetime import datetime, timezone

import bson

OP_REPLY, OP_QUERY, OP_MSG = 1, 2004, 2013
HELLO = {"ismaster": True, "isWritablePrimary": True, "helloOk": True, "maxBsonObjectSize": 16777216,
         "maxMessageSizeBytes": 48000000, "maxWriteBatchSize": 100000, "minWireVersion": 0, "maxWireVersion": 17}


def recv_exact(conn, n):
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError
        buf += chunk
    return buf


def answer(cmd):
    if {"hello", "ismaster", "isMaster"} & set(cmd):
        return {**HELLO, "localTime": datetime.now(timezone.utc), "ok": 1.0}
    return {"ok": 0.0, "code": 50, "codeName": "MaxTimeMSExpired", "errmsg": "operation exceeded time limit"}


def serve_slow(conn):
    while True:
        length, req_id, _, op = struct.unpack("<iiii", recv_exact(conn, 16))
        body = recv_exact(conn, length - 16)
        if op == OP_QUERY:  # the legacy handshake: flags, collection name, skip, limit, query
            end = body.index(b"\0", 4)
            cmd = bson.decode(body[end + 9:end + 9 + struct.unpack("<i", body[end + 9:end + 13])[0]])
            doc = bson.encode(answer(cmd))
            reply = struct.pack("<iqii", 0, 0, 0, 1) + doc
            conn.sendall(struct.pack("<iiii", 16 + len(reply), 0, req_id, OP_REPLY) + reply)
        elif op == OP_MSG:  # flags, then a kind-0 section holding the command
            cmd = bson.decode(body[5:5 + struct.unpack("<i", body[5:9])[0]])
            reply = struct.pack("<IB", 0, 0) + bson.encode(answer(cmd))
            conn.sendall(struct.pack("<iiii", 16 + len(reply), 0, req_id, OP_MSG) + reply)
        else:
            return


def handle(conn, mode):
    try:
        if mode == "silent":
            while conn.recv(65536):
                pass
        else:
            serve_slow(conn)
    except (ConnectionError, OSError, ValueError):
        pass
    finally:
        conn.close()


def main():
    mode, port = sys.argv[1], int(sys.argv[2])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn, mode), daemon=True).start()


if __name__ == "__main__":
    main()
