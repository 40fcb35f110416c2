"""IoT Hub SAS tokens for the interop scripts, signed with Python's own
hmac (the clients under test bring no IoT Hub token helper)."""

import base64
import hashlib
import hmac
import time
import urllib.parse


def sign(resource, key_b64, expiry):
    """A SAS token for `resource` valid until `expiry` (Unix seconds)."""
    sr = urllib.parse.quote(resource, safe="")
    sig = base64.b64encode(hmac.new(base64.b64decode(key_b64),
                                    f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()).decode()
    return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={expiry}"


def sas(resource, key_b64, ttl=3600):
    """A SAS token for `resource` valid for `ttl` seconds from now."""
    return sign(resource, key_b64, int(time.time()) + ttl)
