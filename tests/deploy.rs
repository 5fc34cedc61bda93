//! Checks of `deploy/` and of the demo: the example config starts the binary and names every
//! option, the systemd unit verifies (`systemd-analyze verify`, where installed), the Kubernetes
//! manifests validate (deploy/k8s/check.py: kubernetes-validate schemas + the fields the
//! deployment relies on), fly.toml and the Dockerfile agree with the binary, and `--demo`
//! serves the page and the JS client with presence on `presence:*`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Runs a command with a deadline; `None` when the program is not installed.
fn run(program: &str, args: &[&str], timeout: Duration) -> Option<std::process::Output> {
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("spawn {program}: {e}"),
    };
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output();
            panic!("{program} {args:?} did not finish within {timeout:?}: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child.wait_with_output().unwrap())
}

async fn get_text(relay: &Relay, path: &str) -> (u16, String, String) {
    let res = relay
        .client()
        .get(relay.http(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = res.status().as_u16();
    let kind = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    (status, kind, res.text().await.unwrap())
}

#[tokio::test]
async fn example_config_parses_validates_and_starts() {
    let config = repo("deploy/relay.toml");
    let relay = Relay::start(&["--config", config.to_str().unwrap(), "--shards", "1"]);
    let (status, body) = relay.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = relay.get("/readyz").await;
    assert_eq!(status, 200);
    // demo = false in the example: the landing page, not the demo.
    let (status, _, body) = get_text(&relay, "/").await;
    assert_eq!(status, 200);
    assert!(!body.contains("/demo/relay.js"), "{body}");
}

/// Long flags of `relay serve --help`, without `--help` and `--config`.
fn serve_flags() -> BTreeSet<String> {
    let out = run_bin(&["serve", "--help"], &[], Duration::from_secs(10));
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut flags = BTreeSet::new();
    for line in help.lines() {
        let line = line.trim_start();
        let line = line.strip_prefix("-h, ").unwrap_or(line);
        if let Some(rest) = line.strip_prefix("--") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() && name != "help" && name != "config" {
                flags.insert(name);
            }
        }
    }
    assert!(flags.len() > 20, "few flags parsed from --help: {flags:?}");
    flags
}

#[test]
fn example_config_names_every_option() {
    let toml_text = read("deploy/relay.toml");
    // Keys set or shown commented out: `key = …` or `# key = …`.
    let keys: BTreeSet<String> = toml_text
        .lines()
        .map(|l| l.trim_start_matches(['#', ' ']))
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim().to_owned()))
        .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    let missing: Vec<String> = serve_flags()
        .into_iter()
        .map(|f| f.replace('-', "_"))
        .filter(|k| !keys.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/relay.toml lacks these options of `relay serve --help` (add each, commented): {missing:?}"
    );
    // Every commented-out example line is itself valid TOML for the config (uncommented).
    let uncommented: String = toml_text
        .lines()
        .map(|l| {
            let t = l.trim_start_matches("# ");
            if t.split_once(" = ")
                .is_some_and(|(k, _)| keys.contains(k.trim()))
            {
                t
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    if let Err(e) = relay::config::Config::from_file(Path::new("relay.toml"), &uncommented) {
        panic!("deploy/relay.toml with every example uncommented does not parse: {e}");
    }
}

#[test]
fn systemd_unit_verifies() {
    let unit = read("deploy/relay.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/relay serve"));
    for hardening in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "LimitNOFILE=",
    ] {
        assert!(
            unit.contains(hardening),
            "relay.service lacks {hardening:?}"
        );
    }
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = std::env::temp_dir().join(format!("relay-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("relay.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/relay", BIN)).unwrap();
    let out = run(
        "systemd-analyze",
        &["verify", path.to_str().unwrap()],
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let Some(out) = out else {
        println!("systemd-analyze is not installed: `systemd-analyze verify` SKIPPED");
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Warnings about the unit itself are printed with its name and do not fail the command.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("relay.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify relay.service: {}\n{stderr}",
        out.status
    );
}

#[test]
fn kubernetes_manifests_validate() {
    let script = repo("deploy/k8s/check.py");
    let has_yaml = run("python3", &["-c", "import yaml"], Duration::from_secs(30));
    match has_yaml {
        Some(o) if o.status.success() => {}
        _ if std::env::var_os("CI").is_some() => {
            panic!("python3 with PyYAML is required in CI (pip install kubernetes-validate)")
        }
        _ => {
            println!("python3 with PyYAML is not installed: k8s manifest checks SKIPPED");
            return;
        }
    }
    let out = run(
        "python3",
        &[script.to_str().unwrap()],
        Duration::from_secs(180),
    )
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "deploy/k8s/check.py failed:\n{text}");
}

#[test]
fn fly_toml_and_dockerfile_match_the_binary() {
    let fly: toml::Value = toml::from_str(&read("deploy/fly.toml")).expect("fly.toml parses");
    let svc = &fly["http_service"];
    let port = svc["internal_port"].as_integer().unwrap();
    let listen = fly["env"]["RELAY_LISTEN"].as_str().unwrap();
    assert_eq!(listen, format!("0.0.0.0:{port}"));
    let check = &svc["checks"].as_array().unwrap()[0];
    assert_eq!(check["path"].as_str(), Some("/readyz"));
    assert_eq!(fly["kill_signal"].as_str(), Some("SIGTERM"));

    // The image must contain every file the binary embeds (include_str!/include_bytes!).
    let docker = read("deploy/Dockerfile");
    let copied: Vec<&str> = docker
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut sources = vec![repo("src")];
    let mut embedded = 0;
    while let Some(dir) = sources.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for part in text.split("include_").skip(1) {
                let Some(arg) = part
                    .strip_prefix("str!(\"")
                    .or_else(|| part.strip_prefix("bytes!(\""))
                else {
                    continue;
                };
                let rel = arg.split('"').next().unwrap();
                // The path is relative to the file that embeds it.
                let file = path.parent().unwrap().join(rel).canonicalize().unwrap();
                let file = file
                    .strip_prefix(repo(""))
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned();
                assert!(
                    copied
                        .iter()
                        .any(|c| file == *c || file.starts_with(&format!("{c}/"))),
                    "deploy/Dockerfile does not copy {file} (embedded by {})",
                    path.display()
                );
                embedded += 1;
            }
        }
    }
    assert!(embedded >= 5, "found {embedded} embedded files");
    assert!(docker.contains("EXPOSE 8080") && docker.contains("RELAY_LISTEN=0.0.0.0:8080"));
}

#[tokio::test]
async fn demo_serves_the_page_and_the_client_with_presence() {
    let relay = Relay::start(&["--demo", "--shards", "1"]);
    for path in ["/", "/demo"] {
        let (status, kind, body) = get_text(&relay, path).await;
        assert_eq!(status, 200, "GET {path}");
        assert!(kind.starts_with("text/html"), "{kind}");
        assert!(body.contains("/demo/relay.js") && body.contains("presence:"));
    }
    let (status, kind, body) = get_text(&relay, "/demo/relay.js").await;
    assert_eq!(status, 200);
    assert!(kind.starts_with("text/javascript"), "{kind}");
    assert!(body.contains("export class RelayClient"));
    // --demo turns presence on for presence:* ...
    let (status, body) = relay.get("/api/presence/presence:demo").await;
    assert_eq!(status, 200, "{body}");
    drop(relay);

    // ... unless the operator chose the presence channels.
    let relay = Relay::start(&["--demo", "--presence-channels", "room:*", "--shards", "1"]);
    let (status, _) = relay.get("/api/presence/presence:demo").await;
    assert_eq!(status, 404);
    let (status, _) = relay.get("/api/presence/room:1").await;
    assert_eq!(status, 200);
    drop(relay);

    // Without --demo there is no demo (and RELAY_DEMO / the file key work like the flag).
    let relay = Relay::start(&[]);
    let (status, _, body) = get_text(&relay, "/").await;
    assert_eq!(status, 200);
    assert!(!body.contains("/demo/relay.js"), "{body}");
    assert_eq!(get_text(&relay, "/demo/relay.js").await.0, 404);
    drop(relay);
    let relay = Relay::start_with(&[], &[("RELAY_DEMO", "true")]);
    let (status, _, _) = get_text(&relay, "/demo/relay.js").await;
    assert_eq!(status, 200);
}

/// Whether python3 with PyYAML runs here (CI installs it; elsewhere the check is skipped).
fn python_yaml() -> bool {
    match run("python3", &["-c", "import yaml"], Duration::from_secs(30)) {
        Some(o) if o.status.success() => true,
        _ if std::env::var_os("CI").is_some() => {
            panic!("python3 with PyYAML is required in CI (pip install kubernetes-validate)")
        }
        _ => false,
    }
}

#[test]
fn the_release_workflow_builds_both_musl_binaries_and_the_image() {
    if !python_yaml() {
        println!("python3 with PyYAML is not installed: release workflow check SKIPPED");
        return;
    }
    // YAML 1.1 reads the key `on` as true.
    let script = "import json, sys, yaml\n\
                  d = yaml.safe_load(open(sys.argv[1]))\n\
                  d['on'] = d.pop(True, d.get('on'))\n\
                  print(json.dumps(d))";
    let path = repo(".github/workflows/release.yml");
    let out = run(
        "python3",
        &["-c", script, path.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(out.status.success(), "release.yml does not parse: {out:?}");
    let wf: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(wf["on"]["push"]["tags"], serde_json::json!(["v*"]), "{wf}");
    let jobs = &wf["jobs"];
    assert_eq!(
        jobs["binaries"]["strategy"]["matrix"]["target"],
        serde_json::json!(["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"])
    );
    let steps = |job: &str| jobs[job]["steps"].as_array().unwrap().clone();
    assert!(steps("binaries").iter().any(|s| s["run"]
        .as_str()
        .unwrap_or("")
        .contains("cargo zigbuild --release --locked --bin relay")));
    let platforms: Vec<&str> = jobs["image"]["strategy"]["matrix"]["include"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["platform"].as_str().unwrap())
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    let build = steps("image")
        .into_iter()
        .find(|s| {
            s["uses"]
                .as_str()
                .unwrap_or("")
                .starts_with("docker/build-push-action")
        })
        .expect("an image build step");
    assert_eq!(build["with"]["file"], "deploy/Dockerfile");
    assert_eq!(
        jobs["release"]["needs"],
        serde_json::json!(["binaries", "image-manifest"])
    );
}

#[test]
fn the_dockerfile_build_stage_is_what_the_ci_check_runs() {
    // scripts/test.sh builds this stage (scripts/dockerfile-build.py); here its plan: every
    // instruction of the stage is one the script carries out, every COPY source exists.
    let out = run(
        "python3",
        &[
            repo("scripts/dockerfile-build.py").to_str().unwrap(),
            "--dry-run",
        ],
        Duration::from_secs(30),
    )
    .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docker = read("deploy/Dockerfile");
    let runs = docker
        .split("\nRUN ")
        .skip(1)
        .filter(|r| r.contains("cargo build --release --locked --bin relay"))
        .count();
    assert_eq!(runs, 2, "the dependency and the binary build steps");
    assert_eq!(text.matches("== RUN ").count(), 2, "{text}");
    assert!(
        text.contains("cargo build --release --locked --bin relay"),
        "{text}"
    );
}
