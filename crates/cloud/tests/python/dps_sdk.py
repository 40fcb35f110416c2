"""Drives verge-cloud's DPS with the official Azure IoT device SDK
(azure-iot-device 2.14.0, ProvisioningDeviceClient and IoTHubDeviceClient),
unmodified, plus the DPS HTTPS protocol as aziot-identityd speaks it, and
checks the effects through the official service SDK (azure-iot-hub 2.7.0)
and the DPS service REST API. Exits non-zero on the first mismatch; prints
ALL PASS at the end.

argv[1]: JSON {"service_connection_string", "host", "id_scope", "ca", "x509": {"ind": [cert, key],
"ind_pem", "stranger": [cert, key] (same CN as ind, another key), "group_ca_pem",
"member": [cert, key] (signed by the group CA)}}; certificates are made by the Rust test.
The SDKs always dial port 8883 of `host`, where verge-cloud serves both
IoT Hub's and DPS's MQTT. REQUESTS_CA_BUNDLE must point at verge-cloud's CA.
"""
import base64
import hashlib
import hmac
import json
import sys
import time
import urllib.parse

from azure.iot.device import IoTHubDeviceClient, Message, ProvisioningDeviceClient, X509
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.sastoken import SasToken
import requests

params = json.loads(sys.argv[1])
CS = params["service_connection_string"]
HOST = params["host"]
SCOPE = params["id_scope"]
with open(params["ca"]) as f:
    CA = f.read()
T = 15

rm = IoTHubRegistryManager.from_connection_string(CS)
svc_host = CS.split(";")[0].split("=", 1)[1]
svc_key = CS.split("SharedAccessKey=")[1]
base = "https://" + svc_host


def svc_headers():
    return {"Authorization": str(SasToken(svc_host, svc_key, "iothubowner")),
            "Content-Type": "application/json"}


def step(name):
    print("--", name, flush=True)


def b64key(seed):
    return base64.b64encode(bytes([seed]) * 32).decode()


def derive(group_key, registration_id):
    # As azure-iot-sdk-python's provision_symmetric_key_group.py sample does.
    mac = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def dps_sas(registration_id, key, lower=True, skn=True, ttl=30):
    # aziot-identityd's shape: sr lowercased and encoded, 30 s, skn=registration.
    sr = "%s/registrations/%s" % (SCOPE, registration_id)
    if lower:
        sr = sr.lower()
    sr_q = urllib.parse.quote(sr, safe="")
    se = int(time.time()) + ttl
    sig = base64.b64encode(hmac.new(base64.b64decode(key), ("%s\n%d" % (sr_q, se)).encode(),
                                    hashlib.sha256).digest()).decode()
    tok = "SharedAccessSignature sr=%s&sig=%s&se=%d" % (sr_q, urllib.parse.quote(sig, safe=""), se)
    return tok + ("&skn=registration" if skn else "")


def https_register(registration_id, key, body=None, raw=None):
    url = "%s/%s/registrations/%s/register?api-version=2021-06-01" % (base, SCOPE, registration_id)
    data = raw if raw is not None else json.dumps(
        body if body is not None else {"registrationId": registration_id})
    return requests.put(url, data=data, headers={
        "Authorization": dps_sas(registration_id, key),
        "Content-Type": "application/json; charset=utf-8", "Accept": "application/json"})


def sdk_register(registration_id, key, payload=None):
    c = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=HOST, registration_id=registration_id, id_scope=SCOPE,
        symmetric_key=key, server_verification_cert=CA)
    if payload is not None:
        c.provisioning_payload = payload
    return c.register()


def d2c_from(offset):
    r = requests.get(base + "/verge/messages?from=%d" % offset, headers=svc_headers())
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line]


def send_and_check(result, key, text):
    st = result.registration_state
    dev = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=key, hostname=st.assigned_hub, device_id=st.device_id,
        server_verification_cert=CA, connection_retry=False)
    dev.connect()
    start = len(d2c_from(0))
    dev.send_message(Message(text))
    deadline = time.time() + T
    while True:
        got = [m for m in d2c_from(start) if m["deviceId"] == st.device_id
               and base64.b64decode(m["body"]).decode() == text]
        if got:
            break
        assert time.time() < deadline, "telemetry %r from %s not in the D2C log" % (text, st.device_id)
        time.sleep(0.1)
    return dev


def put(path, body):
    return requests.put(base + path, data=json.dumps(body) if not isinstance(body, str) else body,
                        headers=svc_headers())


IND_KEY = b64key(1)

step("no enrollment yet: unknown registration -> 404")
r = https_register("nobody", b64key(9))
assert r.status_code == 404, (r.status_code, r.text)
assert "errorCode" in r.json(), r.text

step("enrollment service API: malformed bodies -> 400, no policy token -> 401")
assert put("/enrollments/dev-ind", "{not json").status_code == 400
r = put("/enrollments/dev-ind", {"attestation": {"type": "tpm"}})
assert r.status_code == 400 and "not supported" in r.text, r.text
r = put("/enrollments/dev-ind", {"attestation": {"type": "x509"}})
assert r.status_code == 400 and "attestation.x509" in r.text, r.text
assert put("/enrollments/Dev-Upper", {"attestation": {"type": "symmetricKey"}}).status_code == 400
assert put("/enrollments/dev-ind", {"registrationId": "other",
                                    "attestation": {"type": "symmetricKey"}}).status_code == 400
r = requests.put(base + "/enrollments/dev-ind", data="{}")
assert r.status_code == 401, r.status_code

step("individual enrollment: initial twin, payload, reset on re-provisioning")
r = put("/enrollments/dev-ind", {
    "registrationId": "dev-ind",
    "attestation": {"type": "symmetricKey",
                    "symmetricKey": {"primaryKey": IND_KEY, "secondaryKey": b64key(2)}},
    "initialTwin": {"tags": {"site": "lab"}, "properties": {"desired": {"interval": 5}}},
    "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": False},
    "payload": {"hello": "world"},
})
assert r.status_code == 200, r.text
got = requests.get(base + "/enrollments/dev-ind", headers=svc_headers()).json()
assert got["attestation"]["symmetricKey"]["primaryKey"] == IND_KEY, got
assert got["reprovisionPolicy"]["migrateDeviceData"] is False, got

step("wrong key -> 401 (HTTPS); the SDK's CONNECT is refused")
r = https_register("dev-ind", b64key(7))
assert r.status_code == 401, (r.status_code, r.text)
try:
    sdk_register("dev-ind", b64key(7))
    raise AssertionError("registration with a wrong key succeeded")
except AssertionError:
    raise
except Exception as e:  # the SDK raises CredentialError/ClientError on CONNACK 5
    print("   refused:", type(e).__name__, flush=True)

step("malformed register bodies -> 400")
r = https_register("dev-ind", IND_KEY, raw="{nope")
assert r.status_code == 400, (r.status_code, r.text)
r = https_register("dev-ind", IND_KEY, body={"registrationId": "someone-else"})
assert r.status_code == 400, (r.status_code, r.text)
r = https_register("dev-ind", IND_KEY, body=[1, 2])
assert r.status_code == 400, (r.status_code, r.text)

step("ProvisioningDeviceClient (MQTT), individual enrollment")
res = sdk_register("dev-ind", IND_KEY, payload={"model": "m1"})
assert res.status == "assigned", str(res)
st = res.registration_state
assert st.device_id == "dev-ind" and st.assigned_hub == HOST, str(res)
assert json.loads(st.response_payload) == {"hello": "world"}, st.response_payload
assert st.sub_status == "initialAssignment", st.sub_status
twin = rm.get_twin("dev-ind")
assert twin.tags == {"site": "lab"}, twin.tags
assert twin.properties.desired.get("interval") == 5, twin.properties.desired
reg = requests.get(base + "/registrations/dev-ind", headers=svc_headers()).json()
assert reg["deviceId"] == "dev-ind" and reg["assignedHub"] == HOST, reg

step("IoTHubDeviceClient with the assignment: telemetry reaches verge-cloud")
dev = send_and_check(res, IND_KEY, "from-individual")
dev.patch_twin_reported_properties({"fw": "1.0"})
assert rm.get_twin("dev-ind").properties.reported.get("fw") == "1.0"
rm.update_twin("dev-ind", type(twin)(tags={"site": "moved"}), "*")
dev.shutdown()

step("re-provisioning with migrateDeviceData=false resets the twin")
res = sdk_register("dev-ind", IND_KEY)
assert res.status == "assigned" and res.registration_state.sub_status == "deviceDataReset", str(res)
twin = rm.get_twin("dev-ind")
assert "fw" not in twin.properties.reported, twin.properties.reported
assert twin.tags == {"site": "lab"}, twin.tags

step("re-provisioning with migrateDeviceData=true keeps the twin")
got = requests.get(base + "/enrollments/dev-ind", headers=svc_headers()).json()
got["reprovisionPolicy"]["migrateDeviceData"] = True
r = requests.put(base + "/enrollments/dev-ind", data=json.dumps(got),
                 headers=dict(svc_headers(), **{"If-Match": '"%s"' % got["etag"]}))
assert r.status_code == 200, r.text
r = requests.put(base + "/enrollments/dev-ind", data=json.dumps(got),
                 headers=dict(svc_headers(), **{"If-Match": '"stale"'}))
assert r.status_code == 412, r.status_code
dev = send_and_check(sdk_register("dev-ind", IND_KEY), IND_KEY, "before-migrate")
dev.patch_twin_reported_properties({"fw": "2.0"})
dev.shutdown()
res = sdk_register("dev-ind", IND_KEY)
assert res.registration_state.sub_status == "deviceDataMigrated", str(res)
assert rm.get_twin("dev-ind").properties.reported.get("fw") == "2.0"

step("group enrollment: derived device keys")
GROUP_KEY = b64key(3)
r = put("/enrollmentGroups/line-1", {
    "enrollmentGroupId": "line-1",
    "attestation": {"type": "symmetricKey",
                    "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": b64key(4)}},
    "capabilities": {"iotEdge": False},
})
assert r.status_code == 200, r.text
assert put("/enrollmentGroups/line-1", {"deviceId": "x", "attestation": {"type": "symmetricKey"}}).status_code == 400
for rid in ["sensor-a", "sensor-b"]:
    key = derive(GROUP_KEY, rid)
    res = sdk_register(rid, key)
    assert res.status == "assigned" and res.registration_state.device_id == rid, str(res)
    send_and_check(res, key, "from-" + rid).shutdown()
    assert rm.get_device(rid).authentication.symmetric_key.primary_key == key

step("group: the group key itself (not derived) -> 401; unknown id with a group present -> 401")
r = https_register("sensor-c", GROUP_KEY)
assert r.status_code == 401, (r.status_code, r.text)

step("HTTPS protocol as aziot-identityd speaks it: 202 + operationId, then 200 on poll")
key = derive(GROUP_KEY, "edge-http")
r = https_register("edge-http", key, body={"registrationId": "edge-http", "payload": {"a": 1}})
assert r.status_code == 202, (r.status_code, r.text)
assert r.headers.get("retry-after") is not None, r.headers
body = r.json()
assert body["status"] == "assigning" and body["registrationState"]["registrationId"] == "edge-http", body
op = body["operationId"]
url = "%s/%s/registrations/edge-http/operations/%s?api-version=2021-06-01" % (base, SCOPE, urllib.parse.quote(op))
r = requests.get(url, headers={"Authorization": dps_sas("edge-http", key)})
assert r.status_code == 200, (r.status_code, r.text)
body = r.json()
assert body["status"] == "assigned", body
assert body["registrationState"]["assignedHub"] == HOST and body["registrationState"]["deviceId"] == "edge-http", body
r = requests.get(url.replace(op, "5.0.nope"), headers={"Authorization": dps_sas("edge-http", key)})
assert r.status_code == 404, r.status_code
r = requests.get(url, headers={"Authorization": dps_sas("sensor-a", derive(GROUP_KEY, "sensor-a"))})
assert r.status_code == 401, r.status_code

step("disabled enrollment: assignment fails")
got = requests.get(base + "/enrollments/dev-ind", headers=svc_headers()).json()
got["provisioningStatus"] = "disabled"
assert put("/enrollments/dev-ind", got).status_code == 200
try:
    sdk_register("dev-ind", IND_KEY)
    raise AssertionError("a disabled enrollment was assigned")
except AssertionError:
    raise
except Exception as e:
    print("   refused:", type(e).__name__, flush=True)

X = params["x509"]


def x509_register(files, registration_id):
    c = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=HOST, registration_id=registration_id, id_scope=SCOPE,
        x509=X509(cert_file=files[0], key_file=files[1]), server_verification_cert=CA)
    return c.register()


def x509_send_and_check(result, files, text):
    st = result.registration_state
    dev = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(cert_file=files[0], key_file=files[1]), hostname=st.assigned_hub,
        device_id=st.device_id, server_verification_cert=CA, connection_retry=False)
    dev.connect()
    start = len(d2c_from(0))
    dev.send_message(Message(text))
    deadline = time.time() + T
    while not [m for m in d2c_from(start) if m["deviceId"] == st.device_id
               and base64.b64decode(m["body"]).decode() == text]:
        assert time.time() < deadline, "telemetry %r from %s not in the D2C log" % (text, st.device_id)
        time.sleep(0.1)
    dev.shutdown()


step("X.509 individual enrollment: the device's own certificate")
r = put("/enrollments/x509-ind", {
    "registrationId": "x509-ind",
    "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": X["ind_pem"]}}}},
})
assert r.status_code == 200, r.text
info = r.json()["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
assert info["subjectName"] == "CN=x509-ind" and len(info["sha256Thumbprint"]) == 64, info
res = x509_register(X["ind"], "x509-ind")
assert res.status == "assigned" and res.registration_state.device_id == "x509-ind", str(res)
x509_send_and_check(res, X["ind"], "from-x509-ind")
assert rm.get_device("x509-ind").authentication.type == "selfSigned"

step("X.509: another certificate with the same CN is refused")
try:
    x509_register(X["stranger"], "x509-ind")
    raise AssertionError("a certificate not in the enrollment was assigned")
except AssertionError:
    raise
except Exception as e:
    print("   refused:", type(e).__name__, flush=True)

step("X.509 enrollment group: a device signed by the group's CA")
r = put("/enrollmentGroups/x509-line", {
    "enrollmentGroupId": "x509-line",
    "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": X["group_ca_pem"]}}}},
})
assert r.status_code == 200, r.text
r = put("/enrollmentGroups/bad-line", {
    "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": X["ind_pem"]}}}},
})
assert r.status_code == 400 and "not a CA" in r.text, r.text
res = x509_register(X["member"], "x509-member")
assert res.status == "assigned" and res.registration_state.device_id == "x509-member", str(res)
x509_send_and_check(res, X["member"], "from-x509-member")
reg = requests.get(base + "/registrations/x509-member", headers=svc_headers()).json()
assert reg.get("enrollmentGroupId") == "x509-line", reg

step("X.509 over HTTPS: no token and no certificate -> 401")
r = requests.put("%s/%s/registrations/x509-member/register?api-version=2021-06-01" % (base, SCOPE),
                 data=json.dumps({"registrationId": "x509-member"}),
                 headers={"Content-Type": "application/json"})
assert r.status_code == 401, (r.status_code, r.text)
r = requests.put("%s/%s/registrations/x509-member/register?api-version=2021-06-01" % (base, SCOPE),
                 data=json.dumps({"registrationId": "x509-member"}),
                 headers={"Content-Type": "application/json"}, cert=tuple(X["member"]))
assert r.status_code == 202, (r.status_code, r.text)

step("delete an enrollment")
r = requests.delete(base + "/enrollmentGroups/line-1", headers=svc_headers())
assert r.status_code == 204, r.status_code
assert requests.get(base + "/enrollmentGroups/line-1", headers=svc_headers()).status_code == 404

print("ALL PASS", flush=True)
