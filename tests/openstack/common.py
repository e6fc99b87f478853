"""Shared helpers of the OpenStack client workflows (tests/openstack.rs runs them).

Environment (set by the Rust test):
  EMBER_URL          http://127.0.0.1:PORT of `emberd serve`
  EMBER_TOKEN        an admin token
  EMBER_PROJECT      the admin token's project id
  EMBER_DATA_DIR     the node's data directory (its default pool is DATA/pools/default)
  EMBER_OTHER_TOKEN  a member token of another project (ACL checks)
  EMBER_OTHER_TOKEN_ID  its token id

Every check raises (the script exits non-zero and the Rust test shows its output);
the last line a script prints is a JSON summary the Rust test reads.
"""

import json
import os
import subprocess
import sys
import time

from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint

URL = os.environ["EMBER_URL"].rstrip("/")
TOKEN = os.environ["EMBER_TOKEN"]
PROJECT = os.environ["EMBER_PROJECT"]

VOLUME_ENDPOINT = f"{URL}/volume/v3/{PROJECT}"
KEY_MANAGER_ENDPOINT = f"{URL}/key-manager"
IMAGE_ENDPOINT = f"{URL}/image"

# Generous: the machine is shared and volume copies run in the background.
TIMEOUT = 120


def session(endpoint, token=TOKEN):
    """A keystoneauth1 session authenticating with an Ember token at `endpoint`."""
    return ks_session.Session(auth=token_endpoint.Token(endpoint=endpoint, token=token))


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}", flush=True)


def wait_for(fetch, want, what, timeout=TIMEOUT):
    """Poll `fetch()` until its `.status` is `want`; returns the object."""
    t0 = time.monotonic()
    while True:
        obj = fetch()
        status = getattr(obj, "status", None)
        if status == want:
            print(f"ok: {what} is {want}", flush=True)
            return obj
        if status in ("error", "error_deleting") and want not in ("error", "error_deleting"):
            raise AssertionError(f"{what} went to {status}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} stuck in {status} (want {want})")
        time.sleep(0.2)


def wait_gone(fetch, not_found, what, timeout=TIMEOUT):
    """Poll `fetch()` until it raises `not_found`."""
    t0 = time.monotonic()
    while True:
        try:
            fetch()
        except not_found:
            print(f"ok: {what} is gone", flush=True)
            return
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} still there")
        time.sleep(0.2)


def expect_error(call, status, needle, what):
    """`call()` must fail with HTTP `status` and a message containing `needle`."""
    try:
        call()
    except Exception as e:  # the clients raise their own exception types
        code = getattr(e, "code", None) or getattr(e, "http_status", None) or getattr(e, "status_code", None)
        text = str(e)
        check(code == status, f"{what}: HTTP {status} (got {code}: {text})")
        check(needle in text, f"{what}: the message names {needle!r} ({text})")
        return e
    raise AssertionError(f"{what}: the call succeeded but should fail with {status}")


def run(cmd, **kw):
    """Run a tool; its stdout. Fails with its output."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p.stdout


def nbd_uri(connection_info):
    """The NBD URI of a connection_info (Ember's `nbd` driver_volume_type)."""
    check(connection_info["driver_volume_type"] == "nbd", "connection_info is NBD")
    return connection_info["data"]["uri"]


def qemu_write(uri, pattern, offset, length):
    run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", uri])


def qemu_read_ok(uri, pattern, offset, length, what):
    out = run(["qemu-io", "-f", "raw", "-c", f"read -P {pattern} {offset} {length}", uri])
    check("Pattern verification failed" not in out, f"{what}: {length} bytes of {pattern} at {offset}")


def nbd_size(uri):
    out = run(["nbdinfo", "--size", uri])
    return int(out.strip())


def summary(**kw):
    print(json.dumps(kw), flush=True)


def fail_on_exception(main):
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        sys.exit(1)
