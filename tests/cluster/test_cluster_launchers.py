"""cluster/aws.yaml, cluster/gcp.yaml and the AWS IAM policies.

The launcher YAMLs go through Ray's own autoscaler code: ``prepare_config`` (defaults
filled from the provider's defaults.yaml) and ``validate_config`` (ray-schema.json).
Then what the recipe needs (GPU types from 0, spot as separate types, prebuilt image,
no setup) and security (token auth on, dashboard on loopback, own security groups /
subnets / identities, least-privilege IAM).
"""
from __future__ import annotations

import copy
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
LAUNCHERS = ["aws", "gcp"]
DATA_MOUNT = "/mnt/dino-data"


def _raw(name: str) -> dict:
    return yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())


def _prepared(name: str) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(_raw(name)))
    validate_config(cfg)
    return cfg


def _gpu_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if v["resources"].get("GPU", 0) > 0}


# ------------------------------------------------------------------ launcher YAMLs

@pytest.mark.parametrize("name", LAUNCHERS)
def test_cluster_launcher_yaml_passes_ray_validation(name):
    cfg = _prepared(name)
    assert cfg["provider"]["type"] == name
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    # CPU-only head that runs no training.
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    assert head["resources"].get("CPU") == 0
    gpus = _gpu_types(cfg)
    assert gpus, "no GPU worker types"
    for tname, t in gpus.items():
        assert t["min_workers"] == 0, f"{tname} must scale from zero"
        assert t["resources"]["GPU"] == 8 and t["max_workers"] >= 8, tname
    # 64 GPUs (8 nodes) must fit under the global cap.
    assert cfg["max_workers"] >= 8


def test_cluster_aws_offers_p5_and_p4d_on_demand_and_spot():
    cfg = _prepared("aws")
    assert cfg["provider"]["cache_stopped_nodes"] is False
    seen = {}
    for tname, t in _gpu_types(cfg).items():
        nc = t["node_config"]
        spot = nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        seen[(nc["InstanceType"], spot)] = tname
        assert t["resources"].get("gpu_spot" if spot else "gpu_ondemand") == 8, tname
        assert "gpu_ondemand" not in t["resources"] if spot else "gpu_spot" not in t["resources"]
        assert t["resources"]["CPU"] == {"p5.48xlarge": 192, "p4d.24xlarge": 96}[nc["InstanceType"]]
    assert set(seen) == {("p5.48xlarge", False), ("p5.48xlarge", True),
                         ("p4d.24xlarge", False), ("p4d.24xlarge", True)}


def test_cluster_gcp_offers_a3_on_demand_and_spot():
    cfg = _prepared("gcp")
    markets = {}
    for tname, t in _gpu_types(cfg).items():
        nc = t["node_config"]
        assert nc["machineType"] == "a3-highgpu-8g"
        assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE"
        spot = nc["scheduling"].get("provisioningModel") == "SPOT"
        markets[spot] = tname
        assert t["resources"].get("gpu_spot" if spot else "gpu_ondemand") == 8, tname
    assert set(markets) == {True, False}


def _nodes_launched_for(cfg: dict, worker: dict, workers: int) -> dict:
    """The node types Ray's autoscaler (its resource demand scheduler, default scorer) launches
    for ``workers`` Ray Train workers asking ``worker`` each, on an empty cluster."""
    from ray.autoscaler._private import resource_demand_scheduler as rds
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary

    summary = NodeAvailabilitySummary(node_availabilities={})

    def scorer(resources, demands, node_type):
        return rds._default_utilization_scorer(resources, demands, node_type, node_availability_summary=summary)

    head = cfg["head_node_type"]
    launch, unfulfilled = rds.get_nodes_for(cfg["available_node_types"], {head: 1}, head, 100,
                                            [dict(worker) for _ in range(workers)], scorer)
    assert not unfulfilled
    return dict(launch)


@pytest.mark.parametrize("name, pinned, expected", [
    ("aws", ["gpu_h100"], {"gpu.p5.ondemand", "gpu.p5.spot"}),
    ("aws", ["gpu_h100", "gpu_ondemand"], {"gpu.p5.ondemand"}),
    ("aws", ["gpu_h100", "gpu_spot"], {"gpu.p5.spot"}),
    ("gcp", ["gpu_ondemand"], {"gpu_a3_ondemand"}),
    ("gcp", ["gpu_spot"], {"gpu_a3_spot"}),
])
def test_cluster_worker_resources_pin_the_node_type_the_autoscaler_launches(name, pinned, expected):
    """``train.worker_resources`` reaches each worker's request, and Ray's own scheduler then
    launches only the pinned type: 64 workers -> 8 nodes. A plain GPU request scores p4d (A100,
    96 CPUs) above p5 (H100, 192 CPUs) and spot above on-demand: the recipe's cluster commands
    pin ``gpu_h100``. Was: no way to ask for it, and the H100 recipe ran on A100-40GB spot nodes."""
    from dino_scale.config import apply_overrides, preset
    from dino_scale.engine.trainer import resources_per_worker

    cfg = apply_overrides(preset("tiny"), {"train.use_gpu": True, "train.worker_resources": ",".join(pinned)})
    worker = resources_per_worker(cfg)
    assert worker == {"CPU": 1.0, "GPU": 1.0, **{k: 1.0 for k in pinned}}
    launched = _nodes_launched_for(_prepared(name), worker, 64)
    assert set(launched) <= expected and sum(launched.values()) == 8, launched
    plain = _nodes_launched_for(_prepared(name), {"CPU": 1.0, "GPU": 1.0}, 64)
    assert plain == {"aws": {"gpu.p4d.spot": 8}, "gcp": {"gpu_a3_spot": 8}}[name], plain  # why pinning exists


def test_cluster_readme_recipe_commands_pin_h100_nodes():
    """Every training command in cluster/README.md asks for the H100 nodes the cost estimate
    assumes (``train.worker_resources`` with ``gpu_h100``, or a market on GCP/KubeRay's A3-only pools)."""
    text = (CLUSTER / "README.md").read_text()
    commands = [line for line in text.splitlines() if "python -m pipelines." in line and "--workers" in line]
    assert commands
    for line in commands:
        assert "train.worker_resources=" in line, line


@pytest.mark.parametrize("name", LAUNCHERS)
def test_cluster_launcher_uses_prebuilt_image_and_minimal_setup(name):
    cfg = _prepared(name)
    image = cfg["docker"]["image"]
    assert image.endswith("/dino-scale:0.1.0") and "rayproject/" not in image
    assert "--gpus all" in cfg["docker"]["worker_run_options"]
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert cfg[key] == [], f"{key}: everything must be in the image"
    assert cfg["file_mounts"] == {} and cfg["cluster_synced_files"] == []
    commands = " ".join(cfg["initialization_commands"] + cfg["head_start_ray_commands"]
                        + cfg["worker_start_ray_commands"])
    for forbidden in ("pip install", "conda ", "git clone", "nvcc", "python"):
        assert forbidden not in commands  # nothing of the project is built or installed at start


@pytest.mark.parametrize("name", LAUNCHERS)
def test_cluster_launcher_mounts_the_bucket_read_only_for_data(name):
    cfg = _prepared(name)
    assert f"-v {DATA_MOUNT}:{DATA_MOUNT}:ro" in cfg["docker"]["run_options"]
    mount = [c for c in cfg["initialization_commands"] if f"my-dino-bucket {DATA_MOUNT}" in c]
    assert len(mount) == 1
    assert ("mount-s3 --read-only" if name == "aws" else "-o ro,") in mount[0]
    # the mount tool's package pulls dependencies (mount-s3: libfuse2) from the archive: a fresh image's
    # package lists may be empty or stale, so every install on the host updates them first
    for command in cfg["initialization_commands"]:
        for install in re.finditer(r"apt-get install", command):
            assert "apt-get update &&" in command[:install.start()], command


def test_cluster_gcp_setup_runs_on_a_fresh_project_and_image():
    """Two steps that stopped ``ray up`` / the setup script part-way: ``gpg --dearmor -o`` over a
    keyring the image already holds asked to overwrite (no terminal: it failed), and a fresh project
    has none of the APIs the setup script calls (under ``set -e`` it stopped at the first)."""
    init = " ".join(_prepared("gcp")["initialization_commands"])
    assert "gpg --dearmor" not in init and "gpg --batch --yes --dearmor" in init
    script = (CLUSTER / "gcp" / "setup.sh").read_text()
    enable = script.index("services enable")
    apis = script[enable:script.index("\n\n", enable)].split()
    assert {"compute.googleapis.com", "iam.googleapis.com", "secretmanager.googleapis.com",
            "artifactregistry.googleapis.com"} <= set(apis)
    first_call = min(script.index(f"g {svc} ") for svc in ("compute", "iam", "secrets", "artifacts"))
    assert enable < first_call


def _ray_start_flags(commands: list[str]) -> dict[str, str]:
    flags = {}
    for cmd in commands:
        for part in cmd.split(";"):
            argv = shlex.split(part)
            if argv[:2] != ["ray", "start"]:
                continue
            for arg in argv[2:]:
                if arg.startswith("--"):
                    key, _, value = arg[2:].partition("=")
                    flags[key] = value
    return flags


@pytest.mark.parametrize("name", LAUNCHERS)
def test_cluster_launcher_token_auth_on_and_dashboard_on_loopback(name):
    cfg = _prepared(name)
    opts = cfg["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in opts
    token_path = next(o for o in opts if o.startswith("--env RAY_AUTH_TOKEN_PATH=")).split("=", 1)[1]
    # The token file comes from a read-only mount filled from the cloud's secret store.
    mount = next(o for o in opts if o.startswith("-v ") and o.endswith(":ro"))
    assert token_path.startswith(mount.split(":")[1] + "/")
    init = " ".join(cfg["initialization_commands"])
    assert ("secretsmanager get-secret-value" if name == "aws" else "gcloud secrets versions access") in init
    assert "chmod 0400" in init
    head = _ray_start_flags(cfg["head_start_ray_commands"])
    assert "head" in head and head["dashboard-host"] in ("127.0.0.1", "localhost")
    worker = _ray_start_flags(cfg["worker_start_ray_commands"])
    assert "address" in worker and "dashboard-host" not in worker
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=disabled" not in cmd and "--include-dashboard" not in cmd


def test_cluster_aws_network_and_identity_are_explicit():
    """Ray's AWS bootstrap creates a security group with SSH open to the world and a role
    with full EC2/S3 access unless every node type names its own; all of ours do."""
    cfg = _prepared("aws")
    assert "security_group" not in cfg["provider"]
    head_type = cfg["head_node_type"]
    for tname, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        assert nc["SecurityGroupIds"] and nc["SubnetIds"], tname
        # Ray keeps only subnets of the listed zones: a zone needs a subnet of its own (one subnet, one zone)
        zones = [z for z in cfg["provider"]["availability_zone"].split(",") if z.strip()]
        assert len(zones) <= len(set(nc["SubnetIds"])), (tname, zones)
        assert "KeyName" in nc, f"{tname}: ssh_private_key needs KeyName (Ray's bootstrap asserts it)"
        kind = "head" if tname == head_type else "worker"
        assert nc["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/dino-scale-{kind}"), tname
        assert nc["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only
        assert all(b["Ebs"]["Encrypted"] for b in nc["BlockDeviceMappings"])


def _statements(path: Path) -> list[dict]:
    doc = json.loads(path.read_text())
    return [dict(s, Action=[s["Action"]] if isinstance(s["Action"], str) else s["Action"],
                 Resource=[s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])
            for s in doc["Statement"]]


@pytest.mark.parametrize("kind", ["head", "worker"])
def test_cluster_aws_iam_policy_is_least_privilege(kind):
    statements = _statements(CLUSTER / "aws" / f"iam-{kind}-policy.json")
    star_ok = {"ecr:GetAuthorizationToken", "ec2:RunInstances"}  # CreateTags on "*": any instance could be
    # tagged ray-cluster-name=<ours>, which is what lets the head terminate it
    for s in statements:
        assert s["Effect"] == "Allow"
        for action in s["Action"]:
            assert not action.endswith(":*") and action != "*", action
            if action.startswith("s3:"):
                assert all(r in ("arn:aws:s3:::my-dino-bucket", "arn:aws:s3:::my-dino-bucket/*")
                           for r in s["Resource"]), s
            if action.startswith("secretsmanager:"):
                assert s["Resource"] == [
                    "arn:aws:secretsmanager:us-west-2:123456789012:secret:dino-scale/ray-auth-token-*"]
        if "*" in s["Resource"]:
            assert all(a in star_ok or a.startswith("ec2:Describe") for a in s["Action"]), s
    actions = {a for s in statements for a in s["Action"]}
    if kind == "worker":
        assert not any(a.startswith(("ec2:", "iam:")) for a in actions), "workers launch nothing"
    else:
        passrole = [s for s in statements if "iam:PassRole" in s["Action"]]
        assert passrole and passrole[0]["Resource"] == ["arn:aws:iam::123456789012:role/dino-scale-worker"]
        term = [s for s in statements if "ec2:TerminateInstances" in s["Action"]][0]
        name = _raw("aws")["cluster_name"]
        assert term["Condition"]["StringEquals"]["aws:ResourceTag/ray-cluster-name"] == name
        # tags: at launch, only with the cluster's name; later, only on the cluster's instances and never
        # that name (Ray's node provider re-tags status keys of its own instances)
        tagging = [s for s in statements if "ec2:CreateTags" in s["Action"]]
        assert tagging and all(s["Resource"] == ["arn:aws:ec2:us-west-2:123456789012:instance/*"] for s in tagging)
        for s in tagging:
            cond = s["Condition"]["StringEquals"]
            if "ec2:CreateAction" in cond:
                assert cond == {"ec2:CreateAction": "RunInstances", "aws:RequestTag/ray-cluster-name": name}, s
            else:
                assert cond == {"aws:ResourceTag/ray-cluster-name": name}, s
                assert s["Condition"]["ForAllValues:StringNotEquals"] == {"aws:TagKeys": ["ray-cluster-name"]}, s


def test_cluster_gcp_network_and_identity_are_explicit():
    """Without networkInterfaces Ray's GCP bootstrap gives every node an external IP; our
    nodes name the dino-scale subnetwork and only the head has an external address."""
    cfg = _prepared("gcp")
    head_type = cfg["head_node_type"]
    for tname, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        (nic,) = nc["networkInterfaces"]
        assert nic["subnetwork"].endswith("/subnetworks/dino-scale")
        assert bool(nic.get("accessConfigs")) == (tname == head_type), tname
        (sa,) = nc["serviceAccounts"]
        kind = "head" if tname == head_type else "worker"
        assert sa["email"].startswith(f"dino-scale-{kind}@"), tname
        assert "compute@developer" not in sa["email"] and sa["email"] != "default"
        assert "dino-scale" in nc["tags"]["items"]
        meta = {i["key"]: i["value"] for i in nc["metadata"]["items"]}
        assert meta["block-project-ssh-keys"] == "true"
        assert meta["ssh-keys"].startswith("ubuntu:ssh-")  # a public key placeholder


def test_cluster_gcp_disk_types_are_urls_in_the_nodes_zone():
    """instances.insert takes a disk type only as a (partial) URL: a bare `pd-ssd` is refused
    ("The URL is malformed"), so no worker could start. Ray's GCP provider expands machineType
    and acceleratorType to URLs but passes the disks through as written."""
    cfg = _prepared("gcp")
    zone = cfg["provider"]["availability_zone"]
    seen = 0
    for tname, t in cfg["available_node_types"].items():
        for disk in t["node_config"]["disks"]:
            dtype = disk["initializeParams"].get("diskType")
            if dtype is not None:
                seen += 1
                assert dtype.startswith(f"zones/{zone}/diskTypes/") or f"/zones/{zone}/diskTypes/" in dtype, (
                    tname, dtype)
    assert seen >= 2  # the GPU types ask for SSD boot disks


def test_cluster_gcp_a3_nodes_ask_for_gvnic():
    """A3 machine types support only the gVNIC network interface; an interface without
    `nicType` asks for VirtIO-Net, which such an instance cannot have."""
    cfg = _prepared("gcp")
    a3 = {n: t for n, t in cfg["available_node_types"].items()
          if t["node_config"]["machineType"].rsplit("/", 1)[-1].startswith("a3-")}
    assert len(a3) >= 2
    for tname, t in a3.items():
        for nic in t["node_config"]["networkInterfaces"]:
            assert nic.get("nicType") == "GVNIC", tname
