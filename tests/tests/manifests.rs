//! The Kubernetes manifests in `daemonset/` checked against the real things:
//! the API schemas (kubernetes-validate, strict), and every container's
//! flags, environment, ports, probes and mounts against the binaries' own
//! parsers and constants. Needs no cluster, no root and no network.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use ferry_agent::cli::{Cli as AgentCli, Command as AgentCommand, RunArgs};
use ferry_ca::{
    bootstrap::{ISSUER_SECRET, KUBERNETES_NAMESPACE, TRUST_BUNDLE_CONFIG_MAP, TRUST_BUNDLE_FILE},
    cli::{Cli as CaCli, Command as CaCommand, ServeArgs},
};
use ferry_proto::{CA_PORT, DEFAULT_CA_SERVER_NAME, TOKEN_AUDIENCE};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{Container, PodSpec, Probe, Service, Volume, VolumeMount},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

/// kubernetes-validate, as `cargo xtask setup` installs it (xtask/src/setup.rs);
/// `FERRY_KUBERNETES_VALIDATE` names another one.
const KUBERNETES_VALIDATE: &str = "/opt/ferry-tools/bin/kubernetes-validate";
/// The API level k8s-openapi is built for (the workspace's `v1_34`), and the
/// newest one kubernetes-validate 1.37.0 has schemas for.
const KUBERNETES_VERSIONS: &[&str] = &["1.34.0", "1.37.0"];

/// Environment variables a container may set although no flag reads them.
const ENV_WITHOUT_FLAG: &[&str] = &[
    // Read by the Rust standard library when a thread panics.
    "RUST_BACKTRACE",
];

fn daemonset_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemonset")
}

fn yaml_documents(path: &Path) -> Vec<serde_yaml::Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| {
            serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|document: &serde_yaml::Value| !document.is_null())
        .collect()
}

fn kustomization() -> serde_yaml::Value {
    let path = daemonset_dir().join("kustomization.yaml");
    yaml_documents(&path).remove(0)
}

/// The files `kustomization.yaml` lists under `resources`.
fn resource_files() -> Vec<PathBuf> {
    let listed = kustomization()["resources"]
        .as_sequence()
        .expect("kustomization.yaml lists resources")
        .iter()
        .map(|name| daemonset_dir().join(name.as_str().expect("a resource is a file name")))
        .collect::<Vec<_>>();
    assert!(!listed.is_empty());
    listed
}

/// The one object of `kind` among the listed resources.
fn object<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let mut found = resource_files()
        .iter()
        .flat_map(|file| yaml_documents(file))
        .filter(|document| document["kind"].as_str() == Some(kind))
        .collect::<Vec<_>>();
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    serde_yaml::from_value(found.remove(0)).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

fn agent_pod() -> PodSpec {
    object::<DaemonSet>("DaemonSet")
        .spec
        .and_then(|spec| spec.template.spec)
        .expect("the DaemonSet has a pod spec")
}

fn ca_pod() -> PodSpec {
    object::<Deployment>("Deployment")
        .spec
        .and_then(|spec| spec.template.spec)
        .expect("the Deployment has a pod spec")
}

fn only_container(pod: &PodSpec) -> &Container {
    assert_eq!(pod.containers.len(), 1, "one container per pod");
    assert!(pod.init_containers.is_none(), "no init containers");
    &pod.containers[0]
}

// ---------------------------------------------------------------------------
// Schemas

/// Runs kubernetes-validate in strict mode; every document must pass, and a
/// warning (such as a kind it has no schema for) counts as a failure.
fn kubernetes_validate(files: &[PathBuf]) {
    let tool = std::env::var_os("FERRY_KUBERNETES_VALIDATE")
        .map_or_else(|| PathBuf::from(KUBERNETES_VALIDATE), PathBuf::from);
    assert!(
        tool.is_file(),
        "{} is missing: run `cargo xtask setup`, which installs kubernetes-validate into /opt/ferry-tools",
        tool.display()
    );
    let documents: usize = files.iter().map(|file| yaml_documents(file).len()).sum();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&tool)
            .args(["--strict", "--kubernetes-version", version])
            .args(files)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubernetes-validate --strict -k {version} failed:\n{report}"
        );
        let passed = report
            .lines()
            .filter(|line| line.starts_with("INFO") && line.contains(" passed for resource "))
            .count();
        let others: Vec<&str> = report
            .lines()
            .filter(|line| !(line.starts_with("INFO") && line.contains(" passed ")))
            .collect();
        assert!(
            others.is_empty(),
            "kubernetes-validate -k {version} said more than `passed`:\n{report}"
        );
        assert_eq!(
            passed, documents,
            "{documents} documents, {passed} passed (-k {version}):\n{report}"
        );
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn listed_manifests_pass_kubernetes_validate_strict() {
    kubernetes_validate(&resource_files());
}

#[test]
fn bootstrap_manifests_pass_kubernetes_validate_strict() {
    let dir = TempDir::new("manifests-bootstrap");
    let file = dir.0.join("ferry-ca-issuer.yaml");
    let ca = ferry_tests::bin_path("ferry-ca").unwrap();
    let out = Command::new(&ca)
        .args(["bootstrap", "--out"])
        .arg(dir.0.join("ca"))
        .arg("--kubernetes-manifests")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ferry-ca bootstrap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    kubernetes_validate(std::slice::from_ref(&file));

    let documents = yaml_documents(&file);
    let named = |kind: &str| {
        documents
            .iter()
            .find(|document| document["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} in {}", file.display()))
    };
    let secret = named("Secret");
    assert_eq!(secret["metadata"]["name"].as_str(), Some(ISSUER_SECRET));
    let config_map = named("ConfigMap");
    assert_eq!(
        config_map["metadata"]["name"].as_str(),
        Some(TRUST_BUNDLE_CONFIG_MAP)
    );
    for document in [secret, config_map] {
        assert_eq!(
            document["metadata"]["namespace"].as_str(),
            Some(KUBERNETES_NAMESPACE)
        );
    }
    let namespace: serde_yaml::Value = object::<serde_yaml::Value>("Namespace");
    assert_eq!(
        namespace["metadata"]["name"].as_str(),
        Some(KUBERNETES_NAMESPACE)
    );
}

#[test]
fn kustomization_lists_every_manifest_and_pins_the_images() {
    let mut on_disk: Vec<PathBuf> = fs::read_dir(daemonset_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .filter(|path| !path.ends_with("kustomization.yaml"))
        .collect();
    on_disk.sort();
    let mut listed = resource_files();
    listed.sort();
    assert_eq!(
        listed, on_disk,
        "kustomization.yaml resources vs daemonset/*.yaml"
    );

    let images: BTreeMap<String, String> = kustomization()["images"]
        .as_sequence()
        .expect("kustomization.yaml sets images")
        .iter()
        .map(|image| {
            let field = |name: &str| image[name].as_str().unwrap().to_owned();
            (field("name"), field("newTag"))
        })
        .collect();
    for pod in [agent_pod(), ca_pod()] {
        let image = only_container(&pod).image.clone().unwrap();
        let (name, tag) = image.rsplit_once(':').unwrap();
        assert_eq!(images.get(name).map(String::as_str), Some(tag), "{image}");
        assert_eq!(
            tag,
            env!("CARGO_PKG_VERSION"),
            "{image}: the workspace version"
        );
    }
}

// ---------------------------------------------------------------------------
// Flags and environment, through the binaries' own parsers

/// What the kubelet would put in an environment variable set from a field.
fn field_value(path: &str) -> Option<&'static str> {
    Some(match path {
        "spec.nodeName" => "node-1",
        "metadata.name" => "pod-1",
        "metadata.namespace" => KUBERNETES_NAMESPACE,
        "spec.serviceAccountName" => "ferry-agent",
        "status.podIP" | "status.hostIP" => "198.18.0.10",
        "status.podIPs" | "status.hostIPs" => "198.18.0.10,2001:2::10",
        _ => return None,
    })
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, `$$` is a
/// literal `$`, anything else stays as written.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest
            .strip_prefix("$(")
            .and_then(|inner| inner.split_once(')'))
            && let Some((_, value)) = env.iter().rev().find(|(n, _)| n == name)
        {
            out.push_str(value);
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment as the process would see it, in order.
fn container_env(container: &Container) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), None) => expand(value, &env),
            (None, Some(from)) => {
                let field = from.field_ref.as_ref().ok_or_else(|| {
                    format!("env {}: only fieldRef sources are understood", var.name)
                })?;
                field_value(&field.field_path)
                    .ok_or_else(|| format!("env {}: unknown field {}", var.name, field.field_path))?
                    .to_owned()
            }
            _ => {
                return Err(format!(
                    "env {}: needs exactly one of value, valueFrom",
                    var.name
                ));
            }
        };
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

/// The argument of `command` (or of one of its subcommands) that reads `var`.
fn arg_reading_env(command: &clap::Command, var: &str) -> Option<clap::Arg> {
    command
        .get_arguments()
        .find(|arg| arg.get_env().is_some_and(|env| env == var))
        .cloned()
        .or_else(|| {
            command
                .get_subcommands()
                .find_map(|sub| arg_reading_env(sub, var))
        })
}

/// Whether `text` refers to `$(name)` (and not as the escaped `$$(name)`).
fn references(text: &str, name: &str) -> bool {
    let reference = format!("$({name})");
    text.match_indices(&reference)
        .any(|(at, _)| !text[..at].ends_with('$'))
}

/// The command line the container runs: `command` after the binary's name,
/// then `args`, `$(VAR)` expanded, then each environment variable as the flag
/// that reads it (`--flag=value`), so the parser sees every setting. A flag
/// already on the command line beats its variable, as in clap. A variable no
/// flag reads must be referenced as `$(VAR)` or be in [`ENV_WITHOUT_FLAG`].
fn command_line(container: &Container, cli: &clap::Command) -> Result<Vec<String>, String> {
    let command = container.command.as_deref().unwrap_or_default();
    let (binary, command_args) = command
        .split_first()
        .ok_or("the container must set `command` to the binary it runs")?;
    let binary = Path::new(binary).file_name().unwrap().to_string_lossy();
    if binary != cli.get_name() {
        return Err(format!("runs {binary}, expected {}", cli.get_name()));
    }
    let env = container_env(container)?;
    let written: Vec<&String> = command_args
        .iter()
        .chain(container.args.iter().flatten())
        .chain(
            container
                .env
                .iter()
                .flatten()
                .filter_map(|var| var.value.as_ref()),
        )
        .collect();
    let mut argv = vec![binary.into_owned()];
    argv.extend(
        command_args
            .iter()
            .chain(container.args.iter().flatten())
            .map(|arg| expand(arg, &env)),
    );
    let on_command_line = |argv: &[String], long: &str| {
        argv.iter().any(|arg| {
            arg.strip_prefix("--")
                .and_then(|arg| arg.strip_prefix(long))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
        })
    };
    for (name, value) in &env {
        let referenced = written.iter().any(|text| references(text, name));
        let Some(arg) = arg_reading_env(cli, name) else {
            if referenced || ENV_WITHOUT_FLAG.contains(&name.as_str()) {
                continue;
            }
            return Err(format!(
                "env {name} is read by no flag of {}",
                cli.get_name()
            ));
        };
        let long = arg
            .get_long()
            .ok_or_else(|| format!("env {name}: its flag has no long name"))?;
        if on_command_line(&argv, long) {
            continue;
        }
        if arg.get_action().takes_values() {
            argv.push(format!("--{long}={value}"));
        } else if value == "true" {
            argv.push(format!("--{long}"));
        } else {
            return Err(format!("env {name}={value}: --{long} takes no value"));
        }
    }
    Ok(argv)
}

/// `command` with no argument reading the environment: the test process's
/// own variables (KUBECONFIG, FERRY_LOG, …) must not change what is parsed.
fn without_env(command: clap::Command) -> clap::Command {
    let subcommands: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_owned())
        .collect();
    let command = command.mut_args(|arg| arg.env(None::<&str>));
    subcommands.iter().fold(command, |command, name| {
        command.mut_subcommand(name, without_env)
    })
}

/// Parses a container's command line and environment with `P`, the binary's parser.
fn parse_container<P: clap::Parser>(container: &Container) -> Result<P, String> {
    let argv = command_line(container, &P::command())?;
    let matches = without_env(P::command())
        .try_get_matches_from(&argv)
        .map_err(|e| format!("{argv:?}: {e}"))?;
    P::from_arg_matches(&matches).map_err(|e| format!("{argv:?}: {e}"))
}

fn agent_args(container: &Container) -> Result<RunArgs, String> {
    match parse_container::<AgentCli>(container)?.command {
        AgentCommand::Run(args) => Ok(args),
        AgentCommand::Inspect(_) | AgentCommand::Crd => {
            Err("the agent container must run `run`".into())
        }
    }
}

fn ca_args(container: &Container) -> Result<ServeArgs, String> {
    match parse_container::<CaCli>(container)?.command {
        CaCommand::Serve(args) => Ok(*args),
        CaCommand::Bootstrap(_) => Err("the CA container must run `serve`".into()),
    }
}

#[test]
fn agent_flags_parse_with_the_agent_parser() {
    let pod = agent_pod();
    let args = agent_args(only_container(&pod)).unwrap();
    assert!(args.source.kubernetes, "the DaemonSet watches the cluster");
    assert!(args.source.workloads.is_none());
    assert_eq!(args.node, "node-1", "--node from spec.nodeName");
    assert_eq!(
        args.source.node_addresses,
        [
            "198.18.0.10".parse::<std::net::IpAddr>().unwrap(),
            "2001:2::10".parse().unwrap()
        ],
        "--node-address from status.podIPs"
    );
    assert_eq!(args.log.format, ferry_agent::logging::LogFormat::Json);
    assert!(
        args.identity.ca_addr.is_some(),
        "the agent asks the CA for certificates"
    );
}

#[test]
fn ca_flags_parse_with_the_ca_parser() {
    let pod = ca_pod();
    let args = ca_args(only_container(&pod)).unwrap();
    assert!(args.token_review, "the CA asks the API server about tokens");
    assert!(args.jwks.is_none() && args.workloads.is_none());
    assert_eq!(args.token_audience, TOKEN_AUDIENCE);
}

#[test]
fn a_flag_or_variable_the_binary_lacks_fails() {
    let pod = agent_pod();
    let mut container = only_container(&pod).clone();
    container
        .args
        .get_or_insert_default()
        .push("--no-such-flag=1".into());
    let error = agent_args(&container).unwrap_err();
    assert!(error.contains("--no-such-flag"), "{error}");

    let mut container = only_container(&pod).clone();
    container
        .env
        .get_or_insert_default()
        .push(k8s_openapi::api::core::v1::EnvVar {
            name: "FERRY_NO_SUCH_SETTING".into(),
            value: Some("1".into()),
            ..Default::default()
        });
    let error = agent_args(&container).unwrap_err();
    assert!(
        error.contains("FERRY_NO_SUCH_SETTING is read by no flag"),
        "{error}"
    );

    let pod = ca_pod();
    let mut container = only_container(&pod).clone();
    container
        .args
        .get_or_insert_default()
        .push("--node-address=198.18.0.1".into());
    let error = ca_args(&container).unwrap_err();
    assert!(error.contains("--node-address"), "{error}");
}

#[test]
fn environment_and_expansion_follow_kubernetes() {
    let env = vec![
        ("NODE".to_owned(), "n1".to_owned()),
        ("PORT".to_owned(), "15012".to_owned()),
    ];
    assert_eq!(expand("--node=$(NODE)", &env), "--node=n1");
    assert_eq!(expand("$(NODE):$(PORT)", &env), "n1:15012");
    assert_eq!(expand("$$(NODE)", &env), "$(NODE)");
    assert_eq!(expand("$(UNSET) $5 $", &env), "$(UNSET) $5 $");

    // A variable only referenced, one a flag reads with a reference in its
    // value, one on the allow-list, and a flag that beats its variable.
    let container: Container = serde_yaml::from_str(
        r#"
name: agent
command: [/usr/local/bin/ferry-agent]
args: [run, --kubernetes, "--node=$(NODE)", --log-format=text]
env:
  - name: NODE
    valueFrom: { fieldRef: { fieldPath: spec.nodeName } }
  - name: NODE_ADDRESSES
    valueFrom: { fieldRef: { fieldPath: status.podIPs } }
  - name: FERRY_LOG
    value: "info,ferry_agent::capture=$(NODE)"
  - name: FERRY_LOG_FORMAT
    value: json
  - name: RUST_BACKTRACE
    value: "1"
"#,
    )
    .unwrap();
    let args = agent_args(&container).unwrap();
    assert_eq!(args.node, "node-1");
    assert_eq!(args.log.filter, "info,ferry_agent::capture=node-1");
    assert_eq!(args.log.format, ferry_agent::logging::LogFormat::Text);

    let mut unreferenced = container;
    unreferenced.args = Some(vec![
        "run".into(),
        "--kubernetes".into(),
        "--node=n1".into(),
    ]);
    unreferenced.env.as_mut().unwrap().remove(2);
    let error = agent_args(&unreferenced).unwrap_err();
    assert!(error.contains("env NODE is read by no flag"), "{error}");
}

// ---------------------------------------------------------------------------
// Ports, probes and mounts

fn port_number(container: &Container, port: &IntOrString) -> u16 {
    let number = match port {
        IntOrString::Int(number) => *number,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no container port named {name}"))
                .container_port
        }
    };
    u16::try_from(number).unwrap()
}

fn container_ports(container: &Container) -> Vec<u16> {
    let mut ports: Vec<u16> = container
        .ports
        .iter()
        .flatten()
        .map(|p| u16::try_from(p.container_port).unwrap())
        .collect();
    ports.sort_unstable();
    ports
}

/// The port a TCP or HTTP probe checks, and the HTTP path if any.
fn probe_target(container: &Container, probe: Option<&Probe>) -> (u16, Option<String>) {
    let probe = probe.expect("the container has the probe");
    match (&probe.http_get, &probe.tcp_socket) {
        (Some(http), None) => (port_number(container, &http.port), http.path.clone()),
        (None, Some(tcp)) => (port_number(container, &tcp.port), None),
        _ => panic!("expected one httpGet or tcpSocket probe: {probe:?}"),
    }
}

#[test]
fn agent_ports_and_probes_are_the_agent_ports() {
    let pod = agent_pod();
    let container = only_container(&pod);
    let args = agent_args(container).unwrap();
    assert_eq!(
        container_ports(container),
        Vec::<u16>::new(),
        "on the host network a containerPort is a hostPort: the surge pod of a rollout could not be scheduled beside the old one"
    );
    assert_eq!(args.probe_port, ferry_agent::cli::DEFAULT_PROBE_PORT);
    assert_eq!(args.outbound_port, ferry_agent::cli::DEFAULT_OUTBOUND_PORT);
    assert!(args.admin_addr.ip().is_loopback());
    assert_eq!(
        probe_target(container, container.readiness_probe.as_ref()),
        (
            args.probe_port,
            Some(ferry_agent::admin::READY_PATH.to_owned())
        )
    );
    assert_eq!(
        probe_target(container, container.liveness_probe.as_ref()).0,
        args.probe_port
    );
    assert_eq!(
        pod.host_network,
        Some(true),
        "pods are redirected to the node's addresses"
    );
}

#[test]
fn ca_ports_probes_and_service_agree_with_the_agent() {
    let pod = ca_pod();
    let container = only_container(&pod);
    let args = ca_args(container).unwrap();
    assert_eq!(args.listen.port(), CA_PORT);
    assert!(
        args.listen.ip().is_unspecified(),
        "agents on other nodes dial the CA"
    );
    assert!(
        !args.metrics_addr.ip().is_loopback(),
        "a containerPort for metrics on loopback could not be scraped"
    );
    let mut expected = vec![args.listen.port(), args.metrics_addr.port()];
    expected.sort_unstable();
    assert_eq!(container_ports(container), expected);
    for probe in [&container.readiness_probe, &container.liveness_probe] {
        assert_eq!(
            probe_target(container, probe.as_ref()),
            (args.listen.port(), None)
        );
    }

    let service: Service = object("Service");
    let name = service.metadata.name.clone().unwrap();
    let namespace = service.metadata.namespace.clone().unwrap();
    let ports = service.spec.unwrap().ports.unwrap();
    let [port] = ports.as_slice() else {
        panic!("the CA Service has one port")
    };
    assert_eq!(port.port, i32::from(CA_PORT));
    let target = port.target_port.clone().unwrap();
    assert_eq!(port_number(container, &target), args.listen.port());

    // The agent dials the Service by name and checks that name in the CA's certificate.
    let host = format!("{name}.{namespace}.svc");
    let agent_pod = agent_pod();
    let agent = agent_args(only_container(&agent_pod)).unwrap();
    assert_eq!(agent.identity.ca_addr, Some(format!("{host}:{CA_PORT}")));
    assert_eq!(agent.identity.ca_server_name, host);
    assert_eq!(host, DEFAULT_CA_SERVER_NAME);
    assert!(args.server_names.contains(&host), "{:?}", args.server_names);
    assert_eq!(agent.identity.trust_domain, args.trust_domain);
}

/// The volume mounted at the deepest mount path that holds `path`, and
/// `path` relative to it.
fn mount_of<'a>(
    pod: &'a PodSpec,
    container: &'a Container,
    path: &Path,
) -> (&'a VolumeMount, &'a Volume, PathBuf) {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|mount| path.starts_with(&mount.mount_path))
        .max_by_key(|mount| mount.mount_path.len())
        .unwrap_or_else(|| panic!("{} is on no volume", path.display()));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|volume| volume.name == mount.name)
        .unwrap_or_else(|| panic!("no volume {}", mount.name));
    let relative = path.strip_prefix(&mount.mount_path).unwrap().to_owned();
    (mount, volume, relative)
}

/// `path` must be `key` of the trust bundle ConfigMap.
fn assert_trust_bundle(pod: &PodSpec, container: &Container, path: &Path) {
    let (mount, volume, relative) = mount_of(pod, container, path);
    assert_eq!(mount.read_only, Some(true));
    let config_map = volume
        .config_map
        .as_ref()
        .expect("the trust bundle is a ConfigMap");
    assert_eq!(config_map.name, TRUST_BUNDLE_CONFIG_MAP);
    let items = config_map.items.as_deref().unwrap_or_default();
    let item = items
        .iter()
        .find(|item| Path::new(&item.path) == relative)
        .unwrap_or_else(|| panic!("{} is no item of the ConfigMap volume", path.display()));
    assert_eq!(item.key, TRUST_BUNDLE_FILE);
}

#[test]
fn agent_mounts_hold_what_its_flags_name() {
    let pod = agent_pod();
    let container = only_container(&pod);
    let args = agent_args(container).unwrap();

    assert_trust_bundle(
        &pod,
        container,
        args.identity.trust_bundle.as_deref().unwrap(),
    );

    let token = args.identity.token_file.as_deref().unwrap();
    let (mount, volume, relative) = mount_of(&pod, container, token);
    assert_eq!(mount.read_only, Some(true));
    let sources = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_deref())
        .unwrap();
    let projection = sources
        .iter()
        .find_map(|source| source.service_account_token.as_ref())
        .expect("the token is a projected ServiceAccount token");
    assert_eq!(Path::new(&projection.path), relative);
    assert_eq!(projection.audience.as_deref(), Some(TOKEN_AUDIENCE));
    assert_eq!(projection.expiration_seconds, Some(3600));

    let host_path = |path: &Path| {
        let (mount, volume, relative) = mount_of(&pod, container, path);
        let host = volume.host_path.as_ref().expect("a hostPath volume");
        (mount.clone(), PathBuf::from(&host.path).join(relative))
    };
    let (bpffs, pins) = host_path(&args.bpffs_root);
    assert_eq!(
        pins,
        Path::new("/sys/fs/bpf/ferry"),
        "pins where bpftool users look"
    );
    assert_ne!(
        bpffs.mount_propagation.as_deref(),
        Some("Bidirectional"),
        "needs privileged"
    );
    let (cgroup, root) = host_path(&args.source.cgroup_root);
    assert_eq!(root, Path::new("/sys/fs/cgroup"));
    assert_eq!(cgroup.read_only, Some(true));
    let (handover, dir) = host_path(&args.lifecycle.handover_dir);
    assert_eq!(
        dir,
        Path::new(ferry_agent::cli::DEFAULT_HANDOVER_DIR),
        "the old and the new agent of a node meet on the host"
    );
    assert_ne!(
        handover.read_only,
        Some(true),
        "the agent binds its socket there"
    );
}

#[test]
fn a_rollout_surges_and_waits_for_the_drain() {
    let daemonset = object::<DaemonSet>("DaemonSet");
    let spec = daemonset.spec.expect("a DaemonSet spec");
    let rolling = spec
        .update_strategy
        .and_then(|strategy| strategy.rolling_update)
        .expect("a rolling update");
    assert_eq!(
        (rolling.max_surge, rolling.max_unavailable),
        (Some(IntOrString::Int(1)), Some(IntOrString::Int(0))),
        "the new agent starts beside the old one and takes its sockets over"
    );
    let pod = spec.template.spec.expect("a pod spec");
    let args = agent_args(only_container(&pod)).unwrap();
    let grace = pod
        .termination_grace_period_seconds
        .expect("terminationGracePeriodSeconds");
    assert!(
        u64::try_from(grace).unwrap() > args.lifecycle.drain_timeout,
        "the kubelet kills the old agent after {grace} s, before its {} s drain deadline",
        args.lifecycle.drain_timeout
    );
    assert!(
        args.lifecycle.stay_until_terminated,
        "an old agent that exits after its drain is restarted by the kubelet and takes the node back"
    );
}

#[test]
fn ca_mounts_hold_what_its_flags_name() {
    let pod = ca_pod();
    let container = only_container(&pod);
    let args = ca_args(container).unwrap();
    assert_trust_bundle(&pod, container, &args.trust_bundle);
    let (mount, volume, relative) = mount_of(&pod, container, &args.issuer_dir);
    assert_eq!(mount.read_only, Some(true));
    assert_eq!(
        relative,
        Path::new(""),
        "--issuer-dir is the Secret's mount"
    );
    let secret = volume.secret.as_ref().expect("the issuer is a Secret");
    assert_eq!(secret.secret_name.as_deref(), Some(ISSUER_SECRET));
}

#[test]
fn dockerfiles_install_the_binaries_the_manifests_run() {
    for (pod, dockerfile) in [
        (agent_pod(), "Dockerfile.agent"),
        (ca_pod(), "Dockerfile.ca"),
    ] {
        let binary = only_container(&pod).command.as_ref().unwrap()[0].clone();
        let text = fs::read_to_string(daemonset_dir().join(dockerfile)).unwrap();
        let entrypoint = format!("ENTRYPOINT [\"{binary}\"]");
        assert!(
            text.contains(&entrypoint),
            "{dockerfile} lacks {entrypoint}"
        );
    }
}

#[test]
fn the_committed_crd_is_what_the_code_generates() {
    let path = daemonset_dir().join("crd-authorizationpolicy.yaml");
    let committed = fs::read_to_string(&path).unwrap();
    assert!(
        committed == ferry_proto::policy::crd_manifest(),
        "{} differs from what the policy types generate; regenerate it with \
         `cargo run -p ferry-agent -- crd > {}`",
        path.display(),
        ferry_proto::policy::CRD_MANIFEST
    );
}

/// The YAML blocks of a Markdown file that hold an `AuthorizationPolicy`.
fn policy_examples(markdown: &str) -> Vec<serde_json::Value> {
    let mut examples = Vec::new();
    let mut block: Option<String> = None;
    for line in markdown.lines() {
        match (&mut block, line.trim_end()) {
            (None, "```yaml") => block = Some(String::new()),
            (Some(text), "```") => {
                let value: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
                if value["kind"] == "AuthorizationPolicy" {
                    examples.push(serde_json::to_value(value).unwrap());
                }
                block = None;
            }
            (Some(text), line) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    examples
}

/// Checks each of `objects` against the CRD's `openAPIV3Schema` with the
/// `jsonschema` package kubernetes-validate brings; `Ok` or the first error, each.
fn check_against_crd_schema(objects: &[serde_json::Value]) -> Vec<Result<(), String>> {
    let crd = ferry_proto::policy::crd();
    let schema =
        serde_json::to_value(&crd.spec.versions[0].schema).unwrap()["openAPIV3Schema"].clone();
    let dir = TempDir::new("crd-schema");
    let input = dir.0.join("input.json");
    fs::write(
        &input,
        serde_json::to_vec(&serde_json::json!({ "schema": schema, "objects": objects })).unwrap(),
    )
    .unwrap();
    let python = Path::new(KUBERNETES_VALIDATE).with_file_name("python3");
    let script = "import json, sys, jsonschema\n\
                  data = json.load(open(sys.argv[1]))\n\
                  v = jsonschema.Draft7Validator(data['schema'])\n\
                  for o in data['objects']:\n\
                  \x20   errors = sorted(v.iter_errors(o), key=lambda e: list(e.path))\n\
                  \x20   print(json.dumps(errors[0].message if errors else None))\n";
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(&input)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (cargo xtask setup installs it)",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(
            |line| match serde_json::from_str::<Option<String>>(line).unwrap() {
                None => Ok(()),
                Some(error) => Err(error),
            },
        )
        .collect()
}

#[test]
fn every_policy_example_in_the_docs_fits_the_crd_schema_and_the_agents_types() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/policies.md");
    let examples = policy_examples(&fs::read_to_string(&docs).unwrap());
    assert!(
        examples.len() >= 3,
        "{} examples in {}",
        examples.len(),
        docs.display()
    );
    for example in &examples {
        serde_json::from_value::<ferry_proto::policy::AuthorizationPolicy>(example.clone())
            .unwrap_or_else(|e| panic!("the agent cannot read {example}: {e}"));
    }
    for (example, result) in examples.iter().zip(check_against_crd_schema(&examples)) {
        assert!(
            result.is_ok(),
            "{example} does not fit the CRD's schema: {result:?}"
        );
    }

    // The schema really refuses what it says it refuses.
    let with = |spec: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": { "name": "x", "namespace": "shop" }, "spec": spec,
        })
    };
    let bad = [
        with(serde_json::json!({ "ports": [0] })),
        with(serde_json::json!({ "ports": [70000] })),
        with(serde_json::json!({ "action": "Maybe" })),
        with(serde_json::json!({ "from": [{ "namespace": "a", "serviceAccount": "a/b" }] })),
        with(serde_json::json!({ "from": [{}] })),
        with(serde_json::json!({ "from": [{ "serviceAccount": "no-slash" }] })),
        with(serde_json::json!({ "from": [{ "identity": "https://x/ns/a/sa/b" }] })),
        with(
            serde_json::json!({ "selector": { "matchExpressions": [{ "key": "a", "operator": "Near" }] } }),
        ),
    ];
    for (object, result) in bad.iter().zip(check_against_crd_schema(&bad)) {
        assert!(result.is_err(), "the CRD's schema accepts {object}");
    }
}
