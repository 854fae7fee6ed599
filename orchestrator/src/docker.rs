//! `orchestrator docker up|down|status`: a head and N workers as containers
//! on one Docker engine, for trying a cluster on one machine.
//!
//! Everything `up` makes carries the label `flotilla.cluster=NAME`, and
//! `down` removes exactly what carries it: containers of other clusters or
//! of nobody are never touched. The host reaches the head at its address on
//! the cluster's bridge network, which a Linux host routes to directly (an
//! engine on another machine or in a VM, e.g. Docker Desktop, is not
//! supported: `up` would time out waiting for the head and say so).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, ListNetworksOptions, LogsOptions,
    RemoveContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;

use proto::orchestrator::StatusRequest;

use crate::auth;
use crate::cli::DockerCmd;
use crate::client;
use crate::error::{Error, Result};
use crate::status;

/// The label that marks what belongs to a cluster; `down` removes by it.
pub const CLUSTER_LABEL: &str = "flotilla.cluster";
const ROLE_LABEL: &str = "flotilla.role";
/// Each node has its own network namespace, so every head can use the
/// default port.
const HEAD_PORT: u16 = 6379;
const DEFAULT_SOCKET: &str = "unix:///var/run/docker.sock";
/// Per engine request; `up` bounds its whole wait with --timeout.
const REQUEST_TIMEOUT_S: u64 = 120;

#[derive(Debug, Clone)]
pub struct UpSpec {
    pub image: String,
    pub workers: usize,
    pub name: String,
    pub num_cpus: Option<f64>,
    pub num_gpus: Option<f64>,
    pub timeout: Duration,
}

/// The names `up` gives: `<name>-head`, `<name>-worker-<i>`, `<name>-net`.
pub fn head_name(cluster: &str) -> String {
    format!("{cluster}-head")
}
pub fn worker_name(cluster: &str, i: usize) -> String {
    format!("{cluster}-worker-{i}")
}
pub fn network_name(cluster: &str) -> String {
    format!("{cluster}-net")
}

/// Docker's rule for container names, checked before anything is created so
/// a bad --name is one clear error rather than a half-made cluster.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = name.len() <= 200
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "--name",
            format!("'{name}' (letters, digits, '_', '.', '-', starting with a letter or digit)"),
        ))
    }
}

pub async fn run(cmd: DockerCmd) -> Result<()> {
    match cmd {
        DockerCmd::Up {
            engine,
            image,
            workers,
            name,
            num_cpus,
            num_gpus,
            timeout,
        } => {
            validate_name(&name)?;
            if !(timeout.is_finite() && timeout > 0.0) {
                return Err(Error::invalid(
                    "--timeout",
                    format!("{timeout} (seconds > 0)"),
                ));
            }
            let spec = UpSpec {
                image,
                workers,
                name,
                num_cpus,
                num_gpus,
                timeout: Duration::from_secs_f64(timeout),
            };
            let docker = connect(engine.docker_host.as_deref()).await?;
            up(&docker, &spec).await
        }
        DockerCmd::Down { engine, name } => {
            validate_name(&name)?;
            let docker = connect(engine.docker_host.as_deref()).await?;
            let removed = down(&docker, &name).await?;
            if removed.is_empty() {
                println!("nothing labelled {CLUSTER_LABEL}={name} on this engine");
            }
            for r in removed {
                println!("removed {r}");
            }
            Ok(())
        }
        DockerCmd::Status { engine, name } => {
            validate_name(&name)?;
            let docker = connect(engine.docker_host.as_deref()).await?;
            print!("{}", status_text(&docker, &name).await?);
            Ok(())
        }
    }
}

/// The engine at `host` (unix://, tcp:// or http://; DOCKER_HOST through
/// clap, else the default socket). bollard speaks a newer API than older
/// engines (20.10 speaks 1.41), so the version is negotiated down.
pub async fn connect(host: Option<&str>) -> Result<Docker> {
    let host = host.filter(|h| !h.is_empty()).unwrap_or(DEFAULT_SOCKET);
    let unreachable = |reason: String| {
        Error::Docker(format!(
            "cannot reach the Docker engine at {host}: {reason} (is the engine running, and may this user use it? set --docker-host or DOCKER_HOST for another engine)"
        ))
    };
    let docker = if let Some(path) = host.strip_prefix("unix://") {
        if !std::path::Path::new(path).exists() {
            return Err(unreachable(format!("{path} does not exist")));
        }
        Docker::connect_with_unix(host, REQUEST_TIMEOUT_S, bollard::API_DEFAULT_VERSION)
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(host, REQUEST_TIMEOUT_S, bollard::API_DEFAULT_VERSION)
    } else {
        return Err(Error::invalid(
            "--docker-host",
            format!("'{host}' (expected unix://PATH, tcp://HOST:PORT or http://HOST:PORT)"),
        ));
    }
    .map_err(|e| unreachable(e.to_string()))?;
    docker
        .negotiate_version()
        .await
        .map_err(|e| unreachable(e.to_string()))
}

fn engine_error(what: &str, e: BollardError) -> Error {
    Error::Docker(format!("{what}: {e}"))
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn cluster_filter(cluster: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_string(),
        vec![format!("{CLUSTER_LABEL}={cluster}")],
    )])
}

fn labels(cluster: &str, role: &str) -> HashMap<String, String> {
    HashMap::from([
        (CLUSTER_LABEL.to_string(), cluster.to_string()),
        (ROLE_LABEL.to_string(), role.to_string()),
    ])
}

/// Refuses before anything is created: a missing image, a cluster of that
/// name already up, or a name someone else's container or network holds.
async fn preflight(docker: &Docker, spec: &UpSpec) -> Result<()> {
    match docker.inspect_image(&spec.image).await {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {
            return Err(Error::Docker(format!(
                "image {} not found: build it with docker/build.sh{}",
                spec.image,
                if spec.image == "flotilla:latest" {
                    String::new()
                } else {
                    format!(" --tag {}", spec.image)
                }
            )))
        }
        Err(e) => return Err(engine_error(&format!("inspecting image {}", spec.image), e)),
    }
    let ours = list_containers(docker, &spec.name).await?;
    if !ours.is_empty() {
        let names: Vec<&str> = ours.iter().map(|c| c.name.as_str()).collect();
        return Err(Error::Docker(format!(
            "cluster {} is already up on this engine ({}); `orchestrator docker down --name {}` removes it, or choose another --name",
            spec.name,
            names.join(", "),
            spec.name
        )));
    }
    let mut names = vec![head_name(&spec.name)];
    names.extend((1..=spec.workers).map(|i| worker_name(&spec.name, i)));
    for n in &names {
        match docker.inspect_container(n, None).await {
            Ok(_) => {
                return Err(Error::Docker(format!(
                    "a container named {n} already exists and is not part of cluster {}; remove it or choose another --name",
                    spec.name
                )))
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(engine_error(&format!("inspecting container {n}"), e)),
        }
    }
    let net = network_name(&spec.name);
    match docker.inspect_network(&net, None).await {
        Ok(_) => Err(Error::Docker(format!(
            "a network named {net} already exists and is not part of cluster {}; remove it or choose another --name",
            spec.name
        ))),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(engine_error(&format!("inspecting network {net}"), e)),
    }
}

/// Starts the cluster and waits for every node; on failure, Ctrl-C or
/// SIGTERM it removes what it made (preflight refusals made nothing).
pub async fn up(docker: &Docker, spec: &UpSpec) -> Result<()> {
    preflight(docker, spec).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::os("cannot watch for SIGTERM"))?;
    let started = Instant::now();
    let outcome = tokio::select! {
        r = create_and_wait(docker, spec, started) => r,
        _ = tokio::signal::ctrl_c() => Err(Error::Docker("interrupted".into())),
        _ = term.recv() => Err(Error::Docker("terminated".into())),
    };
    match outcome {
        Ok(text) => {
            print!("{text}");
            println!(
                "cluster {}: {} nodes joined {:.1} s after the first container was created",
                spec.name,
                spec.workers + 1,
                started.elapsed().as_secs_f64()
            );
            println!(
                "status: orchestrator docker status --name {0}; remove: orchestrator docker down --name {0}",
                spec.name
            );
            Ok(())
        }
        Err(e) => {
            let removed = cleanup(docker, &spec.name).await;
            let cleanup = match removed {
                Ok(r) if r.is_empty() => String::new(),
                Ok(r) => format!(" (removed {})", r.join(", ")),
                Err(c) => format!(
                    " (and cleaning up failed: {c}; run `orchestrator docker down --name {}`)",
                    spec.name
                ),
            };
            Err(Error::Docker(format!(
                "docker up {}: {e}{cleanup}",
                spec.name
            )))
        }
    }
}

/// `down` after an interrupted `up`: a create the engine had already
/// accepted when the request was dropped still completes, so a second pass
/// catches a container or network that appears after the first.
async fn cleanup(docker: &Docker, cluster: &str) -> Result<Vec<String>> {
    let mut removed = down(docker, cluster).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    removed.extend(down(docker, cluster).await?);
    Ok(removed)
}

async fn create_and_wait(docker: &Docker, spec: &UpSpec, started: Instant) -> Result<String> {
    let net = network_name(&spec.name);
    docker
        .create_network(NetworkCreateRequest {
            name: net.clone(),
            driver: Some("bridge".into()),
            labels: Some(labels(&spec.name, "network")),
            ..Default::default()
        })
        .await
        .map_err(|e| engine_error(&format!("creating network {net}"), e))?;
    // One token for the whole cluster, chosen here so the host can talk to
    // the head; it travels in the environment, never on a command line.
    let token = auth::generate();
    let head = head_name(&spec.name);
    let mut head_cmd = vec![
        "start".to_string(),
        "--block".into(),
        "--head".into(),
        format!("--port={HEAD_PORT}"),
    ];
    head_cmd.extend(resource_args(spec));
    run_container(docker, spec, &head, "head", head_cmd, &token).await?;
    let head_ip = container_ip(docker, &head, &net).await?;
    let address = format!("{head_ip}:{HEAD_PORT}");
    // A node agent gives up when no head answers, so workers start once the
    // head (its etcd, service and own node) is up.
    wait_nodes(docker, spec, &address, &token, 1, started).await?;
    for i in 1..=spec.workers {
        let name = worker_name(&spec.name, i);
        let mut cmd = vec![
            "start".to_string(),
            "--block".into(),
            format!("--address={address}"),
        ];
        cmd.extend(resource_args(spec));
        run_container(docker, spec, &name, "worker", cmd, &token).await?;
    }
    let report = wait_nodes(docker, spec, &address, &token, spec.workers + 1, started).await?;
    Ok(status::render(&report, false))
}

fn resource_args(spec: &UpSpec) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(c) = spec.num_cpus {
        v.push(format!("--num-cpus={c}"));
    }
    if let Some(g) = spec.num_gpus {
        v.push(format!("--num-gpus={g}"));
    }
    v
}

async fn run_container(
    docker: &Docker,
    spec: &UpSpec,
    name: &str,
    role: &str,
    cmd: Vec<String>,
    token: &str,
) -> Result<()> {
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        entrypoint: Some(vec!["orchestrator".into()]),
        cmd: Some(cmd),
        env: Some(vec![format!("FLOTILLA_CLUSTER_TOKEN={token}")]),
        labels: Some(labels(&spec.name, role)),
        host_config: Some(HostConfig {
            network_mode: Some(network_name(&spec.name)),
            // Signals reach the orchestrator and its actors' zombies are reaped.
            init: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.to_string()),
                ..Default::default()
            }),
            body,
        )
        .await
        .map_err(|e| engine_error(&format!("creating container {name}"), e))?;
    docker
        .start_container(name, None)
        .await
        .map_err(|e| engine_error(&format!("starting container {name}"), e))
}

async fn container_ip(docker: &Docker, name: &str, net: &str) -> Result<String> {
    let c = docker
        .inspect_container(name, None)
        .await
        .map_err(|e| engine_error(&format!("inspecting container {name}"), e))?;
    c.network_settings
        .and_then(|s| s.networks)
        .and_then(|mut n| n.remove(net))
        .and_then(|e| e.ip_address)
        .filter(|ip| !ip.is_empty())
        .ok_or_else(|| Error::Docker(format!("container {name} has no address on network {net}")))
}

/// Polls the head until it lists `want` nodes; a container that stops on
/// the way ends the wait with its last log lines.
async fn wait_nodes(
    docker: &Docker,
    spec: &UpSpec,
    address: &str,
    token: &str,
    want: usize,
    started: Instant,
) -> Result<status::Report> {
    let deadline = started + spec.timeout;
    loop {
        for c in list_containers(docker, &spec.name).await? {
            if c.state != "running" && c.state != "created" {
                return Err(Error::Docker(format!(
                    "container {} is {}; its last lines:\n{}",
                    c.name,
                    c.state,
                    log_tail(docker, &c.name).await
                )));
            }
        }
        let last = match head_report(address, token).await {
            Ok(report) if report.active.len() >= want => return Ok(report),
            Ok(report) => format!("{} of {want} nodes joined", report.active.len()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            let head = head_name(&spec.name);
            return Err(Error::Timeout {
                what: format!(
                    "waiting for {want} nodes at the head {address} ({last}); {head}'s last lines:\n{}",
                    log_tail(docker, &head).await
                ),
                seconds: spec.timeout.as_secs_f64(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn head_report(address: &str, token: &str) -> Result<status::Report> {
    let mut c = client::connect_only(address, token, Duration::ZERO).await?;
    let r = c.status(StatusRequest {}).await?.into_inner();
    serde_json::from_str(&r.json).map_err(|source| Error::BadReply {
        what: "status report",
        source,
    })
}

async fn log_tail(docker: &Docker, name: &str) -> String {
    let mut s = docker.logs(
        name,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            tail: "20".into(),
            ..Default::default()
        }),
    );
    let mut out = String::new();
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(c) => out.push_str(&c.to_string()),
            Err(e) => {
                out.push_str(&format!("(reading the log failed: {e})"));
                break;
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct NodeContainer {
    pub name: String,
    pub role: String,
    pub state: String,
    pub ip: String,
}

async fn list_containers(docker: &Docker, cluster: &str) -> Result<Vec<NodeContainer>> {
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(cluster_filter(cluster)),
            ..Default::default()
        }))
        .await
        .map_err(|e| engine_error("listing containers", e))?;
    let mut out: Vec<NodeContainer> = list
        .into_iter()
        .map(|c| {
            let labels = c.labels.unwrap_or_default();
            NodeContainer {
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_string())
                    .or(c.id)
                    .unwrap_or_default(),
                role: labels.get(ROLE_LABEL).cloned().unwrap_or_default(),
                state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                ip: c
                    .network_settings
                    .and_then(|s| s.networks)
                    .and_then(|mut n| n.remove(&network_name(cluster)))
                    .and_then(|e| e.ip_address)
                    .unwrap_or_default(),
            }
        })
        .collect();
    // Head first, then workers in number order.
    out.sort_by_key(|c| {
        let n = c
            .name
            .rsplit_once("-worker-")
            .and_then(|(_, i)| i.parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        (c.role != "head", n, c.name.clone())
    });
    Ok(out)
}

/// Removes the containers and network labelled with `cluster`, and nothing
/// else; returns what it removed ("container X", "network Y").
pub async fn down(docker: &Docker, cluster: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for c in list_containers(docker, cluster).await? {
        match docker
            .remove_container(
                &c.name,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => removed.push(format!("container {}", c.name)),
            // Gone meanwhile (a concurrent `down`, or --rm): nothing to do.
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(engine_error(&format!("removing container {}", c.name), e)),
        }
    }
    let nets = docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(cluster_filter(cluster)),
        }))
        .await
        .map_err(|e| engine_error("listing networks", e))?;
    for n in nets {
        let Some(name) = n.name.or(n.id) else {
            continue;
        };
        match docker.remove_network(&name).await {
            Ok(()) => removed.push(format!("network {name}")),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(engine_error(&format!("removing network {name}"), e)),
        }
    }
    Ok(removed)
}

/// The cluster's containers (name, role, state, address), then the head's
/// `orchestrator status` when it answers.
pub async fn status_text(docker: &Docker, cluster: &str) -> Result<String> {
    let containers = list_containers(docker, cluster).await?;
    if containers.is_empty() {
        return Err(Error::Docker(format!(
            "no containers labelled {CLUSTER_LABEL}={cluster} on this engine (start them with `orchestrator docker up --name {cluster}`)"
        )));
    }
    let mut out = format!(
        "{:<32} {:<8} {:<10} {}\n",
        "CONTAINER", "ROLE", "STATE", "ADDRESS"
    );
    for c in &containers {
        out.push_str(&format!(
            "{:<32} {:<8} {:<10} {}\n",
            c.name,
            c.role,
            c.state,
            if c.ip.is_empty() { "-" } else { &c.ip }
        ));
    }
    let head = containers
        .iter()
        .find(|c| c.role == "head" && c.state == "running" && !c.ip.is_empty());
    let Some(head) = head else {
        out.push_str("\nthe head is not running: no cluster status\n");
        return Ok(out);
    };
    out.push('\n');
    let address = format!("{}:{HEAD_PORT}", head.ip);
    match head_token(docker, &head.name).await {
        Ok(token) => match head_report(&address, &token).await {
            Ok(r) => out.push_str(&status::render(&r, false)),
            Err(e) => out.push_str(&format!("the head at {address} does not answer: {e}\n")),
        },
        Err(e) => out.push_str(&format!("{e}\n")),
    }
    Ok(out)
}

/// The token `up` gave the head, from its container's environment: whoever
/// may use the engine can read it there anyway (docker inspect / exec).
async fn head_token(docker: &Docker, name: &str) -> Result<String> {
    let c = docker
        .inspect_container(name, None)
        .await
        .map_err(|e| engine_error(&format!("inspecting container {name}"), e))?;
    c.config
        .and_then(|c| c.env)
        .unwrap_or_default()
        .into_iter()
        .find_map(|kv| kv.strip_prefix("FLOTILLA_CLUSTER_TOKEN=").map(str::to_string))
        .ok_or_else(|| {
            Error::Docker(format!(
                "container {name} has no FLOTILLA_CLUSTER_TOKEN in its environment (not started by `orchestrator docker up`?)"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(head_name("flotilla"), "flotilla-head");
        assert_eq!(worker_name("flotilla", 2), "flotilla-worker-2");
        assert_eq!(network_name("c1"), "c1-net");
        assert!(validate_name("flotilla").is_ok());
        assert!(validate_name("a.b_c-1").is_ok());
        for bad in ["", "-x", "a b", "a/b", "ü"] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid --name:"), "{e}");
        }
    }

    #[tokio::test]
    async fn an_engine_that_is_not_there_is_named() {
        let e = connect(Some("unix:///nonexistent/docker.sock"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "cannot reach the Docker engine at unix:///nonexistent/docker.sock: /nonexistent/docker.sock does not exist"
            ),
            "{e}"
        );
        let e = connect(Some("ssh://host")).await.unwrap_err().to_string();
        assert!(e.contains("expected unix://PATH"), "{e}");
    }
}
