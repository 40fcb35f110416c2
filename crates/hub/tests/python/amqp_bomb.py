"""A frame declaring a 4 GB value, sent before anything else on an AMQPS
connection to verge-hub (which the test runs under an address-space limit
smaller than that): the hub must close that connection and keep serving.
The AMQP library the hub uses allocates a value's declared size before
reading it; the fuzzer found that with a 40-byte frame.

Usage: amqp_bomb.py <params.json>
params: hub, device, ca (PEM path), amqps_port, keys {modA}.
Prints "PASS <scenario>" per scenario and "ALL PASS" at the end; exits
non-zero on the first failure. Every blocking call has a timeout.
"""

import json
import socket
import ssl
import sys
import time

from iothub_sas import sas
from proton import Message, SSLDomain
from proton.utils import BlockingConnection

T = 15


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    p = json.load(open(sys.argv[1]))
    hub, dev, port = p["hub"], p["device"], p["amqps_port"]

    # 1. The bare AMQP header (as the C# SDK opens), then a frame whose body
    # is a sym32 declaring 0xffffffff bytes and holding three.
    ctx = ssl.create_default_context(cafile=p["ca"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=T)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"AMQP\x00\x01\x00\x00")
    tls.sendall(bytes([0, 0, 0, 16, 2, 0, 0, 0, 0xb3, 0xff, 0xff, 0xff, 0xff, 0x41, 0x41, 0x41]))
    deadline = time.monotonic() + T
    got = b""
    while time.monotonic() < deadline:
        try:
            chunk = tls.recv(4096)
        except (ssl.SSLError, ConnectionError, socket.timeout):
            break
        if not chunk:
            break
        got += chunk
    else:
        raise AssertionError("the hub did not close the connection")
    tls.close()
    print(f"PASS amqp_huge_declared_value_closed ({len(got)} bytes back)", flush=True)

    # 2. The hub still serves: a module sends over a fresh connection.
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(p["ca"])
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
    tok = sas(f"{hub}/devices/{dev}/modules/modA", p["keys"]["modA"], 3600)
    conn = BlockingConnection(f"amqps://localhost:{port}", timeout=T, ssl_domain=domain,
                              allowed_mechs="PLAIN",
                              user=f"{dev}/modules/modA@sas.{hub.split('.')[0]}", password=tok)
    conn.create_sender(f"/devices/{dev}/modules/modA/messages/events").send(
        Message(body=b"still here", inferred=True, properties={"iothub-outputname": "none"}),
        timeout=T)
    conn.close()
    print("PASS amqp_hub_still_serving", flush=True)
    print("ALL PASS", flush=True)


if __name__ == "__main__":
    main()
