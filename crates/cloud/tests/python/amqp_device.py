"""A device on verge-cloud over AMQP, with clients nobody here wrote:
Apache Qpid Proton on AMQPS (SASL PLAIN with a SAS token) sends telemetry
and takes a C2D message (accepted = completed); Microsoft's uamqp sends
telemetry over AMQP on the HTTPS port's WebSocket (AMQPWSB10).

Usage: amqp_device.py <params.json> proton|uamqp-ws|proton-x509
params: host (SAS audience), device, key, ca (PEM path), amqps_port,
https_port, sas_dir (where iothub_sas.py is); for proton-x509: x509_device,
x509 [cert, key] (its certificate), stranger [cert, key] (a certificate with
the same CN the cloud does not know).
Prints "PASS <what>" per step and "ALL PASS" at the end; exits non-zero on
the first failure. Every blocking call has a timeout.
"""

import json
import sys

p = json.load(open(sys.argv[1]))
sys.path.insert(0, p["sas_dir"])
from iothub_sas import sas  # noqa: E402

T = 15
HOST, DEV = p["host"], p["device"]
RESOURCE = f"{HOST}/devices/{DEV}"


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def proton():
    from proton import Message, SSLDomain
    from proton.utils import BlockingConnection

    ssl = SSLDomain(SSLDomain.MODE_CLIENT)
    ssl.set_trusted_ca_db(p["ca"])
    ssl.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
    conn = BlockingConnection(f"amqps://localhost:{p['amqps_port']}", timeout=T, ssl_domain=ssl,
                              allowed_mechs="PLAIN", user=f"{DEV}@sas.{HOST.split('.')[0]}",
                              password=sas(RESOURCE, p["key"]))
    snd = conn.create_sender(f"/devices/{DEV}/messages/events")
    snd.send(Message(body=b"over-amqps", properties={"site": "lab"}), timeout=T)
    print("PASS telemetry over AMQPS", flush=True)
    rcv = conn.create_receiver(f"/devices/{DEV}/messages/devicebound", credit=1)
    m = rcv.receive(timeout=T)
    body = m.body if isinstance(m.body, (bytes, bytearray)) else bytes(m.body or b"")
    check(body == b"to-the-device", f"C2D body {m.body!r}")
    check((m.properties or {}).get("kind") == "greeting", f"C2D properties {m.properties}")
    rcv.accept()
    print("PASS C2D over AMQPS, accepted", flush=True)
    # Proton sends the disposition with its next I/O; one that arrives
    # together with the CLOSE can be lost (the message then comes again:
    # at least once). Let I/O run first.
    from proton import Timeout
    try:
        conn.wait(lambda: False, timeout=1)
    except Timeout:
        pass
    conn.close()


def uamqp_ws():
    import time

    import uamqp
    from uamqp import authentication

    token = sas(RESOURCE, p["key"])
    auth = authentication.SASTokenAuth(
        audience=RESOURCE, uri=f"amqps://localhost/devices/{DEV}", token=token,
        expires_at=int(time.time()) + 3600, port=p["https_port"], verify=p["ca"],
        transport_type=uamqp.TransportType.AmqpOverWebsocket,
        token_type=b"servicebus.windows.net:sastoken")
    client = uamqp.SendClient(f"amqps://localhost/devices/{DEV}/messages/events", auth=auth)
    client.queue_message(uamqp.Message(b"\x00over-ws\xff", application_properties={"site": "ws"}))
    states = client.send_all_messages()
    check(all(s == uamqp.constants.MessageState.SendComplete for s in states), f"ws send {states}")
    client.close()
    print("PASS telemetry over AMQP/WebSocket", flush=True)


def proton_x509():
    """No token: the TLS client certificate authenticates the device."""
    from proton import Message, SSLDomain
    from proton.utils import BlockingConnection, LinkDetached, SendException

    dev = p["x509_device"]

    def connect(files):
        ssl = SSLDomain(SSLDomain.MODE_CLIENT)
        ssl.set_trusted_ca_db(p["ca"])
        ssl.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
        ssl.set_credentials(files[0], files[1], None)
        return BlockingConnection(f"amqps://localhost:{p['amqps_port']}", timeout=T,
                                  ssl_domain=ssl, allowed_mechs="ANONYMOUS")

    conn = connect(p["x509"])
    snd = conn.create_sender(f"/devices/{dev}/messages/events")
    snd.send(Message(body=b"over-amqps-x509", properties={"auth": "x509"}), timeout=T)
    conn.close()
    print("PASS telemetry over AMQPS with an X.509 certificate", flush=True)
    conn = connect(p["stranger"])
    try:
        # The attach is answered, then detached with the refusal.
        snd = conn.create_sender(f"/devices/{dev}/messages/events")
        snd.send(Message(body=b"must-not-arrive"), timeout=T)
        raise AssertionError("a message with an unknown certificate was accepted")
    except (LinkDetached, SendException) as e:
        text = str(e) + " " + repr(getattr(getattr(e, "link", None), "remote_condition", None))
        check("unauthorized-access" in text, f"refusal {text}")
    conn.close()
    print("PASS unknown certificate refused", flush=True)


{"proton": proton, "uamqp-ws": uamqp_ws, "proton-x509": proton_x509}[sys.argv[2]]()
print("ALL PASS", flush=True)
