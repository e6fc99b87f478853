//! End-to-end: the real OpenStack clients against `emberd serve`, unmodified
//! (python-cinderclient, python-barbicanclient, python-glanceclient and the `openstack`
//! CLI from PyPI, with keystoneauth1's token-endpoint plugin).
//!
//! `scripts/install-test-deps.sh` builds their virtualenv outside the source tree
//! (`EMBER_OPENSTACK_VENV`, default `/var/cache/ember-test/openstack-venv`, pinned
//! versions). Each test starts its own node and runs one workflow script of
//! `tests/openstack/` with the venv's python; the script checks every step (status
//! reached, payload equal, data written and read back through the returned connection
//! with qemu-io and nbdinfo) and prints a JSON summary last, which the test reads.

mod common;

use common::require_tool;
use common::serve::{http, ServeNode};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The clients' virtualenv.
fn venv() -> PathBuf {
    let v = std::env::var_os("EMBER_OPENSTACK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ember-test/openstack-venv"));
    assert!(
        v.join("bin/python").is_file() && v.join("bin/openstack").is_file(),
        "the OpenStack client virtualenv {} is missing: run scripts/install-test-deps.sh \
         (the README's test command does)",
        v.display()
    );
    v
}

/// The workflow scripts.
fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/openstack")
}

/// One node, its admin (and the admin's project), and a member of another project (for
/// ACLs).
struct Node {
    serve: ServeNode,
    project: String,
}

impl Node {
    fn start(dir: &Path) -> Node {
        let serve = ServeNode::start(dir, &[]);
        let (s, me) = http(
            "GET",
            &format!("{}/v3/auth/tokens", serve.url),
            &serve.admin,
            None,
        );
        assert_eq!(s, 200, "{me}");
        let project = me["token"]["project_id"]
            .as_str()
            .expect("admin's project")
            .to_string();
        Node { serve, project }
    }

    /// Run workflow `script` with the venv's python; its JSON summary (last line).
    fn run(&self, script: &str, home: &Path) -> Value {
        let venv = venv();
        let mut path = std::ffi::OsString::from(venv.join("bin"));
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        let out = Command::new(venv.join("bin/python"))
            .arg(scripts().join(script))
            .env("EMBER_URL", &self.serve.url)
            .env("EMBER_TOKEN", &self.serve.admin)
            .env("EMBER_PROJECT", &self.project)
            .env("EMBER_DATA_DIR", &self.serve.data)
            .env("EMBER_OTHER_TOKEN", &self.serve.token)
            .env("EMBER_OTHER_TOKEN_ID", &self.serve.token_id)
            .env("PYTHONPATH", scripts())
            // Nothing written into the source tree, nor into the user's home.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("HOME", home)
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("PATH", path)
            .env_remove("OS_CLOUD")
            .output()
            .unwrap_or_else(|e| panic!("run {script}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{script} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        );
        let last = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("{script}: last line is not the summary ({e}):\n{stdout}"))
    }
}

fn workflow(script: &str, name: &str) -> (Node, Value, tempfile::TempDir) {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    venv();
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let summary = node.run(script, &home);
    assert_eq!(summary["workflow"], name, "{summary}");
    (node, summary, dir)
}

/// python-cinderclient 9.x: version discovery and microversions, types, encryption
/// types, QoS specs, type access; volumes created, listed (paged), shown, renamed,
/// given metadata, extended, snapshotted, cloned, restored, attached with
/// `os-initialize_connection` and the attachments API (data written and read back
/// with qemu-io, size seen by nbdinfo), retyped, reset, force-deleted, deleted; limits,
/// services, clusters; strictness on bad fields.
#[test]
fn cinderclient_workflow() {
    let (node, summary, _dir) = workflow("cinder_workflow.py", "cinder");
    assert_eq!(summary["volumes_left"], 0, "{summary}");
    // Nothing left behind, as the API tells it.
    let (s, v) = http(
        "GET",
        &format!(
            "{}/volume/v3/{}/volumes/detail",
            node.serve.url, node.project
        ),
        &node.serve.admin,
        None,
    );
    assert_eq!((s, v["volumes"].as_array().map(Vec::len)), (200, Some(0)));
}

/// python-barbicanclient: passphrase, symmetric and opaque secrets (binary payloads
/// base64 on the wire) read back equal; metadata; key orders; paging; ACLs across
/// projects; deletes.
#[test]
fn barbicanclient_workflow() {
    let (_node, summary, _dir) = workflow("barbican_workflow.py", "barbican");
    assert_eq!(summary["secrets_left"], 0, "{summary}");
}

/// python-glanceclient metadefs: schemas, namespaces, properties, objects, tags,
/// resource-type associations; every answer validated by the client's schema models.
#[test]
fn glanceclient_metadefs_workflow() {
    let (_node, summary, _dir) = workflow("glance_workflow.py", "glance");
    assert_eq!(summary["namespaces"], 2, "{summary}");
}

/// The `openstack` CLI: `volume type create` with encryption, `volume create`,
/// `volume snapshot create`, `volume qos`, `secret store`/`get`/`order create`,
/// `image metadef namespace list`, with `--os-auth-type admin_token`.
#[test]
fn openstack_cli_workflow() {
    let (node, summary, _dir) = workflow("cli_workflow.py", "cli");
    assert_eq!(summary["project"], node.project.as_str(), "{summary}");
}
