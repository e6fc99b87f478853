"""python-barbicanclient against Ember, unmodified: version discovery, secrets of
every type Ember stores (passphrase text, symmetric and opaque binary payloads sent
base64), read back and compared, metadata, key orders, paging, ACLs (a token of
another project reads a secret once the ACL names it), deletes.
"""

import os

from barbicanclient import client as barbican_client
from barbicanclient import exceptions as bexc

from common import KEY_MANAGER_ENDPOINT, check, expect_error, fail_on_exception, session, summary

OTHER_TOKEN = os.environ["EMBER_OTHER_TOKEN"]
OTHER_TOKEN_ID = os.environ["EMBER_OTHER_TOKEN_ID"]


def client(token=None):
    sess = session(KEY_MANAGER_ENDPOINT, **({"token": token} if token else {}))
    # barbicanclient discovers the versions at the endpoint, then talks to <endpoint>/v1/.
    return barbican_client.Client(session=sess, endpoint=KEY_MANAGER_ENDPOINT)


def main():
    b = client()
    check(b.client.microversion == "1.0", f"negotiated key-manager 1.0 ({b.client.microversion})")

    # Passphrase (text/plain).
    words = "correct horse battery staple"
    pref = b.secrets.create(name="os-pass", payload=words, secret_type="passphrase").store()
    got = b.secrets.get(pref)
    check(got.secret_type == "passphrase" and got.name == "os-pass", "passphrase secret metadata")
    check(got.payload == words, "passphrase payload read back")

    # Symmetric key (bytes: the client sends them base64, application/octet-stream).
    key = os.urandom(32)
    sref = b.secrets.create(
        name="os-sym", payload=key, secret_type="symmetric", algorithm="aes", bit_length=256, mode="xts"
    ).store()
    got = b.secrets.get(sref)
    check(got.payload == key, "symmetric payload read back byte for byte")
    check(got.bit_length == 256 and got.algorithm == "aes", "symmetric attributes")

    # Opaque binary (every byte value).
    blob = bytes(range(256))
    oref = b.secrets.create(name="os-opaque", payload=blob).store()
    check(b.secrets.get(oref).payload == blob, "opaque payload read back")

    # Types Ember does not store are refused, naming the field.
    expect_error(
        lambda: b.secrets.create(name="x", payload="y", secret_type="certificate").store(),
        400, "secret_type", "a certificate secret",
    )

    # Metadata.
    b.secrets.set_secret_metadata(sref, {"use": "volume", "owner": "ci"})
    check(b.secrets.get_secret_metadata(sref)["metadata"] == {"use": "volume", "owner": "ci"}, "metadata set")
    b.secrets.add_secret_metadata(sref, "color", "blue")
    b.secrets.delete_secret_metadata(sref, "owner")
    meta = b.secrets.get_secret_metadata(sref)["metadata"]
    check(meta == {"use": "volume", "color": "blue"}, f"metadata added and removed ({meta})")

    # A key order: the secret exists once the order is ACTIVE.
    order_ref = b.orders.create_key(name="os-order", algorithm="aes", bit_length=256, mode="xts").submit()
    order = b.orders.get(order_ref)
    check(order.status == "ACTIVE" and order.secret_ref, "key order ACTIVE with its secret")
    check(len(b.secrets.get(order.secret_ref).payload) == 32, "ordered key is 256 bits")
    check(any(o.order_ref == order_ref for o in b.orders.list()), "order listed")

    # Paging.
    page1 = b.secrets.list(limit=2, offset=0)
    page2 = b.secrets.list(limit=2, offset=2)
    refs = {s.secret_ref for s in page1} | {s.secret_ref for s in page2}
    check(len(page1) == 2 and len(page2) == 2 and len(refs) == 4, "two pages of two")
    check([s.name for s in b.secrets.list(name="os-pass")] == ["os-pass"], "list filtered by name")

    # ACL: another project's token cannot see it, then can read it once named.
    other = client(OTHER_TOKEN)
    expect_error(lambda: other.secrets.get(sref).payload, 404, "not found", "another project's secret")
    acl = b.acls.create(entity_ref=sref, users=[OTHER_TOKEN_ID], project_access=True)
    acl.submit()
    got_acl = b.acls.get(sref)
    check(got_acl.read.users == [OTHER_TOKEN_ID], "ACL read users")
    check(other.secrets.get(sref).payload == key, "the ACL's user reads the payload")
    expect_error(lambda: other.secrets.delete(sref), 403, "ACL", "the ACL's user cannot delete it")
    b.acls.get(sref).remove()
    expect_error(lambda: other.secrets.get(sref).payload, 404, "not found", "ACL removed")

    # Deletes.
    b.orders.delete(order_ref)
    for ref in (pref, sref, oref, order.secret_ref):
        b.secrets.delete(ref)
    try:
        b.secrets.get(pref).payload
        raise AssertionError("a deleted secret is still readable")
    except bexc.HTTPClientError as e:
        check(e.status_code == 404, "deleted secret is 404")
    summary(workflow="barbican", secrets_left=len(b.secrets.list()))


fail_on_exception(main)
