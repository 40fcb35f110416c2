"""AMQP interop with Apache Qpid Proton (Debian python3-qpid-proton) against
verge-hub: SASL ANONYMOUS + $cbs, SASL PLAIN, and no SASL at all (the bare
AMQP header the C# SDK sends), several identities on one connection, and
refused, foreign and expiring tokens.

Usage: amqp_proton.py <params.json>
params: hub, device, ca (PEM path), amqps_port, keys {modA, modB, leaf1, bad}.
Prints "PASS <scenario>" per scenario and "ALL PASS" at the end; exits
non-zero on the first failure. Every blocking call has a timeout.
"""

import json
import ssl as pyssl
import sys
import threading
import time
import urllib.request
import uuid

import proton
from iothub_sas import sas
from proton import Message, SSLDomain, symbol
from proton.utils import BlockingConnection, LinkDetached, SendException

T = 15


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    p = json.load(open(sys.argv[1]))
    hub, dev, port = p["hub"], p["device"], p["amqps_port"]
    url = f"amqps://localhost:{port}"
    ssl = SSLDomain(SSLDomain.MODE_CLIENT)
    ssl.set_trusted_ca_db(p["ca"])
    ssl.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)

    def resource(ident):
        return f"{hub}/devices/{dev}" + (f"/modules/{ident}" if ident != "leaf1" else "") \
            if ident != "leaf1" else f"{hub}/devices/leaf1"

    def token(ident, key=None, ttl=3600):
        return sas(resource(ident), key or p["keys"][ident], ttl)

    def events(ident):
        if ident == "leaf1":
            return "/devices/leaf1/messages/events"
        return f"/devices/{dev}/modules/{ident}/messages/events"

    def connect(**kw):
        return BlockingConnection(url, timeout=T, ssl_domain=ssl, **kw)

    class Cbs:
        """put-token over $cbs, matching the reply by correlation-id."""

        def __init__(self, conn):
            # Distinct link names: Proton would name both `{container}-$cbs`,
            # and fe2o3 (the hub's AMQP library) refuses a second link of the
            # same name in a session, whatever its direction.
            self.sender = conn.create_sender("$cbs", name="cbs-sender")
            self.receiver = conn.create_receiver("$cbs", credit=10, name="cbs-receiver")
            self.next = 1

        def put(self, ident, tok):
            mid = self.next
            self.next += 1
            msg = Message(id=mid, body=tok, properties={
                "operation": "put-token", "type": "servicebus.windows.net:sastoken",
                "name": resource(ident)})
            self.sender.send(msg, timeout=T)
            reply = self.receiver.receive(timeout=T)
            self.receiver.accept()
            check(reply.correlation_id == mid, f"correlation id {reply.correlation_id!r} != {mid}")
            status = reply.properties["status-code"]
            check(isinstance(status, int), f"status-code type {type(status)}")
            return status, reply.properties.get("status-description")

    def telemetry(i, output="out1"):
        return Message(body=bytes([0, 1, 255, i]), inferred=True, id=f"p-{i}",
                       properties={"iothub-outputname": output, "n": str(i)},
                       content_type="application/octet-stream")

    def expect_refused(fn, condition, what):
        try:
            fn()
        except (LinkDetached, SendException) as e:
            text = str(e) + " " + repr(getattr(getattr(e, "link", None), "remote_condition", None))
            check(condition in text, f"{what}: expected {condition}, got {text}")
            return
        raise AssertionError(f"{what}: not refused")

    # 1. SASL ANONYMOUS + CBS; three identities on one connection: modA sends
    # to its output, modB receives it on its input, leaf1 sends telemetry.
    conn = connect(allowed_mechs="ANONYMOUS")
    cbs = Cbs(conn)
    for ident in ("modA", "modB", "leaf1"):
        status, desc = cbs.put(ident, token(ident))
        check(status == 200, f"put-token {ident}: {status} {desc}")
    inputs = conn.create_receiver(events("modB"), credit=10)
    out = conn.create_sender(events("modA"))
    for i in range(3):
        out.send(telemetry(i), timeout=T)
    for i in range(3):
        m = inputs.receive(timeout=T)
        inputs.accept()
        check(m.body == bytes([0, 1, 255, i]), f"body {m.body!r}")
        check(m.annotations.get(symbol("x-opt-input-name")) == "in1", f"annotations {m.annotations}")
        check(m.annotations.get(symbol("iothub-connection-module-id")) == "modA", f"stamp {m.annotations}")
        check(m.properties.get("n") == str(i), f"app props {m.properties}")
        check(m.id == f"p-{i}", f"id {m.id!r}")
        check(m.content_type == "application/octet-stream", f"content type {m.content_type!r}")
    # Above IoT Hub's 256 KB: that transfer is rejected, the link lives on.
    try:
        out.send(Message(body=b"x" * (300 * 1024), inferred=True,
                         properties={"iothub-outputname": "out1"}), timeout=T)
        raise AssertionError("a 300 KB message was accepted")
    except SendException as e:
        check(e.state == proton.Delivery.REJECTED, f"oversize message: {e.state}")
    out.send(telemetry(3), timeout=T)
    m = inputs.receive(timeout=T)
    inputs.accept()
    check(m.id == "p-3", f"after the oversize message: {m.id!r}")
    leaf = conn.create_sender(events("leaf1"))
    leaf.send(Message(body=b"leaf", inferred=True), timeout=T)
    print("PASS proton_anonymous_cbs_three_identities", flush=True)

    # 2. Refusals on that connection: a wrong key and an expired token get
    # 401 from $cbs; a link for an identity without a token is refused.
    status, _ = cbs.put("modA", token("modA", key=p["keys"]["bad"]))
    check(status == 401, f"wrong key: {status}")
    status, _ = cbs.put("modA", token("modA", ttl=-60))
    check(status == 401, f"expired token: {status}")
    # modB's token carried for modA's audience names modB: it authorizes modB only.
    expect_refused(lambda: conn.create_sender(f"/devices/{dev}/modules/modC/messages/events").send(
        telemetry(9), timeout=T), "amqp:unauthorized-access", "link without a token")
    conn.close()
    print("PASS proton_refused_tokens", flush=True)

    # 3. SASL PLAIN: the connection is modA's; modB's links are refused.
    conn = connect(allowed_mechs="PLAIN", user=f"{dev}/modules/modA@sas.{hub.split('.')[0]}",
                   password=token("modA"))
    conn.create_sender(events("modA")).send(telemetry(7), timeout=T)
    expect_refused(lambda: conn.create_sender(events("modB")).send(telemetry(8), timeout=T),
                   "amqp:unauthorized-access", "PLAIN foreign link")
    conn.close()
    try:
        bad = connect(allowed_mechs="PLAIN", user=f"{dev}/modules/modA@sas.testhub",
                      password=token("modA", key=p["keys"]["bad"]))
        bad.create_sender(events("modA")).send(telemetry(6), timeout=T)
        raise AssertionError("PLAIN with a wrong key was served")
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - any refusal will do; the condition is checked below
        check("unauthorized" in str(e) or "closed" in str(e).lower() or "Connection" in type(e).__name__,
              f"PLAIN wrong key: {type(e).__name__}: {e}")
    print("PASS proton_sasl_plain", flush=True)

    # 4. No SASL (the C# SDK's bare AMQP header), then CBS.
    conn = connect(sasl_enabled=False)
    cbs = Cbs(conn)
    status, _ = cbs.put("modA", token("modA"))
    check(status == 200, f"put-token: {status}")
    conn.create_sender(events("modA")).send(telemetry(5), timeout=T)
    conn.close()
    print("PASS proton_no_sasl_cbs", flush=True)

    # 5. A token that expires on a live link closes it; renewal keeps it.
    conn = connect(allowed_mechs="ANONYMOUS")
    cbs = Cbs(conn)
    status, _ = cbs.put("modA", token("modA", ttl=3))
    check(status == 200, f"short token: {status}")
    status, _ = cbs.put("modB", token("modB", ttl=3))
    check(status == 200, f"short token: {status}")
    status, _ = cbs.put("modB", token("modB", ttl=3600))
    check(status == 200, f"renewal: {status}")
    a = conn.create_sender(events("modA"))
    b = conn.create_sender(events("modB"))
    a.send(telemetry(1), timeout=T)
    time.sleep(5)
    # Proton reports a link's remote close from whatever call waits next.
    expect_refused(lambda: a.send(telemetry(3), timeout=T), "amqp:unauthorized-access",
                   "expired token on a live link")
    b.send(telemetry(2, output="none"), timeout=T)
    conn.close()
    print("PASS proton_token_expiry_and_renewal", flush=True)

    # 6. Twin over AMQP: GET, PATCH reported, desired notifications.
    conn = connect(allowed_mechs="ANONYMOUS")
    cbs = Cbs(conn)
    check(cbs.put("modA", token("modA"))[0] == 200, "put-token")
    twin_addr = f"/devices/{dev}/modules/modA/twin"
    twin_rx = conn.create_receiver(twin_addr, credit=10, name="twin-rcv")
    twin_tx = conn.create_sender(twin_addr, name="twin-snd")

    def twin_call(op, resource=None, body=None):
        ann = {symbol("operation"): op}
        if resource:
            ann[symbol("resource")] = resource
        cid = f"{op}{uuid.uuid4()}"
        twin_tx.send(Message(correlation_id=cid, annotations=ann, inferred=True,
                             body=json.dumps(body).encode() if body is not None else b" "), timeout=T)
        reply = twin_rx.receive(timeout=T)
        twin_rx.accept()
        check(reply.correlation_id == cid, f"twin correlation {reply.correlation_id!r}")
        status = reply.annotations.get(symbol("status"))
        check(isinstance(status, int), f"twin status {reply.annotations}")
        raw = bytes(reply.body) if reply.body is not None else b""
        return status, (json.loads(raw) if raw.strip() else None), reply

    status, twin, _ = twin_call("GET")
    check(status == 200 and "desired" in twin and "reported" in twin, f"GET {status} {twin}")
    status, _, reply = twin_call("PATCH", "/properties/reported", {"fw": "2.0"})
    check(status == 204, f"PATCH {status}")
    check(isinstance(reply.annotations.get(symbol("version")), int), f"version {reply.annotations}")
    status, twin, _ = twin_call("GET")
    check(twin["reported"].get("fw") == "2.0", f"reported {twin}")
    status, _, _ = twin_call("PUT", "/notifications/twin/properties/desired")
    check(status == 200, f"PUT {status}")
    with open(p["twins_file"], "w") as f:
        json.dump({f"{dev}/modA": {"rate": 9}}, f)
    patch = twin_rx.receive(timeout=T)
    twin_rx.accept()
    check(patch.correlation_id is None, f"desired patch correlation {patch.correlation_id!r}")
    desired = json.loads(bytes(patch.body))
    check(desired.get("rate") == 9 and "$version" in desired, f"desired patch {desired}")
    print("PASS proton_twin", flush=True)

    # 7. A direct method (HTTPS API, called as modA) to an AMQP module modB.
    check(cbs.put("modB", token("modB"))[0] == 200, "put-token modB")
    m_addr = f"/devices/{dev}/modules/modB/methods/devicebound"
    m_rx = conn.create_receiver(m_addr, credit=10, name="methods-rcv")
    m_tx = conn.create_sender(m_addr, name="methods-snd")
    result = {}

    def invoke():
        ctx = pyssl.create_default_context(cafile=p["ca"])
        req = urllib.request.Request(
            f"https://localhost:{p['https_port']}/twins/{dev}/modules/modB/methods",
            data=json.dumps({"methodName": "reset", "payload": {"x": 1},
                             "responseTimeoutInSeconds": 10}).encode(),
            headers={"Content-Type": "application/json", "x-ms-edge-moduleId": f"{dev}/modA",
                     "Authorization": token("modA")}, method="POST")
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=T) as r:
                result["body"] = json.loads(r.read())
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e

    t = threading.Thread(target=invoke, daemon=True)
    t.start()
    req = m_rx.receive(timeout=T)
    m_rx.accept()
    check(isinstance(req.correlation_id, uuid.UUID), f"method correlation {req.correlation_id!r}")
    check(req.properties.get("IoThub-methodname") == "reset", f"method props {req.properties}")
    check(json.loads(bytes(req.body)) == {"x": 1}, f"method payload {req.body!r}")
    m_tx.send(Message(correlation_id=req.correlation_id, properties={"IoThub-status": 201},
                      body=json.dumps({"done": True}).encode(), inferred=True), timeout=T)
    t.join(T)
    check(result.get("body") == {"status": 201, "payload": {"done": True}}, f"invoke {result}")
    conn.close()
    print("PASS proton_method", flush=True)

    print("ALL PASS", flush=True)


if __name__ == "__main__":
    main()
