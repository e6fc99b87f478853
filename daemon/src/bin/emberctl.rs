//! `emberctl`: a small CLI over Ember's REST API.
//!
//! Endpoint and token come from `--url`/`--token` (or `--token-file`) or from
//! `EMBER_URL`/`EMBER_TOKEN`/`EMBER_TOKEN_FILE`. Output is a table, or the API's JSON
//! with `--json`. API errors print the server's message and exit 1. `volume attach
//! --psk-file` writes an NBD attachment's TLS key where NBD clients read it (psktool
//! format, mode 0600) and keeps it off the terminal.

use anyhow::Context;
use base64::Engine;
use clap::{Args, Parser, Subcommand};
use reqwest::blocking::Client;
use reqwest::Method;
use serde_json::{json, Value};
use std::io::Write;
use std::process::ExitCode;

/// Command-line client for emberd's REST API.
#[derive(Debug, Parser)]
#[command(name = "emberctl", version)]
struct Cli {
    /// API endpoint.
    #[arg(
        long,
        env = "EMBER_URL",
        default_value = "http://127.0.0.1:8776",
        global = true
    )]
    url: String,
    /// Token (X-Auth-Token).
    #[arg(long, env = "EMBER_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// File holding the token (e.g. DATA/admin-token).
    #[arg(long, env = "EMBER_TOKEN_FILE", global = true)]
    token_file: Option<std::path::PathBuf>,
    /// Project id for /v3/{project}/… calls [default: the token's project].
    #[arg(long, env = "EMBER_PROJECT", global = true)]
    project: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Projects (admin).
    #[command(subcommand)]
    Project(ProjectCmd),
    /// Tokens (admin).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Volume types.
    #[command(subcommand)]
    Type(TypeCmd),
    /// Secrets (key manager).
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Volume attachments.
    #[command(subcommand)]
    Volume(VolumeCmd),
}

#[derive(Debug, Subcommand)]
enum VolumeCmd {
    /// Attach a volume (`os-initialize_connection`); prints where to reach it.
    Attach {
        /// Volume id.
        id: String,
        /// nbd or vhost-user.
        #[arg(long, default_value = "nbd")]
        protocol: String,
        /// NBD with TLS: write the attachment's pre-shared key to this file (psktool
        /// format `identity:hexkey`, mode 0600; must not exist) for nbdinfo's
        /// `tls-psk-file=` or, named `keys.psk` in a directory, qemu's `tls-creds-psk`.
        #[arg(long, value_name = "PATH")]
        psk_file: Option<std::path::PathBuf>,
    },
    /// Detach (`os-terminate_connection`): its clients are disconnected, its key revoked.
    Detach {
        /// Volume id.
        id: String,
        /// The attachment id `attach` printed.
        attachment: String,
    },
    /// The paths of an attached volume's LUN (multipath): portal, state (up, degraded,
    /// down, idle), sessions logged in out of the I/O threads, ALUA state, failovers. Nothing
    /// when the volume is not attached or its LUN has one path.
    Paths {
        /// Volume id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectCmd {
    /// Create a project.
    Create {
        /// Project name (unique).
        name: String,
        /// Free-text description.
        #[arg(long)]
        description: Option<String>,
    },
    /// List projects.
    List,
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Issue a token for a project; prints it once.
    Create {
        /// Project id.
        #[arg(long = "for-project")]
        for_project: String,
        /// admin, member or reader.
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TypeCmd {
    /// Create a volume type.
    Create(TypeCreate),
    /// List volume types.
    List,
    /// Show a volume type (id or name).
    Show { id: String },
    /// Delete a volume type (id or name).
    Delete { id: String },
}

#[derive(Debug, Args)]
struct TypeCreate {
    /// Type name (unique).
    name: String,
    /// Free-text description.
    #[arg(long)]
    description: Option<String>,
    /// Make the type private.
    #[arg(long)]
    private: bool,
    /// Extra spec KEY=VALUE (repeatable).
    #[arg(long = "property", value_name = "KEY=VALUE")]
    properties: Vec<String>,
    /// Metadata KEY=VALUE (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    metadata: Vec<String>,
    /// Add an encryption spec with this provider (luks or luks2).
    #[arg(long)]
    encryption: Option<String>,
    /// Encryption key size in bits (256 or 512).
    #[arg(long, requires = "encryption")]
    key_size: Option<u32>,
}

#[derive(Debug, Subcommand)]
enum SecretCmd {
    /// Store a secret (give one of --payload, --payload-file, --generate-bits).
    Create(SecretCreate),
    /// List the project's secrets.
    List,
    /// Show a secret's metadata, or its payload with --payload (raw bytes on stdout).
    Get {
        id: String,
        #[arg(long)]
        payload: bool,
    },
    /// Delete a secret.
    Delete { id: String },
}

#[derive(Debug, Args)]
struct SecretCreate {
    /// Secret name.
    #[arg(long)]
    name: Option<String>,
    /// symmetric, passphrase or opaque.
    #[arg(long = "type", default_value = "opaque")]
    secret_type: String,
    /// Payload text (stored as text/plain).
    #[arg(long, conflicts_with_all = ["payload_file", "generate_bits"])]
    payload: Option<String>,
    /// Payload file (binary, stored as application/octet-stream).
    #[arg(long, conflicts_with = "generate_bits")]
    payload_file: Option<std::path::PathBuf>,
    /// Let the server generate a random symmetric key of this many bits (a key order).
    #[arg(long)]
    generate_bits: Option<u32>,
    /// Algorithm recorded with the secret (orders default to aes).
    #[arg(long)]
    algorithm: Option<String>,
    /// Cipher mode recorded with the secret (e.g. xts).
    #[arg(long)]
    mode: Option<String>,
}

struct Api {
    client: Client,
    url: String,
    token: String,
}

impl Api {
    fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(Vec<u8>, Value)> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.url))
            .header("X-Auth-Token", &self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .with_context(|| format!("cannot reach {}", self.url))?;
        let status = resp.status();
        let bytes = resp.bytes().context("read response")?.to_vec();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = v
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(|f| f["message"].as_str())
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            anyhow::bail!(
                "{} {}: {msg}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
        }
        Ok((bytes, v))
    }

    fn json(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        Ok(self.call(method, path, body)?.1)
    }
}

fn kv(items: &[String]) -> anyhow::Result<serde_json::Map<String, Value>> {
    items
        .iter()
        .map(|s| {
            let (k, v) = s
                .split_once('=')
                .with_context(|| format!("{s:?}: expected KEY=VALUE"))?;
            Ok((k.to_string(), Value::String(v.to_string())))
        })
        .collect()
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(headers.iter().map(|s| s.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n") + "\n"
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", s(v)))
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

fn last_segment(r: &Value) -> String {
    r.as_str()
        .and_then(|s| s.rsplit('/').next())
        .unwrap_or_default()
        .to_string()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("read {}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => {
            anyhow::bail!("no token: pass --token/--token-file or set EMBER_TOKEN/EMBER_TOKEN_FILE")
        }
    };
    let api = Api {
        client: Client::new(),
        url: cli.url.trim_end_matches('/').to_string(),
        token,
    };
    let project = || -> anyhow::Result<String> {
        match &cli.project {
            Some(p) => Ok(p.clone()),
            None => {
                let v = api.json(Method::GET, "/v3/auth/tokens", None)?;
                v["token"]["project_id"]
                    .as_str()
                    .map(str::to_string)
                    .context("token has no project")
            }
        }
    };
    let mut out = std::io::stdout().lock();
    let mut print = |v: &Value, text: String| -> anyhow::Result<()> {
        if cli.json {
            writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
        } else {
            write!(out, "{text}")?;
        }
        Ok(())
    };
    match &cli.cmd {
        Cmd::Volume(VolumeCmd::Attach {
            id,
            protocol,
            psk_file,
        }) => {
            let p = project()?;
            let body = json!({"os-initialize_connection": {"connector": {"protocol": protocol}}});
            let v = api.json(
                Method::POST,
                &format!("/v3/{p}/volumes/{id}/action"),
                Some(body),
            )?;
            let d = &v["connection_info"]["data"];
            let tls = &d["tls"];
            if let Some(path) = psk_file {
                let (Some(ident), Some(key)) = (tls["psk_identity"].as_str(), tls["psk"].as_str())
                else {
                    anyhow::bail!(
                        "the attachment has no TLS key (an NBD listener without TLS, or not NBD); attachment {}",
                        s(&d["attachment_id"])
                    );
                };
                write_secret_file(path, &format!("{ident}:{key}\n"))?;
            }
            let mut shown = v.clone();
            if psk_file.is_some() {
                // The key is in the file; keep it off the terminal.
                if let Some(t) = shown["connection_info"]["data"]["tls"].as_object_mut() {
                    t.remove("psk");
                }
            }
            let r#where = d["uri"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| s(&d["socket_path"]));
            print(
                &shown,
                table(
                    &["attachment_id", "uri", "psk_identity"],
                    &[vec![
                        s(&d["attachment_id"]),
                        r#where,
                        s(&tls["psk_identity"]),
                    ]],
                ),
            )?;
        }
        Cmd::Volume(VolumeCmd::Detach { id, attachment }) => {
            let p = project()?;
            let body =
                json!({"os-terminate_connection": {"connector": {"attachment_id": attachment}}});
            let (_, v) = api.call(
                Method::POST,
                &format!("/v3/{p}/volumes/{id}/action"),
                Some(body),
            )?;
            print(&v, format!("detached {attachment}\n"))?;
        }
        Cmd::Volume(VolumeCmd::Paths { id }) => {
            let p = project()?;
            let v = api.json(Method::GET, &format!("/v3/{p}/volumes/{id}"), None)?;
            let rows: Vec<Vec<String>> = v["volume"]["paths"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            vec![
                                s(&p["portal"]),
                                s(&p["state"]),
                                format!("{}/{}", s(&p["sessions_up"]), s(&p["sessions"])),
                                s(&p["alua_state"]),
                                s(&p["failovers"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print(
                &v["volume"]["paths"],
                table(&["portal", "state", "sessions", "alua", "failovers"], &rows),
            )?;
        }
        Cmd::Project(ProjectCmd::Create { name, description }) => {
            let v = api.json(
                Method::POST,
                "/v3/projects",
                Some(json!({"project": {"name": name, "description": description}})),
            )?;
            let p = &v["project"];
            print(
                &v,
                table(&["id", "name"], &[vec![s(&p["id"]), s(&p["name"])]]),
            )?;
        }
        Cmd::Project(ProjectCmd::List) => {
            let v = api.json(Method::GET, "/v3/projects", None)?;
            let rows: Vec<Vec<String>> = v["projects"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| vec![s(&p["id"]), s(&p["name"]), s(&p["description"])])
                .collect();
            print(&v, table(&["id", "name", "description"], &rows))?;
        }
        Cmd::Token(TokenCmd::Create {
            for_project,
            role,
            name,
        }) => {
            let v = api.json(
                Method::POST,
                &format!("/v3/projects/{for_project}/tokens"),
                Some(json!({"token": {"role": role, "name": name}})),
            )?;
            let t = &v["token"];
            print(
                &v,
                table(
                    &["id", "project_id", "role", "token"],
                    &[vec![
                        s(&t["id"]),
                        s(&t["project_id"]),
                        s(&t["role"]),
                        s(&t["token"]),
                    ]],
                ),
            )?;
        }
        Cmd::Type(TypeCmd::Create(c)) => {
            let p = project()?;
            let body = json!({"volume_type": {"name": c.name, "description": c.description,
                "os-volume-type-access:is_public": !c.private,
                "extra_specs": kv(&c.properties)?, "metadata": kv(&c.metadata)?}});
            let mut v = api.json(Method::POST, &format!("/v3/{p}/types"), Some(body))?;
            if let Some(provider) = &c.encryption {
                let id = s(&v["volume_type"]["id"]);
                let mut enc = json!({"provider": provider, "control_location": "front-end", "cipher": "aes-xts-plain64"});
                if let Some(k) = c.key_size {
                    enc["key_size"] = json!(k);
                }
                let r = api.json(
                    Method::POST,
                    &format!("/v3/{p}/types/{id}/encryption"),
                    Some(json!({"encryption": enc})),
                );
                match r {
                    Ok(e) => {
                        v = api.json(Method::GET, &format!("/v3/{p}/types/{id}"), None)?;
                        v["volume_type"]["encryption"] = e["encryption"].clone();
                    }
                    Err(e) => {
                        // Keep the CLI's action atomic: remove the half-made type.
                        let _ = api.call(Method::DELETE, &format!("/v3/{p}/types/{id}"), None);
                        return Err(
                            e.context("adding the encryption spec failed; the type was removed")
                        );
                    }
                }
            }
            let t = &v["volume_type"];
            print(&v, type_table(std::slice::from_ref(t)))?;
        }
        Cmd::Type(TypeCmd::List) => {
            let p = project()?;
            let v = api.json(Method::GET, &format!("/v3/{p}/types"), None)?;
            let list = v["volume_types"].as_array().cloned().unwrap_or_default();
            print(&v, type_table(&list))?;
        }
        Cmd::Type(TypeCmd::Show { id }) => {
            let p = project()?;
            let v = api.json(Method::GET, &format!("/v3/{p}/types/{id}"), None)?;
            let t = &v["volume_type"];
            let rows: Vec<Vec<String>> = [
                "id",
                "name",
                "description",
                "is_public",
                "extra_specs",
                "metadata",
            ]
            .iter()
            .map(|f| vec![f.to_string(), s(&t[*f])])
            .collect();
            print(&v, table(&["field", "value"], &rows))?;
        }
        Cmd::Type(TypeCmd::Delete { id }) => {
            let p = project()?;
            api.call(Method::DELETE, &format!("/v3/{p}/types/{id}"), None)?;
            print(
                &json!({"deleted": id}),
                format!("deleted volume type {id}\n"),
            )?;
        }
        Cmd::Secret(SecretCmd::Create(c)) => {
            let v = if let Some(bits) = c.generate_bits {
                let o = api.json(Method::POST, "/v1/orders", Some(json!({"type": "key", "meta": {"name": c.name,
                    "algorithm": c.algorithm.clone().unwrap_or_else(|| "aes".into()), "bit_length": bits, "mode": c.mode}})))?;
                let order = api.json(
                    Method::GET,
                    &format!("/v1/orders/{}", last_segment(&o["order_ref"])),
                    None,
                )?;
                json!({"secret_ref": order["secret_ref"]})
            } else {
                let mut body = json!({"name": c.name, "secret_type": c.secret_type, "algorithm": c.algorithm, "mode": c.mode});
                match (&c.payload, &c.payload_file) {
                    (Some(text), _) => {
                        body["payload"] = json!(text);
                        body["payload_content_type"] = json!("text/plain");
                    }
                    (None, Some(f)) => {
                        let bytes =
                            std::fs::read(f).with_context(|| format!("read {}", f.display()))?;
                        body["payload"] =
                            json!(base64::engine::general_purpose::STANDARD.encode(bytes));
                        body["payload_content_type"] = json!("application/octet-stream");
                        body["payload_content_encoding"] = json!("base64");
                    }
                    (None, None) => {
                        anyhow::bail!("give one of --payload, --payload-file, --generate-bits")
                    }
                }
                api.json(Method::POST, "/v1/secrets", Some(body))?
            };
            let id = last_segment(&v["secret_ref"]);
            print(
                &v,
                table(&["id", "secret_ref"], &[vec![id, s(&v["secret_ref"])]]),
            )?;
        }
        Cmd::Secret(SecretCmd::List) => {
            let v = api.json(Method::GET, "/v1/secrets?limit=100", None)?;
            let rows: Vec<Vec<String>> = v["secrets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    vec![
                        last_segment(&x["secret_ref"]),
                        s(&x["name"]),
                        s(&x["secret_type"]),
                        s(&x["bit_length"]),
                        s(&x["created"]),
                    ]
                })
                .collect();
            print(&v, table(&["id", "name", "type", "bits", "created"], &rows))?;
        }
        Cmd::Secret(SecretCmd::Get { id, payload: true }) => {
            let (bytes, _) = api.call(Method::GET, &format!("/v1/secrets/{id}/payload"), None)?;
            out.write_all(&bytes)?;
        }
        Cmd::Secret(SecretCmd::Get { id, payload: false }) => {
            let v = api.json(Method::GET, &format!("/v1/secrets/{id}"), None)?;
            let rows: Vec<Vec<String>> = [
                "secret_ref",
                "name",
                "secret_type",
                "algorithm",
                "bit_length",
                "mode",
                "status",
                "expiration",
                "created",
            ]
            .iter()
            .map(|f| vec![f.to_string(), s(&v[*f])])
            .collect();
            print(&v, table(&["field", "value"], &rows))?;
        }
        Cmd::Secret(SecretCmd::Delete { id }) => {
            api.call(Method::DELETE, &format!("/v1/secrets/{id}"), None)?;
            print(&json!({"deleted": id}), format!("deleted secret {id}\n"))?;
        }
    }
    Ok(())
}

/// Create `path` (which must not exist) with mode 0600 and write `text`.
fn write_secret_file(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

fn type_table(list: &[Value]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            vec![
                s(&t["id"]),
                s(&t["name"]),
                s(&t["is_public"]),
                s(&t["extra_specs"]),
                s(&t["metadata"]),
            ]
        })
        .collect();
    table(&["id", "name", "public", "extra_specs", "metadata"], &rows)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("emberctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
