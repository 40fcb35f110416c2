"""Drives verge-cloud's device endpoint with the official Azure IoT device SDK
(azure-iot-device 2.14.0), unmodified, and checks the effects through the
official service SDK (azure-iot-hub 2.7.0) and Verge's HTTP paths.
Exits non-zero on the first mismatch; prints ALL PASS at the end.

argv[1]: JSON {"service_connection_string", "device_host", "ca"}.
The device SDK always dials port 8883 of device_host.
REQUESTS_CA_BUNDLE must point at verge-cloud's generated CA.
"""
import base64
import json
import queue
import sys
import time

from azure.iot.device import IoTHubDeviceClient, IoTHubModuleClient, Message, MethodResponse
from azure.iot.device.exceptions import CredentialError
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties
from azure.iot.hub.sastoken import SasToken
import requests

params = json.loads(sys.argv[1])
CS = params["service_connection_string"]
HOST = params["device_host"]
with open(params["ca"]) as f:
    CA = f.read()
T = 15


def step(name):
    print("--", name, flush=True)


def wait_until(what, fn, timeout=T):
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError("timed out: " + what)
        time.sleep(0.1)


rm = IoTHubRegistryManager.from_connection_string(CS)
svc_host = CS.split(";")[0].split("=", 1)[1]
token = str(SasToken(svc_host, CS.split("SharedAccessKey=")[1], "iothubowner"))
base = "https://" + svc_host
auth = {"Authorization": token}


def d2c_from(offset):
    r = requests.get(base + "/verge/messages?from=%d" % offset, headers=auth)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line]


step("register a device and a module through the service API")
pk = base64.b64encode(b"d" * 32).decode()
mk = base64.b64encode(b"m" * 32).decode()
rm.create_device_with_sas("dev1", pk, base64.b64encode(b"e" * 32).decode(), "enabled")
rm.create_module_with_sas("dev1", "modX", None, mk, base64.b64encode(b"n" * 32).decode())
dev_cs = "HostName=%s;DeviceId=dev1;SharedAccessKey=%s" % (HOST, pk)
mod_cs = "HostName=%s;DeviceId=dev1;ModuleId=modX;SharedAccessKey=%s" % (HOST, mk)

step("bad SAS key: connection refused (CONNACK 5)")
bad = IoTHubDeviceClient.create_from_connection_string(
    "HostName=%s;DeviceId=dev1;SharedAccessKey=%s" % (HOST, base64.b64encode(b"x" * 32).decode()),
    server_verification_cert=CA,
    connection_retry=False,
)
try:
    bad.connect()
    raise AssertionError("connect with a bad key succeeded")
except CredentialError:
    pass
finally:
    bad.shutdown()
assert rm.get_device("dev1").connection_state == "Disconnected"

step("device connects with its connection string")
dev = IoTHubDeviceClient.create_from_connection_string(dev_cs, server_verification_cert=CA)
desired_q = queue.Queue()
c2d_q = queue.Queue()
dev.on_twin_desired_properties_patch_received = desired_q.put
dev.on_message_received = c2d_q.put


def on_method(req):
    dev.send_method_response(
        MethodResponse.create_from_method_request(req, 200, {"echo": req.payload, "name": req.name})
    )


dev.on_method_request_received = on_method
dev.connect()
assert rm.get_device("dev1").connection_state == "Connected"

step("telemetry lands in the D2C log with its properties")
tail = len(d2c_from(0))
msg = Message('{"t": 21}')
msg.message_id = "m-1"
msg.custom_properties["color"] = "blue"
dev.send_message(msg)
got = d2c_from(tail)
assert len(got) == 1, got
e = got[0]
assert e["deviceId"] == "dev1" and e["moduleId"] is None, e
assert e["messageId"] == "m-1", e
assert e["properties"]["color"] == "blue", e
assert base64.b64decode(e["body"]) == b'{"t": 21}', e

step("twin get and reported patch (visible through the service API)")
twin = dev.get_twin()
assert "desired" in twin and "reported" in twin, twin
dev.patch_twin_reported_properties({"fw": "1.2.3"})
assert rm.get_twin("dev1").properties.reported["fw"] == "1.2.3"

step("desired patch from the service API reaches the device")
rm.update_twin("dev1", Twin(properties=TwinProperties(desired={"rate": 7})))
# The SDK also hands the handler the whole desired document it reads on
# (re)connect, so skip anything before the patch we made.
patch = desired_q.get(timeout=T)
while "rate" not in patch:
    patch = desired_q.get(timeout=T)
assert patch["rate"] == 7 and "$version" in patch, patch
assert dev.get_twin()["desired"]["rate"] == 7

step("direct method invoked through the service SDK is answered")
res = rm.invoke_device_method(
    "dev1", CloudToDeviceMethod(method_name="reboot", payload={"delay": 3}, response_timeout_in_seconds=10)
)
assert res.status == 200, res
assert res.payload == {"echo": {"delay": 3}, "name": "reboot"}, res.payload

step("C2D through the Verge HTTP path, completion recorded as feedback")
fb_before = len(requests.get(base + "/verge/feedback?from=0", headers=auth).json())
r = requests.post(base + "/verge/devices/dev1/messages/deviceBound?ttlSecs=60",
                  data=b"hello device", headers=dict(auth, **{"iothub-messageid": "c2d-1",
                                                             "iothub-app-kind": "greeting"}))
assert r.status_code == 200, r.text
m = c2d_q.get(timeout=T)
assert m.data == b"hello device", m.data
assert m.message_id == "c2d-1", m.message_id
assert m.custom_properties.get("kind") == "greeting", m.custom_properties


def completed():
    fb = requests.get(base + "/verge/feedback?from=0", headers=auth).json()
    return [f for f in fb[fb_before:] if f["originalMessageId"] == "c2d-1"]


fb = wait_until("C2D completion feedback", completed)
assert fb[0]["statusCode"] == "Success" and fb[0]["deviceId"] == "dev1", fb

step("module identity: telemetry and reported properties")
mod = IoTHubModuleClient.create_from_connection_string(mod_cs, server_verification_cert=CA)
mod.connect()
tail = len(d2c_from(0))
mm = Message("from module")
mm.custom_properties["n"] = "1"
mod.send_message_to_output(mm, "out1")
got = d2c_from(tail)
assert len(got) == 1 and got[0]["deviceId"] == "dev1" and got[0]["moduleId"] == "modX", got
assert got[0]["properties"]["n"] == "1", got
mod.patch_twin_reported_properties({"ready": True})
assert rm.get_module_twin("dev1", "modX").properties.reported["ready"] is True
mod.shutdown()

step("disconnect is visible through the service API")
dev.shutdown()
wait_until("device disconnected", lambda: rm.get_device("dev1").connection_state == "Disconnected")

print("ALL PASS", flush=True)
