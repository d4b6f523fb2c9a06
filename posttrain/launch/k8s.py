"""Kubernetes manifests for one training run (``posttrain launch k8s CONFIG --nodes N --gpus-per-node G --image IMG``).

A run is three objects, applied together with ``kubectl apply -f``:

- ConfigMap ``NAME-config``: the run config as the pods run it (the YAML ``posttrain train`` saves as a run's
  ``config.yaml``), mounted read-only at ``/config/run.yaml``. It is the config given, with its overrides, and
  ``output_dir`` placed on the checkpoint volume;
- PersistentVolumeClaim ``NAME-checkpoints``, mounted at ``/checkpoints``: the run directory is
  ``/checkpoints/NAME``, and with ``resume: auto`` (required) a pod that restarts continues from the newest
  complete checkpoint there. Every rank writes its shard of a checkpoint into that one directory, so a run over several
  nodes claims ``ReadWriteMany`` storage (``ReadWriteOnce`` is enough for one node);
- the job, one of ``JOB_KINDS``: a Kubeflow Trainer v2 ``TrainJob`` over the ``torch-distributed``
  ClusterTrainingRuntime, a Kubeflow Training Operator v1 ``PyTorchJob``, or a KubeRay ``RayJob`` (see ``rayjob``).

Every pod of a TrainJob or PyTorchJob runs the same command, ``torchrun -m posttrain train /config/run.yaml``.
torchrun takes each launcher option it is not given from ``PET_<OPTION>`` (torch/distributed/argparse_util.py), and
both operators set ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
``PET_MASTER_PORT`` in each pod (trainer v2.3 pkg/runtime/framework/plugins/torch/torch.go; training operator
v1.9 pkg/controller.v1/pytorch/envvar.go and master.go), so the manifest states the size once and no pod needs
to know its rank. ``/dev/shm`` is a memory-backed emptyDir: a container's default 64 MiB is too small for NCCL
and for data-loader workers.

The config's paths (``model.path``, ``data.train``, ...) are read inside the pod: a hub id, a path baked into the
image, or one on the checkpoint volume.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from posttrain.config import ConfigError, DistributedBlock, PpoConfig, RolesBlock, StageConfig
from posttrain.roles import RoleActor, ray_actors

CONFIG_DIR = "/config"
CONFIG_FILE = "run.yaml"
CHECKPOINT_DIR = "/checkpoints"
GPU = "nvidia.com/gpu"
# The torch-distributed ClusterTrainingRuntime names its replicated job and its trainer container "node"
# (trainer manifests/base/runtimes/torch_distributed.yaml); a runtime patch naming anything else is refused.
TRAINER_RUNTIME = "torch-distributed"
TRAINER_NODE = "node"
# The training operator looks up the container named "pytorch" for the master port and refuses a replica without
# one (pkg/webhooks/pytorch/pytorchjob_webhook.go); MASTER_PORT comes from its port named "pytorchjob-port".
PYTORCH_CONTAINER = "pytorch"
PYTORCH_PORT = {"name": "pytorchjob-port", "containerPort": 23456}
# A job's name is an RFC 1035 label in both operators' admission rules (the TrainJob CRD's CEL rule, the
# PyTorchJob webhook's NameIsDNS1035Label): lower-case letters, digits and "-", a letter first, at most 63.
_JOB_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_JOB_NAME_MAX = 63
# KubeRay names the RayCluster after the RayJob plus a 6-character suffix and caps cluster names at 53
# (ray-operator/controllers/ray/utils/constant.go MaxRayJobNameLength, enforced by ValidateRayJobMetadata).
_RAYJOB_NAME_MAX = 47
# KubeRay runs the Ray node in the first container of each pod (utils.RayContainerIndex); the names are its samples'.
RAY_HEAD_CONTAINER = "ray-head"
RAY_WORKER_CONTAINER = "ray-worker"
RAY_WORKER_GROUP = "workers"
# How long a finished RayJob's cluster stays up for `kubectl logs` and the dashboard before KubeRay deletes it;
# checkpoints and metrics are on the claim and outlive it.
RAYJOB_TTL_SECONDS = 600
# Retries of a failed RayJob: each deletes the Ray cluster and starts a new one, which resumes from the claim.
RAYJOB_BACKOFF_LIMIT = 2
# distributed.placement=ray: the policy trainer (the job's entrypoint) reserves one GPU from Ray, so that no role's
# actor is given the GPU it trains on. One process: a trainer group over several GPUs is not rendered here (yet).
TRAINER_GPUS = 1
# The run config's distributed.ray_address under a RayJob: join the job's own cluster, at the address Ray's job
# supervisor puts in the entrypoint's RAY_ADDRESS.
RAYJOB_RAY_ADDRESS = "auto"
_INT32_MAX = 2**31 - 1
# A Kubernetes quantity as a storage size takes it: a positive decimal with an optional binary or decimal suffix.
_STORAGE_SIZE = re.compile(r"([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[kMGTPE])?")


@dataclass(frozen=True)
class Cluster:
    """The resources a run asks of the cluster: the flags of ``posttrain launch k8s``."""

    nodes: int
    gpus_per_node: int
    image: str
    storage: str = "100Gi"
    storage_class: str | None = None
    ttl_after_finished: int | None = None  # RayJob only; None: RAYJOB_TTL_SECONDS

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be at least 1 (got {self.nodes})")
        if self.gpus_per_node < 1:
            raise ConfigError(f"--gpus-per-node must be at least 1 (got {self.gpus_per_node})")
        if not self.image.strip():
            raise ConfigError(
                "--image is required: a container image with posttrain installed, e.g. --image ghcr.io/me/posttrain:0.1"
            )
        if not _STORAGE_SIZE.fullmatch(self.storage):
            raise ConfigError(f"--storage {self.storage}: expected a Kubernetes quantity such as 100Gi or 1Ti")
        if self.ttl_after_finished is not None and not 0 <= self.ttl_after_finished <= _INT32_MAX:
            raise ConfigError(
                f"--ttl-after-finished {self.ttl_after_finished}: expected seconds from 0 to {_INT32_MAX} "
                f"(default {RAYJOB_TTL_SECONDS})"
            )

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Pod:
    """What every pod of the run shares, whichever operator starts it."""

    job_name: str
    cluster: Cluster
    roles_on_ray: bool = False  # distributed.placement=ray (RayJob only): the roles are actors of the Ray cluster

    @property
    def output_dir(self) -> str:
        return f"{CHECKPOINT_DIR}/{self.job_name}"

    @property
    def command(self) -> list[str]:
        return ["torchrun", "-m", "posttrain", "train", f"{CONFIG_DIR}/{CONFIG_FILE}"]

    @property
    def gpus(self) -> dict[str, Any]:
        return {"limits": {GPU: self.cluster.gpus_per_node}}

    @property
    def volumes(self) -> list[dict[str, Any]]:
        return [
            {"name": "run-config", "configMap": {"name": f"{self.job_name}-config"}},
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": f"{self.job_name}-checkpoints"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ]

    @property
    def volume_mounts(self) -> list[dict[str, Any]]:
        return [
            {"name": "run-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "checkpoints", "mountPath": CHECKPOINT_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ]


def trainjob(pod: Pod) -> dict[str, Any]:
    """Kubeflow Trainer v2 TrainJob. The runtime sets the pods' restart policy (JobSet defaults it to OnFailure);
    the volumes go in through ``runtimePatches``, the one place a TrainJob may add them."""
    node_pod_spec = {
        "volumes": pod.volumes,
        "containers": [{"name": TRAINER_NODE, "volumeMounts": pod.volume_mounts}],
    }
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": pod.job_name, "labels": _labels(pod.job_name)},
        "spec": {
            "runtimeRef": {
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
                "name": TRAINER_RUNTIME,
            },
            "trainer": {
                "image": pod.cluster.image,
                "command": pod.command,
                "numNodes": pod.cluster.nodes,
                # Without it the runtime passes "auto" and torchrun counts the GPUs it sees; stated, the world size
                # is the one asked for, or the rendezvous fails.
                "numProcPerNode": pod.cluster.gpus_per_node,
                "resourcesPerNode": pod.gpus,
            },
            "runtimePatches": [
                {
                    "manager": "posttrain/launch-k8s",
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {"name": TRAINER_NODE, "template": {"spec": {"template": {"spec": node_pod_spec}}}}
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


def pytorchjob(pod: Pod) -> dict[str, Any]:
    """Kubeflow Training Operator v1 PyTorchJob: a Master (node rank 0, the rendezvous host) and ``nodes - 1``
    Workers, each pod restarted in place on failure. No elasticPolicy: the world size is fixed, as the run's global
    batch assumes."""
    template = {
        "metadata": {"labels": _labels(pod.job_name)},
        "spec": {
            "containers": [
                {
                    "name": PYTORCH_CONTAINER,
                    "image": pod.cluster.image,
                    "command": pod.command,
                    "ports": [PYTORCH_PORT],
                    "resources": pod.gpus,
                    "volumeMounts": pod.volume_mounts,
                }
            ],
            "volumes": pod.volumes,
        },
    }
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if pod.cluster.nodes > 1:
        replicas["Worker"] = {"replicas": pod.cluster.nodes - 1, "restartPolicy": "OnFailure", "template": template}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": pod.job_name, "labels": _labels(pod.job_name)},
        "spec": {"nprocPerNode": str(pod.cluster.gpus_per_node), "pytorchReplicaSpecs": replicas},
    }


def rayjob(pod: Pod) -> dict[str, Any]:
    """KubeRay ``RayJob`` (ray.io/v1): a Ray cluster of one head pod and ``nodes - 1`` worker pods, each with the
    node's GPUs, and ``posttrain train`` as the job's entrypoint. Where the run's processes go follows the config's
    ``distributed.placement``:

    - ``local`` (every stage but ppo, and ppo by default): the entrypoint is ``posttrain train CONFIG --nproc G``, G
      processes on the head. It asks for no resources (entrypointNumCpus/Gpus unset), so Ray's job supervisor runs it
      on the head node and leaves CUDA_VISIBLE_DEVICES unset for it. The roles live in those processes, so the workers
      join the cluster and stay idle; they are rendered so the manifest already has the cluster's final shape.
    - ``ray``: the entrypoint is ``posttrain train CONFIG``, one process, the policy trainer. It reserves
      ``TRAINER_GPUS`` (``entrypointNumGpus``): Ray starts it on a node with a free GPU, head or worker (every pod
      mounts the config and the claim), with that GPU in its CUDA_VISIBLE_DEVICES, and gives it to no role's actor.
      The rollout engines, the reference and the reward are Ray actors (``ray_actors``) that Ray places over the
      cluster's GPUs. The run config says
      ``distributed.ray_address: auto``: the job supervisor sets the entrypoint's RAY_ADDRESS to the cluster's GCS
      address (KubeRay also sets it in every Ray container), which ``auto`` joins; left unset, posttrain would start
      a Ray of its own, and ``ray.init`` refuses that once RAY_ADDRESS is set.

    K8sJobMode: KubeRay submits the entrypoint from a separate Kubernetes Job (``ray job submit`` against the head's
    dashboard), which retries its own submission without starting the job twice. ``backoffLimit`` retries a failed
    job on a new Ray cluster, which resumes from the newest checkpoint on the claim (resume=auto).
    ``shutdownAfterJobFinishes`` frees the GPUs once the job ends, ``ttlSecondsAfterFinished`` later.
    No ``runtimeEnvYAML``: the image carries posttrain and its dependencies, and neither the entrypoint nor the roles'
    actors need a variable that the pods and Ray do not already set: RAY_ADDRESS (above); PYTHONUNBUFFERED (the job
    supervisor sets it for the entrypoint, Ray for every worker process); OMP_NUM_THREADS (Ray sets each actor's to its
    num_cpus, and ``distributed.roles.*.threads`` sets torch's own count; the entrypoint inherits the job
    supervisor's 1, torchrun's default too); CUDA_VISIBLE_DEVICES (Ray, per actor and for a reserving entrypoint);
    HOME and the working directory (the image's, inherited by every process of a pod from its raylet).
    The object store takes Ray's default size (30 % of the memory Ray sees in the container) in the memory-backed
    /dev/shm, whose emptyDir has no size limit below the pod's memory, so it is not set here."""
    gpus = str(pod.cluster.gpus_per_node)

    def pod_template(container_name: str) -> dict[str, Any]:
        container = {
            "name": container_name,
            "image": pod.cluster.image,
            "resources": pod.gpus,
            "volumeMounts": pod.volume_mounts,
        }
        return {
            "metadata": {"labels": _labels(pod.job_name)},
            "spec": {"containers": [container], "volumes": pod.volumes},
        }

    # num-gpus states what KubeRay would otherwise infer from the container's GPU limit: the two are one number.
    cluster_spec: dict[str, Any] = {
        "headGroupSpec": {"rayStartParams": {"num-gpus": gpus}, "template": pod_template(RAY_HEAD_CONTAINER)}
    }
    workers = pod.cluster.nodes - 1
    if workers:
        # A fixed size (no autoscaler): min = max = replicas, which KubeRay requires when autoscaling is off.
        cluster_spec["workerGroupSpecs"] = [
            {
                "groupName": RAY_WORKER_GROUP,
                "replicas": workers,
                "minReplicas": workers,
                "maxReplicas": workers,
                "rayStartParams": {"num-gpus": gpus},
                "template": pod_template(RAY_WORKER_CONTAINER),
            }
        ]
    ttl = RAYJOB_TTL_SECONDS if pod.cluster.ttl_after_finished is None else pod.cluster.ttl_after_finished
    entrypoint = ["posttrain", "train", f"{CONFIG_DIR}/{CONFIG_FILE}"]
    if not pod.roles_on_ray:
        entrypoint += ["--nproc", gpus]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": pod.job_name, "labels": _labels(pod.job_name)},
        "spec": {
            "entrypoint": shlex.join(entrypoint),
            **({"entrypointNumGpus": TRAINER_GPUS} if pod.roles_on_ray else {}),
            "submissionMode": "K8sJobMode",
            "backoffLimit": RAYJOB_BACKOFF_LIMIT,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": ttl,
            "rayClusterSpec": cluster_spec,
        },
    }


JOB_KINDS: dict[str, Callable[[Pod], dict[str, Any]]] = {
    "trainjob": trainjob,
    "pytorchjob": pytorchjob,
    "rayjob": rayjob,
}
# The longest job name each kind's operator accepts.
_NAME_MAX = {"trainjob": _JOB_NAME_MAX, "pytorchjob": _JOB_NAME_MAX, "rayjob": _RAYJOB_NAME_MAX}


def render(config: StageConfig, kind: str, cluster: Cluster, name: str | None = None) -> list[dict[str, Any]]:
    """The run's manifests, in the order they are applied: claim, config, job. The job's name defaults to the last
    part of ``config.output_dir``."""
    if kind not in JOB_KINDS:
        raise ConfigError(f"--kind {kind}: unknown job kind; expected one of {', '.join(JOB_KINDS)}")
    if config.resume != "auto":
        raise ConfigError(
            f"resume={'false' if config.resume is False else config.resume}: a pod that restarts on Kubernetes must continue from its last checkpoint, so "
            "launch k8s needs resume=auto; remove the resume setting from the config"
        )
    if cluster.ttl_after_finished is not None and kind != "rayjob":
        raise ConfigError(
            f"--ttl-after-finished applies to --kind rayjob only (a {kind} has no such field); remove it"
        )
    job_name = _job_name(name, config.output_dir, _NAME_MAX[kind])
    ray_placed = _ray_placed(config)
    pod = Pod(job_name, cluster, roles_on_ray=ray_placed is not None and kind == "rayjob")
    update: dict[str, Any] = {"output_dir": pod.output_dir}
    if ray_placed is not None and kind != "rayjob":
        # In a torchrun pod the run would start a Ray of its own there, whose actors Ray gives the GPUs the
        # trainer already uses, and the other pods would not join it.
        raise ConfigError(
            f"distributed.placement=ray places the roles on a Ray cluster, and a {kind} has none (its pods run "
            "torchrun); use --kind rayjob"
        )
    if ray_placed is not None and kind == "rayjob":
        update["distributed"] = _joining_the_job_cluster(ray_placed, cluster)
    run_config = config.model_copy(update=update)
    return [_checkpoint_claim(job_name, cluster), _config_map(job_name, run_config), JOB_KINDS[kind](pod)]


def launch_k8s(
    config: StageConfig, kind: str, cluster: Cluster, name: str | None = None, out: str | Path | None = None
) -> str:
    """What ``posttrain launch k8s`` prints: the manifests, ready for ``kubectl apply -f -``; or, given ``out``, what
    it wrote to ``out/NAME.yaml`` and how to start it."""
    manifests = render(config, kind, cluster, name)
    text = to_yaml(manifests)
    if out is None:
        return text
    claim, config_map, job = manifests
    path = Path(out) / f"{job['metadata']['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    pod = Pod(job["metadata"]["name"], cluster)
    roles = ""
    if job["kind"] == "RayJob":
        ray_cluster = (
            f"Ray cluster of {cluster.nodes} pods (head + {cluster.nodes - 1} workers) x {cluster.gpus_per_node} GPUs"
        )
        ray_placed = _ray_placed(config)
        if ray_placed is not None:
            shape = (
                f"{ray_cluster}; the policy trainer (posttrain train, {TRAINER_GPUS} GPU) and the roles' Ray "
                "actors go wherever Ray finds room"
            )
            roles = f"  roles:       {_describe_roles(ray_placed, cluster)}\n"
        else:
            shape = (
                f"{ray_cluster}; posttrain train runs on the head as {cluster.gpus_per_node} processes, the workers "
                "stay idle"
            )
    else:
        shape = (
            f"world size {cluster.world_size} ({cluster.nodes} pods x {cluster.gpus_per_node} GPUs, one process per "
            "GPU, started by torchrun in each pod)"
        )
    return (
        f"{job['kind']} {pod.job_name}: {shape}\n"
        f"{roles}"
        f"  config:      ConfigMap {config_map['metadata']['name']}, mounted at {CONFIG_DIR}/{CONFIG_FILE}\n"
        f"  checkpoints: PersistentVolumeClaim {claim['metadata']['name']} ({cluster.storage}, "
        f"{claim['spec']['accessModes'][0]}): output_dir={pod.output_dir}, resume=auto\n"
        f"  manifests:   {path}\n"
        f"  start:       kubectl apply -f {path}\n"
    )


class _ManifestDumper(yaml.SafeDumper):
    """Multi-line strings (the run config) as literal blocks; a dict used twice (the PyTorchJob's pod template)
    written out twice, not as a YAML alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_ManifestDumper.add_representer(str, _str)


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    """One multi-document YAML file, as ``kubectl apply -f`` reads it."""
    return yaml.dump_all(manifests, Dumper=_ManifestDumper, sort_keys=False)


def _job_name(name: str | None, output_dir: str, max_length: int) -> str:
    if name is None:
        derived = re.sub(r"[^a-z0-9]+", "-", PurePosixPath(output_dir).name.lower()).strip("-")
        name = derived if derived[:1].isalpha() else f"run-{derived}".rstrip("-")
        name = name[:max_length].rstrip("-")
        source = f"output_dir={output_dir}"
    else:
        source = "--name"
    if not _JOB_NAME.fullmatch(name) or len(name) > max_length:
        raise ConfigError(
            f"{source}: job name {name!r} is not an RFC 1035 label (lower-case letters, digits and '-', a letter "
            f"first, at most {max_length} characters); give one with --name, e.g. --name sft-run-1"
        )
    return name


def _labels(job_name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "posttrain", "app.kubernetes.io/instance": job_name}


def _ray_placed(config: StageConfig) -> PpoConfig | None:
    """``config`` when its roles are placed on Ray (only stage ppo has roles to place), else None."""
    return config if isinstance(config, PpoConfig) and config.distributed.placement == "ray" else None


def _joining_the_job_cluster(config: PpoConfig, cluster: Cluster) -> DistributedBlock:
    """``config.distributed`` for a RayJob's entrypoint: joining the job's own Ray cluster. Refuses another cluster's
    address, and roles whose GPUs the cluster cannot hold, which Ray would leave pending until the run fails at
    ``distributed.call_timeout_s`` naming one of them."""
    distributed = config.distributed
    if distributed.ray_address not in (None, RAYJOB_RAY_ADDRESS):
        raise ConfigError(
            f"distributed.ray_address={distributed.ray_address}: a RayJob runs on its own Ray cluster, which the run "
            f"joins with ray_address={RAYJOB_RAY_ADDRESS}; remove the setting"
        )
    actors = ray_actors(config)
    for actor in actors:
        if actor.num_gpus > cluster.gpus_per_node:
            raise ConfigError(
                f"distributed.roles.{actor.role}.num_gpus={actor.num_gpus:g}: a Ray actor runs on one node, which has "
                f"{cluster.gpus_per_node} GPUs (--gpus-per-node); lower it or raise --gpus-per-node"
            )
    demand = _gpu_demand(actors)
    if demand > cluster.world_size:
        shares = ", ".join(
            f"{role} {len(group)} x {group[0].num_gpus:g}" if len(group) > 1 else f"{role} {group[0].num_gpus:g}"
            for role, group in _by_role(actors).items()
            if group[0].num_gpus
        )
        raise ConfigError(
            f"distributed.roles ask for {demand:g} GPUs with the trainer's {TRAINER_GPUS} ({shares}), more than the "
            f"cluster's {cluster.world_size} (--nodes {cluster.nodes} x --gpus-per-node {cluster.gpus_per_node}); "
            "lower the roles' num_gpus or rollout.num_engines, colocate a role with the policy, or raise --nodes"
        )
    return distributed.model_copy(update={"ray_address": RAYJOB_RAY_ADDRESS})


def _gpu_demand(actors: list[RoleActor]) -> float:
    # Ray counts resources in units of 1/10000: rounded there, 3 x 0.1 GPU is 0.3, not 0.30000000000000004.
    return round(TRAINER_GPUS + sum(actor.num_gpus for actor in actors), 4)


def _by_role(actors: list[RoleActor]) -> dict[str, list[RoleActor]]:
    groups: dict[str, list[RoleActor]] = {}
    for actor in actors:
        groups.setdefault(actor.role, []).append(actor)
    return groups


def _describe_roles(config: PpoConfig, cluster: Cluster) -> str:
    """Where each role runs under placement ray, and the GPUs they reserve with the trainer's."""
    actors = _by_role(ray_actors(config))
    placed = []
    for role in RolesBlock.model_fields:
        if role in actors:
            group = actors[role]
            count = f"{len(group)} x " if len(group) > 1 else ""
            placed.append(f"{role} {count}({group[0].num_gpus:g} GPU, {group[0].num_cpus:g} CPU)")
        elif getattr(config.distributed.roles, role).colocate_with == "policy":
            placed.append(f"{role} in the trainer's process")
    demand = _gpu_demand([actor for group in actors.values() for actor in group])
    return f"{', '.join(placed)}; {demand:g} of {cluster.world_size} GPUs with the trainer's"


def _checkpoint_claim(job_name: str, cluster: Cluster) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany" if cluster.nodes > 1 else "ReadWriteOnce"],
        "resources": {"requests": {"storage": cluster.storage}},
    }
    if cluster.storage_class:
        spec["storageClassName"] = cluster.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"{job_name}-checkpoints", "labels": _labels(job_name)},
        "spec": spec,
    }


def _config_map(job_name: str, config: StageConfig) -> dict[str, Any]:
    # The text save_config writes as a run's config.yaml (tests/test_k8s.py holds the two equal).
    config_yaml = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{job_name}-config", "labels": _labels(job_name)},
        "data": {CONFIG_FILE: config_yaml},
    }
