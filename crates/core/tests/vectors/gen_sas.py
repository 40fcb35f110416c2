#!/usr/bin/env python3
"""Independent SAS vectors for verge-core's tests, from Python's standard library only.

Run: python3 crates/core/tests/vectors/gen_sas.py > crates/core/tests/vectors/sas.tsv
Columns: key(base64) resource(decoded) expiry string_to_sign signature(base64) token
"""
import base64, hashlib, hmac
from urllib.parse import quote

cases = [
    ("AAECAwQFBgcICQoLDA0ODw==", "myhub.azure-devices.net/devices/edge1", 1764064800),
    ("c2VjcmV0LWtleS1mb3ItbW9kdWxl", "myhub.azure-devices.net/devices/edge1/modules/filter", 1893456000),
    ("ZGV2aWNla2V5MTIzNDU2Nzg5MGFiY2RlZg==", "h.local/devices/dev(1)!/modules/$edgeHub", 4102444800),
    ("MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI=", "verge.local/devices/leaf-7", 2000000000),
]
for key, resource, expiry in cases:
    sr = quote(resource, safe="")
    to_sign = f"{sr}\n{expiry}"
    sig = base64.b64encode(hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()).decode()
    token = f"SharedAccessSignature sr={sr}&sig={quote(sig, safe='')}&se={expiry}"
    print("\t".join([key, resource, str(expiry), to_sign.replace("\n", "\\n"), sig, token]))
