"""``posttrain launch k8s``: the manifests validate against the operators' own CRD schemas, and the run they describe
is the one asked for: the world size and node ranks torchrun computes in each pod, the config each pod reads, the
checkpoint volume under the run directory, resume=auto, /dev/shm in memory.

The schemas (tests/data/k8s/, each naming its source and commit) are the CRDs' openAPIV3Schema. The API server
rejects fields a schema does not declare (kubectl's default strict field validation), so ``strict`` closes every
declared object the same way; CEL rules (``x-kubernetes-validations``) are not evaluated by jsonschema, and the one
that concerns a new object, the job's name, is checked here directly. ConfigMap and PersistentVolumeClaim are core
objects without a CRD: their invariants are checked instead.

What the operators put into each pod is modelled from their source (``operator_env``); torchrun itself parses each
pod's command under that environment, so "world size" is the launcher's own arithmetic, not a copy of ours.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from torch.distributed import run as torchrun

from posttrain.cli import SHIPPED_CONFIGS, main
from posttrain.config import ConfigError, load_config, save_config
from posttrain.launch.k8s import CHECKPOINT_DIR, RAYJOB_TTL_SECONDS, Cluster, render, to_yaml

SCHEMAS = Path(__file__).parent / "data" / "k8s"
SCHEMA_FILES = {
    "TrainJob": "trainjob.schema.yaml",
    "PyTorchJob": "pytorchjob.schema.yaml",
    "RayJob": "rayjob.schema.yaml",
}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "kubernetes.md"
CONFIG = SHIPPED_CONFIGS / "sft_full.yaml"
# Paths as the pods see them: nothing here reads them.
OVERRIDES = ["model.path=/models/qwen2.5-0.5b", "data.train=/data/sft.jsonl", "train.batch_size=4"]
SHAPES = [(2, 4), (1, 4), (1, 1)]
KINDS = ["trainjob", "pytorchjob"]  # the torchrun kinds; the RayJob has its own tests below


def strict(schema: Any) -> Any:
    """The schema with every object that declares its properties closed to others, as the API server treats it."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


@functools.cache
def validator(kind: str) -> jsonschema.Draft4Validator:
    # OpenAPI 3.0 schemas are JSON Schema draft 4 with extensions (x-kubernetes-*), which draft 4 ignores.
    # libyaml's loader: the RayJob schema (three pod templates) takes over a second with the Python one.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schema = yaml.load((SCHEMAS / SCHEMA_FILES[kind]).read_text(encoding="utf-8"), Loader=loader)
    return jsonschema.Draft4Validator(strict(schema))


def manifests(kind: str, nodes: int, gpus: int, **cluster: Any) -> tuple[dict, dict, dict]:
    config = load_config(CONFIG, OVERRIDES)
    claim, config_map, job = render(config, kind, Cluster(nodes, gpus, "ghcr.io/example/posttrain:1", **cluster))
    return claim, config_map, job


def pod_specs(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod spec of each replica kind, with the trainer container first."""
    if job["kind"] == "PyTorchJob":
        return [replica["template"]["spec"] for replica in job["spec"]["pytorchReplicaSpecs"].values()]
    (patch,) = job["spec"]["runtimePatches"]
    (replicated_job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return [replicated_job["template"]["spec"]["template"]["spec"]]


def trainer_command(job: dict[str, Any]) -> list[str]:
    if job["kind"] == "TrainJob":
        return job["spec"]["trainer"]["command"]
    commands = {tuple(spec["containers"][0]["command"]) for spec in pod_specs(job)}
    assert len(commands) == 1, "Master and Workers run one command"
    return list(commands.pop())


def operator_env(job: dict[str, Any]) -> list[dict[str, str]]:
    """The launcher variables each pod of ``job`` gets from its operator, one dict per pod.

    TrainJob (kubeflow/trainer v2.3 pkg/runtime/framework/plugins/torch/torch.go, EnforceMLPolicy): PET_NNODES =
    numNodes, PET_NPROC_PER_NODE = numProcPerNode ("auto" when unset), PET_NODE_RANK = the pod's Job completion
    index, PET_MASTER_ADDR = NAME-node-0-0.NAME, PET_MASTER_PORT = 29500.
    PyTorchJob (kubeflow/trainer v1.9.4 pkg/controller.v1/pytorch/envvar.go and master.go): PET_NNODES = all
    replicas, PET_NPROC_PER_NODE = nprocPerNode, PET_NODE_RANK = RANK = 0 for the Master and index + 1 for each
    Worker, WORLD_SIZE = replicas x nprocPerNode, PET_MASTER_ADDR = NAME-master-0, PET_MASTER_PORT = the port named
    pytorchjob-port of the container named pytorch."""
    name = job["metadata"]["name"]
    if job["kind"] == "TrainJob":
        trainer = job["spec"]["trainer"]
        nodes = trainer["numNodes"]
        return [
            {
                "PET_NNODES": str(nodes),
                "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", "auto")),
                "PET_NODE_RANK": str(index),
                "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
                "PET_MASTER_PORT": "29500",
            }
            for index in range(nodes)
        ]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    total = sum(spec["replicas"] for spec in replicas.values())
    nproc = job["spec"]["nprocPerNode"]
    (port,) = [
        p["containerPort"]
        for c in replicas["Master"]["template"]["spec"]["containers"]
        if c["name"] == "pytorch"
        for p in c.get("ports", [])
        if p["name"] == "pytorchjob-port"
    ]
    ranks = [0] + [index + 1 for index in range(replicas.get("Worker", {"replicas": 0})["replicas"])]
    return [
        {
            "PET_NNODES": str(total),
            "PET_NPROC_PER_NODE": nproc,
            "PET_NODE_RANK": str(rank),
            "RANK": str(rank),
            "WORLD_SIZE": str(total * int(nproc)),
            "MASTER_ADDR": f"{name}-master-0",
            "PET_MASTER_ADDR": f"{name}-master-0",
            "MASTER_PORT": str(port),
            "PET_MASTER_PORT": str(port),
        }
        for rank in ranks
    ]


def launch_as_torchrun(command: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """torchrun's own parse of ``command`` in a pod with ``env``: its LaunchConfig and the command it starts."""
    assert command[0] == "torchrun"
    with monkeypatch.context() as pod:
        for key in [k for k in os.environ if k.startswith("PET_")]:
            pod.delenv(key)
        for key, value in env.items():
            pod.setenv(key, value)
        pod.setenv("OMP_NUM_THREADS", "1")
        args = torchrun.get_args_parser().parse_args(command[1:])  # PET_* defaults are read when it is built
        return torchrun.config_from_args(args)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("nodes", "gpus"), SHAPES)
def test_the_job_validates_against_its_crd_schema(kind: str, nodes: int, gpus: int) -> None:
    *_, job = manifests(kind, nodes, gpus)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(job["kind"]).iter_errors(job)]
    assert not errors, errors
    # The CEL rule of the TrainJob CRD and the PyTorchJob webhook: the name is an RFC 1035 label.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 63


@pytest.mark.parametrize("kind", KINDS)
def test_the_schema_check_rejects_a_misspelt_field_and_a_wrong_type(kind: str) -> None:
    *_, job = manifests(kind, 2, 4)
    check = validator(job["kind"])
    misspelt = yaml.safe_load(yaml.safe_dump(job))
    wrong_type = yaml.safe_load(yaml.safe_dump(job))
    if kind == "trainjob":
        misspelt["spec"]["trainer"]["numNode"] = misspelt["spec"]["trainer"].pop("numNodes")
        wrong_type["spec"]["trainer"]["numProcPerNode"] = "four"
    else:
        misspelt["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicies"] = "OnFailure"
        wrong_type["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "1"
    assert any("numNode" in e.message or "restartPolicies" in e.message for e in check.iter_errors(misspelt))
    assert list(check.iter_errors(wrong_type))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("nodes", "gpus"), SHAPES)
def test_torchrun_in_each_pod_sees_the_world_size_and_its_own_node_rank(
    kind: str, nodes: int, gpus: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    *_, job = manifests(kind, nodes, gpus)
    command = trainer_command(job)
    pods = operator_env(job)
    assert len(pods) == nodes
    launches = [launch_as_torchrun(command, env, monkeypatch) for env in pods]
    node_ranks = []
    for config, _entrypoint, entry_args in launches:
        assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (nodes, nodes, gpus)
        assert config.rdzv_backend == "static"
        node_ranks.append(config.rdzv_configs["rank"])
        # Every pod meets at rank 0's pod, not at its own localhost.
        assert config.rdzv_endpoint == f"{pods[0]['PET_MASTER_ADDR']}:{pods[0]['PET_MASTER_PORT']}"
        assert entry_args[-4:] == ["-m", "posttrain", "train", "/config/run.yaml"]
    world_size = launches[0][0].max_nodes * launches[0][0].nproc_per_node
    assert world_size == nodes * gpus
    assert sorted(node_ranks) == list(range(nodes))
    if kind == "pytorchjob":  # the v1 operator's own WORLD_SIZE counts processes too (replicas x nprocPerNode)
        assert {env["WORLD_SIZE"] for env in pods} == {str(nodes * gpus)}


@pytest.mark.parametrize("kind", KINDS)
def test_each_node_asks_for_its_gpus(kind: str) -> None:
    *_, job = manifests(kind, 2, 4)
    if kind == "trainjob":
        assert job["spec"]["trainer"]["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 4}}
        assert job["spec"]["trainer"]["numProcPerNode"] == 4
    else:
        for spec in pod_specs(job):
            assert spec["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 4}}


@pytest.mark.parametrize("nodes", [2, 1])
def test_pytorchjob_has_one_master_and_the_other_nodes_as_workers(nodes: int) -> None:
    *_, job = manifests("pytorchjob", nodes, 4)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1  # the operator's webhook refuses any other count
    assert replicas.get("Worker", {"replicas": 0})["replicas"] == nodes - 1
    assert set(replicas) == ({"Master", "Worker"} if nodes > 1 else {"Master"})
    for replica in replicas.values():
        assert replica["restartPolicy"] == "OnFailure"
        # The training operator finds its container by this name (master port, webhook): no other name works.
        assert replica["template"]["spec"]["containers"][0]["name"] == "pytorch"
    assert "elasticPolicy" not in job["spec"]


def test_trainjob_runs_on_the_torch_distributed_runtime_and_patches_its_node_container() -> None:
    *_, job = manifests("trainjob", 2, 4)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    assert job["spec"]["trainer"]["numNodes"] == 2
    assert job["spec"]["trainer"]["image"] == "ghcr.io/example/posttrain:1"
    # The runtime's replicated job and trainer container are both "node"; the trainer webhook refuses a patch of
    # a job or container the runtime lacks, and env for the node container (torchrun's variables are reserved).
    (patch,) = job["spec"]["runtimePatches"]
    (replicated_job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated_job["name"] == "node"
    (container,) = replicated_job["template"]["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "node" and "env" not in container


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("nodes", "gpus"), SHAPES)
def test_each_pod_mounts_the_config_the_checkpoint_volume_and_shared_memory(kind: str, nodes: int, gpus: int) -> None:
    claim, config_map, job = manifests(kind, nodes, gpus)
    command = trainer_command(job)
    run_config = yaml.safe_load(config_map["data"]["run.yaml"])
    for spec in pod_specs(job):
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        mounts = {mount["mountPath"]: mount["name"] for mount in spec["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
        checkpoints = volumes[mounts[CHECKPOINT_DIR]]["persistentVolumeClaim"]["claimName"]
        assert checkpoints == claim["metadata"]["name"]
        config_dir, config_file = command[-1].rsplit("/", 1)
        assert volumes[mounts[config_dir]]["configMap"]["name"] == config_map["metadata"]["name"]
        assert config_file in config_map["data"]
    # The run directory, so its checkpoints, is on the claim; every restart resumes from there.
    assert run_config["output_dir"] == f"{CHECKPOINT_DIR}/{job['metadata']['name']}"
    assert run_config["resume"] == "auto"


@pytest.mark.parametrize(("nodes", "access"), [(2, "ReadWriteMany"), (1, "ReadWriteOnce")])
def test_the_checkpoint_claim_is_shared_by_every_node(nodes: int, access: str) -> None:
    claim, *_ = manifests("trainjob", nodes, 4, storage="2Ti", storage_class="shared-nfs")
    assert claim["apiVersion"] == "v1" and claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"] == {
        "accessModes": [access],
        "resources": {"requests": {"storage": "2Ti"}},
        "storageClassName": "shared-nfs",
    }
    default_claim, *_ = manifests("trainjob", nodes, 4)
    assert default_claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert "storageClassName" not in default_claim["spec"]


def test_the_config_map_holds_the_loaded_config_as_train_saves_it(tmp_path: Path) -> None:
    _, config_map, job = manifests("pytorchjob", 2, 4)
    assert config_map["apiVersion"] == "v1" and config_map["kind"] == "ConfigMap"
    expected = load_config(CONFIG, [*OVERRIDES, f"output_dir={CHECKPOINT_DIR}/{job['metadata']['name']}"])
    save_config(expected, tmp_path / "config.yaml")
    assert config_map["data"]["run.yaml"] == (tmp_path / "config.yaml").read_text(encoding="utf-8")
    # What the pods load is the same config, overrides included.
    (tmp_path / "run.yaml").write_text(config_map["data"]["run.yaml"], encoding="utf-8")
    loaded = load_config(tmp_path / "run.yaml")
    assert loaded == expected
    assert loaded.train.batch_size == 4 and loaded.model.path == "/models/qwen2.5-0.5b"


def test_the_job_name_comes_from_output_dir_or_name() -> None:
    config = load_config(CONFIG, [*OVERRIDES, "output_dir=runs/SFT_Qwen 0.5B"])
    *_, job = render(config, "trainjob", Cluster(1, 1, "img"))
    assert job["metadata"]["name"] == "sft-qwen-0-5b"
    *_, job = render(config, "trainjob", Cluster(1, 1, "img"), name="sft-2")
    assert job["metadata"]["name"] == "sft-2"
    with pytest.raises(ConfigError, match="RFC 1035"):
        render(config, "trainjob", Cluster(1, 1, "img"), name="2-sft")


def test_a_written_file_holds_the_manifests_and_the_printed_ones_apply_as_is(tmp_path: Path, capsys) -> None:
    flags = ["--nodes", "2", "--gpus-per-node", "4", "--image", "ghcr.io/example/posttrain:1", "--kind", "pytorchjob"]
    assert main(["launch", "k8s", str(CONFIG), *OVERRIDES, *flags, "--out", str(tmp_path)]) == 0
    summary = capsys.readouterr().out
    written = tmp_path / "sft-full.yaml"
    assert f"kubectl apply -f {written}" in summary and "world size 8" in summary
    documents = list(yaml.safe_load_all(written.read_text(encoding="utf-8")))
    assert documents == list(manifests("pytorchjob", 2, 4))
    assert "&id" not in written.read_text(encoding="utf-8"), "the pod template is written out, not as an alias"
    assert main(["launch", "k8s", str(CONFIG), *OVERRIDES, *flags]) == 0
    assert capsys.readouterr().out == to_yaml(documents)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nodes", "0", "--image", "img"], "--nodes must be at least 1 (got 0)"),
        (["--gpus-per-node", "0", "--image", "img"], "--gpus-per-node must be at least 1 (got 0)"),
        (
            ["--kind", "mpijob", "--image", "img"],
            "--kind mpijob: unknown job kind; expected one of trainjob, pytorchjob, rayjob",
        ),
        (["--kind", "rayjob", "--nodes", "0", "--image", "img"], "--nodes must be at least 1 (got 0)"),
        (
            ["--kind", "rayjob", "--ttl-after-finished", "-1", "--image", "img"],
            "--ttl-after-finished -1: expected seconds from 0 to 2147483647 (default 600)",
        ),
        (
            ["--ttl-after-finished", "60", "--image", "img"],
            "--ttl-after-finished applies to --kind rayjob only (a trainjob has no such field)",
        ),
        (
            ["--kind", "rayjob", "--image", "img", "--name", "a" * 48],
            f"--name: job name '{'a' * 48}' is not an RFC 1035 label (lower-case letters, digits and '-', a letter "
            "first, at most 47 characters)",
        ),
        (["--nodes", "2"], "--image is required"),
        (["--image", "img", "--storage", "lots"], "--storage lots: expected a Kubernetes quantity"),
        (["resume=false", "--image", "img"], "resume=false: a pod that restarts on Kubernetes"),
        (["--image", "img", "--name", "Sft_Run"], "--name: job name 'Sft_Run' is not an RFC 1035 label"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    overrides = [flag for flag in flags if "=" in flag]  # before the options, as argparse wants them
    options = [flag for flag in flags if "=" not in flag]
    code = main(["launch", "k8s", str(CONFIG), *OVERRIDES, *overrides, *options, "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(f"error: {message}") and captured.err.count("\n") == 1, captured.err
    assert not list(tmp_path.iterdir())


def test_every_launch_command_in_the_docs_runs(tmp_path: Path, capsys) -> None:
    commands = [
        line.strip()
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", DOCS.read_text(encoding="utf-8"), flags=re.M | re.S)
        for line in block.splitlines()
        if line.strip().startswith("posttrain launch k8s ")
    ]
    assert commands
    for command in commands:
        argv = shlex.split(command.replace("/tmp/", f"{tmp_path}/"))[1:]
        argv = [str(SHIPPED_CONFIGS / Path(a).name) if a.startswith("configs/") else a for a in argv]
        assert main(argv) == 0, command
        out = capsys.readouterr().out
        if command == commands[0] or "distributed.placement=ray" in command:  # the docs show what these print
            assert out.replace(f"{tmp_path}/", "/tmp/") in DOCS.read_text(encoding="utf-8")
        written = re.search(r"manifests:\s+(\S+)", out)
        documents = yaml.safe_load_all(Path(written.group(1)).read_text() if written else out)
        *_, job = documents
        assert not list(validator(job["kind"]).iter_errors(job)), command


def ray_groups(job: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """(role, pods, group spec) for the head group and each worker group of a RayJob's cluster."""
    cluster = job["spec"]["rayClusterSpec"]
    head = ("head", 1, cluster["headGroupSpec"])
    return [head, *[("worker", group["replicas"], group) for group in cluster.get("workerGroupSpecs", [])]]


@pytest.mark.parametrize("nodes", [1, 3])
def test_rayjob_validates_against_the_kuberay_crd_schema(nodes: int) -> None:
    *_, job = manifests("rayjob", nodes, 8)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator("RayJob").iter_errors(job)]
    assert not errors, errors
    # KubeRay's ValidateRayJobMetadata: an RFC 1035 label of at most 47 characters (its cluster adds 6).
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 47
    misspelt = yaml.safe_load(yaml.safe_dump(job))
    misspelt["spec"]["shutdownAfterJobFinish"] = misspelt["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e.message for e in validator("RayJob").iter_errors(misspelt))
    wrong_type = yaml.safe_load(yaml.safe_dump(job))
    wrong_type["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 8
    assert list(validator("RayJob").iter_errors(wrong_type)), "rayStartParams values are strings"


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (3, 8)])
def test_rayjob_cluster_is_one_head_and_the_other_nodes_as_workers_each_with_its_gpus(nodes: int, gpus: int) -> None:
    *_, job = manifests("rayjob", nodes, gpus)
    groups = ray_groups(job)
    assert [role for role, _, _ in groups][0] == "head"
    assert sum(pods for _, pods, _ in groups) == nodes
    for role, pods, group in groups:
        (container, *sidecars) = group["template"]["spec"]["containers"]
        assert not sidecars and container["name"] == f"ray-{role}"  # KubeRay runs Ray in the first container
        assert container["image"] == "ghcr.io/example/posttrain:1"
        assert container["resources"] == {"limits": {"nvidia.com/gpu": gpus}}
        # What `ray start --num-gpus` registers is the pod's GPU limit, not a second number that could drift.
        assert group["rayStartParams"] == {"num-gpus": str(gpus)}
        if role == "worker":  # a fixed size: no autoscaler, min = max = replicas (KubeRay's rule without one)
            assert group["minReplicas"] == group["maxReplicas"] == pods == nodes - 1
    assert "enableInTreeAutoscaling" not in job["spec"]["rayClusterSpec"]


def test_rayjob_runs_posttrain_train_on_the_head_and_frees_the_cluster_when_done() -> None:
    *_, job = manifests("rayjob", 3, 8)
    spec = job["spec"]
    # An entrypoint asking for no resources runs on the head node: one posttrain train, one process per head GPU.
    assert shlex.split(spec["entrypoint"]) == ["posttrain", "train", "/config/run.yaml", "--nproc", "8"]
    assert not {"entrypointNumCpus", "entrypointNumGpus", "entrypointResources"} & set(spec)
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == RAYJOB_TTL_SECONDS == 600
    # Each retry is a new Ray cluster resuming from the claim; KubeRay's default (0) would never retry.
    assert spec["backoffLimit"] == 2
    assert "runtimeEnvYAML" not in spec, "the image carries posttrain; nothing to install at submission"
    *_, kept = manifests("rayjob", 1, 1, ttl_after_finished=0)
    assert kept["spec"]["ttlSecondsAfterFinished"] == 0


@pytest.mark.parametrize("nodes", [1, 3])
def test_rayjob_head_and_workers_mount_the_config_the_checkpoint_volume_and_shared_memory(nodes: int) -> None:
    claim, config_map, job = manifests("rayjob", nodes, 4)
    config_path = shlex.split(job["spec"]["entrypoint"])[2]
    config_dir, config_file = config_path.rsplit("/", 1)
    for _, _, group in ray_groups(job):
        spec = group["template"]["spec"]
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        mounts = {mount["mountPath"]: mount["name"] for mount in spec["containers"][0]["volumeMounts"]}
        # Ray's object store lives in /dev/shm: memory-backed, as KubeRay itself would mount it.
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
        assert volumes[mounts[CHECKPOINT_DIR]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert volumes[mounts[config_dir]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_file in config_map["data"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany" if nodes > 1 else "ReadWriteOnce"]


def test_rayjob_config_map_holds_the_config_as_train_saves_it(tmp_path: Path) -> None:
    _, config_map, job = manifests("rayjob", 3, 4)
    expected = load_config(CONFIG, [*OVERRIDES, f"output_dir={CHECKPOINT_DIR}/{job['metadata']['name']}"])
    save_config(expected, tmp_path / "config.yaml")
    assert config_map["data"]["run.yaml"] == (tmp_path / "config.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(config_map["data"]["run.yaml"])["resume"] == "auto"


# ------------------------------------------------------------------------------- RayJob with distributed.placement=ray
GRPO = SHIPPED_CONFIGS / "grpo.yaml"
RL_OVERRIDES = [
    "model.path=/models/qwen2.5-0.5b",
    "data.train=/data/prompts.jsonl",
    "distributed.placement=ray",
    "distributed.roles.rollout.num_engines=2",
    "distributed.roles.rollout.num_gpus=1",
]


def ray_placed_manifests(nodes: int, gpus: int, *overrides: str) -> tuple[dict, dict, dict]:
    config = load_config(GRPO, [*RL_OVERRIDES, *overrides])
    claim, config_map, job = render(config, "rayjob", Cluster(nodes, gpus, "ghcr.io/example/posttrain:1"))
    return claim, config_map, job


@pytest.mark.parametrize("nodes", [1, 3])
def test_a_ray_placed_rayjob_validates_and_its_entrypoint_is_the_trainer_alone_on_a_gpu_of_its_own(nodes: int) -> None:
    *_, job = ray_placed_manifests(nodes, 4)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator("RayJob").iter_errors(job)]
    assert not errors, errors
    spec = job["spec"]
    # One process, the policy trainer: no --nproc.
    assert shlex.split(spec["entrypoint"]) == ["posttrain", "train", "/config/run.yaml"]
    # Reserved from Ray: the job supervisor puts that GPU in the trainer's CUDA_VISIBLE_DEVICES and no actor gets it.
    assert spec["entrypointNumGpus"] == 1
    assert not {"entrypointNumCpus", "entrypointResources", "runtimeEnvYAML"} & set(spec)
    for _, _, group in ray_groups(job):  # Ray's GPU count is still each pod's limit
        assert group["rayStartParams"] == {"num-gpus": "4"}
        assert group["template"]["spec"]["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 4}}
    wrong_type = yaml.safe_load(yaml.safe_dump(job))
    wrong_type["spec"]["entrypointNumGpus"] = "1"
    assert list(validator("RayJob").iter_errors(wrong_type)), "entrypointNumGpus is a number"


def test_a_ray_placed_config_map_joins_the_job_cluster_and_loads_back(tmp_path: Path) -> None:
    _, config_map, job = ray_placed_manifests(3, 4)
    run_yaml = config_map["data"]["run.yaml"]
    assert yaml.safe_load(run_yaml)["distributed"]["ray_address"] == "auto"
    (tmp_path / "run.yaml").write_text(run_yaml, encoding="utf-8")
    loaded = load_config(tmp_path / "run.yaml")  # what the trainer reads, validated as posttrain train does
    expected = load_config(
        GRPO,
        [*RL_OVERRIDES, f"output_dir={CHECKPOINT_DIR}/{job['metadata']['name']}", "distributed.ray_address=auto"],
    )
    assert loaded == expected
    assert loaded.distributed.placement == "ray" and loaded.distributed.roles.rollout.num_engines == 2
    save_config(expected, tmp_path / "config.yaml")
    assert run_yaml == (tmp_path / "config.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["distributed.roles.rollout.num_engines=3", "distributed.roles.rollout.num_gpus=0.5"],
        ["distributed.roles.reference.colocate_with=policy", "distributed.roles.reward.num_gpus=0.25"],
        ["algorithm.kl_coef=0", "distributed.roles.reward.colocate_with=policy"],
        ["distributed.roles.rollout.colocate_with=policy", "distributed.roles.rollout.num_engines=1"],
    ],
)
def test_the_actors_counted_are_the_ones_ray_roles_starts(
    overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ray_actors`` (what launch.k8s sizes the cluster by) against ``roles.ray_roles`` itself, its RayRole
    replaced by a recorder (no Ray started)."""
    import posttrain.roles as roles
    from posttrain.roles import ray_actors

    config = load_config(GRPO, [*RL_OVERRIDES, *overrides])
    started: list[tuple[str, dict[str, float]]] = []

    class RecordedActor:
        def __init__(self, name: str, kind: str, config: Any, every_prompt: Any, resources: dict, *rest: Any) -> None:
            started.append((name, resources))

        def submit(self, method: str, *args: Any, timeout_s: float | None = None) -> roles.Pending:
            assert method == "gold_info"
            return roles.Pending((False, False))

    class LocalScorer:
        def gold_info(self) -> tuple[bool, bool]:
            return False, False

    monkeypatch.setattr(roles, "RayRole", RecordedActor)
    # What the recipe's local_roles holds when the reference is not in its process: one only with a KL anchor.
    reference = roles.LocalRole("reference", None) if config.algorithm.kl_coef else None
    local = roles.Roles([roles.LocalRole("rollout-0", None)], reference, roles.LocalRole("reward", LocalScorer()))
    roles.ray_roles(config, [], local, None)  # no trainer group: one trainer process
    counted = [(a.name, {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus}) for a in ray_actors(config)]
    assert counted == started


def test_roles_that_fill_the_cluster_exactly_are_accepted() -> None:
    # 1 (trainer) + 3 x 0.4 + 0.6 + 0.2 = 3 GPUs, which floating point sums to 3.0000000000000004.
    fractions = [
        "distributed.roles.rollout.num_engines=3",
        "distributed.roles.rollout.num_gpus=0.4",
        "distributed.roles.reference.num_gpus=0.6",
        "distributed.roles.reward.num_gpus=0.2",
    ]
    *_, job = ray_placed_manifests(1, 3, *fractions)
    assert job["spec"]["entrypointNumGpus"] == 1
    with pytest.raises(ConfigError, match="ask for 3.1 GPUs"):
        ray_placed_manifests(1, 3, *fractions[:-1], "distributed.roles.reward.num_gpus=0.3")


def test_the_printed_summary_says_where_each_role_runs(tmp_path: Path, capsys) -> None:
    overrides = [*RL_OVERRIDES, "distributed.roles.reward.colocate_with=policy"]
    flags = ["--kind", "rayjob", "--nodes", "2", "--gpus-per-node", "4", "--image", "img", "--out", str(tmp_path)]
    assert main(["launch", "k8s", str(GRPO), *overrides, *flags]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert summary[:2] == [
        "RayJob grpo: Ray cluster of 2 pods (head + 1 workers) x 4 GPUs; the policy trainer (posttrain train, 1 GPU) "
        "and the roles' Ray actors go wherever Ray finds room",
        "  roles:       rollout 2 x (1 GPU, 1 CPU), reference (0 GPU, 1 CPU), reward in the trainer's process; "
        "3 of 8 GPUs with the trainer's",
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            [
                "distributed.roles.rollout.num_engines=4",
                "distributed.roles.reference.num_gpus=1",
                "--kind",
                "rayjob",
                "--gpus-per-node",
                "4",
            ],
            "distributed.roles ask for 6 GPUs with the trainer's 1 (rollout 4 x 1, reference 1), more than the "
            "cluster's 4 (--nodes 1 x --gpus-per-node 4); lower the roles' num_gpus or rollout.num_engines, "
            "colocate a role with the policy, or raise --nodes",
        ),
        (
            ["distributed.roles.rollout.num_gpus=8", "--kind", "rayjob", "--nodes", "4", "--gpus-per-node", "4"],
            "distributed.roles.rollout.num_gpus=8: a Ray actor runs on one node, which has 4 GPUs (--gpus-per-node); "
            "lower it or raise --gpus-per-node",
        ),
        (
            ["distributed.ray_address=10.0.0.1:6379", "--kind", "rayjob", "--gpus-per-node", "4"],
            "distributed.ray_address=10.0.0.1:6379: a RayJob runs on its own Ray cluster, which the run joins with "
            "ray_address=auto; remove the setting",
        ),
        (
            ["--kind", "pytorchjob"],  # even one pod of one GPU: a Ray of its own there would share the trainer's GPU
            "distributed.placement=ray places the roles on a Ray cluster, and a pytorchjob has none (its pods run "
            "torchrun); use --kind rayjob",
        ),
    ],
)
def test_a_ray_placed_config_the_cluster_cannot_hold_is_one_error_line_and_exit_2(
    flags: list[str], message: str, tmp_path: Path, capsys
) -> None:
    overrides = [flag for flag in flags if "=" in flag]
    options = [flag for flag in flags if "=" not in flag]
    argv = ["launch", "k8s", str(GRPO), *RL_OVERRIDES, *overrides, *options, "--image", "img", "--out", str(tmp_path)]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == f"error: {message}\n"
    assert not list(tmp_path.iterdir())
