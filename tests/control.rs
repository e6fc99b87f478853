//! End-to-end: `emberd serve` with `emberctl` as the client (SQLite backend).

mod common;

use common::{free_port, run_any, run_ok, wait_for_tcp, Daemon};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn ctl(url: &str, token_file: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_emberctl"));
    c.env("EMBER_URL", url)
        .env("EMBER_TOKEN_FILE", token_file)
        .env_remove("EMBER_TOKEN")
        .args(args);
    c
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Run `emberctl` (expecting success) and parse its `--json` output.
fn ctl_json(url: &str, token_file: &Path, args: &[&str]) -> Value {
    json_of(&run_ok(&mut ctl(url, token_file, args)))
}

/// The id at the end of a `*_ref` link.
fn ref_id(link: &Value) -> String {
    let link = link
        .as_str()
        .unwrap_or_else(|| panic!("not a link: {link}"));
    link.rsplit('/').next().unwrap().to_string()
}

fn start(dir: &Path, port: u16) -> Daemon {
    let data = dir.join("data");
    let rest = format!("127.0.0.1:{port}");
    let d = Daemon::spawn(
        dir,
        &[
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--rest",
            &rest,
            "--node-name",
            "e2e-node",
            "--nbd",
            "127.0.0.1:0",
        ],
    );
    wait_for_tcp(&rest, Duration::from_secs(60));
    d
}

#[test]
fn serve_and_emberctl() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut d = start(dir.path(), port);
    let data = dir.path().join("data");
    let admin_file = data.join("admin-token");
    let admin = std::fs::read_to_string(&admin_file)
        .unwrap()
        .trim()
        .to_string();
    for f in [&admin_file, &data.join("master.key")] {
        assert_eq!(
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            f.display()
        );
    }
    let log = d.log_text();
    assert!(
        log.contains("admin-token"),
        "the log names the admin token file:\n{log}"
    );
    assert!(
        !log.contains(&admin),
        "the log must never contain the token"
    );

    // Admin: project, member token.
    let v = ctl_json(&url, &admin_file, &["--json", "project", "create", "alpha"]);
    let pa = v["project"]["id"].as_str().unwrap().to_string();
    let v = ctl_json(
        &url,
        &admin_file,
        &[
            "--json",
            "token",
            "create",
            "--for-project",
            &pa,
            "--role",
            "member",
        ],
    );
    let member = v["token"]["token"].as_str().unwrap().to_string();
    let member_file = dir.path().join("member-token");
    std::fs::write(&member_file, &member).unwrap();

    // Types.
    let out = run_ok(&mut ctl(
        &url,
        &admin_file,
        &[
            "type",
            "create",
            "gold",
            "--description",
            "fast",
            "--property",
            "qos:read_iops_sec=100",
            "--metadata",
            "replication=true",
            "--encryption",
            "luks2",
            "--key-size",
            "512",
        ],
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("gold") && text.contains("encryption=true"),
        "{text}"
    );
    let out = run_ok(&mut ctl(&url, &admin_file, &["type", "list"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("id") && text.contains("__DEFAULT__") && text.contains("gold"),
        "{text}"
    );
    let v = ctl_json(&url, &admin_file, &["--json", "type", "show", "gold"]);
    assert_eq!(v["volume_type"]["extra_specs"]["qos:read_iops_sec"], "100");
    let out = run_any(&mut ctl(
        &url,
        &admin_file,
        &["type", "create", "bad", "--property", "qos:read_iops_sec=0"],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("400") && err.contains("qos:read_iops_sec") && err.contains("minimum"),
        "{err}"
    );
    // The member sees the type (without hidden specs) but cannot delete it.
    let v = ctl_json(&url, &member_file, &["--json", "type", "show", "gold"]);
    assert_eq!(v["volume_type"]["extra_specs"], serde_json::json!({}));
    let out = run_any(&mut ctl(&url, &member_file, &["type", "delete", "gold"]));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{out:?}"
    );

    // Secrets.
    let v = ctl_json(
        &url,
        &member_file,
        &[
            "--json",
            "secret",
            "create",
            "--name",
            "pw",
            "--type",
            "passphrase",
            "--payload",
            "correct horse",
        ],
    );
    let pw = ref_id(&v["secret_ref"]);
    let out = run_ok(&mut ctl(
        &url,
        &member_file,
        &["secret", "get", &pw, "--payload"],
    ));
    assert_eq!(out.stdout, b"correct horse");
    let keyfile = dir.path().join("key.bin");
    std::fs::write(&keyfile, [7u8; 32]).unwrap();
    run_ok(&mut ctl(
        &url,
        &member_file,
        &[
            "secret",
            "create",
            "--type",
            "symmetric",
            "--payload-file",
            keyfile.to_str().unwrap(),
        ],
    ));
    let v = ctl_json(
        &url,
        &member_file,
        &[
            "--json",
            "secret",
            "create",
            "--generate-bits",
            "512",
            "--mode",
            "xts",
        ],
    );
    let gen = ref_id(&v["secret_ref"]);
    let out = run_ok(&mut ctl(
        &url,
        &member_file,
        &["secret", "get", &gen, "--payload"],
    ));
    assert_eq!(out.stdout.len(), 64);
    let out = run_ok(&mut ctl(&url, &member_file, &["secret", "list"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 4, "{text}");
    // Another project (the admin's) cannot read the member's payload.
    let out = run_any(&mut ctl(
        &url,
        &admin_file,
        &["secret", "get", &pw, "--payload"],
    ));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );

    // Graceful stop, then restart on the same data dir: same admin token, secrets readable.
    d.terminate(Duration::from_secs(60));
    assert!(d.log_text().contains("stopped"));
    let port2 = free_port();
    let url2 = format!("http://127.0.0.1:{port2}");
    let _d2 = start(dir.path(), port2);
    assert_eq!(std::fs::read_to_string(&admin_file).unwrap().trim(), admin);
    let out = run_ok(&mut ctl(
        &url2,
        &member_file,
        &["secret", "get", &pw, "--payload"],
    ));
    assert_eq!(out.stdout, b"correct horse");
    run_ok(&mut ctl(&url2, &admin_file, &["type", "delete", "gold"]));
    let out = run_ok(&mut ctl(&url2, &admin_file, &["type", "list"]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("gold"));
    // Missing token is a clear error.
    let out = run_any(
        Command::new(env!("CARGO_BIN_EXE_emberctl"))
            .env_remove("EMBER_TOKEN")
            .env_remove("EMBER_TOKEN_FILE")
            .args(["--url", &url2, "type", "list"]),
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no token"),
        "{out:?}"
    );
}

#[test]
fn serve_rejects_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_any(Command::new(common::emberd_bin()).args([
        "serve",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--nbd",
        "nonsense",
    ]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--nbd"),
        "{out:?}"
    );
    let out = run_any(Command::new(common::emberd_bin()).args([
        "serve",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--database",
        "postgres://x",
    ]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unsupported database URL"),
        "{out:?}"
    );
    let out = run_ok(Command::new(common::emberd_bin()).args(["serve", "--help"]));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--data-dir",
        "--rest",
        "--nbd",
        "--vhost-dir",
        "--database",
        "--node-name",
        "--master-key-file",
        "--config",
        "EMBER_DATABASE",
    ] {
        assert!(help.contains(flag), "help lacks {flag}:\n{help}");
    }
}

/// `--nbd` listeners (TCP and Unix) answer real NBD clients; the socket is removed on exit.
#[test]
fn serve_listens_for_nbd() {
    common::require_tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let rest = format!("127.0.0.1:{}", free_port());
    let nbd = format!("127.0.0.1:{}", free_port());
    let sock = dir.path().join("nbd.sock");
    let data = dir.path().join("data");
    let mut d = Daemon::spawn(
        dir.path(),
        &[
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--rest",
            &rest,
            "--nbd",
            &nbd,
            "--nbd",
            &format!("unix:{}", sock.display()),
            // Plaintext listing (the TLS default: tests/nbd_tls.rs).
            "--nbd-tls",
            "off",
        ],
    );
    wait_for_tcp(&rest, Duration::from_secs(60));
    for uri in [
        format!("nbd://{nbd}"),
        format!("nbd+unix:///?socket={}", sock.display()),
    ] {
        let out = run_ok(Command::new("nbdinfo").args(["--list", &uri]));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("newstyle-fixed"),
            "{out:?}"
        );
    }
    d.terminate(Duration::from_secs(60));
    assert!(!sock.exists(), "the NBD socket is removed at shutdown");
}
