"""python-cinderclient 9.x against Ember, unmodified: version discovery and
microversions, types with extra specs, encryption types and QoS specs, volumes
created, listed, shown, renamed, given metadata, extended, snapshotted, cloned,
restored, attached (os-initialize_connection and the attachments API), detached,
reset and deleted. Data is written and read back through the returned connections
with qemu-io and nbdinfo.
"""

import os
import tempfile
import uuid

from cinderclient import api_versions
from cinderclient import client as cinder_client
from cinderclient import exceptions as cexc

from barbicanclient import client as barbican_client

from common import (
    KEY_MANAGER_ENDPOINT,
    PROJECT,
    URL,
    VOLUME_ENDPOINT,
    check,
    expect_error,
    fail_on_exception,
    nbd_size,
    nbd_uri,
    qemu_read_ok,
    qemu_write,
    run,
    session,
    summary,
    wait_for,
    wait_gone,
)

GIB = 1 << 30
# The node's default storage pool (a directory of `<volume id>.img` files).
POOL_DIR = os.path.join(os.environ["EMBER_DATA_DIR"], "pools", "default")
OTHER_TOKEN = os.environ["EMBER_OTHER_TOKEN"]
CONNECTOR = {"protocol": "nbd", "host": "test-host", "initiator": "iqn.2026-01.test:host", "multipath": False}


def luks_check(uri, volume_id, passphrase):
    """Ember serves an encrypted volume decrypted (its data plane runs LUKS): write
    plaintext through the NBD export, then open the volume's backing file in QEMU's LUKS
    driver with the key Barbican gives (Cinder's rule: the passphrase is the hex of the
    symmetric key) and find it there; the file itself holds only ciphertext."""
    qemu_write(uri, "0x42", 0, "64k")
    qemu_read_ok(uri, "0x42", 0, "64k", "plaintext through the export")
    img = os.path.join(POOL_DIR, f"{volume_id}.img")
    with tempfile.NamedTemporaryFile("w", suffix=".pass") as f:
        f.write(passphrase)
        f.flush()
        opts = f"driver=luks,key-secret=k,file.driver=file,file.filename={img}"
        out = run(["qemu-io", "-r", "--object", f"secret,id=k,file={f.name}", "--image-opts", opts,
                   "-c", "read -P 0x42 0 64k"])
        check("Pattern verification failed" not in out, "QEMU opens the backing file with the volume's key")
    with open(img, "rb") as raw:
        data = raw.read(16 << 20)
    check(b"\x42" * 4096 not in data, "the backing file holds no plaintext")


def main():
    sess = session(VOLUME_ENDPOINT)
    c = cinder_client.Client("3.0", session=sess)

    # Discovery: the client reads the server's range and settles on the highest
    # version both know.
    high = api_versions.get_highest_version(c)
    check(high == api_versions.APIVersion("3.71"), f"server's highest microversion is 3.71 ({high})")
    v = api_versions.discover_version(c, api_versions.APIVersion("3.99"))
    check(v == api_versions.APIVersion("3.71"), f"3.99 is negotiated down to 3.71 ({v})")
    c = cinder_client.Client("3.71", session=sess)
    c44 = cinder_client.Client("3.44", session=sess)

    # ---- types, extra specs, encryption, QoS specs, access --------------------------------
    plain = c.volume_types.create("os-plain", description="plain volumes")
    plain.set_keys({"multiattach": "<is> True"})
    check(c.volume_types.get(plain.id).extra_specs.get("multiattach") == "<is> True", "extra spec set")
    gold = c.volume_types.create("os-gold")
    c.volume_encryption_types.create(
        gold, {"provider": "luks", "cipher": "aes-xts-plain64", "key_size": 256, "control_location": "front-end"}
    )
    enc = c.volume_encryption_types.get(gold)
    check(enc.provider == "luks" and enc.key_size == 256, "encryption type of os-gold")
    gold2 = c.volume_types.create("os-gold2")
    c.volume_encryption_types.create(
        gold2, {"provider": "luks", "cipher": "aes-xts-plain64", "key_size": 256, "control_location": "front-end"}
    )
    private = c.volume_types.create("os-private", is_public=False)
    c.volume_type_access.add_project_access(private, PROJECT)
    access = c.volume_type_access.list(private)
    check([a.project_id for a in access] == [PROJECT], "type access list of the private type")
    c.volume_type_access.remove_project_access(private, PROJECT)
    check(c.volume_type_access.list(private) == [], "type access removed")
    c.volume_type_access.add_project_access(private, PROJECT)

    qos = c.qos_specs.create("os-qos", {"consumer": "front-end", "read_iops_sec": "2000"})
    c.qos_specs.set_keys(qos.id, {"write_iops_sec": "1000", "total_bytes_sec": "104857600"})
    c.qos_specs.unset_keys(qos.id, ["total_bytes_sec"])
    got = c.qos_specs.get(qos)
    check(got.specs == {"read_iops_sec": "2000", "write_iops_sec": "1000"}, f"QoS spec keys ({got.specs})")
    c.qos_specs.associate(qos, plain.id)
    assoc = c.qos_specs.get_associations(qos)
    check([a.id for a in assoc] == [plain.id], "QoS spec associated with os-plain")
    check(c.volume_types.get(plain.id).qos_specs_id == qos.id, "the type names its QoS spec")
    expect_error(
        lambda: c.qos_specs.create("os-bad-qos", {"read_iops_sec_max": "5"}),
        400, "read_iops_sec_max", "an unenforced QoS key is refused",
    )

    # ---- strictness where Cinder is strict, leniency where the client sends nulls ---------
    expect_error(lambda: c.volumes.create("abc", name="x"), 400, "size", "a size that is not a number")
    expect_error(
        lambda: c.volumes.create(1, name="x", imageRef=str(uuid.uuid4())),
        400, "imageRef", "a non-null imageRef",
    )
    expect_error(
        lambda: c.volumes.create(1, name="x", availability_zone="nova"),
        400, "availability_zone", "an unknown availability zone",
    )

    # ---- a plain volume: create, list, show, rename, metadata, extend ----------------------
    vol = c.volumes.create(1, name="os-v1", volume_type="os-plain", metadata={"purpose": "test"})
    vol = wait_for(lambda: c.volumes.get(vol.id), "available", "volume os-v1")
    check(vol.metadata.get("purpose") == "test", "metadata given at create")
    check(vol.volume_type == "os-plain" and vol.size == 1, "type and size")
    names = [x.name for x in c.volumes.list(search_opts={"name": "os-v1"})]
    check(names == ["os-v1"], f"list filtered by name ({names})")
    c.volumes.update(vol, name="os-v1-renamed", description="renamed")
    check(c.volumes.get(vol.id).name == "os-v1-renamed", "renamed")
    c.volumes.set_metadata(vol, {"tier": "gold", "owner": "ci"})
    c.volumes.delete_metadata(vol, ["owner"])
    meta = c.volumes.get(vol.id).metadata
    check(meta == {"purpose": "test", "tier": "gold"}, f"metadata set and deleted ({meta})")
    c.volumes.extend(vol, 2)
    check(c.volumes.get(vol.id).size == 2, "extended to 2 GiB")
    c.volumes.set_bootable(vol, True)
    check(c.volumes.get(vol.id).bootable == "true", "bootable")

    # Paging through the detail list.
    extra = [c.volumes.create(1, name=f"os-page-{i}", volume_type="os-plain") for i in range(3)]
    for e in extra:
        wait_for(lambda e=e: c.volumes.get(e.id), "available", f"volume {e.name}")
    first = c.volumes.list(limit=2, sort="name:asc")
    check(len(first) == 2, "a page of 2")
    rest = c.volumes.list(marker=first[-1].id, sort="name:asc")
    got_names = [x.name for x in first] + [x.name for x in rest]
    check(got_names == sorted(got_names) and len(got_names) == 4, f"marker paging covers all ({got_names})")
    # Filters: status; all_tenants (the admin sees every project's volumes, each naming
    # its project).
    avail = {x.name for x in c.volumes.list(search_opts={"status": "available"})}
    check(avail == {"os-v1-renamed", "os-page-0", "os-page-1", "os-page-2"}, f"list filtered by status ({avail})")
    check(c.volumes.list(search_opts={"status": "error"}) == [], "no volume in error")
    other_sess = session(URL, token=OTHER_TOKEN)
    other_project = other_sess.get(URL + "/v3/auth/tokens").json()["token"]["project_id"]
    oc = cinder_client.Client("3.71", session=session(f"{URL}/volume/v3/{other_project}", token=OTHER_TOKEN))
    theirs = oc.volumes.create(1, name="os-theirs")
    wait_for(lambda: oc.volumes.get(theirs.id), "available", "the other project's volume")
    check("os-theirs" not in {x.name for x in c.volumes.list()}, "another project's volume is not listed")
    every = {x.name: getattr(x, "os-vol-tenant-attr:tenant_id") for x in c.volumes.list(search_opts={"all_tenants": 1})}
    check(
        len(every) == 5 and every["os-theirs"] == other_project and every["os-v1-renamed"] == PROJECT,
        f"all_tenants lists every project's volumes with their project ({every})",
    )
    oc.volumes.delete(theirs)
    wait_gone(lambda: oc.volumes.get(theirs.id), cexc.NotFound, "the other project's volume")
    for e in extra:
        c.volumes.delete(e)

    # ---- data through os-initialize_connection -------------------------------------------
    info = c.volumes.initialize_connection(vol, CONNECTOR)
    uri = nbd_uri(info)
    check(nbd_size(uri) == 2 * GIB, "nbdinfo sees 2 GiB")
    qemu_write(uri, "0x5a", 0, "1M")
    qemu_write(uri, "0xa5", 2 * GIB - (1 << 20), "1M")
    qemu_read_ok(uri, "0x5a", 0, "1M", "first MiB read back")
    check(c.volumes.get(vol.id).status == "in-use", "in-use while attached")
    c.volumes.terminate_connection(vol, {**CONNECTOR, "attachment_id": info["data"]["attachment_id"]})
    wait_for(lambda: c.volumes.get(vol.id), "available", "detached volume")

    # ---- snapshot, clone, restore --------------------------------------------------------
    snap = c.volume_snapshots.create(vol.id, name="os-s1", metadata={"k": "v"})
    snap = wait_for(lambda: c.volume_snapshots.get(snap.id), "available", "snapshot os-s1")
    check(snap.metadata == {"k": "v"}, "snapshot metadata")
    c.volume_snapshots.update(snap, name="os-s1-renamed")
    c.volume_snapshots.set_metadata(snap, {"k2": "v2"})
    snaps = c.volume_snapshots.list(search_opts={"volume_id": vol.id})
    check([s.name for s in snaps] == ["os-s1-renamed"], "snapshot list (detail) filtered by volume")
    check(c.volume_snapshots.get(snap.id).metadata == {"k": "v", "k2": "v2"}, "snapshot metadata merged")

    clone = c.volumes.create(2, name="os-clone", source_volid=vol.id)
    restored = c.volumes.create(2, name="os-restored", snapshot_id=snap.id)
    for x in (clone, restored):
        wait_for(lambda x=x: c.volumes.get(x.id), "available", f"volume {x.name}")
        check(c.volumes.get(x.id).bootable == "true", f"{x.name} inherits bootable")

    # ---- the attachments API, as Nova drives it ------------------------------------------
    instance = str(uuid.uuid4())
    att = c44.attachments.create(clone.id, None, instance_id=instance)
    check(att["status"] == "reserved", "an attachment without a connector is a reservation")
    wait_for(lambda: c.volumes.get(clone.id), "reserved", "reserved clone")
    upd = c44.attachments.update(att["id"], CONNECTOR)
    curi = nbd_uri(upd.connection_info)
    qemu_read_ok(curi, "0x5a", 0, "1M", "the clone holds the source's first MiB")
    qemu_read_ok(curi, "0xa5", 2 * GIB - (1 << 20), "1M", "and its last")
    c44.attachments.complete(att["id"])
    shown = c44.attachments.show(att["id"])
    check(shown.status == "attached" and shown.instance == instance, "attachment completed")
    listed = c44.attachments.list(search_opts={"volume_id": clone.id})
    check([a.id for a in listed] == [att["id"]], "attachment listed by volume")
    check(c.volumes.get(clone.id).status == "in-use", "clone in-use")
    c44.attachments.delete(att["id"])
    wait_for(lambda: c.volumes.get(clone.id), "available", "clone after the attachment is deleted")

    ro = c44.attachments.create(restored.id, CONNECTOR, instance_id=instance)
    ruri = nbd_uri(ro["connection_info"])
    qemu_read_ok(ruri, "0x5a", 0, "1M", "the volume restored from the snapshot holds its data")
    c44.attachments.delete(ro["id"])
    # Microversions on the wire: cinderclient itself refuses these, so ask directly.
    r = sess.get(VOLUME_ENDPOINT + "/attachments", headers={"OpenStack-API-Version": "volume 3.26"}, raise_exc=False)
    check(r.status_code == 404 and "3.27" in r.text, "the attachments API below 3.27 is 404")
    r = sess.get(VOLUME_ENDPOINT + "/volumes", headers={"OpenStack-API-Version": "volume 3.72"}, raise_exc=False)
    check(r.status_code == 406, "3.72 is outside the range: 406")
    r = sess.get(VOLUME_ENDPOINT + "/volumes", headers={"X-OpenStack-Volume-API-Version": "3.50"})
    check(r.headers.get("OpenStack-API-Version") == "volume 3.50", "the version is echoed")
    check(r.headers.get("X-OpenStack-Volume-API-Version") == "3.50", "the legacy header too")

    # ---- an encrypted volume ---------------------------------------------------------------
    ev = c.volumes.create(1, name="os-enc", volume_type="os-gold")
    ev = wait_for(lambda: c.volumes.get(ev.id), "available", "encrypted volume")
    check(ev.encrypted, "encrypted")
    einfo = c.volumes.initialize_connection(ev, CONNECTOR)
    check(einfo["data"]["encrypted"] is True, "connection_info says encrypted")
    keys = barbican_client.Client(session=session(KEY_MANAGER_ENDPOINT), endpoint=KEY_MANAGER_ENDPOINT)
    secret = keys.secrets.get(f"{KEY_MANAGER_ENDPOINT}/v1/secrets/{ev.encryption_key_id}")
    check(secret.secret_type == "symmetric" and len(secret.payload) == 32, "the volume's key is a 256-bit symmetric secret")
    luks_check(nbd_uri(einfo), ev.id, secret.payload.hex())
    c.volumes.terminate_connection(ev, CONNECTOR)
    wait_for(lambda: c.volumes.get(ev.id), "available", "encrypted volume detached")
    c.volumes.retype(ev, "os-gold2", "never")
    check(c.volumes.get(ev.id).volume_type == "os-gold2", "retyped to a type with the same encryption")
    expect_error(lambda: c.volumes.retype(ev, "os-plain", "never"), 400, "encryption", "retype across encryption")

    # ---- admin actions, limits, services, clusters ------------------------------------------
    c.volumes.update_readonly_flag(vol, True)
    rinfo = c.volumes.initialize_connection(vol, CONNECTOR)
    check(rinfo["data"]["access_mode"] == "ro", "a readonly volume attaches read-only")
    c.volumes.terminate_connection(vol, CONNECTOR)
    wait_for(lambda: c.volumes.get(vol.id), "available", "readonly volume detached")
    c.volumes.update_readonly_flag(vol, False)
    c.volumes.reset_state(restored, "error")
    wait_for(lambda: c.volumes.get(restored.id), "error", "reset to error")
    c.volumes.force_delete(restored)
    wait_gone(lambda: c.volumes.get(restored.id), cexc.NotFound, "force-deleted volume")
    c.volume_snapshots.reset_state(snap, "error")
    wait_for(lambda: c.volume_snapshots.get(snap.id), "error", "snapshot reset to error")

    absolute = {l.name: l.value for l in c.limits.get().absolute}
    check(absolute["totalVolumesUsed"] == 3 and absolute["maxTotalVolumes"] == -1, f"limits ({absolute})")
    services = c.services.list()
    check([s.binary for s in services] == ["cinder-volume"] and services[0].state == "up", "one cinder-volume service, up")
    clusters = c.clusters.list()
    check([x.name for x in clusters] == ["ember"], "the one cluster")

    # ---- delete everything --------------------------------------------------------------
    c.volume_snapshots.delete(snap)
    wait_gone(lambda: c.volume_snapshots.get(snap.id), cexc.NotFound, "snapshot")
    for x in (vol, clone, ev):
        c.volumes.delete(x)
        wait_gone(lambda x=x: c.volumes.get(x.id), cexc.NotFound, f"volume {x.id}")
    c.qos_specs.disassociate(qos, plain.id)
    c.qos_specs.delete(qos)
    for t in (plain, gold, gold2, private):
        c.volume_types.delete(t)
    summary(workflow="cinder", volumes_left=len(c.volumes.list()), microversion="3.71")


fail_on_exception(main)
