"""X.509 leaf devices through verge-hub with the official Azure IoT device SDK
(azure-iot-device 2.14.0), unmodified: IoTHubDeviceClient.create_from_x509_certificate
(no password, TLS client certificate) sends telemetry; a wrong certificate, and
a module presenting a certificate (IoTHubModuleClient.create_from_x509_certificate),
are refused (CONNACK 5 -> CredentialError). The Rust test checks the
telemetry reached verge-cloud. Prints ALL PASS.

argv[1]: JSON {"host", "ca", "edge", "certs": {name: [cert, key]}}.
"""
import json
import sys

from azure.iot.device import IoTHubDeviceClient, IoTHubModuleClient, Message, X509
from azure.iot.device.exceptions import CredentialError

params = json.loads(sys.argv[1])
HOST = params["host"]
CERTS = params["certs"]
with open(params["ca"]) as f:
    CA = f.read()


def x509(name):
    c, k = CERTS[name]
    return X509(cert_file=c, key_file=k)


def step(name):
    print("--", name, flush=True)


for device_id, cert in [("pyss", "pyss"), ("pyca", "pyca")]:
    step("telemetry from %s through the hub" % device_id)
    dev = IoTHubDeviceClient.create_from_x509_certificate(
        x509=x509(cert), hostname=HOST, device_id=device_id,
        server_verification_cert=CA, connection_retry=False)
    dev.connect()
    dev.send_message(Message("py-" + device_id))
    dev.shutdown()

step("refused: wrong certificate")
dev = IoTHubDeviceClient.create_from_x509_certificate(
    x509=x509("wrong"), hostname=HOST, device_id="pyss",
    server_verification_cert=CA, connection_retry=False)
try:
    dev.connect()
    raise AssertionError("connected with a wrong certificate")
except CredentialError:
    pass
finally:
    dev.shutdown()

step("refused: a module presenting a certificate")
mod = IoTHubModuleClient.create_from_x509_certificate(
    x509=x509("pyss"), hostname=HOST, device_id=params["edge"], module_id="modA",
    server_verification_cert=CA, connection_retry=False)
try:
    mod.connect()
    raise AssertionError("a module connected with a certificate")
except CredentialError:
    pass
finally:
    mod.shutdown()

print("ALL PASS", flush=True)
