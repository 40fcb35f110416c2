"""X.509 devices at verge-cloud with the official SDKs, unmodified:
azure-iot-hub 2.7.0 creates them (create_device_with_x509,
create_device_with_certificate_authority), azure-iot-device 2.14.0 connects
with IoTHubDeviceClient.create_from_x509_certificate and sends telemetry.
Refusals (CONNACK 5 -> CredentialError): wrong thumbprint, expired
certificate, CN != device id, untrusted CA, a CA certificate as leaf, a
disabled device. Exits non-zero on the first mismatch; prints ALL PASS.

argv[1]: JSON {"service_connection_string", "device_host", "ca", "certs": {name: [cert, key]},
               "thumbprints": {name: hex}}. Certificates are made by the Rust test.
REQUESTS_CA_BUNDLE must point at verge-cloud's generated CA.
"""
import base64
import json
import sys

from azure.iot.device import IoTHubDeviceClient, Message, X509
from azure.iot.device.exceptions import CredentialError
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.sastoken import SasToken
import requests
from msrest.exceptions import HttpOperationError

params = json.loads(sys.argv[1])
CS = params["service_connection_string"]
HOST = params["device_host"]
CERTS = params["certs"]
TP = params["thumbprints"]
with open(params["ca"]) as f:
    CA = f.read()


def step(name):
    print("--", name, flush=True)


rm = IoTHubRegistryManager.from_connection_string(CS)
svc_host = CS.split(";")[0].split("=", 1)[1]
token = str(SasToken(svc_host, CS.split("SharedAccessKey=")[1], "iothubowner"))
base = "https://" + svc_host
auth = {"Authorization": token}


def d2c_from(offset):
    r = requests.get(base + "/verge/messages?from=%d" % offset, headers=auth)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line]


def client(device_id, cert):
    c, k = CERTS[cert]
    return IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(cert_file=c, key_file=k),
        hostname=HOST,
        device_id=device_id,
        server_verification_cert=CA,
        connection_retry=False,
    )


step("create X.509 devices with the service SDK")
d = rm.create_device_with_x509("ss1", TP["ss_sha256"], TP["second_sha256"].lower(), "enabled")
assert d.authentication.type == "selfSigned", d.authentication
assert d.authentication.x509_thumbprint.primary_thumbprint == TP["ss_sha256"].upper()
assert d.authentication.x509_thumbprint.secondary_thumbprint == TP["second_sha256"].upper()
assert d.authentication.symmetric_key.primary_key is None
rm.create_device_with_x509("ss2", TP["ss_sha1"], None, "enabled")
d = rm.create_device_with_certificate_authority("ca1", "enabled")
assert d.authentication.type == "certificateAuthority", d.authentication
rm.create_device_with_certificate_authority("ca2", "enabled")
rm.create_device_with_x509("off1", TP["ss_sha256"], None, "disabled")
got = rm.get_device("ss1")
assert got.authentication.type == "selfSigned"
try:
    rm.create_device_with_x509("bad", "1234", None, "enabled")
    raise AssertionError("a malformed thumbprint was accepted")
except HttpOperationError as e:
    assert e.response.status_code == 400, e
try:
    rm.create_device_with_x509("bad", TP["ss_sha256"], TP["ss_sha1"], "enabled")
    raise AssertionError("a SHA-256 and a SHA-1 thumbprint together were accepted")
except HttpOperationError as e:
    assert e.response.status_code == 400, e

for device_id, cert, label in [
    ("ss1", "ss", "self-signed, primary SHA-256 thumbprint"),
    ("ss1", "second", "self-signed, secondary SHA-256 thumbprint"),
    ("ss2", "ss", "self-signed, SHA-1 thumbprint"),
    ("ca1", "ca1", "CA-signed (verified CA)"),
]:
    step("telemetry: " + label)
    tail = len(d2c_from(0))
    dev = client(device_id, cert)
    dev.connect()
    dev.send_message(Message("hello from " + cert))
    got = d2c_from(tail)
    assert len(got) == 1 and got[0]["deviceId"] == device_id, got
    assert base64.b64decode(got[0]["body"]) == ("hello from " + cert).encode(), got
    dev.shutdown()

for device_id, cert, label in [
    ("ss1", "other", "wrong thumbprint"),
    ("ss1", "expired", "expired certificate"),
    ("ca2", "ca1", "CN is not the device id"),
    ("ca1", "untrusted", "untrusted CA"),
    ("ca1", "ca_as_leaf", "a CA certificate used as a leaf"),
    ("off1", "ss", "disabled device"),
]:
    step("refused: " + label)
    dev = client(device_id, cert)
    try:
        dev.connect()
        raise AssertionError("connected: " + label)
    except CredentialError:
        pass
    finally:
        dev.shutdown()

print("ALL PASS", flush=True)
