"""Drives verge-cloud with the official Azure IoT Hub service SDK
(azure-iot-hub 2.7.0), unmodified. Exits non-zero on the first mismatch.

argv[1]: JSON {"connection_string": ..., "bad_connection_string": ...}.
REQUESTS_CA_BUNDLE must point at verge-cloud's generated CA.
"""
import base64
import json
import sys

from azure.iot.hub import IoTHubConfigurationManager, IoTHubRegistryManager
from azure.iot.hub.models import (
    CloudToDeviceMethod,
    ConfigurationContent,
    Twin,
    TwinProperties,
)
from azure.iot.hub.sastoken import SasToken
from msrest.exceptions import HttpOperationError
import requests

params = json.loads(sys.argv[1])
CS = params["connection_string"]


def step(name):
    print("--", name, flush=True)


def expect_status(status, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except HttpOperationError as e:
        got = e.response.status_code
        assert got == status, "expected %d, got %d: %s" % (status, got, e.response.text)
        return e
    raise AssertionError("expected HTTP %d, call succeeded" % status)


rm = IoTHubRegistryManager.from_connection_string(CS)
cm = IoTHubConfigurationManager.from_connection_string(CS)

step("create SAS device with generated keys")
leaf = rm.create_device_with_sas("leaf1", None, None, "enabled")
assert leaf.device_id == "leaf1"
assert leaf.status == "enabled"
assert leaf.authentication.type == "sas"
for k in (leaf.authentication.symmetric_key.primary_key, leaf.authentication.symmetric_key.secondary_key):
    assert len(base64.b64decode(k)) == 32, k
assert leaf.generation_id and leaf.etag
assert leaf.connection_state == "Disconnected"
assert leaf.capabilities.iot_edge is False

step("create edge device with given keys")
pk = base64.b64encode(b"p" * 32).decode()
sk = base64.b64encode(b"s" * 32).decode()
edge = rm.create_device_with_sas("edge1", pk, sk, "enabled", iot_edge=True)
assert edge.capabilities.iot_edge is True
assert edge.authentication.symmetric_key.primary_key == pk
assert edge.device_scope.startswith("ms-azure-iot-edge://edge1-"), edge.device_scope

step("create a child of the edge device")
child = rm.create_device_with_sas("child1", None, None, "enabled", device_scope=edge.device_scope)
assert child.parent_scopes == [edge.device_scope], child.parent_scopes
expect_status(
    400, rm.create_device_with_sas, "child2", None, None, "enabled",
    parent_scopes=[edge.device_scope, "ms-azure-iot-edge://x-1"],
)

step("get device, list devices, conflicts")
got = rm.get_device("leaf1")
assert got.generation_id == leaf.generation_id and got.etag == leaf.etag
ids = sorted(d.device_id for d in rm.get_devices())
assert ids == ["child1", "edge1", "leaf1"], ids
assert len(rm.get_devices(max_number_of_devices=2)) == 2
expect_status(409, rm.create_device_with_sas, "leaf1", None, None, "enabled")
expect_status(412, rm.update_device_with_sas, "leaf1", "wrong-etag", pk, sk, "disabled")
upd = rm.update_device_with_sas("leaf1", got.etag, pk, sk, "disabled")
assert upd.status == "disabled" and upd.etag != got.etag
assert upd.generation_id == leaf.generation_id
expect_status(404, rm.get_device, "nobody")

step("modules")
mod = rm.create_module_with_sas("leaf1", "mod1", "me", None, None)
assert mod.module_id == "mod1" and mod.device_id == "leaf1" and mod.managed_by == "me"
assert rm.get_module("leaf1", "mod1").generation_id == mod.generation_id
assert [m.module_id for m in rm.get_modules("leaf1")] == ["mod1"]
assert sorted(m.module_id for m in rm.get_modules("edge1")) == ["$edgeAgent", "$edgeHub"]
upd = rm.update_module_with_sas("leaf1", "mod1", "other", mod.etag, pk, sk)
assert upd.managed_by == "other"

step("device twin: tags and desired")
twin = rm.get_twin("leaf1")
assert twin.device_id == "leaf1" and twin.properties.desired["$version"] == 0
patch = Twin(tags={"site": "plant-3", "line": {"n": 1}}, properties=TwinProperties(desired={"rate": 5}))
t1 = rm.update_twin("leaf1", patch, twin.etag)
assert t1.tags == {"site": "plant-3", "line": {"n": 1}}, t1.tags
assert t1.properties.desired["rate"] == 5
assert t1.properties.desired["$version"] == 1
assert t1.etag != twin.etag and t1.version > twin.version
expect_status(412, rm.update_twin, "leaf1", Twin(tags={"x": 1}), twin.etag)
t2 = rm.update_twin("leaf1", Twin(tags={"line": {"m": 2}}, properties=TwinProperties(desired={"rate": None, "mode": "eco"})))
assert t2.tags == {"site": "plant-3", "line": {"n": 1, "m": 2}}, t2.tags
assert "rate" not in t2.properties.desired and t2.properties.desired["mode"] == "eco"
assert rm.get_twin("leaf1").properties.desired["$version"] == 2
t3 = rm.replace_twin("leaf1", Twin(tags={"only": True}, properties=TwinProperties(desired={"a": 1})))
assert t3.tags == {"only": True} and t3.properties.desired["a"] == 1
assert "mode" not in t3.properties.desired
expect_status(400, rm.update_twin, "leaf1", Twin(properties=TwinProperties(desired={"bad key": 1})))

step("module twin")
mt = rm.update_module_twin("leaf1", "mod1", Twin(properties=TwinProperties(desired={"threshold": 80})))
assert mt.module_id == "mod1" and mt.properties.desired["threshold"] == 80
assert rm.get_module_twin("leaf1", "mod1").properties.desired["$version"] == 1

step("apply configuration content to the edge device")
agent = {
    "schemaVersion": "1.1",
    "runtime": {"type": "docker", "settings": {"minDockerVersion": "v1.25", "loggingOptions": ""}},
    "systemModules": {
        "edgeAgent": {"type": "docker", "settings": {"image": "mcr.microsoft.com/azureiotedge-agent:1.5", "createOptions": "{}"}},
        "edgeHub": {"type": "docker", "status": "running", "restartPolicy": "always",
                    "settings": {"image": "mcr.microsoft.com/azureiotedge-hub:1.5", "createOptions": "{}"}},
    },
    "modules": {
        "filter": {"version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always",
                   "settings": {"image": "example/filter:1.0", "createOptions": ""}},
    },
}
hub = {"schemaVersion": "1.1", "routes": {"up": "FROM /messages/* INTO $upstream"},
       "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}
content = ConfigurationContent(modules_content={
    "$edgeAgent": {"properties.desired": agent},
    "$edgeHub": {"properties.desired": hub},
    "filter": {"properties.desired": {"threshold": 42}},
})
cm.apply_configuration_on_edge_device("edge1", content)
ea = rm.get_module_twin("edge1", "$edgeAgent")
assert ea.module_id == "$edgeAgent"
assert ea.properties.desired["schemaVersion"] == "1.1"
assert ea.properties.desired["modules"]["filter"]["settings"]["image"] == "example/filter:1.0"
assert rm.get_module_twin("edge1", "$edgeHub").properties.desired["routes"]["up"].startswith("FROM")
assert rm.get_module_twin("edge1", "filter").properties.desired["threshold"] == 42
assert rm.get_module("edge1", "filter").managed_by == "IotEdge"
bad_agent = dict(agent, schemaVersion="9.0")
bad = ConfigurationContent(modules_content={
    "$edgeAgent": {"properties.desired": bad_agent},
    "$edgeHub": {"properties.desired": hub},
})
e = expect_status(400, cm.apply_configuration_on_edge_device, "edge1", bad)
assert "schemaVersion" in e.response.text, e.response.text
assert rm.get_module_twin("edge1", "$edgeAgent").properties.desired["schemaVersion"] == "1.1"
expect_status(400, cm.apply_configuration_on_edge_device, "leaf1", content)

step("direct method to a device that is not connected")
req = CloudToDeviceMethod(method_name="reboot", payload={"now": True}, response_timeout_in_seconds=5)
e = expect_status(404, rm.invoke_device_method, "child1", req)
assert "DeviceNotOnline" in e.response.text, e.response.text
expect_status(404, rm.invoke_device_module_method, "leaf1", "mod1", req)

step("Verge-specific C2D and D2C paths")
host = CS.split(";")[0].split("=", 1)[1]
token = str(SasToken(host, CS.split("SharedAccessKey=")[1], "iothubowner"))
base = "https://" + host
r = requests.post(base + "/verge/devices/child1/messages/deviceBound?ttlSecs=60",
                  data=b"hello", headers={"Authorization": token, "iothub-messageid": "c2d-1",
                                          "iothub-app-kind": "greeting"})
assert r.status_code == 200 and r.json()["messageId"] == "c2d-1", r.text
assert rm.get_device("child1").cloud_to_device_message_count == 1
r = requests.get(base + "/verge/feedback?from=0", headers={"Authorization": token})
assert r.status_code == 200 and r.json() == [], r.text
r = requests.get(base + "/verge/messages?from=0", headers={"Authorization": token})
assert r.status_code == 200 and r.text == "", r.text
assert requests.get(base + "/verge/messages", headers={"Authorization": token + "x"}).status_code == 401

step("bad SAS key is refused with 401")
bad_rm = IoTHubRegistryManager.from_connection_string(params["bad_connection_string"])
e = expect_status(401, bad_rm.get_device, "leaf1")
assert "IotHubUnauthorizedAccess" in e.response.text

step("delete")
rm.delete_module("leaf1", "mod1")
expect_status(404, rm.get_module, "leaf1", "mod1")
rm.delete_device("child1")
expect_status(404, rm.get_device, "child1")
expect_status(404, rm.get_twin, "child1")

print("OK", flush=True)
