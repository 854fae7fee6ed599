"""The Helm chart charts/flotilla, checked offline: `helm lint`, `helm
template` with the default values and every file under charts/flotilla/ci/
validated strictly against the Kubernetes API schemas (kubernetes-validate),
what the rendered pods must carry, and values the chart's schema rejects.

No Kubernetes cluster runs here: nothing is installed, only rendered. helm
itself comes from scripts/get-helm.sh (or FLOTILLA_HELM); without it the
tests skip and say why."""

import glob
import os
import subprocess

import pytest
import yaml

from conftest import REPO

CHART = os.path.join(REPO, "charts", "flotilla")
CI_VALUES = sorted(glob.glob(os.path.join(CHART, "ci", "*.yaml")))
RELEASE, NAMESPACE = "flotilla", "serving"
# The brief's whole set-up: `helm install flotilla charts/flotilla --set ...`.
QUICKSTART = ["model.path=/models/llama", "workers.replicas=2", "workers.gpusPerNode=8"]
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the
# newest whose schemas kubernetes-validate ships.
OLDEST_KUBERNETES = "1.25"


@pytest.fixture(scope="module")
def helm():
    explicit = os.environ.get("FLOTILLA_HELM")
    if explicit:
        return explicit
    try:
        out = subprocess.run(["bash", os.path.join(REPO, "scripts", "get-helm.sh")],
                             capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"helm cannot be obtained (scripts/get-helm.sh: {e})")
    path = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode != 0 or not os.path.isfile(path):
        pytest.skip(f"helm cannot be obtained (scripts/get-helm.sh exited {out.returncode}: "
                    f"{out.stderr.strip()[-500:]})")
    return path


def run_helm(helm, *args):
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)


def template(helm, values_file=None, sets=()):
    """`helm template` as a list of resources; fails the test on an error."""
    args = ["template", RELEASE, CHART, "--namespace", NAMESPACE]
    if values_file:
        args += ["--values", values_file]
    for s in sets:
        args += ["--set", s]
    out = run_helm(helm, *args)
    assert out.returncode == 0, f"helm {' '.join(args)} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs, kind, name):
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name} not rendered once: {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return hits[0]


def pod_specs(docs):
    return {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
            for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


def container(docs, kind, name):
    return find(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


def serve_config(docs):
    return yaml.safe_load(find(docs, "ConfigMap", f"{RELEASE}-gateway")["data"]["serve.yaml"])


# Every value set the tests render: (id, values file, --set arguments).
VALUE_SETS = [("defaults", None, ["model.path=/models/llama"]), ("quickstart", None, QUICKSTART)] + [
    (os.path.basename(f)[: -len(".yaml")], f, []) for f in CI_VALUES]


@pytest.fixture(scope="module")
def rendered(helm):
    return {vid: template(helm, f, sets) for vid, f, sets in VALUE_SETS}


def test_ci_value_files_cover_cpu_gpu_and_external_etcd():
    names = {os.path.basename(f) for f in CI_VALUES}
    assert {"cpu-values.yaml", "gpu-values.yaml", "external-etcd-values.yaml"} <= names, names


@pytest.mark.parametrize("vid,values_file,sets", VALUE_SETS, ids=[v[0] for v in VALUE_SETS])
def test_helm_lint(helm, vid, values_file, sets):
    args = ["lint", "--strict", CHART]
    if values_file:
        args += ["--values", values_file]
    for s in sets:
        args += ["--set", s]
    out = run_helm(helm, *args)
    assert out.returncode == 0, out.stdout + out.stderr


def test_manifests_validate_strictly_against_kubernetes_schemas(rendered):
    import kubernetes_validate as kv  # scripts/requirements.txt: a missing one fails, never skips
    from kubernetes_validate import utils as kv_utils

    versions = [OLDEST_KUBERNETES, kv_utils.latest_version()]
    custom = {"monitoring.coreos.com/v1"}  # Prometheus Operator CRDs: no upstream schema
    for vid, docs in rendered.items():
        for d in docs:
            what = f"{vid}: {d['kind']}/{d['metadata']['name']}"
            if d["apiVersion"] in custom:
                assert d["kind"] == "ServiceMonitor", what
                continue
            for v in versions:
                try:
                    kv.validate(d, v, strict=True)
                except kv.ValidationError as e:
                    path = ".".join(str(p) for p in e.path)
                    pytest.fail(f"{what} is invalid for Kubernetes {v} at {path}: {e.message}")


def test_strict_validation_rejects_unknown_fields(rendered):
    """The check above is only worth something if a typo fails it."""
    import kubernetes_validate as kv

    gateway = find(rendered["defaults"], "Deployment", f"{RELEASE}-gateway")
    bad = yaml.safe_load(yaml.safe_dump(gateway))
    bad["spec"]["template"]["spec"]["enableServicelinks"] = False
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, OLDEST_KUBERNETES, strict=True)


def test_every_pod_disables_service_links(rendered):
    # Kubernetes would inject <SERVICE>_PORT variables; a Service named vllm
    # sets VLLM_PORT, which the workers read as their first internal port.
    for vid, docs in rendered.items():
        for name, spec in pod_specs(docs).items():
            assert spec.get("enableServiceLinks") is False, f"{vid}: {name}"


def test_cluster_token_reaches_every_orchestrator_and_gateway_pod(rendered):
    for vid, docs in rendered.items():
        secrets = [d for d in docs if d["kind"] == "Secret"]
        if vid == "external-etcd-values":
            token_secret = "flotilla-token"  # clusterToken.existingSecret
            assert not secrets
        else:
            token_secret = f"{RELEASE}-cluster-token"
            assert [s["metadata"]["name"] for s in secrets] == [token_secret]
        for kind, name in [("Deployment", f"{RELEASE}-head"), ("StatefulSet", f"{RELEASE}-worker"),
                           ("Deployment", f"{RELEASE}-gateway")]:
            env = env_of(container(docs, kind, name))
            ref = env["FLOTILLA_CLUSTER_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": token_secret, "key": "token"}, f"{vid}: {name}"
            assert env["VLLM_HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_generated_token_and_given_token(helm, rendered):
    import base64

    secret = find(rendered["defaults"], "Secret", f"{RELEASE}-cluster-token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 48 and token.isalnum(), token
    docs = template(helm, sets=["model.path=/models/llama", "clusterToken.value=s3cret-token"])
    secret = find(docs, "Secret", f"{RELEASE}-cluster-token")
    assert base64.b64decode(secret["data"]["token"]).decode() == "s3cret-token"


def test_gpu_workers_request_their_gpus_and_get_a_memory_shm(rendered):
    for vid, gpus in [("quickstart", 8), ("gpu-values", 8), ("external-etcd-values", 1), ("cpu-values", 0)]:
        docs = rendered[vid]
        agent = container(docs, "StatefulSet", f"{RELEASE}-worker")
        limits = agent.get("resources", {}).get("limits", {})
        if gpus:
            assert limits["nvidia.com/gpu"] == gpus, vid
        else:
            assert "nvidia.com/gpu" not in limits, vid
        assert f"--num-gpus={gpus}" in agent["args"], vid
        assert f"--address={RELEASE}-head:6379" in agent["args"], vid
        spec = find(docs, "StatefulSet", f"{RELEASE}-worker")["spec"]["template"]["spec"]
        shm = [m for m in agent["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(shm) == 1, vid
        vol = next(v for v in spec["volumes"] if v["name"] == shm[0]["name"])
        assert vol["emptyDir"]["medium"] == "Memory", vid
    # The user's own limits stay beside the GPUs.
    gpu = container(rendered["gpu-values"], "StatefulSet", f"{RELEASE}-worker")
    assert gpu["resources"]["limits"] == {"nvidia.com/gpu": 8, "memory": "512Gi"}
    assert find(rendered["quickstart"], "StatefulSet", f"{RELEASE}-worker")["spec"]["replicas"] == 2


def test_model_volume_is_mounted_at_the_same_path_in_gateway_and_workers(rendered):
    for vid, source in [("defaults", "hostPath"), ("gpu-values", "persistentVolumeClaim")]:
        docs = rendered[vid]
        for kind, name in [("StatefulSet", f"{RELEASE}-worker"), ("Deployment", f"{RELEASE}-gateway")]:
            spec = find(docs, kind, name)["spec"]["template"]["spec"]
            mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model")
            assert mount["mountPath"] == "/models" and mount["readOnly"], f"{vid}: {name}"
            vol = next(v for v in spec["volumes"] if v["name"] == "model")
            assert source in vol, f"{vid}: {name}: {vol}"
    vol = next(v for v in pod_specs(rendered["gpu-values"])[f"StatefulSet/{RELEASE}-worker"]["volumes"]
               if v["name"] == "model")
    assert vol["persistentVolumeClaim"]["claimName"] == "models"


def test_gateway_probes_health(rendered):
    for vid, docs in rendered.items():
        gw = container(docs, "Deployment", f"{RELEASE}-gateway")
        assert gw["startupProbe"]["httpGet"]["path"] == "/health", vid
        assert gw["readinessProbe"]["httpGet"]["path"] == "/health", vid
        assert gw["livenessProbe"]["httpGet"]["port"] == "http", vid
        # Startup allows the placement group's 30-minute wait for GPUs.
        p = gw["startupProbe"]
        assert p["periodSeconds"] * p["failureThreshold"] >= 1800, vid
        assert gw["ports"] == [{"name": "http", "containerPort": 8000}]
        svc = find(docs, "Service", f"{RELEASE}-gateway")
        assert svc["spec"]["ports"][0]["port"] == 8000


def test_serve_config_carries_model_and_parallel_sizes(rendered):
    # The quick start: tensor parallel inside a node, one stage per node.
    cfg = serve_config(rendered["quickstart"])
    assert cfg == {"model": "/models/llama", "host": "0.0.0.0", "port": 8000,
                   "tensor-parallel-size": 8, "pipeline-parallel-size": 2,
                   "distributed-executor-backend": "ray", "device": "cuda"}
    cfg = serve_config(rendered["gpu-values"])
    assert (cfg["model"], cfg["tensor-parallel-size"], cfg["pipeline-parallel-size"]) == (
        "/models/llama/Llama-3.1-70B-Instruct", 8, 2)
    gw = container(rendered["gpu-values"], "Deployment", f"{RELEASE}-gateway")
    assert gw["args"] == ["serve", "--config=/etc/flotilla/serve.yaml", "--max-num-seqs=128"]
    mount = next(m for m in gw["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/flotilla"
    assert env_of(gw)["FLOTILLA_ADDRESS"]["value"] == f"{RELEASE}-head:6379"

    cfg = serve_config(rendered["cpu-values"])
    assert cfg["device"] == "cpu" and cfg["distributed-executor-backend"] == "ray"
    assert (cfg["tensor-parallel-size"], cfg["pipeline-parallel-size"]) == (1, 2)
    assert cfg["served-model-name"] == ["smollm2", "default"]
    assert cfg["max-model-len"] == 2048 and cfg["enable-prefix-caching"] is True
    # The API key comes from its Secret, under a name not copied to workers.
    gw = container(rendered["cpu-values"], "Deployment", f"{RELEASE}-gateway")
    assert "--api-key=$(GATEWAY_API_KEY)" in gw["args"]
    ref = env_of(gw)["GATEWAY_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "flotilla-api-key", "key": "api-key"}
    assert "VLLM_API_KEY" not in env_of(gw)
    # Without a key, no flag.
    gw = container(rendered["quickstart"], "Deployment", f"{RELEASE}-gateway")
    assert gw["args"] == ["serve", "--config=/etc/flotilla/serve.yaml"]


def test_three_etcd_members_with_stable_peer_urls(rendered):
    for vid in ["defaults", "quickstart", "cpu-values", "gpu-values"]:
        docs = rendered[vid]
        sts = find(docs, "StatefulSet", f"{RELEASE}-etcd")
        assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
        svc = find(docs, "Service", f"{RELEASE}-etcd")
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
        domain = f"{RELEASE}-etcd.{NAMESPACE}.svc.cluster.local"
        args = dict(a.split("=", 1) for a in sts["spec"]["template"]["spec"]["containers"][0]["args"])
        assert args["--initial-cluster"] == ",".join(
            f"{RELEASE}-etcd-{i}=http://{RELEASE}-etcd-{i}.{domain}:2380" for i in range(3))
        assert args["--initial-advertise-peer-urls"] == f"http://$(POD_NAME).{domain}:2380"
        assert args["--name"] == "$(POD_NAME)"
        # The heads dial every member by name.
        head = container(docs, "Deployment", f"{RELEASE}-head")
        assert f"--etcd-endpoints=" + ",".join(
            f"http://{RELEASE}-etcd-{i}.{domain}:2379" for i in range(3)) in head["args"]
        pdb = find(docs, "PodDisruptionBudget", f"{RELEASE}-etcd")
        assert pdb["spec"]["minAvailable"] == 2
        has_claims = "volumeClaimTemplates" in sts["spec"]
        assert has_claims == (vid != "cpu-values"), vid


@pytest.mark.parametrize("members,quorum", [(1, None), (5, 3)])
def test_etcd_member_count_follows_the_value(helm, members, quorum):
    docs = template(helm, sets=["model.path=/models/llama", f"etcd.replicas={members}"])
    sts = find(docs, "StatefulSet", f"{RELEASE}-etcd")
    assert sts["spec"]["replicas"] == members
    args = dict(a.split("=", 1) for a in sts["spec"]["template"]["spec"]["containers"][0]["args"])
    assert len(args["--initial-cluster"].split(",")) == members
    head = container(docs, "Deployment", f"{RELEASE}-head")
    endpoints = next(a for a in head["args"] if a.startswith("--etcd-endpoints="))
    assert len(endpoints.split(",")) == members
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == f"{RELEASE}-etcd"]
    # One member has no quorum to protect: a budget would only block drains.
    assert [p["spec"]["minAvailable"] for p in pdbs] == ([quorum] if quorum else [])


def test_two_heads_behind_one_service(rendered):
    docs = rendered["defaults"]
    dep = find(docs, "Deployment", f"{RELEASE}-head")
    assert dep["spec"]["replicas"] == 2
    svc = find(docs, "Service", f"{RELEASE}-head")
    assert svc["spec"]["ports"][0]["port"] == 6379
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["start", "--head", "--block"]
    assert "--num-gpus=0" in args and "--num-cpus=0" in args
    assert find(docs, "PodDisruptionBudget", f"{RELEASE}-head")["spec"]["minAvailable"] == 1


def test_pods_wait_for_what_they_dial(helm, rendered):
    def waits(docs, kind, name):
        inits = find(docs, kind, name)["spec"]["template"]["spec"].get("initContainers", [])
        return [a for c in inits for a in c["command"][4:]]

    docs = rendered["defaults"]
    domain = f"{RELEASE}-etcd.{NAMESPACE}.svc.cluster.local"
    assert waits(docs, "Deployment", f"{RELEASE}-head") == [f"{RELEASE}-etcd-{i}.{domain}:2379" for i in range(3)]
    for kind, name in [("StatefulSet", f"{RELEASE}-worker"), ("Deployment", f"{RELEASE}-gateway")]:
        assert waits(docs, kind, name) == [f"{RELEASE}-head:6379"], name
    assert waits(rendered["external-etcd-values"], "Deployment", f"{RELEASE}-head") == [
        f"etcd-{x}.example.internal:2379" for x in "abc"]
    docs = template(helm, sets=["model.path=/models/llama", "waitForDependencies=false"])
    assert not any("initContainers" in spec for spec in pod_specs(docs).values())


def test_external_etcd(rendered):
    docs = rendered["external-etcd-values"]
    assert not [d for d in docs if d["metadata"]["name"] == f"{RELEASE}-etcd"]
    head = container(docs, "Deployment", f"{RELEASE}-head")
    assert ("--etcd-endpoints=https://etcd-a.example.internal:2379,https://etcd-b.example.internal:2379,"
            "https://etcd-c.example.internal:2379") in head["args"]
    assert "--cluster-name=prod" in head["args"]
    # Heads and node agents both dial etcd, each with its own TLS flags.
    for kind, name in [("Deployment", f"{RELEASE}-head"), ("StatefulSet", f"{RELEASE}-worker")]:
        c = container(docs, kind, name)
        for flag in ["--etcd-cacert=/etc/flotilla/etcd-tls/ca.crt", "--etcd-cert=/etc/flotilla/etcd-tls/tls.crt",
                     "--etcd-key=/etc/flotilla/etcd-tls/tls.key"]:
            assert flag in c["args"], f"{name}: {flag}"
        assert any(m["mountPath"] == "/etc/flotilla/etcd-tls" for m in c["volumeMounts"]), name
        vols = find(docs, kind, name)["spec"]["template"]["spec"]["volumes"]
        assert {"name": "etcd-tls", "secret": {"secretName": "etcd-client-tls"}} in vols, name
        env = env_of(c)
        assert env["FLOTILLA_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "etcd-auth", "key": "password"}
    # The gateway never dials etcd: no credentials there.
    assert "FLOTILLA_ETCD_PASSWORD" not in env_of(container(docs, "Deployment", f"{RELEASE}-gateway"))


def test_service_monitor_scrapes_gateway_metrics(rendered):
    assert not [d for d in rendered["defaults"] if d["kind"] == "ServiceMonitor"]
    sm = find(rendered["gpu-values"], "ServiceMonitor", f"{RELEASE}-gateway")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    svc = find(rendered["gpu-values"], "Service", f"{RELEASE}-gateway")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


def test_notes_tell_how_to_reach_the_api(helm):
    out = run_helm(helm, "install", RELEASE, CHART, "--dry-run=client", "--namespace", NAMESPACE,
                   *sum((["--set", s] for s in QUICKSTART), []))
    assert out.returncode == 0, out.stderr
    notes = out.stdout[out.stdout.index("NOTES:"):]
    assert f"port-forward service/{RELEASE}-gateway 8000:8000" in notes
    assert 'OpenAI(base_url="http://localhost:8000/v1"' in notes
    assert 'model="/models/llama"' in notes


BAD_VALUES = [
    (["workers.replicas=-1"], "/workers/replicas': minimum: got -1, want 0"),
    (["heads.replicas=0"], "/heads/replicas': minimum: got 0, want 1"),
    (["replicas=2"], "additional properties 'replicas' not allowed"),
    (["workers.gpusPerNode=eight"], "/workers/gpusPerNode': got string, want integer"),
    (["workers.gpuPerNode=8"], "additional properties 'gpuPerNode' not allowed"),
    (["etcd.replicas=2"], "/etcd/replicas'"),
    (["model.volume.type=nfs"], "/model/volume/type'"),
    (["gateway.service.port=70000"], "/gateway/service/port'"),
    (["model.path="], "model.path is required"),
    (["model.path=/data/llama"], "model.path /data/llama must lie under model.volume.mountPath /models"),
    (["model.path=/models/llama", "workers.gpusPerNode=8", "model.tensorParallelSize=16"],
     "need 16 GPUs, but workers.replicas x workers.gpusPerNode offer 8"),
    (["model.path=/models/llama", "gateway.config.tensor-parallel-size=2"],
     "gateway.config.tensor-parallel-size is set by the chart"),
    (["model.path=/models/llama", "etcd.enabled=false"], "etcd.enabled=false needs etcd.external.endpoints"),
    (["etcd.external.endpoints={https://etcd.example}"], "/etcd/external/endpoints/0'"),
    (["model.path=/models/llama", "model.volume.type=persistentVolumeClaim"], "model.volume.claimName is needed"),
]


@pytest.mark.parametrize("sets,message", BAD_VALUES, ids=[" ".join(s) for s, _ in BAD_VALUES])
def test_bad_values_are_rejected_with_a_clear_message(helm, sets, message):
    if not any(s.startswith("model.path") for s in sets):
        sets = ["model.path=/models/llama", *sets]
    args = ["template", RELEASE, CHART]
    for s in sets:
        args += ["--set", s]
    out = run_helm(helm, *args)
    assert out.returncode != 0, f"helm template accepted {sets}"
    assert message in out.stderr, out.stderr
