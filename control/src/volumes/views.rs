//! The JSON the volumes API answers with: volumes, snapshots, attachments, and Cinder's
//! `connection_info` rendered from the data plane's typed [`Endpoint`] (the data plane
//! builds no JSON).

use super::rows::{Attachment, Snap, Vol};
use super::status::Status;
use crate::dataplane::Endpoint;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Bytes per GiB (volume sizes are whole GiB, as in Cinder).
pub const GIB: u64 = 1 << 30;

/// The one availability zone of Ember volumes.
pub const AVAILABILITY_ZONE: &str = "ember";

/// An attachment as a volume lists it.
pub fn attachment(a: &Attachment) -> Value {
    json!({
        "id": a.id,
        "attachment_id": a.id,
        "volume_id": a.volume_id,
        "server_id": a.instance_uuid,
        "host_name": a.node_id,
        "device": null,
        "protocol": a.protocol,
        "attached_at": a.attached_at,
    })
}

/// An attachment as the attachments API shows it (`full`: the detail view, with its
/// `connection_info` as recorded, credentials left out).
pub fn attachment_api(a: &Attachment, full: bool) -> Value {
    let mut o = json!({
        "id": a.id,
        "status": a.attach_status,
        "instance": a.instance_uuid,
        "volume_id": a.volume_id,
    });
    if full {
        o["attached_at"] = json!(a.attached_at);
        o["detached_at"] = Value::Null;
        o["attach_mode"] = json!(a.attach_mode);
        o["connection_info"] =
            serde_json::from_str(&a.connection_info).unwrap_or_else(|_| json!({}));
    }
    o
}

/// A volume (`type_name`: its type's name, if the type still exists).
pub fn volume(
    v: &Vol,
    type_name: Option<String>,
    attachments: &[Attachment],
    metadata: &BTreeMap<String, String>,
) -> Value {
    let mut meta = json!(metadata);
    if v.readonly {
        // Cinder shows its admin flag among the metadata.
        meta["readonly"] = json!("True");
    }
    let mut o = json!({
        "id": v.id,
        "name": v.name,
        "description": v.description,
        "status": v.status.as_str(),
        "size": v.size_bytes / GIB,
        "volume_type": type_name,
        "volume_type_id": v.type_id,
        "encrypted": v.encryption_key_id.is_some(),
        "attachments": attachments.iter().map(attachment).collect::<Vec<_>>(),
        "replication_status": "disabled",
        "multiattach": true,
        "source_volid": v.source_volid,
        "snapshot_id": v.snapshot_id,
        "bootable": if v.bootable { "true" } else { "false" },
        "metadata": meta,
        "availability_zone": AVAILABILITY_ZONE,
        "os-vol-host-attr:host": format!("{}@{}", v.node_id.clone().unwrap_or_default(), v.pool),
        "os-vol-tenant-attr:tenant_id": v.project_id,
        "os-vol-mig-status-attr:migstat": null,
        "os-vol-mig-status-attr:name_id": null,
        "migration_status": null,
        "consistencygroup_id": null,
        "group_id": null,
        "provider_id": null,
        "shared_targets": false,
        "service_uuid": null,
        "cluster_name": null,
        "consumes_quota": true,
        "user_id": null,
        "created_at": v.created_at,
        "updated_at": v.updated_at,
    });
    if let Some(k) = &v.encryption_key_id {
        o["encryption_key_id"] = json!(k);
    }
    o
}

/// A snapshot.
pub fn snapshot(s: &Snap, metadata: &BTreeMap<String, String>) -> Value {
    let progress = if s.status == Status::Creating {
        "0%"
    } else {
        "100%"
    };
    json!({
        "id": s.id,
        "name": s.name,
        "description": s.description,
        "volume_id": s.volume_id,
        "status": s.status.as_str(),
        "size": s.size_bytes / GIB,
        "encrypted": s.encryption_key_id.is_some(),
        "metadata": metadata,
        "os-extended-snapshot-attributes:progress": progress,
        "os-extended-snapshot-attributes:project_id": s.project_id,
        "progress": progress,
        "project_id": s.project_id,
        "user_id": null,
        "group_snapshot_id": null,
        "consumes_quota": true,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
    })
}

/// Cinder's `connection_info` (`{driver_volume_type, data}`) for attachment
/// `attachment_id` of volume `v`, reached at `endpoint`.
pub fn connection_info(
    endpoint: &Endpoint,
    v: &Vol,
    attachment_id: &str,
    read_only: bool,
) -> Value {
    let mut info = match endpoint {
        Endpoint::Nbd {
            export,
            uris,
            credentials,
        } => {
            let mut data = json!({
                "export_name": export,
                "uri": uris.first(),
                "uris": uris,
            });
            if let Some(c) = credentials {
                data["tls"] = json!({
                    "psk_identity": c.psk_identity,
                    "psk": hex::encode(c.psk.expose()),
                });
            }
            json!({ "driver_volume_type": "nbd", "data": data })
        }
        Endpoint::VhostUser { socket, queues } => json!({
            "driver_volume_type": "vhost-user",
            "data": { "socket_path": socket, "num_queues": queues },
        }),
    };
    info["data"]["attachment_id"] = json!(attachment_id);
    info["data"]["volume_id"] = json!(v.id);
    info["data"]["encrypted"] = json!(v.encryption_key_id.is_some());
    info["data"]["access_mode"] = json!(if read_only { "ro" } else { "rw" });
    info
}
