"""Interop scenarios: the official azure-iot-device SDK against verge-hub.

Usage: interop.py <params.json>
params: hub, device, ca (PEM path), keys {modA, modB, leaf1, bad}, twins_file.
Prints "PASS <scenario>" per scenario; exits non-zero on the first failure.
Every SDK call runs under a timeout (the SDK can block forever).
"""

import json
import queue
import sys
import time
from functools import partial

import timed_call
from azure.iot.device import IoTHubDeviceClient, IoTHubModuleClient, Message
from azure.iot.device import exceptions

T = 15  # seconds per SDK call

# Every blocking call runs under timed(); T unless a call says otherwise.
timed = partial(timed_call.timed, timeout=T)


def main():
    p = json.load(open(sys.argv[1]))
    hub, dev = p["hub"], p["device"]
    ca = open(p["ca"]).read()

    def module(m, key=None):
        cs = (f"HostName={hub};DeviceId={dev};ModuleId={m};"
              f"SharedAccessKey={key or p['keys'][m]};GatewayHostName=localhost")
        return IoTHubModuleClient.create_from_connection_string(
            cs, server_verification_cert=ca, connection_retry=False)

    def check(cond, what):
        if not cond:
            raise AssertionError(what)

    # 1. Auth rejection.
    bad = module("modA", key=p["keys"]["bad"])
    try:
        timed(bad.connect)
        raise AssertionError("connect with a wrong key succeeded")
    except exceptions.CredentialError:
        pass
    finally:
        try:
            timed(bad.shutdown)
        except Exception:  # noqa: BLE001
            pass
    print("PASS auth_rejection", flush=True)

    # 2. Module A output -> route -> module B input.
    inbox = queue.Queue()
    b = module("modB")
    timed(b.connect)
    b.on_message_received = lambda msg: inbox.put(msg)
    a = module("modA")
    timed(a.connect)
    payloads = [bytes([0, 1, 2, 255, i]) for i in range(3)]
    for i, body in enumerate(payloads):
        msg = Message(body)
        msg.message_id = f"mid-{i}"
        msg.custom_properties["k"] = f"v {i}"
        msg.custom_properties["a/b"] = "x&y=z"
        timed(a.send_message_to_output, msg, "out1")
    for i, body in enumerate(payloads):
        got = inbox.get(timeout=T)
        check(got.input_name == "in1", f"input name {got.input_name}")
        data = got.data if isinstance(got.data, bytes) else bytes(got.data, "utf-8")
        check(data == body, f"payload {data!r} != {body!r}")
        check(got.message_id == f"mid-{i}", f"message id {got.message_id}")
        cp = got.custom_properties
        check(cp.get("k") == f"v {i}", f"custom properties {cp}")
        check(cp.get("a/b") == "x&y=z", f"custom properties {cp}")
        check(cp.get("$.cdid") == dev and cp.get("$.cmid") == "modA", f"connection ids {cp}")
    print("PASS module_to_module", flush=True)

    # 3. Unrouted output is dropped (but acknowledged).
    timed(a.send_message_to_output, Message("nobody"), "nowhere")
    try:
        extra = inbox.get(timeout=1.5)
        raise AssertionError(f"unrouted message delivered: {extra}")
    except queue.Empty:
        pass
    print("PASS unrouted_dropped", flush=True)

    # 4. Twins.
    twin = timed(a.get_twin)
    check("desired" in twin and "reported" in twin, f"twin {twin}")
    check("$version" in twin["desired"], f"twin {twin}")
    timed(a.patch_twin_reported_properties, {"fw": "1.2", "n": None})
    twin = timed(a.get_twin)
    check(twin["reported"].get("fw") == "1.2", f"reported {twin}")
    patches = queue.Queue()
    a.on_twin_desired_properties_patch_received = lambda patch: patches.put(patch)
    time.sleep(0.5)
    with open(p["twins_file"], "w") as f:
        json.dump({f"{dev}/modA": {"rate": 7}}, f)
    patch = patches.get(timeout=T)
    check(patch.get("rate") == 7 and "$version" in patch, f"desired patch {patch}")
    print("PASS twins", flush=True)

    # 5. Downstream device telemetry.
    leaf = IoTHubDeviceClient.create_from_connection_string(
        f"HostName={hub};DeviceId=leaf1;SharedAccessKey={p['keys']['leaf1']};GatewayHostName=localhost",
        server_verification_cert=ca, connection_retry=False)
    timed(leaf.connect)
    m = Message('{"t": 21.5}')
    m.content_type = "application/json"
    m.content_encoding = "utf-8"
    timed(leaf.send_message, m)
    timed(leaf.shutdown)
    print("PASS downstream_device", flush=True)

    # 6. Delivery to a module that was offline, in order.
    timed(b.shutdown)
    time.sleep(0.5)
    for i in range(4):
        timed(a.send_message_to_output, Message(f"offline-{i}"), "out1")
    inbox2 = queue.Queue()
    b2 = module("modB")
    b2.on_message_received = lambda msg: inbox2.put(msg)
    timed(b2.connect)
    for i in range(4):
        got = inbox2.get(timeout=T)
        data = got.data.decode() if isinstance(got.data, bytes) else got.data
        check(data == f"offline-{i}", f"offline message {i}: {data!r}")
    print("PASS offline_delivery", flush=True)

    timed(a.shutdown)
    timed(b2.shutdown)
    print("ALL PASS", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:  # noqa: BLE001
        print(f"FAIL {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
