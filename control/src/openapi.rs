//! The router and its OpenAPI description, built together so they cannot drift: every
//! route is registered through `utoipa_axum::routes!`, which adds the handler's
//! `#[utoipa::path]` to the spec as it adds the handler to the router. `GET
//! /openapi.json` serves the spec; a test checks spec and router against each other.
//!
//! [`check_body`] runs a request body through what its route does before touching the
//! database (the strict parser, then the body's own checks): the entry point of the
//! `rest_bodies` fuzz target and of the body property test.

use crate::api::{cinder_errors, fallback, MAX_BODY};
use crate::state::AppState;
use crate::{keys, locks, metadefs, projects, qos, services, types, versions, volumes};
use axum::extract::{DefaultBodyLimit, State};
use axum::Json;
use std::sync::Arc;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::OpenApi as Spec;
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "Ember control plane", description = "Cinder-, Glance-metadefs- and Barbican-shaped REST API of emberd."),
    modifiers(&TokenAuth),
    security(("token" = []))
)]
struct ApiDoc;

struct TokenAuth;

impl Modify for TokenAuth {
    fn modify(&self, openapi: &mut Spec) {
        let comps = openapi.components.get_or_insert_with(Default::default);
        comps.add_security_scheme(
            "token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Auth-Token"))),
        );
    }
}

#[derive(Clone)]
struct SpecState(Arc<Spec>);

#[utoipa::path(get, path = "/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "this OpenAPI document")))]
async fn openapi_json(State(spec): State<SpecState>) -> Json<Spec> {
    Json((*spec.0).clone())
}

/// All API routes with their spec (no state yet, no fallback).
pub fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(versions::root))
        .routes(routes!(versions::cinder_v3))
        .routes(routes!(versions::barbican_v1))
        .routes(routes!(versions::glance))
        .routes(routes!(versions::glance_v2))
        .routes(routes!(projects::create_project, projects::list_projects))
        .routes(routes!(projects::show_project))
        .routes(routes!(projects::create_token, projects::list_tokens))
        .routes(routes!(projects::delete_token))
        .routes(routes!(projects::whoami))
        .routes(routes!(types::list_types, types::create_type))
        .routes(routes!(types::default_type))
        .routes(routes!(
            types::show_type,
            types::update_type,
            types::delete_type
        ))
        .routes(routes!(types::list_specs, types::set_specs))
        .routes(routes!(
            types::show_spec,
            types::put_spec,
            types::delete_spec
        ))
        .routes(routes!(types::list_meta, types::set_meta))
        .routes(routes!(
            types::show_meta,
            types::put_meta,
            types::delete_meta
        ))
        .routes(routes!(types::show_encryption, types::create_encryption))
        .routes(routes!(
            types::show_encryption_key,
            types::update_encryption,
            types::delete_encryption
        ))
        .routes(routes!(types::list_access))
        .routes(routes!(types::type_action))
        .routes(routes!(
            metadefs::list_namespaces,
            metadefs::create_namespace
        ))
        .routes(routes!(
            metadefs::show_namespace,
            metadefs::update_namespace,
            metadefs::delete_namespace
        ))
        .routes(routes!(
            metadefs::list_properties,
            metadefs::create_property
        ))
        .routes(routes!(
            metadefs::show_property,
            metadefs::update_property,
            metadefs::delete_property
        ))
        .routes(routes!(
            metadefs::list_associations,
            metadefs::create_association
        ))
        .routes(routes!(metadefs::delete_association))
        .routes(routes!(
            metadefs::objects::list_objects,
            metadefs::objects::create_object
        ))
        .routes(routes!(
            metadefs::objects::show_object,
            metadefs::objects::update_object,
            metadefs::objects::delete_object
        ))
        .routes(routes!(
            metadefs::objects::list_tags,
            metadefs::objects::create_tags,
            metadefs::objects::delete_tags
        ))
        .routes(routes!(
            metadefs::objects::show_tag,
            metadefs::objects::create_tag,
            metadefs::objects::rename_tag,
            metadefs::objects::delete_tag
        ))
        .routes(routes!(metadefs::objects::list_resource_types))
        .routes(routes!(metadefs::schemas::show_schema))
        .routes(routes!(keys::create_secret, keys::list_secrets))
        .routes(routes!(keys::show_secret, keys::delete_secret))
        .routes(routes!(keys::secret_payload))
        .routes(routes!(
            keys::acl::show_acl,
            keys::acl::put_acl,
            keys::acl::patch_acl,
            keys::acl::delete_acl
        ))
        .routes(routes!(
            keys::acl::show_secret_metadata,
            keys::acl::put_secret_metadata,
            keys::acl::add_secret_meta
        ))
        .routes(routes!(
            keys::acl::show_secret_meta,
            keys::acl::post_secret_meta,
            keys::acl::put_secret_meta,
            keys::acl::delete_secret_meta
        ))
        .routes(routes!(keys::create_order, keys::list_orders))
        .routes(routes!(keys::show_order, keys::delete_order))
        .routes(routes!(
            volumes::handlers::list_volumes,
            volumes::handlers::create_volume
        ))
        .routes(routes!(volumes::handlers::list_volumes_detail))
        .routes(routes!(
            volumes::handlers::show_volume,
            volumes::handlers::update_volume,
            volumes::handlers::delete_volume
        ))
        .routes(routes!(volumes::handlers::volume_action))
        .routes(routes!(volumes::handlers::volume_encryption))
        .routes(routes!(
            volumes::handlers::volume_metadata,
            volumes::handlers::set_volume_metadata,
            volumes::handlers::replace_volume_metadata
        ))
        .routes(routes!(
            volumes::handlers::volume_meta_item,
            volumes::handlers::put_volume_meta_item,
            volumes::handlers::delete_volume_meta_item
        ))
        .routes(routes!(
            volumes::manageable::list_manageable,
            volumes::manageable::manage
        ))
        .routes(routes!(volumes::manageable::list_manageable_detail))
        .routes(routes!(
            volumes::handlers::list_snapshots,
            volumes::handlers::create_snapshot
        ))
        .routes(routes!(volumes::handlers::list_snapshots_detail))
        .routes(routes!(
            volumes::handlers::show_snapshot,
            volumes::handlers::update_snapshot,
            volumes::handlers::delete_snapshot
        ))
        .routes(routes!(volumes::handlers::snapshot_action))
        .routes(routes!(
            volumes::handlers::snapshot_metadata,
            volumes::handlers::set_snapshot_metadata,
            volumes::handlers::replace_snapshot_metadata
        ))
        .routes(routes!(
            volumes::handlers::snapshot_meta_item,
            volumes::handlers::put_snapshot_meta_item,
            volumes::handlers::delete_snapshot_meta_item
        ))
        .routes(routes!(
            volumes::attachments::list_attachments,
            volumes::attachments::create_attachment
        ))
        .routes(routes!(volumes::attachments::list_attachments_detail))
        .routes(routes!(
            volumes::attachments::show_attachment,
            volumes::attachments::update_attachment,
            volumes::attachments::delete_attachment
        ))
        .routes(routes!(volumes::attachments::attachment_action))
        .routes(routes!(qos::list_qos, qos::create_qos))
        .routes(routes!(qos::show_qos, qos::set_qos_keys, qos::delete_qos))
        .routes(routes!(qos::delete_qos_keys))
        .routes(routes!(qos::qos_associations))
        .routes(routes!(qos::associate_qos))
        .routes(routes!(qos::disassociate_qos))
        .routes(routes!(qos::disassociate_all_qos))
        .routes(routes!(services::list_services))
        .routes(routes!(services::list_clusters))
        .routes(routes!(services::list_clusters_detail))
        .routes(routes!(services::show_cluster))
        .routes(routes!(services::limits))
        .routes(routes!(locks::api::list_locks, locks::api::create_lock))
        .routes(routes!(locks::api::lock_history))
        .routes(routes!(
            locks::api::show_lock,
            locks::api::renew_lock,
            locks::api::delete_lock
        ))
}

/// The OpenAPI document (including `/openapi.json` itself).
pub fn spec() -> Spec {
    let (_, mut spec) = api().split_for_parts();
    let (_, meta) = OpenApiRouter::<SpecState>::new()
        .routes(routes!(openapi_json))
        .split_for_parts();
    spec.merge(meta);
    spec
}

/// The complete HTTP service.
pub fn router(state: AppState) -> axum::Router {
    let spec = Arc::new(spec());
    let (api, _) = api().split_for_parts();
    let (meta, _) = OpenApiRouter::<SpecState>::new()
        .routes(routes!(openapi_json))
        .split_for_parts();
    let api = api
        .with_state(state)
        .merge(meta.with_state(SpecState(spec)))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(cinder_errors));
    versions::serve_prefixed(api)
}

/// A request body of the API, by route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BodyKind {
    /// `POST /v3/{project_id}/volumes`
    Volume,
    /// `POST /v3/{project_id}/volumes/{volume_id}/action`
    VolumeAction,
    /// `POST /v3/{project_id}/snapshots`
    Snapshot,
    /// `POST /v1/secrets`
    Secret,
    /// `POST /v1/orders`
    Order,
    /// `POST /v3/{project_id}/types`
    Type,
    /// `PUT /v3/{project_id}/types/{type_id}`
    TypeUpdate,
    /// `POST /v3/{project_id}/types/{type_id}/extra_specs`
    ExtraSpecs,
    /// `POST /v3/{project_id}/types/{type_id}/encryption`
    Encryption,
    /// `POST /v3/{project_id}/types/{type_id}/action`
    TypeAction,
    /// `POST /v3/locks`
    Lock,
    /// `POST /v3/projects`
    Project,
}

impl BodyKind {
    /// Every kind.
    pub const ALL: [BodyKind; 12] = [
        BodyKind::Volume,
        BodyKind::VolumeAction,
        BodyKind::Snapshot,
        BodyKind::Secret,
        BodyKind::Order,
        BodyKind::Type,
        BodyKind::TypeUpdate,
        BodyKind::ExtraSpecs,
        BodyKind::Encryption,
        BodyKind::TypeAction,
        BodyKind::Lock,
        BodyKind::Project,
    ];
}

/// Parse `bytes` strictly as a body of `kind` and run the checks that need no
/// database; the 400 (or 413) the route would answer otherwise.
pub fn check_body(kind: BodyKind, bytes: &[u8]) -> crate::error::ApiResult<()> {
    use crate::api::parse_json;
    use crate::volumes::handlers as vh;
    match kind {
        BodyKind::Volume => parse_json::<vh::VolumeCreateBody>(bytes)?
            .volume
            .validate()
            .map(drop),
        BodyKind::VolumeAction => vh::VolumeAction::parse(parse_json(bytes)?).map(drop),
        BodyKind::Snapshot => parse_json::<vh::SnapshotCreateBody>(bytes)?
            .snapshot
            .validate(crate::versions::Microversion(crate::versions::CINDER_MAX))
            .map(drop),
        BodyKind::Secret => keys::check_secret_body(parse_json(bytes)?),
        BodyKind::Order => parse_json::<keys::OrderCreate>(bytes).map(drop),
        BodyKind::Type => {
            let t = parse_json::<types::TypeCreateBody>(bytes)?;
            for k in t.volume_type.extra_specs.iter().flat_map(|m| m.keys()) {
                types::check_key("extra_specs", k)?;
            }
            Ok(())
        }
        BodyKind::TypeUpdate => parse_json::<types::TypeUpdateBody>(bytes).map(drop),
        BodyKind::ExtraSpecs => {
            let b = parse_json::<types::ExtraSpecsBody>(bytes)?;
            for k in b.extra_specs.keys() {
                types::check_key("extra_specs", k)?;
            }
            Ok(())
        }
        BodyKind::Encryption => parse_json::<types::EncryptionBody>(bytes).map(drop),
        BodyKind::TypeAction => parse_json::<types::TypeActionBody>(bytes).map(drop),
        BodyKind::Lock => parse_json::<locks::api::LockCreateBody>(bytes).map(drop),
        BodyKind::Project => parse_json::<projects::ProjectCreateBody>(bytes).map(drop),
    }
}
