"""Running a blocking client call under a timeout, shared by the interop
scripts (the SDKs under test can block forever)."""

import threading


def timed(fn, *args, timeout, **kwargs):
    """`fn(*args, **kwargs)`, or TimeoutError if it does not finish in `timeout` seconds."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish in {timeout}s")
    if "error" in out:
        raise out["error"]
    return out.get("value")
