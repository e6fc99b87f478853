"""python-glanceclient's metadefs API against Ember, unmodified: the schemas it fetches
first, the standard namespaces and their properties listed and shown, and a namespace
of its own with properties, objects, tags and resource-type associations, updated and
deleted. Every answer is validated by the client against Ember's schemas.
"""

from glanceclient import client as glance_client
from glanceclient import exc as gexc

from common import IMAGE_ENDPOINT, check, expect_error, fail_on_exception, session, summary


def main():
    g = glance_client.Client("2", session=session(IMAGE_ENDPOINT), endpoint=IMAGE_ENDPOINT)

    names = [n.namespace for n in g.metadefs_namespace.list()]
    check("OS::Ember::VolumeType" in names and "OS::Ember::QoS" in names, f"standard namespaces listed ({names})")
    qos = g.metadefs_namespace.get("OS::Ember::QoS")
    check(qos.protected and qos.visibility == "public", "OS::Ember::QoS is public and protected")
    check("read_iops_sec" in qos.properties, "OS::Ember::QoS shows its properties")
    props = {p.name: p for p in g.metadefs_property.list("OS::Ember::QoS")}
    check(props["read_iops_sec"].type == "integer" and props["read_iops_sec"].minimum == 1, "property list")
    one = g.metadefs_property.get("OS::Ember::VolumeType", "encryption")
    check(one.type == "boolean" and one.readonly, "property shown")
    rts = [r.name for r in g.metadefs_resource_type.list()]
    check("OS::Cinder::Volumetype" in rts, f"resource types ({rts})")
    assoc = [r.name for r in g.metadefs_resource_type.get("OS::Ember::QoS")]
    check(assoc == ["OS::Cinder::Volumetype"], "associations of OS::Ember::QoS")

    # Paging: one namespace a page.
    first = list(g.metadefs_namespace.list(page_size=1))
    check(len(first) >= 2, "page_size 1 still lists every namespace (the client follows `next`)")

    # A namespace of our own.
    ns = g.metadefs_namespace.create(namespace="OS::Test::Ember", display_name="Test", visibility="public")
    check(ns.namespace == "OS::Test::Ember", "namespace created")
    g.metadefs_namespace.update("OS::Test::Ember", description="a test namespace")
    check(g.metadefs_namespace.get("OS::Test::Ember").description == "a test namespace", "namespace updated")
    g.metadefs_property.create(
        "OS::Test::Ember", name="speed", title="Speed", type="integer", minimum=1, maximum=10
    )
    check(g.metadefs_property.get("OS::Test::Ember", "speed").maximum == 10, "property created")
    g.metadefs_property.update("OS::Test::Ember", "speed", title="Speed", type="integer", minimum=1, maximum=20)
    check(g.metadefs_property.get("OS::Test::Ember", "speed").maximum == 20, "property updated")
    g.metadefs_object.create(
        "OS::Test::Ember",
        name="disk",
        description="disk hints",
        properties={"bus": {"title": "Bus", "type": "string", "enum": ["virtio", "scsi"]}},
        required=["bus"],
    )
    obj = g.metadefs_object.get("OS::Test::Ember", "disk")
    check(obj.required == ["bus"] and "bus" in obj.properties, "object created")
    check([o.name for o in g.metadefs_object.list("OS::Test::Ember")] == ["disk"], "object listed")
    list(g.metadefs_tag.create_multiple("OS::Test::Ember", tags=["fast", "slow"]))  # a generator
    g.metadefs_tag.create("OS::Test::Ember", "medium")
    tags = sorted(t.name for t in g.metadefs_tag.list("OS::Test::Ember"))
    check(tags == ["fast", "medium", "slow"], f"tags ({tags})")
    g.metadefs_tag.update("OS::Test::Ember", "slow", name="slowest")
    check(g.metadefs_tag.get("OS::Test::Ember", "slowest").name == "slowest", "tag renamed")
    g.metadefs_resource_type.associate("OS::Test::Ember", name="OS::Cinder::Volume", prefix="test_")
    check(
        [r.name for r in g.metadefs_resource_type.get("OS::Test::Ember")] == ["OS::Cinder::Volume"],
        "resource type associated",
    )
    full = g.metadefs_namespace.get("OS::Test::Ember")
    check(len(full.objects) == 1 and len(full.tags) == 3, "the namespace shows its objects and tags")

    # Ember's strictness: a bad definition is refused, naming the problem.
    expect_error(
        lambda: g.metadefs_property.create("OS::Test::Ember", name="bad", title="Bad", type="integer", minimum=5, maximum=1),
        400, "minimum", "an inconsistent property definition",
    )

    g.metadefs_resource_type.deassociate("OS::Test::Ember", "OS::Cinder::Volume")
    g.metadefs_tag.delete("OS::Test::Ember", "fast")
    g.metadefs_object.delete("OS::Test::Ember", "disk")
    g.metadefs_property.delete("OS::Test::Ember", "speed")
    g.metadefs_namespace.delete("OS::Test::Ember")
    try:
        g.metadefs_namespace.get("OS::Test::Ember")
        raise AssertionError("the namespace is still there")
    except gexc.HTTPNotFound:
        check(True, "namespace deleted")
    summary(workflow="glance", namespaces=len(list(g.metadefs_namespace.list())))


fail_on_exception(main)
