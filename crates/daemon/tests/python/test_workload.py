"""Interop check: the official Azure IoT Python SDK (azure-iot-device 2.14.x)
builds a module client from the environment verged gives a module.

create_from_edge_environment() fetches the trust bundle and signs a SAS token
through the module's workload socket. Nothing is dialled (there is no hub).
Prints one JSON line: {"ok": true, "token": ..., "trust_bundle": ...}
or {"ok": false, "error": ...}; the Rust test checks the token.
"""
import json
import os
import sys


def main():
    try:
        from azure.iot.device import IoTHubModuleClient
    except ImportError as e:  # pragma: no cover
        print(json.dumps({"ok": False, "error": "azure-iot-device missing: %s" % e}))
        return 3
    try:
        client = IoTHubModuleClient.create_from_edge_environment()
    except Exception as e:  # noqa: BLE001 - report any failure to the Rust side
        print(json.dumps({"ok": False, "error": "%s: %s" % (type(e).__name__, e)}))
        return 1
    cfg = client._mqtt_pipeline.pipeline_configuration
    print(json.dumps({
        "ok": True,
        "token": str(cfg.sastoken),
        "trust_bundle": cfg.server_verification_cert,
        "gateway_hostname": cfg.gateway_hostname,
        "hostname": cfg.hostname,
    }))
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    # The SDK starts background threads; leave without waiting for them.
    os._exit(rc)
