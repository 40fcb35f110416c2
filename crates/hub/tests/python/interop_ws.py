"""Interop over port 443: the official azure-iot-device SDK using MQTT over
WebSocket (websockets=True) and module-to-module invoke_method (HTTPS),
plus SAS tokens computed here with Python's hmac (independent of the hub's
Rust signer) accepted or refused as IoT Hub would.

Usage: interop_ws.py <params.json>
params: hub, device, ca (PEM path), keys {modA, modB, bad}.
Prints "PASS <scenario>" per scenario; exits non-zero on the first failure.
"""

import json
import os
import queue
import sys
import time
from functools import partial

import timed_call
from azure.iot.device import IoTHubModuleClient, Message, MethodResponse
from azure.iot.device import exceptions
from iothub_sas import sign

T = 15  # seconds per SDK call

# Every blocking call runs under timed(); T unless a call says otherwise.
timed = partial(timed_call.timed, timeout=T)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def refused(client, what):
    try:
        timed(client.connect)
        raise AssertionError(f"{what}: connect succeeded")
    except exceptions.CredentialError:
        pass
    finally:
        try:
            timed(client.shutdown)
        except Exception:  # noqa: BLE001
            pass


def main():
    p = json.load(open(sys.argv[1]))
    hub, dev = p["hub"], p["device"]
    ca = open(p["ca"]).read()

    def cs(m, key=None):
        return (f"HostName={hub};DeviceId={dev};ModuleId={m};"
                f"SharedAccessKey={key or p['keys'][m]};GatewayHostName=localhost")

    def ws_module(m, key=None):
        return IoTHubModuleClient.create_from_connection_string(
            cs(m, key), server_verification_cert=ca, websockets=True, connection_retry=False)

    def ws_token_client(token):
        return IoTHubModuleClient.create_from_sastoken(
            token, gateway_hostname="localhost", server_verification_cert=ca,
            websockets=True, connection_retry=False)

    # 1. Wrong key over WebSocket: CONNACK 5 -> CredentialError.
    refused(ws_module("modA", key=p["keys"]["bad"]), "wrong key")
    print("PASS ws_auth_rejection", flush=True)

    # 2. Module B over WebSocket receives routed output of module A (also over
    #    WebSocket, built like a module in a container would be) in order,
    #    with properties and binary bodies.
    inbox = queue.Queue()
    b = ws_module("modB")
    timed(b.connect)
    b.on_message_received = lambda msg: inbox.put(msg)

    def on_method(req):
        resp = MethodResponse.create_from_method_request(
            req, 201, {"echo": req.payload, "name": req.name})
        b.send_method_response(resp)

    b.on_method_request_received = on_method
    os.environ["EdgeHubConnectionString"] = cs("modA")
    os.environ["EdgeModuleCACertificateFile"] = p["ca"]
    a = IoTHubModuleClient.create_from_edge_environment(websockets=True, connection_retry=False)
    timed(a.connect)
    bodies = [bytes([255, 0, i]) * 50 for i in range(3)]
    for i, body in enumerate(bodies):
        msg = Message(body)
        msg.custom_properties["seq"] = str(i)
        timed(a.send_message_to_output, msg, "out1")
    for i, body in enumerate(bodies):
        got = inbox.get(timeout=T)
        check(got.input_name == "in1", f"input name {got.input_name}")
        check(got.data == body, f"payload {i}: {got.data!r}")
        check(got.custom_properties.get("seq") == str(i), f"order/properties {got.custom_properties}")
        check(got.custom_properties.get("$.cmid") == "modA", f"sender {got.custom_properties}")
    print("PASS ws_module_to_module", flush=True)

    # 3. Twin over WebSocket.
    timed(b.patch_twin_reported_properties, {"via": "ws"})
    twin = timed(b.get_twin)
    check(twin["reported"].get("via") == "ws", f"twin {twin}")
    print("PASS ws_twin", flush=True)

    # 4. Module-to-module direct method (HTTPS on 443), callee on WebSocket.
    res = timed(a.invoke_method,
                {"methodName": "echo", "payload": {"x": [1, 2]}, "responseTimeoutInSeconds": 5},
                dev, module_id="modB")
    check(res == {"status": 201, "payload": {"echo": {"x": [1, 2]}, "name": "echo"}},
          f"method result {res}")
    try:
        timed(a.invoke_method, {"methodName": "echo", "payload": None}, dev, module_id="ghost")
        raise AssertionError("invoke_method on an unconnected module succeeded")
    except exceptions.ClientError as e:
        check(isinstance(e.__cause__, exceptions.ServiceError), f"cause {e.__cause__!r}")
    print("PASS invoke_method", flush=True)

    # 5. Tokens signed here: valid accepted; another hub's audience and an
    #    expired token refused by the hub (CONNACK 5 -> CredentialError).
    res_a = f"{hub}/devices/{dev}/modules/modA"
    ok = ws_token_client(sign(res_a, p["keys"]["modA"], int(time.time()) + 600))
    timed(ok.connect)
    timed(ok.shutdown)
    foreign = f"otherhub.azure-devices.net/devices/{dev}/modules/modA"
    refused(ws_token_client(sign(foreign, p["keys"]["modA"], int(time.time()) + 600)),
            "foreign hub audience")
    soon = ws_token_client(sign(res_a, p["keys"]["modA"], int(time.time()) + 2))
    time.sleep(3)
    refused(soon, "expired token")
    print("PASS python_signed_tokens", flush=True)

    timed(a.shutdown)
    timed(b.shutdown)
    print("ALL PASS", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:  # noqa: BLE001
        print(f"FAIL {type(e).__name__}: {e!r} cause={e.__cause__!r}", flush=True)
        sys.exit(1)
