"""The `openstack` CLI (python-openstackclient, with its openstacksdk volume and image
commands and barbicanclient's secret commands) against Ember, unmodified, with the
invocations the README gives:

  openstack --os-auth-type admin_token --os-token TOKEN \
            --os-endpoint http://HOST:8776/volume/v3/PROJECT   volume ...
            --os-endpoint http://HOST:8776/key-manager/v1      secret ...
            --os-endpoint http://HOST:8776/image/v2            image metadef ...
"""

import json
import os
import sys
import time

from cinderclient import client as cinder_client

from common import (
    IMAGE_ENDPOINT,
    KEY_MANAGER_ENDPOINT,
    PROJECT,
    TIMEOUT,
    TOKEN,
    URL,
    VOLUME_ENDPOINT,
    check,
    fail_on_exception,
    nbd_uri,
    qemu_read_ok,
    qemu_write,
    run,
    session,
    summary,
)

# The venv's own `openstack` (beside its python; not resolved through the symlink).
OPENSTACK = os.path.join(os.path.dirname(sys.executable), "openstack")
BASE = [OPENSTACK, "--os-auth-type", "admin_token", "--os-token", TOKEN]
VOLUME = BASE + ["--os-endpoint", VOLUME_ENDPOINT]
SECRET = BASE + ["--os-endpoint", f"{KEY_MANAGER_ENDPOINT}/v1"]
IMAGE = BASE + ["--os-endpoint", f"{IMAGE_ENDPOINT}/v2"]
CONNECTOR = {"protocol": "nbd", "host": "cli-host"}


def osc(prefix, *args, fmt=True):
    out = run(prefix + list(args) + (["-f", "json"] if fmt else []))
    return json.loads(out) if fmt and out.strip() else out


def wait_status(kind, name, want):
    t0 = time.monotonic()
    while True:
        got = osc(VOLUME, kind, "show", name)["status"]
        if got == want:
            print(f"ok: {kind} {name} is {want}", flush=True)
            return
        if got == "error" or time.monotonic() - t0 > TIMEOUT:
            raise AssertionError(f"{kind} {name} is {got}, want {want}")
        time.sleep(0.3)


def main():
    # The commands of the issue.
    t = osc(
        VOLUME, "volume", "type", "create",
        "--encryption-provider", "luks", "--encryption-cipher", "aes-xts-plain64",
        "--encryption-key-size", "256", "--encryption-control-location", "front-end", "cli-gold",
    )
    check(t["encryption"]["provider"] == "luks" and t["encryption"]["key_size"] == 256, "volume type create with encryption")
    shown = osc(VOLUME, "volume", "type", "show", "--encryption-type", "cli-gold")
    check(shown["encryption"]["cipher"] == "aes-xts-plain64", "volume type show --encryption-type")
    check("cli-gold" in [x["Name"] for x in osc(VOLUME, "volume", "type", "list")], "volume type list")

    q = osc(VOLUME, "volume", "qos", "create", "--consumer", "front-end", "--property", "read_iops_sec=500", "cli-qos")
    check(q["properties"] == {"read_iops_sec": "500"}, "volume qos create")
    osc(VOLUME, "volume", "qos", "associate", "cli-qos", "cli-gold", fmt=False)
    check(osc(VOLUME, "volume", "qos", "show", "cli-qos")["associations"] == ["cli-gold"], "volume qos associate")

    v = osc(VOLUME, "volume", "create", "--type", "cli-gold", "--size", "1", "cli-v1")
    check(v["encrypted"] and v["type"] == "cli-gold", "volume create --type --size")
    wait_status("volume", "cli-v1", "available")
    osc(VOLUME, "volume", "set", "--name", "cli-v1b", "--property", "tier=gold", "cli-v1", fmt=False)
    shown = osc(VOLUME, "volume", "show", "cli-v1b")
    check(shown["properties"] == {"tier": "gold"}, "volume set --name --property")
    check("cli-v1b" in [x["Name"] for x in osc(VOLUME, "volume", "list")], "volume list")

    # Data before the snapshot, through a connection (the CLI has no host-attach
    # command; cinderclient makes the same call Nova's os-brick does).
    cinder = cinder_client.Client("3.71", session=session(VOLUME_ENDPOINT))
    v1 = cinder.volumes.get(shown["id"])
    info = cinder.volumes.initialize_connection(v1, CONNECTOR)
    qemu_write(nbd_uri(info), "0x3c", 0, "1M")
    qemu_read_ok(nbd_uri(info), "0x3c", 0, "1M", "written through cli-v1b's connection")
    cinder.volumes.terminate_connection(v1, CONNECTOR)
    wait_status("volume", "cli-v1b", "available")

    osc(VOLUME, "volume", "snapshot", "create", "--volume", "cli-v1b", "cli-s1")
    t0 = time.monotonic()
    while osc(VOLUME, "volume", "snapshot", "show", "cli-s1")["status"] != "available":
        check(time.monotonic() - t0 < TIMEOUT, "snapshot becomes available in time")
        time.sleep(0.3)
    check("cli-s1" in [x["Name"] for x in osc(VOLUME, "volume", "snapshot", "list")], "volume snapshot create, list")
    osc(VOLUME, "volume", "create", "--snapshot", "cli-s1", "cli-v2")
    wait_status("volume", "cli-v2", "available")
    v2 = osc(VOLUME, "volume", "show", "cli-v2")
    check(v2["encrypted"] and v2["type"] == "cli-gold", "the restored volume keeps the encrypted type")
    info = cinder.volumes.initialize_connection(cinder.volumes.get(v2["id"]), CONNECTOR)
    qemu_read_ok(nbd_uri(info), "0x3c", 0, "1M", "cli-v2 (restored from cli-s1) holds cli-v1b's data")
    cinder.volumes.terminate_connection(cinder.volumes.get(v2["id"]), CONNECTOR)
    wait_status("volume", "cli-v2", "available")
    services = osc(VOLUME, "volume", "service", "list")
    check([s["Binary"] for s in services] == ["cinder-volume"], "volume service list")

    # Secrets.
    href = osc(SECRET, "secret", "store", "--name", "cli-secret", "--secret-type", "passphrase",
               "--payload", "open sesame")["Secret href"]
    check(href.startswith(f"{URL}/key-manager/v1/secrets/"), "secret store")
    got = osc(SECRET, "secret", "get", "--payload", href)
    check(got["Payload"] == "open sesame", "secret get --payload")
    check("cli-secret" in [s["Name"] for s in osc(SECRET, "secret", "list")], "secret list")
    order = osc(SECRET, "secret", "order", "create", "--name", "cli-key", "--algorithm", "aes",
                "--bit-length", "256", "--mode", "xts", "key")
    check(order["Order href"].startswith(f"{URL}/key-manager/v1/orders/"), "secret order create")
    osc(SECRET, "secret", "delete", href, fmt=False)

    # Metadefs.
    names = [n["namespace"] for n in osc(IMAGE, "image", "metadef", "namespace", "list")]
    check({"OS::Ember::QoS", "OS::Ember::VolumeType"} <= set(names), f"image metadef namespace list ({names})")
    ns = osc(IMAGE, "image", "metadef", "namespace", "show", "OS::Ember::QoS")
    check(ns["namespace"] == "OS::Ember::QoS", "image metadef namespace show")
    props = [p["name"] for p in osc(IMAGE, "image", "metadef", "property", "list", "OS::Ember::QoS")]
    check("total_iops_sec" in props, "image metadef property list")

    # Clean up.
    osc(VOLUME, "volume", "delete", "cli-v2", fmt=False)
    t0 = time.monotonic()
    while any(x["Name"] == "cli-v2" for x in osc(VOLUME, "volume", "list")):
        check(time.monotonic() - t0 < TIMEOUT, "cli-v2 goes in time")
        time.sleep(0.3)
    osc(VOLUME, "volume", "snapshot", "delete", "cli-s1", fmt=False)
    osc(VOLUME, "volume", "delete", "cli-v1b", fmt=False)
    summary(workflow="cli", project=PROJECT)


fail_on_exception(main)
