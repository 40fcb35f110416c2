"""AMQP interop with Microsoft's uamqp 1.6.11 (CBS over SASL MSSBCBS) against
verge-hub, with an azure-iot-device MQTT module on the other side of a route.

Usage: amqp_uamqp.py <params.json>
params: hub, device, ca (PEM path), amqps_port, keys {modA, modB, ...}.
Prints "PASS <scenario>" per scenario and "ALL PASS" at the end; exits
non-zero on the first failure. Every blocking call runs under a timeout.
"""

import json
import queue
import sys
import time
from functools import partial

import timed_call
import uamqp
from uamqp import authentication
from uamqp.message import MessageProperties
from azure.iot.device import IoTHubModuleClient, Message as MqttMessage
from iothub_sas import sign

T = 20

# Every blocking call runs under timed(); T unless a call says otherwise.
timed = partial(timed_call.timed, timeout=T)


def sas(resource, key_b64, ttl=3600):
    """An IoT Hub SAS token and its expiry (uamqp's own helper signs Service Bus style)."""
    expiry = int(time.time()) + ttl
    return sign(resource, key_b64, expiry), expiry


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    p = json.load(open(sys.argv[1]))
    hub, dev, port, ca = p["hub"], p["device"], p["amqps_port"], p["ca"]

    def auth(module, key=None, ttl=3600):
        resource = f"{hub}/devices/{dev}/modules/{module}"
        token, expiry = sas(resource, key or p["keys"][module], ttl)
        uri = f"amqps://localhost:{port}/devices/{dev}/modules/{module}"
        return authentication.SASTokenAuth(
            audience=resource, uri=uri, token=token, expires_at=expiry, port=port,
            verify=ca, token_type=b"servicebus.windows.net:sastoken")

    def events(module):
        return f"amqps://localhost:{port}/devices/{dev}/modules/{module}/messages/events"

    def mqtt_module(m):
        cs = (f"HostName={hub};DeviceId={dev};ModuleId={m};"
              f"SharedAccessKey={p['keys'][m]};GatewayHostName=localhost")
        return IoTHubModuleClient.create_from_connection_string(
            cs, server_verification_cert=open(ca).read(), connection_retry=False)

    # 1. uamqp module A (AMQP) output out1 -> route AtoB -> MQTT module B input in1.
    inbox = queue.Queue()
    b = mqtt_module("modB")
    timed(b.connect)
    b.on_message_received = lambda msg: inbox.put(msg)
    sender = uamqp.SendClient(events("modA"), auth=auth("modA"))
    bodies = [bytes([0, 1, 2, 255, i]) for i in range(3)]
    for i, body in enumerate(bodies):
        props = MessageProperties(message_id=f"mid-{i}", correlation_id=f"cid-{i}",
                                  content_type="application/octet-stream", content_encoding="binary")
        msg = uamqp.Message(body, properties=props,
                            application_properties={"iothub-outputname": "out1", "k": f"v {i}"})
        sender.queue_message(msg)
    results = timed(sender.send_all_messages, close_on_done=False)
    check(all(r == uamqp.constants.MessageState.SendComplete for r in results), f"send states {results}")
    got = [timed(inbox.get, timeout=T) for _ in bodies]
    for i, m in enumerate(got):
        check(m.data == bodies[i], f"body {i}: {m.data!r}")
        check(m.input_name == "in1", f"input name {m.input_name!r}")
        check(m.message_id == f"mid-{i}", f"message id {m.message_id!r}")
        check(m.correlation_id == f"cid-{i}", f"correlation id {m.correlation_id!r}")
        check(m.content_type == "application/octet-stream", f"content type {m.content_type!r}")
        check(m.custom_properties.get("k") == f"v {i}", f"props {m.custom_properties}")
    print("PASS uamqp_module_output_to_mqtt_input", flush=True)

    # 1b. A batch (message format 0x80013700, as the C# SDK's
    # SendEventBatchAsync sends): three messages in one transfer, each
    # routed on its own with its own properties.
    items = [uamqp.Message(bytes([9, i]), properties=MessageProperties(message_id=f"batch-{i}"),
                           application_properties={"iothub-outputname": "out1", "k": f"b {i}"})
             for i in range(3)]
    sender.queue_message(uamqp.message.BatchMessage(data=items))
    results = timed(sender.send_all_messages, close_on_done=False)
    check(all(r == uamqp.constants.MessageState.SendComplete for r in results), f"batch send {results}")
    got = sorted((timed(inbox.get, timeout=T) for _ in items), key=lambda m: m.message_id)
    for i, m in enumerate(got):
        check(m.data == bytes([9, i]), f"batch body {i}: {m.data!r}")
        check(m.message_id == f"batch-{i}", f"batch message id {m.message_id!r}")
        check(m.input_name == "in1", f"batch input name {m.input_name!r}")
        check(m.custom_properties.get("k") == f"b {i}", f"batch props {m.custom_properties}")
    check(inbox.empty(), "one message per batch item")
    print("PASS uamqp_batch_to_mqtt_input", flush=True)

    # 2. MQTT module A output out1 -> route AtoB -> uamqp module B input in1.
    timed(b.shutdown)
    a = mqtt_module("modA")
    timed(a.connect)
    receiver = uamqp.ReceiveClient(events("modB"), auth=auth("modB"), timeout=15000,
                                   prefetch=10)
    # The receiver link must be open before the message is routed to it.
    timed(receiver.open)
    while not timed(receiver.client_ready):
        time.sleep(0.05)
    for i, body in enumerate(bodies):
        m = MqttMessage(body)
        m.message_id = f"rev-{i}"
        m.custom_properties["k"] = f"w {i}"
        timed(a.send_message_to_output, m, "out1")
    received = []
    deadline = time.time() + T
    while len(received) < len(bodies) and time.time() < deadline:
        batch = timed(receiver.receive_message_batch, max_batch_size=10, timeout=2000)
        for m in batch:
            m.accept()
            received.append(m)
    check(len(received) == len(bodies), f"received {len(received)} of {len(bodies)}")
    for i, m in enumerate(received):
        data = b"".join(m.get_data())
        check(data == bodies[i], f"body {i}: {data!r}")
        ann = {k.decode() if isinstance(k, bytes) else k: v for k, v in (m.annotations or {}).items()}
        name = ann.get("x-opt-input-name")
        name = name.decode() if isinstance(name, bytes) else name
        check(name == "in1", f"input name {ann}")
        mid = m.properties.message_id
        mid = mid.decode() if isinstance(mid, bytes) else mid
        check(mid == f"rev-{i}", f"message id {mid!r}")
        app = {k.decode() if isinstance(k, bytes) else k: (v.decode() if isinstance(v, bytes) else v)
               for k, v in (m.application_properties or {}).items()}
        check(app.get("k") == f"w {i}", f"app props {app}")
        cmid = ann.get("iothub-connection-module-id")
        cmid = cmid.decode() if isinstance(cmid, bytes) else cmid
        check(cmid == "modA", f"sender stamp {ann}")
    receiver.close()
    timed(a.shutdown)
    print("PASS mqtt_module_output_to_uamqp_input", flush=True)

    # 3. A wrong key: the put-token is refused and nothing is sent.
    bad = uamqp.SendClient(events("modA"), auth=auth("modA", key=p["keys"]["bad"]))
    bad.queue_message(uamqp.Message(b"x", application_properties={"iothub-outputname": "out1"}))
    try:
        states = timed(bad.send_all_messages)
        check(all(s != uamqp.constants.MessageState.SendComplete for s in states),
              f"a refused token sent {states}")
    except (uamqp.errors.AuthenticationException, uamqp.errors.TokenAuthFailure,
            uamqp.errors.AMQPConnectionError, uamqp.errors.MessageSendFailed) as e:
        check(True, str(e))
    print("PASS uamqp_wrong_key_refused", flush=True)

    # 4. AMQP over WebSocket (AMQPWSB10) on the HTTPS listener: uamqp module A
    # output -> route -> MQTT module B input.
    b = mqtt_module("modB")
    timed(b.connect)
    inbox = queue.Queue()
    b.on_message_received = lambda msg: inbox.put(msg)
    resource = f"{hub}/devices/{dev}/modules/modA"
    tok, exp = sas(resource, p["keys"]["modA"])
    ws_auth = authentication.SASTokenAuth(
        audience=resource, uri=f"amqps://localhost/devices/{dev}/modules/modA", token=tok,
        expires_at=exp, port=p["https_port"], verify=ca,
        transport_type=uamqp.TransportType.AmqpOverWebsocket,
        token_type=b"servicebus.windows.net:sastoken")
    ws = uamqp.SendClient(f"amqps://localhost/devices/{dev}/modules/modA/messages/events",
                          auth=ws_auth)
    ws.queue_message(uamqp.Message(b"\x00over-ws\xff", application_properties={"iothub-outputname": "out1"}))
    states = timed(ws.send_all_messages)
    check(all(s == uamqp.constants.MessageState.SendComplete for s in states), f"ws send {states}")
    m = timed(inbox.get, timeout=T)
    check(m.data == b"\x00over-ws\xff" and m.input_name == "in1", f"ws message {m.data!r} {m.input_name}")
    timed(b.shutdown)
    print("PASS uamqp_websocket", flush=True)

    sender.close()
    print("ALL PASS", flush=True)


if __name__ == "__main__":
    main()
