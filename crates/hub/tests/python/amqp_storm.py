"""Attach storms against verge-hub's AMQP endpoint, with Apache Qpid Proton
(Debian python3-qpid-proton): one connection attaching links past the
session's handle-max, and one opening, using and closing a link over and
over.
Neither may hurt another connection, and the churn must not grow the hub.

Usage: amqp_storm.py <params.json>
params: hub, device, ca (PEM path), amqps_port, hub_pid, keys {modA, modB}.
Prints "PASS <scenario>" per scenario and "ALL PASS" at the end; exits
non-zero on the first failure. Every blocking call has a timeout.
"""

import json
import sys

from iothub_sas import sas
from proton import Message, SSLDomain
from proton.utils import BlockingConnection

T = 15
# The hub's handle-max per session (verge-amqp MAX_HANDLE = 63: handles 0..63).
HANDLES = 64
CHURN = 1000


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def main():
    p = json.load(open(sys.argv[1]))
    hub, dev, port, pid = p["hub"], p["device"], p["amqps_port"], p["hub_pid"]
    ssl = SSLDomain(SSLDomain.MODE_CLIENT)
    ssl.set_trusted_ca_db(p["ca"])
    ssl.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)

    def events(ident):
        return f"/devices/{dev}/modules/{ident}/messages/events"

    def connect(ident):
        tok = sas(f"{hub}/devices/{dev}/modules/{ident}", p["keys"][ident], 3600)
        return BlockingConnection(f"amqps://localhost:{port}", timeout=T, ssl_domain=ssl,
                                  allowed_mechs="PLAIN",
                                  user=f"{dev}/modules/{ident}@sas.{hub.split('.')[0]}",
                                  password=tok)

    def msg(tag):
        return Message(body=tag.encode(), inferred=True, id=tag,
                       properties={"iothub-outputname": "out1"})

    # A bystander: modB's input, fed by modA's out1 through the hub's route.
    bystander = connect("modB")
    inputs = bystander.create_receiver(events("modB"), credit=10)

    def delivered(tag):
        sender = connect("modA")
        sender.create_sender(events("modA")).send(msg(tag), timeout=T)
        sender.close()
        m = inputs.receive(timeout=T)
        inputs.accept()
        check(m.id == tag, f"bystander got {m.id!r}, wanted {tag!r}")

    delivered("before")

    # 1. Links past the session's handle-max: refused, never more than the
    # hub allows, and the bystander is untouched.
    storm = connect("modA")
    opened, refused = 0, None
    for i in range(HANDLES + 40):
        try:
            storm.create_sender(events("modA"), name=f"storm-{i}")
            opened += 1
        except Exception as e:  # noqa: BLE001 - the refusal's form is Proton's
            refused = f"{type(e).__name__}: {e}"
            break
    check(refused is not None, f"{opened} links attached on one session, none refused")
    check(opened <= HANDLES, f"{opened} links attached past the handle-max {HANDLES}")
    try:
        storm.close()
    except Exception:  # noqa: BLE001 - the hub may have closed it already
        pass
    delivered("after-storm")
    print(f"PASS amqp_handle_storm ({opened} attached, then {refused[:120]})", flush=True)

    # 2. Attach and detach one link over and over: the hub gives back what
    # each link took (tasks, queues), so its memory stays flat.
    churn = connect("modA")

    # Each link carries one (unrouted) message before it closes, as clients
    # use links: a link closed the instant it opened can meet a race in
    # fe2o3 (the hub's AMQP library), whose first credit frame may leave
    # after its reply to the client's detach; Proton then ends the
    # connection on a frame for a handle it has freed (seen once in about
    # 5,000 bare cycles).
    def cycle(name):
        try:
            link = churn.create_sender(events("modA"), name=name)
            link.send(Message(body=b"churn", inferred=True,
                              properties={"iothub-outputname": "unrouted"}), timeout=T)
            link.close()
        except Exception as e:
            raise AssertionError(f"attach/send/detach {name}: {type(e).__name__}: {e}") from e

    for i in range(100):
        cycle(f"warm-{i}")
    before = rss_kib(pid)
    for i in range(CHURN):
        cycle(f"churn-{i}")
    after = rss_kib(pid)
    s = churn.create_sender(events("modA"), name="last")
    s.send(msg("after-churn"), timeout=T)
    m = inputs.receive(timeout=T)
    inputs.accept()
    check(m.id == "after-churn", f"bystander got {m.id!r} after the churn")
    churn.close()
    grew = after - before
    check(grew < 4096, f"the hub grew {grew} KiB over {CHURN} attach/detach cycles")
    print(f"PASS amqp_attach_churn ({CHURN} cycles, RSS {before} -> {after} KiB)", flush=True)

    bystander.close()
    print("ALL PASS", flush=True)


if __name__ == "__main__":
    main()
