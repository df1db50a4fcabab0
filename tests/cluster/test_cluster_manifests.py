"""cluster/kuberay/*, security scans over all of cluster/, README commands (the image recipe and the
cost estimate: test_cluster_image.py).

The KubeRay RayCluster specs go through Ray's ``_derive_autoscaling_config_from_ray_cr``,
the translation the in-tree KubeRay autoscaler applies to the custom resource (it
validates the result with the autoscaler schema), plus the fields the operator needs.
Security scans: nothing open to the world, no token or key literals, ClusterIP only.
Every ``python -m pipelines...`` command of the README and the RayJob is parsed and built
by the pipeline's own code.
"""
from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
PART_OF = ("app.kubernetes.io/part-of", "dino-scale")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DATA_MOUNT = "/mnt/dino-data"


def _gpu_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if v["resources"].get("GPU", 0) > 0}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_kuberay_docs() -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)]


def _cluster_specs() -> list[tuple[str, dict, dict]]:
    """(label, metadata, RayCluster spec) for the RayCluster and the RayJob's cluster."""
    out = []
    for doc in _all_kuberay_docs():
        if doc["kind"] == "RayCluster":
            out.append(("RayCluster", doc["metadata"], doc["spec"]))
        elif doc["kind"] == "RayJob":
            out.append(("RayJob", doc["metadata"], doc["spec"]["rayClusterSpec"]))
    return out


def _text_files() -> list[Path]:
    return [p for p in sorted(CLUSTER.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]


# ------------------------------------------------------------------ security scans

def _config_lines(path: Path):
    """Non-comment content of config-like files (YAML, JSON, shell, Dockerfile)."""
    if path.suffix not in (".yaml", ".yml", ".json", ".sh") and not path.name.startswith("Dockerfile"):
        return
    for i, line in enumerate(path.read_text().splitlines(), 1):
        code = line if path.suffix == ".json" else line.split(" #")[0]
        if not code.lstrip().startswith("#"):
            yield i, code


def _open_to_the_world(path: Path) -> list[tuple[int, str]]:
    """(line, CIDR) of each world-open CIDR in the non-comment content of ``path``."""
    return [(i, cidr) for i, code in _config_lines(path) for cidr in ("0.0.0.0/0", "::/0") if cidr in code]


def test_cluster_nothing_is_open_to_the_world():
    files = [p for p in _text_files() if list(_config_lines(p))]
    assert len(files) >= 8  # aws, gcp, 3 kuberay, Dockerfile, 2 setup scripts, policies
    for path in files:
        assert not _open_to_the_world(path), f"{path.relative_to(ROOT)} opens {_open_to_the_world(path)}"
    for doc in _all_kuberay_docs():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert doc["kind"] not in ("Ingress", "Gateway", "HTTPRoute", "Route")
    for label, _, spec in _cluster_specs():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", label


SECRET_PATTERNS = [
    (re.compile(r"AKIA[0-9A-Z]{16}"), "AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "private key"),
    (re.compile(r"RAY_AUTH_TOKEN(?!_PATH)\s*[=:]\s*['\"]?[A-Za-z0-9_\-]{6,}"), "Ray token literal"),
    (re.compile(r"\b[0-9a-fA-F]{32,}\b"), "long hex string (token?)"),
    (re.compile(r"(?i)(password|secret[_-]?key|api[_-]?key)\s*[=:]\s*['\"]?[A-Za-z0-9/+_\-]{8,}"), "credential"),
]


def test_cluster_no_token_or_key_literals():
    readme = CLUSTER / "README.md"
    for path in _text_files():
        text = path.read_text()
        for pattern, what in SECRET_PATTERNS:
            m = pattern.search(text)
            assert m is None, f"{path.relative_to(ROOT)}: {what}: {m.group(0)[:20]}..."
    assert readme.is_file()
    # No Kubernetes Secret with content in the manifests: the token Secret is made by hand.
    for doc in _all_kuberay_docs():
        assert doc["kind"] != "Secret", "secrets must not live in manifests"
        assert "auth_token" not in json.dumps(doc)


def test_cluster_security_test_catches_bad_configs(tmp_path):
    """The scans above do fail on the mistakes they guard against."""
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("# CidrIp: 0.0.0.0/0 in a comment is fine\n"
                         "IpRanges: [{CidrIp: 0.0.0.0/0}]\n"
                         "Ipv6Ranges: [{CidrIpv6: ::/0}]  # and a comment after it\n"
                         "ports: [22]  # 0.0.0.0/0 only in this comment\n")
    assert _open_to_the_world(yaml_file) == [(2, "0.0.0.0/0"), (3, "::/0")]
    bad = {
        "token": "env: {RAY_AUTH_TOKEN: 'a1b2c3d4e5f6'}",
        "hex": "token: 3f1c9a7be2d84f6a9c0b1d2e3f4a5b6c",
    }
    hits = {k: any(p.search(v) for p, _ in SECRET_PATTERNS) for k, v in bad.items()}
    assert all(hits.values()), hits
    assert not any(p.search("--env RAY_AUTH_TOKEN_PATH=/run/secrets/ray/auth_token") for p, _ in SECRET_PATTERNS)


# ------------------------------------------------------------------ KubeRay

def _pod_templates(spec: dict) -> list[tuple[str, dict]]:
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    return out


def test_cluster_kuberay_manifests_carry_operator_fields():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    specs = _cluster_specs()
    assert [s[0] for s in specs] == ["RayCluster", "RayJob"]
    images = set()
    for label, meta, spec in specs:
        assert meta["name"] and meta["namespace"] == "dino-scale"
        assert spec["enableInTreeAutoscaling"] is True, label
        assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
        assert spec["rayVersion"].startswith("2.")
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict) and head["rayStartParams"]["num-cpus"] == "0"
        names = [g["groupName"] for g in spec["workerGroupSpecs"]]
        assert len(set(names)) == len(names) and all(DNS_LABEL.match(n) and len(n) <= 63 for n in names)
        for g in spec["workerGroupSpecs"]:
            assert g["minReplicas"] == 0 <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] >= 8
            assert all(isinstance(v, str) for v in g["rayStartParams"].values())
            res = g["template"]["spec"]["containers"][0]["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8"
        for _, tmpl in _pod_templates(spec):
            (container,) = tmpl["spec"]["containers"]
            images.add(container["image"])
        # The translation the in-tree autoscaler applies to this CR (validates with Ray's schema).
        auto = _derive_autoscaling_config_from_ray_cr({"metadata": meta, "spec": spec})
        gpu_types = _gpu_types(auto)
        assert set(gpu_types) == set(names)
        markets = set()
        for name, t in gpu_types.items():
            assert t["resources"]["GPU"] == 8 and t["min_workers"] == 0 and t["max_workers"] >= 8
            markets |= {m for m in ("gpu_spot", "gpu_ondemand") if t["resources"].get(m) == 8}
        assert markets == {"gpu_spot", "gpu_ondemand"}
        assert auto["available_node_types"]["headgroup"]["resources"]["CPU"] == 0
    (image,) = images
    assert image.endswith("/dino-scale:0.1.0")


def test_cluster_kuberay_auth_network_policy_and_identity():
    docs = {d["kind"]: d for d in _docs(KUBERAY / "common.yaml")}
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == dict([PART_OF])
    assert "Ingress" in policy["policyTypes"]
    assert "ipBlock" not in json.dumps(policy)
    sa = docs["ServiceAccount"]
    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].startswith("dino-scale-worker@")
    for label, _, spec in _cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": "dino-scale-ray-token"}, label
        for group, tmpl in _pod_templates(spec):
            assert tmpl["metadata"]["labels"][PART_OF[0]] == PART_OF[1], (label, group)
            assert tmpl["spec"]["serviceAccountName"] == sa["metadata"]["name"]
            assert tmpl["spec"]["securityContext"]["runAsNonRoot"] is True
            for c in tmpl["spec"]["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                for env in c.get("env", []):
                    assert env["name"] not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE"), "authOptions sets these"
    for label, _, spec in _cluster_specs():
        for group, tmpl in _pod_templates(spec):
            vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
            mounts = {m["mountPath"]: m for m in tmpl["spec"]["containers"][0]["volumeMounts"]}
            assert mounts[DATA_MOUNT]["readOnly"] is True, (label, group)
            data = vols[mounts[DATA_MOUNT]["name"]]["csi"]
            assert data["readOnly"] is True and data["volumeAttributes"]["bucketName"] == "my-dino-bucket"
    job = next(d for d in _docs(KUBERAY / "rayjob.yaml") if d["kind"] == "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # the job pins its workers (train.worker_resources) to what every GPU worker group advertises
    pins = [a.split("=", 1)[1] for a in job["spec"]["entrypoint"].split() if a.startswith("train.worker_resources=")]
    assert pins == ["gpu_h100"]
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        advertised = json.loads(json.loads(group["rayStartParams"]["resources"]))
        assert all(name in advertised for name in pins[0].split(",")), group["groupName"]
    assert job["spec"]["submitterPodTemplate"]["metadata"]["labels"][PART_OF[0]] == PART_OF[1]


def test_cluster_kuberay_autoscaler_gets_its_kubernetes_token():
    """The in-tree autoscaler (a sidecar of the head pod) reads the pod's ServiceAccount token
    to scale the worker groups; without it every API call fails and the groups stay at 0 pods.
    The account turns token mounting off, so the head pod must turn it back on; workers and
    the RayJob submitter need no Kubernetes API and stay without one."""
    from ray.autoscaler._private.kuberay import node_provider

    # What the sidecar opens (no client certificate configured): the projected token.
    assert node_provider.IN_CLUSTER_TOKEN_PATH == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    sa = next(d for d in _docs(KUBERAY / "common.yaml") if d["kind"] == "ServiceAccount")
    sa_default = sa.get("automountServiceAccountToken", True)

    def mounted(pod_spec: dict) -> bool:  # Kubernetes: the pod's field wins over the account's
        return pod_spec.get("automountServiceAccountToken", sa_default)

    for label, _, spec in _cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True
        assert mounted(spec["headGroupSpec"]["template"]["spec"]), f"{label}: autoscaler has no token"
        for g in spec["workerGroupSpecs"]:
            assert not mounted(g["template"]["spec"]), (label, g["groupName"])
    job = next(d for d in _docs(KUBERAY / "rayjob.yaml") if d["kind"] == "RayJob")
    assert not mounted(job["spec"]["submitterPodTemplate"]["spec"])


# ------------------------------------------------------------------ commands vs the pipelines CLI

def _bash_blocks(path: Path) -> list[str]:
    """The ```bash blocks of the markdown file ``path``, line continuations joined."""
    return [b.replace("\\\n", " ") for b in re.findall(r"(?ms)^```bash\n(.*?)^```", path.read_text())]


def _commands_in(texts: list[str]) -> list[tuple[str, list[str]]]:
    """(module, argv) of every `python -m pipelines.X ...` line of ``texts`` (shell comments cut)."""
    out = []
    for text in texts:
        for line in text.splitlines():
            if "python -m pipelines." not in line:
                continue
            argv = shlex.split(line[line.index("python -m pipelines."):].split("`")[0], comments=True)
            out.append((argv[2], argv[3:]))
    return out


def _pipeline_commands() -> list[tuple[str, list[str]]]:
    """Every `python -m pipelines.X ...` in the README's bash blocks (continuations joined)
    and the RayJob entrypoint, as (module, argv)."""
    job = next(d for d in _docs(KUBERAY / "rayjob.yaml") if d["kind"] == "RayJob")
    return _commands_in(_bash_blocks(CLUSTER / "README.md") + [job["spec"]["entrypoint"]])


def test_cluster_commands_parse_with_the_pipeline_cli(monkeypatch):
    from dino_scale.engine.trainer import worker_count
    from pipelines import _common as common

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # jobs on a cluster: `ray job submit` sets it

    commands = _pipeline_commands()
    modules = {m for m, _ in commands}
    assert len(commands) >= 5  # README: pretrain x2, fine-tune x2; the RayJob entrypoint
    assert {"pipelines.pretrain_o365", "pipelines.finetune_coco"} <= modules
    for module, argv in commands:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # a command naming a pipeline that does not exist is a broken doc
                pytest.fail(f"cluster command runs {module}, which does not exist: {' '.join(argv)}")
            raise
        args = mod.build_parser().parse_args(argv)
        assert args.preset, f"{module}: name the preset explicitly on a cluster"
        # What the pipeline checks up front and builds (preset + --set + flags); unknown keys
        # raise ConfigError, and the engine's check that the global batch divides over the
        # workers must pass.
        common.validate_config_args(args)
        cfg = common.build_config(args)
        assert worker_count(cfg) == cfg.train.num_workers and cfg.train.use_gpu, module
        storage = [o.split("=", 1)[1] for o in args.overrides if o.startswith("train.storage_path=")]
        assert storage and storage[0].startswith(("s3://", "gs://")), f"{module}: checkpoints to object storage"
        # Data: the bucket's datasets/ prefix, mounted read-only at DATA_MOUNT on every node.
        assert args.data and args.data.startswith(DATA_MOUNT + "/"), f"{module}: data from the bucket mount"


def test_cluster_o365_recipe_trains_on_train_and_val_minus_5k():
    # The paper recipe (26 O365 epochs) trains on the train set plus the val images after the
    # first 5k (prepare-data --o365-val-split 5000 writes them to <out>/train_extra) and validates
    # on those 5k. A folder given as --data takes only its train/ and val/: the recipe commands
    # used to drop train_extra silently.
    full = [(m, argv) for m, argv in _pipeline_commands()
            if m == "pipelines.pretrain_o365" and "--epochs" in argv and argv[argv.index("--epochs") + 1] == "26"]
    assert len(full) >= 2  # cluster/README.md and the RayJob
    for module, argv in full:
        args = importlib.import_module(module).build_parser().parse_args(argv)
        parts = {Path(part).name for part in args.data.split(",")}
        assert parts == {"train", "train_extra"}, args.data
        assert args.val_data and Path(args.val_data).name == "val", args.val_data


def _excludes_spot_nodes(pod_spec: dict) -> bool:
    """Whether the pod can only be scheduled on nodes without GKE's Spot label (a required node
    affinity term set in which every term says cloud.google.com/gke-spot DoesNotExist / NotIn true)."""
    terms = (pod_spec.get("affinity", {}).get("nodeAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))

    def excludes(term: dict) -> bool:
        return any(e.get("key") == "cloud.google.com/gke-spot" and (
            e.get("operator") == "DoesNotExist" or (e.get("operator") == "NotIn" and "true" in e.get("values", [])))
            for e in term.get("matchExpressions", []))

    return bool(terms) and all(excludes(t) for t in terms)


def test_cluster_kuberay_on_demand_groups_stay_off_spot_nodes():
    """The on-demand groups' nodeSelector (H100, a3) matched the Spot node pool as well: GKE
    labels Spot nodes cloud.google.com/gke-spot=true but taints a Standard node pool only when
    asked, so a pod advertising gpu_ondemand could be placed on (or scale up) a Spot VM and be
    preempted, and pinning a run to on-demand (README: maxReplicas 0 on the Spot group) did not
    hold. Every group advertising gpu_ondemand must require nodes without the Spot label; every
    gpu_spot group selects them."""
    seen = set()
    for label, _, spec in _cluster_specs():
        for g in spec["workerGroupSpecs"]:
            market = next(m for m in ("gpu_spot", "gpu_ondemand") if m in g["rayStartParams"]["resources"])
            pod = g["template"]["spec"]
            seen.add(market)
            if market == "gpu_spot":
                assert pod["nodeSelector"].get("cloud.google.com/gke-spot") == "true", (label, g["groupName"])
            else:
                assert "cloud.google.com/gke-spot" not in pod.get("nodeSelector", {}), (label, g["groupName"])
                assert _excludes_spot_nodes(pod), (label, g["groupName"])
    assert seen == {"gpu_spot", "gpu_ondemand"}
