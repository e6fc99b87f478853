//! Router-level tests of every endpoint (status codes and error bodies), run against
//! SQLite and MariaDB (`EMBER_TEST_MYSQL_URL`).

mod common;

use axum::body::Body;
use axum::http::{Method, Request};
use common::{assert_fault, fields, ref_id, Backend, Harness, DELETE, GET, POST, PUT};
use serde_json::json;

api_test!(auth_and_projects, |h| {
    // No token / unknown token.
    h.fault(GET, "/v3/projects", None, None, 401, "X-Auth-Token")
        .await;
    h.fault(
        GET,
        "/v3/projects",
        Some("nope"),
        None,
        401,
        "unknown token",
    )
    .await;

    let pa = h.project("alpha").await;
    h.admin_fault(
        POST,
        "/v3/projects",
        Some(json!({"project": {"name": "alpha"}})),
        409,
        "alpha",
    )
    .await;
    h.admin_fault(
        POST,
        "/v3/projects",
        Some(json!({"project": {"name": ""}})),
        400,
        "project.name",
    )
    .await;
    h.admin_fault(
        POST,
        "/v3/projects",
        Some(json!({"project": {"name": "x", "color": 1}})),
        400,
        "color",
    )
    .await;

    let (tid, member) = h.token(&pa, "member").await;
    h.admin_fault(
        POST,
        &format!("/v3/projects/{pa}/tokens"),
        Some(json!({"token": {"role": "root"}})),
        400,
        "token.role",
    )
    .await;
    h.admin_ok(
        POST,
        "/v3/projects/nope/tokens",
        Some(json!({"token": {"role": "reader"}})),
        404,
    )
    .await;

    let v = h
        .expect(GET, "/v3/auth/tokens", Some(&member), None, 200)
        .await;
    assert_eq!(v["token"]["project_id"], pa.as_str());
    assert_eq!(v["token"]["role"], "member");

    // Members see only their project; cannot create projects or tokens.
    let v = h
        .expect(GET, "/v3/projects", Some(&member), None, 200)
        .await;
    assert_eq!(v["projects"].as_array().unwrap().len(), 1);
    h.fault(
        POST,
        "/v3/projects",
        Some(&member),
        Some(json!({"project": {"name": "m"}})),
        403,
        "admin",
    )
    .await;
    h.expect(
        GET,
        &format!("/v3/projects/{}", h.admin_project),
        Some(&member),
        None,
        403,
    )
    .await;
    h.admin_ok(GET, "/v3/projects/missing", None, 404).await;
    let v = h
        .admin_ok(GET, &format!("/v3/projects/{pa}/tokens"), None, 200)
        .await;
    let list = v["tokens"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert!(
        list[0].get("token").is_none(),
        "token list must not reveal tokens"
    );

    // Revoke.
    h.admin_ok(
        DELETE,
        &format!("/v3/projects/{pa}/tokens/{tid}"),
        None,
        204,
    )
    .await;
    h.expect(GET, "/v3/auth/tokens", Some(&member), None, 401)
        .await;
    h.admin_ok(
        DELETE,
        &format!("/v3/projects/{pa}/tokens/{tid}"),
        None,
        404,
    )
    .await;
});

api_test!(bad_input, |h| {
    let p = &h.admin_project;
    let uri = format!("/v3/{p}/types");
    let (s, v) = h
        .call_bytes_with(
            POST,
            &uri,
            Some(&h.admin),
            b"{\"volume_type\": ".to_vec(),
            &[],
        )
        .await;
    assert_eq!(s, 400);
    assert_fault(&v, 400, "badRequest", "malformed JSON");
    for (body, needle) in [
        (
            Some(json!({"volume_type": {"name": 5}})),
            "volume_type.name",
        ),
        (
            Some(json!({"volume_type": {"name": "a", "bogus": true}})),
            "bogus",
        ),
        (Some(json!({"volume_type": {}, "extra": 1})), "extra"),
        (None, "required"),
    ] {
        h.admin_fault(POST, &uri, body, 400, needle).await;
    }
    // Oversized body.
    let big = format!(
        "{{\"volume_type\": {{\"name\": \"{}\"}}}}",
        "x".repeat(70 * 1024)
    );
    let (s, v) = h
        .call_bytes_with(POST, &uri, Some(&h.admin), big.into_bytes(), &[])
        .await;
    assert_eq!(s, 413);
    assert_fault(&v, 413, "overLimit", "larger than");
    // Unknown route and method.
    h.admin_fault(
        GET,
        "/v3/nothing/here/at/all",
        None,
        404,
        "no such API route",
    )
    .await;
    let v = h.admin_ok(Method::PATCH, &uri, None, 405).await;
    assert!(v["badMethod"]["code"] == 405, "{v}");
    // Bad query.
    let v = h.admin_ok(GET, "/v1/secrets?limit=abc", None, 400).await;
    assert!(
        v["badRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("limit"),
        "{v}"
    );
    h.admin_ok(GET, "/v1/secrets?limit=1000", None, 400).await;
    // Nothing was written by the failures.
    let v = h.admin_ok(GET, &uri, None, 200).await;
    assert_eq!(v["volume_types"].as_array().unwrap().len(), 1, "{v}");
});

api_test!(types_crud_and_visibility, |h| {
    let p = &h.admin_project;
    let pa = h.project("a").await;
    let (_, member) = h.token(&pa, "member").await;
    let base = format!("/v3/{p}/types");
    let v = h
        .admin_ok(
            POST,
            &base,
            Some(json!({"volume_type": {"name": "gold", "description": "fast",
                "extra_specs": {"volume_backend_name": "pool1", "multiattach": "<is> True", "qos:read_iops_sec": "500"},
                "metadata": {"replication": "false", "tier": "gold"}}})),
            200,
        )
        .await;
    let t = &v["volume_type"];
    let id = t["id"].as_str().unwrap().to_string();
    assert_eq!(t["is_public"], true);
    assert_eq!(t["os-volume-type-access:is_public"], true);
    assert_eq!(t["extra_specs"]["volume_backend_name"], "pool1");
    assert_eq!(t["metadata"]["encryption"], "false");
    assert_eq!(t["metadata"]["tier"], "gold");
    h.admin_fault(
        POST,
        &base,
        Some(json!({"volume_type": {"name": "gold"}})),
        409,
        "gold",
    )
    .await;

    // Member view: user-visible extra specs only; hidden key is 404.
    let mb = format!("/v3/{pa}/types");
    let v = h
        .expect(GET, &format!("{mb}/{id}"), Some(&member), None, 200)
        .await;
    let specs = v["volume_type"]["extra_specs"].as_object().unwrap();
    assert_eq!(specs.len(), 1, "{v}");
    assert_eq!(specs["multiattach"], "<is> True");
    h.fault(
        GET,
        &format!("{mb}/{id}/extra_specs/volume_backend_name"),
        Some(&member),
        None,
        404,
        "volume_backend_name",
    )
    .await;
    h.expect(
        GET,
        &format!("{mb}/{id}/extra_specs/multiattach"),
        Some(&member),
        None,
        200,
    )
    .await;
    let v = h
        .admin_ok(
            GET,
            &format!("{base}/{id}/extra_specs/volume_backend_name"),
            None,
            200,
        )
        .await;
    assert_eq!(v, json!({"volume_backend_name": "pool1"}));
    let v = h
        .expect(
            GET,
            &format!("{mb}/{id}/extra_specs"),
            Some(&member),
            None,
            200,
        )
        .await;
    assert_eq!(v["extra_specs"].as_object().unwrap().len(), 1);
    let v = h
        .expect(
            GET,
            &format!("{mb}/{id}/metadata"),
            Some(&member),
            None,
            200,
        )
        .await;
    assert_eq!(v["metadata"]["tier"], "gold");
    let (s, v) = h
        .call(
            GET,
            &format!("{mb}/{id}/metadata/encryption"),
            Some(&member),
            None,
        )
        .await;
    assert_eq!((s.as_u16(), v), (200, json!({"encryption": "false"})));
    // By name, and default type.
    h.admin_ok(GET, &format!("{base}/gold"), None, 200).await;
    let v = h.admin_ok(GET, &format!("{base}/default"), None, 200).await;
    assert_eq!(v["volume_type"]["name"], "__DEFAULT__");
    let v = h.admin_ok(GET, &format!("{base}/default"), None, 200).await;
    let def_id = v["volume_type"]["id"].as_str().unwrap().to_string();
    h.admin_fault(DELETE, &format!("{base}/{def_id}"), None, 400, "default")
        .await;

    // Private type: invisible to members until access is granted.
    let pid = h
        .create_type(json!({"name": "secret-tier", "os-volume-type-access:is_public": false}))
        .await;
    h.expect(GET, &format!("{mb}/{pid}"), Some(&member), None, 404)
        .await;
    let (_, v) = h.call(GET, &mb, Some(&member), None).await;
    assert!(v["volume_types"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["id"] != pid.as_str()));
    let act = format!("{base}/{pid}/action");
    h.admin_ok(
        POST,
        &act,
        Some(json!({"addProjectAccess": {"project": pa}})),
        202,
    )
    .await;
    h.admin_ok(
        POST,
        &act,
        Some(json!({"addProjectAccess": {"project": pa}})),
        409,
    )
    .await;
    h.admin_ok(
        POST,
        &act,
        Some(json!({"addProjectAccess": {"project": "nope"}})),
        404,
    )
    .await;
    h.admin_ok(POST, &act, Some(json!({})), 400).await;
    h.admin_ok(
        POST,
        &format!("{base}/{id}/action"),
        Some(json!({"addProjectAccess": {"project": pa}})),
        400,
    )
    .await;
    let v = h
        .admin_ok(
            GET,
            &format!("{base}/{pid}/os-volume-type-access"),
            None,
            200,
        )
        .await;
    assert_eq!(
        v["volume_type_access"],
        json!([{"volume_type_id": pid, "project_id": pa}])
    );
    h.admin_ok(
        GET,
        &format!("{base}/{id}/os-volume-type-access"),
        None,
        404,
    )
    .await;
    h.expect(GET, &format!("{mb}/{pid}"), Some(&member), None, 200)
        .await;
    h.admin_ok(
        POST,
        &act,
        Some(json!({"removeProjectAccess": {"project": pa}})),
        202,
    )
    .await;
    h.admin_ok(
        POST,
        &act,
        Some(json!({"removeProjectAccess": {"project": pa}})),
        404,
    )
    .await;
    h.expect(GET, &format!("{mb}/{pid}"), Some(&member), None, 404)
        .await;
    let v = h
        .admin_ok(GET, &format!("{base}?is_public=false"), None, 200)
        .await;
    assert_eq!(v["volume_types"].as_array().unwrap().len(), 1);
    h.admin_ok(GET, &format!("{base}?is_public=maybe"), None, 400)
        .await;

    // Update.
    let v = h
        .admin_ok(
            PUT,
            &format!("{base}/{id}"),
            Some(json!({"volume_type": {"description": "faster", "is_public": "yes"}})),
            200,
        )
        .await;
    assert_eq!(v["volume_type"]["description"], "faster");
    h.admin_ok(
        PUT,
        &format!("{base}/{id}"),
        Some(json!({"volume_type": {}})),
        400,
    )
    .await;
    h.admin_ok(
        PUT,
        &format!("{base}/{id}"),
        Some(json!({"volume_type": {"name": "secret-tier"}})),
        409,
    )
    .await;
    h.admin_ok(
        PUT,
        &format!("{base}/missing"),
        Some(json!({"volume_type": {"name": "z"}})),
        404,
    )
    .await;

    // Delete.
    h.admin_ok(DELETE, &format!("{base}/{pid}"), None, 202)
        .await;
    h.admin_ok(GET, &format!("{base}/{pid}"), None, 404).await;
    h.admin_ok(DELETE, &format!("{base}/{pid}"), None, 404)
        .await;
});

api_test!(extra_specs_metadata_rules, |h| {
    let p = &h.admin_project;
    let base = format!("/v3/{p}/types");
    let id = h.create_type(json!({"name": "t"})).await;
    let es = format!("{base}/{id}/extra_specs");
    let v = h
        .admin_ok(
            POST,
            &es,
            Some(json!({"extra_specs": {"a": "1", "b.c:d-e_f": "2"}})),
            200,
        )
        .await;
    assert_eq!(v["extra_specs"]["a"], "1");
    for (body, needle) in [
        (json!({"extra_specs": {"bad key": "1"}}), "bad key"),
        (json!({"extra_specs": {"k": "v".repeat(256)}}), "255"),
        (json!({"extra_specs": {"k": 5}}), "extra_specs.k"),
    ] {
        h.admin_fault(POST, &es, Some(body), 400, needle).await;
    }
    h.admin_ok(POST, &es, Some(json!({"extra_specs": {}})), 400)
        .await;
    // PUT single key.
    let v = h
        .admin_ok(PUT, &format!("{es}/a"), Some(json!({"a": "9"})), 200)
        .await;
    assert_eq!(v, json!({"a": "9"}));
    h.admin_fault(
        PUT,
        &format!("{es}/a"),
        Some(json!({"b": "9"})),
        400,
        "exactly",
    )
    .await;
    h.admin_ok(
        PUT,
        &format!("{es}/a"),
        Some(json!({"a": "1", "b": "2"})),
        400,
    )
    .await;
    h.admin_ok(DELETE, &format!("{es}/a"), None, 202).await;
    h.admin_ok(DELETE, &format!("{es}/a"), None, 404).await;
    h.admin_ok(GET, &format!("{es}/a"), None, 404).await;

    // Metadef enforcement: qos range, unknown qos key, read-only encryption, boolean.
    let v = h
        .admin_fault(
            POST,
            &es,
            Some(json!({"extra_specs": {"qos:read_iops_sec": "0"}})),
            400,
            "OS::Ember::QoS/read_iops_sec",
        )
        .await;
    assert!(
        v["badRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("minimum"),
        "{v}"
    );
    h.admin_fault(
        PUT,
        &format!("{es}/qos:write_bytes_sec"),
        Some(json!({"qos:write_bytes_sec": "lots"})),
        400,
        "integer",
    )
    .await;
    h.admin_fault(
        POST,
        &es,
        Some(json!({"extra_specs": {"qos:bogus": "1"}})),
        400,
        "unknown property",
    )
    .await;
    h.admin_ok(
        POST,
        &es,
        Some(json!({"extra_specs": {"qos:total_iops_sec": "1000"}})),
        200,
    )
    .await;
    let md = format!("{base}/{id}/metadata");
    h.admin_fault(
        POST,
        &md,
        Some(json!({"metadata": {"encryption": "true"}})),
        400,
        "read-only",
    )
    .await;
    h.admin_fault(
        POST,
        &md,
        Some(json!({"metadata": {"replication": "sometimes"}})),
        400,
        "OS::Ember::VolumeType/replication",
    )
    .await;
    // A failed multi-key request writes nothing.
    h.admin_ok(
        POST,
        &md,
        Some(json!({"metadata": {"zzz": "1", "replication": "nope"}})),
        400,
    )
    .await;
    h.admin_ok(GET, &format!("{md}/zzz"), None, 404).await;
    h.admin_ok(
        POST,
        &md,
        Some(json!({"metadata": {"replication": "true", "note": "x"}})),
        200,
    )
    .await;
    let v = h
        .admin_ok(PUT, &format!("{md}/note"), Some(json!({"note": "y"})), 200)
        .await;
    assert_eq!(v, json!({"note": "y"}));
    h.admin_ok(DELETE, &format!("{md}/note"), None, 202).await;
    h.admin_ok(DELETE, &format!("{md}/note"), None, 404).await;

    // In use: extra specs and encryption frozen; metadata still editable; delete refused.
    h.fake_volume(p, &id, None).await;
    h.admin_fault(
        POST,
        &es,
        Some(json!({"extra_specs": {"x": "1"}})),
        400,
        "used by 1 volume",
    )
    .await;
    h.admin_ok(PUT, &format!("{es}/x"), Some(json!({"x": "1"})), 400)
        .await;
    h.admin_ok(DELETE, &format!("{es}/qos:total_iops_sec"), None, 400)
        .await;
    h.admin_ok(
        POST,
        &format!("{base}/{id}/encryption"),
        Some(json!({"encryption": {"provider": "luks"}})),
        400,
    )
    .await;
    h.admin_ok(
        POST,
        &md,
        Some(json!({"metadata": {"tier": "silver"}})),
        200,
    )
    .await;
    h.admin_ok(DELETE, &format!("{base}/{id}"), None, 400).await;
});

api_test!(encryption_specs, |h| {
    let p = &h.admin_project;
    let base = format!("/v3/{p}/types");
    let id = h.create_type(json!({"name": "enc"})).await;
    let e = format!("{base}/{id}/encryption");
    assert_eq!(h.admin_ok(GET, &e, None, 200).await, json!({}));
    for (body, needle) in [
        (json!({"encryption": {"provider": "plain"}}), "provider"),
        (
            json!({"encryption": {"cipher": "aes-xts-plain64"}}),
            "provider",
        ),
        (
            json!({"encryption": {"provider": "luks", "cipher": "aes-cbc-essiv"}}),
            "cipher",
        ),
        (
            json!({"encryption": {"provider": "luks", "key_size": 128}}),
            "key_size",
        ),
        (
            json!({"encryption": {"provider": "luks", "key_size": true}}),
            "key_size",
        ),
        (
            json!({"encryption": {"provider": "luks", "control_location": "middle"}}),
            "control_location",
        ),
        (
            json!({"encryption": {"provider": "luks", "extra": 1}}),
            "extra",
        ),
    ] {
        let (s, v) = h.call(POST, &e, Some(&h.admin), Some(body)).await;
        assert_eq!(s, 400, "{v}");
        assert_fault(&v, 400, "badRequest", needle);
    }
    let v = h
        .admin_ok(POST, &e, Some(json!({"encryption": {"provider": "luks2", "cipher": "aes-xts-plain64", "key_size": "256", "control_location": "front-end"}})), 200)
        .await;
    let enc = &v["encryption"];
    assert_eq!(enc["key_size"], 256);
    assert_eq!(enc["volume_type_id"], id.as_str());
    let enc_id = enc["encryption_id"].as_str().unwrap().to_string();
    h.admin_ok(
        POST,
        &e,
        Some(json!({"encryption": {"provider": "luks"}})),
        400,
    )
    .await;
    let v = h.admin_ok(GET, &e, None, 200).await;
    assert_eq!(v["provider"], "luks2");
    assert!(v["created_at"].is_string());
    assert_eq!(
        h.admin_ok(GET, &format!("{e}/cipher"), None, 200).await,
        json!({"cipher": "aes-xts-plain64"})
    );
    h.admin_ok(GET, &format!("{e}/nonsense"), None, 404).await;
    // The derived metadata flips.
    let v = h
        .admin_ok(GET, &format!("{base}/{id}/metadata"), None, 200)
        .await;
    assert_eq!(v["metadata"]["encryption"], "true");
    // Non-admins cannot read the spec.
    let pa = h.project("a").await;
    let (_, member) = h.token(&pa, "member").await;
    h.fault(
        GET,
        &format!("/v3/{pa}/types/{id}/encryption"),
        Some(&member),
        None,
        403,
        "admin",
    )
    .await;
    let (_, v) = h
        .call(GET, &format!("/v3/{pa}/types/{id}"), Some(&member), None)
        .await;
    assert_eq!(v["volume_type"]["metadata"]["encryption"], "true");
    // Update and delete by encryption id.
    let v = h
        .admin_ok(
            PUT,
            &format!("{e}/{enc_id}"),
            Some(json!({"encryption": {"key_size": 512}})),
            200,
        )
        .await;
    assert_eq!(v, json!({"encryption": {"key_size": 512}}));
    h.admin_ok(
        PUT,
        &format!("{e}/{enc_id}"),
        Some(json!({"encryption": {}})),
        400,
    )
    .await;
    h.admin_ok(
        PUT,
        &format!("{e}/wrong"),
        Some(json!({"encryption": {"key_size": 512}})),
        404,
    )
    .await;
    assert_eq!(
        h.admin_ok(GET, &format!("{e}/key_size"), None, 200).await,
        json!({"key_size": 512})
    );
    h.admin_ok(DELETE, &format!("{e}/wrong"), None, 404).await;
    h.admin_ok(DELETE, &format!("{e}/{enc_id}"), None, 202)
        .await;
    assert_eq!(h.admin_ok(GET, &e, None, 200).await, json!({}));
    h.admin_ok(DELETE, &format!("{e}/{enc_id}"), None, 404)
        .await;
});

api_test!(metadefs_api, |h| {
    let v = h.admin_ok(GET, "/v2/metadefs/namespaces", None, 200).await;
    let names = fields(&v, "namespaces", "namespace");
    assert!(
        names.contains(&"OS::Ember::VolumeType") && names.contains(&"OS::Ember::QoS"),
        "{names:?}"
    );
    let v = h
        .admin_ok(GET, "/v2/metadefs/namespaces/OS::Ember::QoS", None, 200)
        .await;
    assert_eq!(v["properties"]["read_iops_sec"]["minimum"], 1.0);
    assert_eq!(v["resource_type_associations"][0]["prefix"], "qos:");
    assert_eq!(v["protected"], true);
    h.admin_fault(
        DELETE,
        "/v2/metadefs/namespaces/OS::Ember::QoS",
        None,
        403,
        "protected",
    )
    .await;

    // A custom enforced namespace.
    let ns = json!({
        "namespace": "Acme::Tiers", "display_name": "Acme", "visibility": "private",
        "properties": {"tier": {"title": "Tier", "type": "string", "enum": ["gold", "silver"]}},
        "resource_type_associations": [{"name": "OS::Cinder::Volumetype", "prefix": "acme:"}]
    });
    let v = h
        .admin_ok(POST, "/v2/metadefs/namespaces", Some(ns.clone()), 201)
        .await;
    assert_eq!(v["namespace"], "Acme::Tiers");
    h.admin_ok(POST, "/v2/metadefs/namespaces", Some(ns), 409)
        .await;
    h.admin_fault(
        POST,
        "/v2/metadefs/namespaces",
        Some(json!({"namespace": "x", "visibility": "open"})),
        400,
        "visibility",
    )
    .await;
    let base = "/v2/metadefs/namespaces/Acme::Tiers";
    let prop =
        json!({"name": "iops", "title": "IOPS", "type": "integer", "minimum": 10, "maximum": 20});
    h.admin_ok(POST, &format!("{base}/properties"), Some(prop.clone()), 201)
        .await;
    h.admin_ok(POST, &format!("{base}/properties"), Some(prop), 409)
        .await;
    h.admin_fault(
        POST,
        &format!("{base}/properties"),
        Some(json!({"name": "bad", "title": "b", "type": "string", "pattern": "("})),
        400,
        "pattern",
    )
    .await;
    h.admin_fault(
        POST,
        &format!("{base}/properties"),
        Some(json!({"name": "bad", "title": "b", "type": "object"})),
        400,
        "type",
    )
    .await;
    h.admin_ok(
        POST,
        &format!("{base}/properties"),
        Some(json!({"title": "no name", "type": "string"})),
        400,
    )
    .await;
    let v = h
        .admin_ok(GET, &format!("{base}/properties/iops"), None, 200)
        .await;
    assert_eq!(v["name"], "iops");
    h.admin_ok(
        PUT,
        &format!("{base}/properties/iops"),
        Some(json!({"title": "IOPS", "type": "integer", "minimum": 10, "maximum": 30})),
        200,
    )
    .await;
    h.admin_ok(
        PUT,
        &format!("{base}/properties/iops"),
        Some(json!({"name": "other", "title": "IOPS", "type": "integer"})),
        400,
    )
    .await;
    h.admin_ok(
        PUT,
        &format!("{base}/properties/none"),
        Some(json!({"title": "IOPS", "type": "integer"})),
        404,
    )
    .await;
    let v = h
        .admin_ok(GET, &format!("{base}/properties"), None, 200)
        .await;
    assert_eq!(v["properties"].as_object().unwrap().len(), 2);

    // Enforced on types.
    let p = &h.admin_project;
    let id = h.create_type(json!({"name": "acme"})).await;
    let md = format!("/v3/{p}/types/{id}/metadata");
    h.admin_ok(
        POST,
        &md,
        Some(json!({"metadata": {"acme:tier": "gold", "acme:iops": "25"}})),
        200,
    )
    .await;
    h.admin_fault(
        POST,
        &md,
        Some(json!({"metadata": {"acme:tier": "bronze"}})),
        400,
        "Acme::Tiers/tier must be one of",
    )
    .await;
    h.admin_fault(
        POST,
        &md,
        Some(json!({"metadata": {"acme:iops": "31"}})),
        400,
        "maximum",
    )
    .await;
    // Creating a type validates too.
    h.admin_ok(
        POST,
        &format!("/v3/{p}/types"),
        Some(json!({"volume_type": {"name": "acme2", "metadata": {"acme:nope": "1"}}})),
        400,
    )
    .await;
    h.admin_ok(GET, &format!("/v3/{p}/types/acme2"), None, 404)
        .await;

    // Associations.
    let v = h
        .admin_ok(GET, &format!("{base}/resource_types"), None, 200)
        .await;
    assert_eq!(
        v["resource_type_associations"][0]["name"],
        "OS::Cinder::Volumetype"
    );
    h.admin_ok(
        POST,
        &format!("{base}/resource_types"),
        Some(json!({"name": "OS::Cinder::Volume"})),
        201,
    )
    .await;
    h.admin_ok(
        POST,
        &format!("{base}/resource_types"),
        Some(json!({"name": "OS::Cinder::Volume"})),
        409,
    )
    .await;
    h.admin_ok(
        DELETE,
        &format!("{base}/resource_types/OS::Cinder::Volume"),
        None,
        204,
    )
    .await;
    h.admin_ok(
        DELETE,
        &format!("{base}/resource_types/OS::Cinder::Volume"),
        None,
        404,
    )
    .await;
    let v = h
        .admin_ok(
            GET,
            "/v2/metadefs/namespaces?resource_types=OS::Cinder::Volumetype",
            None,
            200,
        )
        .await;
    assert_eq!(v["namespaces"].as_array().unwrap().len(), 3);

    // Private namespace hidden from other projects.
    let pa = h.project("a").await;
    let (_, member) = h.token(&pa, "member").await;
    h.expect(GET, base, Some(&member), None, 404).await;
    let (_, v) = h
        .call(GET, "/v2/metadefs/namespaces", Some(&member), None)
        .await;
    assert_eq!(v["namespaces"].as_array().unwrap().len(), 2);
    h.expect(
        POST,
        "/v2/metadefs/namespaces",
        Some(&member),
        Some(json!({"namespace": "m"})),
        403,
    )
    .await;

    // Update, unprotect and delete.
    let v = h
        .admin_ok(
            PUT,
            base,
            Some(json!({"description": "tiers", "visibility": "public"})),
            200,
        )
        .await;
    assert_eq!(v["visibility"], "public");
    h.admin_ok(PUT, base, Some(json!({"namespace": "renamed"})), 400)
        .await;
    h.admin_ok(DELETE, &format!("{base}/properties/iops"), None, 204)
        .await;
    h.admin_ok(DELETE, &format!("{base}/properties/iops"), None, 404)
        .await;
    h.admin_ok(DELETE, base, None, 204).await;
    h.admin_ok(GET, base, None, 404).await;
    // With the namespace gone, its keys are free-form again.
    h.admin_ok(
        POST,
        &md,
        Some(json!({"metadata": {"acme:tier": "bronze"}})),
        200,
    )
    .await;
});

api_test!(secrets_and_orders, |h| {
    let pa = h.project("a").await;
    let pb = h.project("b").await;
    let (_, member) = h.token(&pa, "member").await;
    let (_, reader) = h.token(&pa, "reader").await;
    let (_, other) = h.token(&pb, "member").await;
    let key = [0x5au8; 32];
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(key);
    let (s, v) = h
        .call(POST, "/v1/secrets", Some(&member), Some(json!({"name": "k1", "secret_type": "symmetric", "algorithm": "aes",
            "bit_length": 256, "mode": "xts", "payload": b64, "payload_content_type": "application/octet-stream",
            "payload_content_encoding": "base64"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let sref = v["secret_ref"].as_str().unwrap();
    let sid = sref.rsplit('/').next().unwrap().to_string();
    assert!(sref.starts_with("http://"));
    let v = h
        .expect(GET, &format!("/v1/secrets/{sid}"), Some(&reader), None, 200)
        .await;
    assert_eq!(v["secret_type"], "symmetric");
    assert_eq!(v["bit_length"], 256);
    assert_eq!(v["status"], "ACTIVE");
    assert_eq!(v["content_types"]["default"], "application/octet-stream");
    assert!(v.get("payload").is_none());
    // Payload: owner member only.
    let req = Request::get(format!("/v1/secrets/{sid}/payload"))
        .header("x-auth-token", &member)
        .body(Body::empty())
        .unwrap();
    let (s, hd, body) = h.raw(req).await;
    assert_eq!(s, 200);
    assert_eq!(body, key);
    assert_eq!(hd["content-type"], "application/octet-stream");
    // Bytes that are UTF-8 text are served as text when asked so (the `openstack` CLI
    // stores a passphrase base64-encoded and reads it as text); other types are 406.
    let req = Request::get(format!("/v1/secrets/{sid}/payload"))
        .header("x-auth-token", &member)
        .header("accept", "text/plain")
        .body(Body::empty())
        .unwrap();
    let (s, hd, body) = h.raw(req).await;
    assert_eq!(
        (s.as_u16(), hd["content-type"].to_str().ok(), body),
        (200, Some("text/plain"), key.to_vec())
    );
    let req = Request::get(format!("/v1/secrets/{sid}/payload"))
        .header("x-auth-token", &member)
        .header("accept", "image/png")
        .body(Body::empty())
        .unwrap();
    let (s, _, _) = h.raw(req).await;
    assert_eq!(s, 406);
    let (s, v) = h
        .call(
            GET,
            &format!("/v1/secrets/{sid}/payload"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(s, 403, "{v}");
    for t in [&other, &h.admin] {
        h.fault(
            GET,
            &format!("/v1/secrets/{sid}/payload"),
            Some(t),
            None,
            404,
            &sid,
        )
        .await;
        h.expect(GET, &format!("/v1/secrets/{sid}"), Some(t), None, 404)
            .await;
    }
    // At rest the payload is sealed.
    let row: (String,) = sqlx::query_as("SELECT sealed FROM secrets WHERE id = ?")
        .bind(sid.clone())
        .fetch_one(&h.control.state.db().pool)
        .await
        .unwrap();
    assert!(!row.0.contains(&b64) && !row.0.contains(&hex::encode(key)));
    // Passphrase rule for volumes.
    let pp = ember_control::keys::unlock_passphrase(&h.control.state, &pa, &sid)
        .await
        .unwrap();
    assert_eq!(&pp[..], hex::encode(key).as_bytes());

    // Text passphrase.
    let v = h.expect(POST, "/v1/secrets", Some(&member), Some(json!({"secret_type": "passphrase", "payload": "correct horse", "payload_content_type": "text/plain"})), 201).await;
    let pid = ref_id(&v["secret_ref"]);
    let req = Request::get(format!("/v1/secrets/{pid}/payload"))
        .header("x-auth-token", &member)
        .header("accept", "text/plain")
        .body(Body::empty())
        .unwrap();
    let (s, _, body) = h.raw(req).await;
    assert_eq!((s.as_u16(), body), (200, b"correct horse".to_vec()));
    assert_eq!(
        ember_control::keys::unlock_passphrase(&h.control.state, &pa, &pid)
            .await
            .unwrap()[..],
        b"correct horse"[..]
    );

    // Validation.
    for (body, status, needle) in [
        (
            json!({"payload": "x", "payload_content_type": "application/octet-stream", "payload_content_encoding": "base64"}),
            400,
            "base64",
        ),
        (
            json!({"payload": "eA==", "payload_content_type": "application/octet-stream"}),
            400,
            "payload_content_encoding",
        ),
        (
            json!({"payload": "x", "payload_content_type": "text/plain", "payload_content_encoding": "base64"}),
            400,
            "payload_content_encoding",
        ),
        (
            json!({"payload": "x", "payload_content_type": "image/png"}),
            400,
            "payload_content_type",
        ),
        (
            json!({"payload": "x", "payload_content_type": "text/plain", "secret_type": "symmetric"}),
            400,
            "symmetric",
        ),
        (
            json!({"payload": "AAAA", "payload_content_type": "application/octet-stream", "payload_content_encoding": "base64", "secret_type": "symmetric", "bit_length": 256}),
            400,
            "bit_length",
        ),
        (
            json!({"payload": "x", "payload_content_type": "text/plain", "secret_type": "certificate"}),
            400,
            "secret_type",
        ),
        (
            json!({"payload": "x", "payload_content_type": "text/plain", "expiration": "2001-01-01T00:00:00Z"}),
            400,
            "future",
        ),
        (
            json!({"payload": "x", "payload_content_type": "text/plain", "expiration": "soon"}),
            400,
            "expiration",
        ),
        (
            json!({"payload_content_type": "text/plain"}),
            400,
            "payload",
        ),
        (
            json!({"payload": "x".repeat(10_001), "payload_content_type": "text/plain"}),
            413,
            "larger than",
        ),
    ] {
        let (s, v) = h.call(POST, "/v1/secrets", Some(&member), Some(body)).await;
        assert_eq!(s.as_u16(), status, "{v}");
        let fault = if status == 413 {
            "overLimit"
        } else {
            "badRequest"
        };
        assert_fault(&v, status, fault, needle);
    }
    h.expect(
        POST,
        "/v1/secrets",
        Some(&reader),
        Some(json!({"payload": "x", "payload_content_type": "text/plain"})),
        403,
    )
    .await;

    // Listing is per project.
    let (_, v) = h.call(GET, "/v1/secrets", Some(&reader), None).await;
    assert_eq!(v["total"], 2);
    let (_, v) = h
        .call(
            GET,
            "/v1/secrets?secret_type=passphrase&limit=1",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(v["secrets"].as_array().unwrap().len(), 1);
    let (_, v) = h.call(GET, "/v1/secrets", Some(&other), None).await;
    assert_eq!(v["total"], 0);

    // Orders.
    let (s, v) = h.call(POST, "/v1/orders", Some(&member), Some(json!({"type": "key", "meta": {"name": "gen", "algorithm": "aes", "bit_length": 512, "mode": "xts"}}))).await;
    assert_eq!(s, 202, "{v}");
    let oid = ref_id(&v["order_ref"]);
    let v = h
        .expect(GET, &format!("/v1/orders/{oid}"), Some(&reader), None, 200)
        .await;
    assert_eq!(v["status"], "ACTIVE");
    let gen = ref_id(&v["secret_ref"]);
    let req = Request::get(format!("/v1/secrets/{gen}/payload"))
        .header("x-auth-token", &member)
        .body(Body::empty())
        .unwrap();
    let (s, _, body) = h.raw(req).await;
    assert_eq!((s.as_u16(), body.len()), (200, 64));
    for (body, needle) in [
        (
            json!({"type": "asymmetric", "meta": {"algorithm": "rsa", "bit_length": 2048}}),
            "type",
        ),
        (
            json!({"type": "key", "meta": {"algorithm": "aes", "bit_length": 100}}),
            "bit_length",
        ),
        (
            json!({"type": "key", "meta": {"algorithm": "aes", "bit_length": 256, "payload": "x"}}),
            "payload",
        ),
        (
            json!({"type": "key", "meta": {"algorithm": "aes"}}),
            "bit_length",
        ),
    ] {
        let (s, v) = h.call(POST, "/v1/orders", Some(&member), Some(body)).await;
        assert_eq!(s, 400, "{v}");
        assert_fault(&v, 400, "badRequest", needle);
    }
    let (_, v) = h.call(GET, "/v1/orders", Some(&member), None).await;
    assert_eq!(v["total"], 1);
    h.expect(GET, &format!("/v1/orders/{oid}"), Some(&other), None, 404)
        .await;
    h.expect(
        DELETE,
        &format!("/v1/orders/{oid}"),
        Some(&reader),
        None,
        403,
    )
    .await;
    h.expect(
        DELETE,
        &format!("/v1/orders/{oid}"),
        Some(&member),
        None,
        204,
    )
    .await;
    let (s, _) = h
        .call(GET, &format!("/v1/secrets/{gen}"), Some(&member), None)
        .await;
    assert_eq!(s, 200, "deleting an order keeps its secret");

    // Delete: refused while a volume uses the secret.
    let v = h
        .admin_ok(
            GET,
            &format!("/v3/{}/types/default", h.admin_project),
            None,
            200,
        )
        .await;
    let def = v["volume_type"]["id"].as_str().unwrap().to_string();
    let vol = h.fake_volume(&pa, &def, Some(&sid)).await;
    h.fault(
        DELETE,
        &format!("/v1/secrets/{sid}"),
        Some(&member),
        None,
        409,
        "used by 1 volume",
    )
    .await;
    sqlx::query("DELETE FROM volumes WHERE id = ?")
        .bind(vol)
        .execute(&h.control.state.db().pool)
        .await
        .unwrap();
    h.expect(
        DELETE,
        &format!("/v1/secrets/{sid}"),
        Some(&reader),
        None,
        403,
    )
    .await;
    h.expect(
        DELETE,
        &format!("/v1/secrets/{sid}"),
        Some(&other),
        None,
        404,
    )
    .await;
    h.expect(
        DELETE,
        &format!("/v1/secrets/{sid}"),
        Some(&member),
        None,
        204,
    )
    .await;
    h.expect(GET, &format!("/v1/secrets/{sid}"), Some(&member), None, 404)
        .await;
});

api_test!(restart_keeps_state, |h| {
    // Re-opening the same data dir and database reuses the admin token and master key.
    let v = h.admin_ok(POST, "/v1/secrets", Some(json!({"payload": "pw", "payload_content_type": "text/plain", "secret_type": "passphrase"})), 201).await;
    let sid = ref_id(&v["secret_ref"]);
    let cfg = ember_control::ControlConfig::new(
        h.dir.path().to_path_buf(),
        String::new(),
        "n2".into(),
        "x".into(),
    );
    let _ = cfg;
    let pp = ember_control::keys::unlock_passphrase(&h.control.state, &h.admin_project, &sid)
        .await
        .unwrap();
    assert_eq!(&pp[..], b"pw");
    // A wrong master key is refused at start-up.
    let wrong = h.dir.path().join("wrong.key");
    std::fs::write(&wrong, [9u8; 32]).unwrap();
    let r = ember_control::keys::check_master_key(
        h.control.state.db(),
        &ember_control::keys::MasterKey::load(&wrong).unwrap(),
    )
    .await;
    assert!(r.unwrap_err().to_string().contains("does not match"));
});

api_test!(names_compare_bytewise, |h| {
    // Both backends treat names as exact byte strings: case and trailing spaces matter.
    let base = format!("/v3/{}/types", h.admin_project);
    for name in ["Gold", "gold", "gold ", "göld"] {
        h.admin_ok(
            POST,
            &base,
            Some(json!({"volume_type": {"name": name}})),
            200,
        )
        .await;
    }
    h.admin_ok(
        POST,
        &base,
        Some(json!({"volume_type": {"name": "gold "}})),
        409,
    )
    .await;
    let v = h.admin_ok(GET, &format!("{base}/gold%20"), None, 200).await;
    assert_eq!(v["volume_type"]["name"], "gold ");
    let v = h.admin_ok(GET, &format!("{base}/Gold"), None, 200).await;
    assert_eq!(v["volume_type"]["name"], "Gold");
    let id = v["volume_type"]["id"].as_str().unwrap().to_string();
    let es = format!("{base}/{id}/extra_specs");
    h.admin_ok(
        POST,
        &es,
        Some(json!({"extra_specs": {"k": "1", "K": "2"}})),
        200,
    )
    .await;
    let v = h.admin_ok(GET, &es, None, 200).await;
    assert_eq!(v["extra_specs"], json!({"k": "1", "K": "2"}));
});
