"""One operation against verge-cloud with the official Azure IoT Hub service
SDK (azure-iot-hub 2.7.0), unmodified; used by tests/cloud_deployment.rs.

argv[1]: JSON {"cs": <service connection string>, "op": ..., ...}.
REQUESTS_CA_BUNDLE must point at verge-cloud's generated CA.
Prints one JSON document on success; exits non-zero on failure.
"""
import json
import sys

from azure.iot.hub import IoTHubConfigurationManager, IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, ConfigurationContent, Twin, TwinProperties

p = json.loads(sys.argv[1])
rm = IoTHubRegistryManager.from_connection_string(p["cs"])
op = p["op"]

if op == "register_edge":
    # An edge device with the SAS key its verged holds.
    d = rm.create_device_with_sas(p["device"], p["pk"], p["sk"], "enabled", iot_edge=True)
    print(json.dumps({"device_id": d.device_id, "iot_edge": d.capabilities.iot_edge}))
elif op == "module_keys":
    # The module identity's keys: those verged derives for its generation id.
    m = rm.get_module(p["device"], p["module"])
    u = rm.update_module_with_sas(p["device"], p["module"], m.managed_by, m.etag, p["pk"], p["sk"])
    print(json.dumps({"module_id": u.module_id}))
elif op == "apply":
    cm = IoTHubConfigurationManager.from_connection_string(p["cs"])
    cm.apply_configuration_on_edge_device(
        p["device"], ConfigurationContent(modules_content=p["modules_content"])
    )
    print(json.dumps({"applied": True}))
elif op == "patch_desired":
    t = rm.update_module_twin(p["device"], p["module"], Twin(properties=TwinProperties(desired=p["desired"])))
    print(json.dumps({"version": t.properties.desired.get("$version")}))
elif op == "module_twin":
    t = rm.get_module_twin(p["device"], p["module"])
    print(json.dumps({
        "desired": t.properties.desired,
        "reported": t.properties.reported,
        "connection_state": t.connection_state,
    }))
elif op == "invoke":
    # A direct method to a module; the device's status and payload.
    r = rm.invoke_device_module_method(p["device"], p["module"], CloudToDeviceMethod(
        method_name=p["method"], payload=p.get("payload"),
        response_timeout_in_seconds=p["timeout"]))
    print(json.dumps({"status": r.status, "payload": r.payload}))
else:
    raise SystemExit("unknown op " + op)
