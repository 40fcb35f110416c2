"""An X.509 device on verge-cloud over MQTT over WebSocket (the HTTPS port,
`/$iothub/websocket`, subprotocol `mqtt`) with paho-mqtt (what the Azure
Python SDK runs on): only its certificate, no password; CONNACK 0 and a
telemetry message, then a certificate the cloud does not know gets CONNACK 5.

Usage: mqtt_ws_x509.py <params.json>
params: host, https_port, ca, x509_device, x509 [cert, key], stranger [cert, key].
Prints "PASS …" per step and "ALL PASS"; exits non-zero on the first failure.
"""

import json
import ssl
import sys
import threading

import paho.mqtt.client as mqtt

p = json.load(open(sys.argv[1]))
DEV = p["x509_device"]
T = 15


def connect(files):
    c = mqtt.Client(client_id=DEV, protocol=mqtt.MQTTv311, transport="websockets")
    c.ws_set_options(path="/$iothub/websocket")
    c.username_pw_set(f"{p['host']}/{DEV}/?api-version=2021-04-12")
    ctx = ssl.create_default_context(cafile=p["ca"])
    ctx.load_cert_chain(files[0], files[1])
    c.tls_set_context(ctx)
    done = threading.Event()
    result = {}

    def on_connect(_c, _u, _f, rc):
        result["rc"] = rc
        done.set()

    c.on_connect = on_connect
    c.connect("localhost", p["https_port"], keepalive=30)
    c.loop_start()
    if not done.wait(T):
        raise AssertionError("no CONNACK")
    return c, result["rc"]


c, rc = connect(p["x509"])
if rc != 0:
    raise AssertionError(f"CONNACK {rc} for the device's own certificate")
info = c.publish(f"devices/{DEV}/messages/events/auth=x509-ws", b"over-mqtt-ws-x509", qos=1)
info.wait_for_publish(T)
if not info.is_published():
    raise AssertionError("no PUBACK")
c.disconnect()
c.loop_stop()
print("PASS X.509 over MQTT/WebSocket", flush=True)
c, rc = connect(p["stranger"])
c.loop_stop()
if rc != 5:
    raise AssertionError(f"CONNACK {rc} for a certificate the cloud does not know")
print("PASS unknown certificate refused (CONNACK 5)", flush=True)
print("ALL PASS", flush=True)
