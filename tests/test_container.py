"""docker/Dockerfile.cpu and docker/k8s without a container engine or a cluster: the Kubernetes manifests render
(`kubectl kustomize` where kubectl is installed), and their ports, probes, termination grace period, --grace,
user and writable paths agree with each other and with the image. Each rule is also shown to fail when the
two disagree. scripts/container-check.sh builds and runs the image itself (it needs buildah and root)."""
from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile.cpu"
K8S = REPO / "docker" / "k8s"
SCRIPT = REPO / "scripts" / "container-check.sh"


# ---------------------------------------------------------------- reading the Dockerfile

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def last(self, instruction: str) -> str:
        found = self.all(instruction)
        assert found, f"the stage FROM {self.base} has no {instruction}"
        return found[-1]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(ARGs before the first FROM with their defaults, the stages): continuation lines joined, comments dropped."""
    lines, pending = [], ""
    for raw in text.splitlines():
        if not pending and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if pending and raw.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        instruction, _, args = line.strip().partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            words = args.split()
            stages.append(Stage(words[0], words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        elif not stages:
            assert instruction == "ARG", f"only ARG may come before the first FROM, not {line!r}"
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((instruction, args))
    return global_args, stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def flag(argv: list[str], name: str) -> str | None:
    """The value of the last `name VALUE` in argv (argparse: the last one wins), or None."""
    value = None
    for i, word in enumerate(argv[:-1]):
        if word == name:
            value = argv[i + 1]
    return value


@dataclass
class Image:
    """What a container engine takes from the runtime stage of docker/Dockerfile.cpu."""
    exposed: set[int]
    user: str
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]


def image_of(text: str) -> Image:
    _, stages = parse_dockerfile(text)
    runtime = stages[-1]
    healthcheck = runtime.last("HEALTHCHECK")
    assert " CMD " in f" {healthcheck} ", healthcheck
    return Image(exposed={int(p.split("/")[0]) for args in runtime.all("EXPOSE") for p in args.split()},
                 user=runtime.last("USER"), env=env_of(runtime), entrypoint=exec_form(runtime.last("ENTRYPOINT")),
                 cmd=exec_form(runtime.last("CMD")), healthcheck=exec_form(healthcheck.split(" CMD ", 1)[1]))


# ---------------------------------------------------------------- rendering the manifests

def kustomize_subset(folder: Path) -> list[dict]:
    """The rendering of a kustomization that only lists resources (what docker/k8s has): their objects, in order."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    extra = set(kustomization) - {"apiVersion", "kind", "resources"}
    assert not extra, f"kustomization.yaml uses {sorted(extra)}: render it with kubectl kustomize"
    return [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((folder / name).read_text()) if doc]


def kubectl_kustomize(folder: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def rendered() -> list[dict]:
    return kubectl_kustomize(K8S) if shutil.which("kubectl") else kustomize_subset(K8S)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


# ---------------------------------------------------------------- the rules

def problems(image: Image, objects: list[dict]) -> list[str]:
    """Every way the manifests and the image disagree (empty when they agree)."""
    found: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            found.append(message)

    entrypoint = image.entrypoint
    ports = {"grpc": flag(entrypoint, "--port"), "http": flag(entrypoint, "--http-port"),
             "metrics": flag(entrypoint, "--metrics-port")}
    check(all(ports.values()), f"the ENTRYPOINT sets --port, --http-port and --metrics-port: {entrypoint}")
    served = {name: int(p) for name, p in ports.items() if p}
    check(set(served.values()) == image.exposed,
          f"EXPOSE {sorted(image.exposed)} differs from the ENTRYPOINT's ports {sorted(served.values())}")
    check(flag(entrypoint, "--host") in ("0.0.0.0", "[::]", "::"), "the ENTRYPOINT listens on every interface")

    # The HEALTHCHECK asks the HTTP port's /health.
    url = re.search(r"https?://[^/'\"]+:(\d+)(/[\w/]*)", " ".join(image.healthcheck))
    check(url is not None and int(url.group(1)) == served.get("http") and url.group(2) == "/health",
          f"the HEALTHCHECK asks {url.group(0) if url else 'no URL'}, not the --http-port's /health")

    deployments = by_kind(objects, "Deployment")
    check(len(deployments) == 1, f"one Deployment, found {len(deployments)}")
    if not deployments:
        return found
    pod = deployments[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    check(named == served, f"the container's ports {named} differ from the image's {served}")

    # Probes: the gRPC health service on the gRPC port, or GET /health on the HTTP port.
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe is None:
            found.append(f"no {kind}")
        elif "grpc" in probe:
            check(probe["grpc"].get("port") == served.get("grpc"),
                  f"{kind} asks gRPC port {probe['grpc'].get('port')}, the server's is {served.get('grpc')}")
        elif "httpGet" in probe:
            port = probe["httpGet"].get("port")
            check((named.get(port) if isinstance(port, str) else port) == served.get("http")
                  and probe["httpGet"].get("path") == "/health", f"{kind} asks {probe['httpGet']}, not http /health")
        else:
            found.append(f"{kind} is neither a grpc nor an httpGet probe")

    # args replace CMD: they keep its flags, --grace above all, and the pod outlives the drain.
    args = container.get("args", image.cmd)
    for word in image.cmd:
        if word.startswith("--"):
            check(word in args, f"the Deployment's args drop the image's CMD flag {word}")
    grace = float(flag(args, "--grace") or 10)
    check(grace == float(flag(image.cmd, "--grace") or 10),
          f"--grace {grace:g} in the Deployment's args, {flag(image.cmd, '--grace')} in the image's CMD")
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pause = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] and len(pre_stop) == 2 else 0.0
    period = pod.get("terminationGracePeriodSeconds", 30)
    check(period > pause + grace, f"terminationGracePeriodSeconds {period} is not longer than the preStop pause "
                                  f"{pause:g} s plus --grace {grace:g} s: streams would be killed mid-drain")
    liveness = container.get("livenessProbe", {})
    window = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    check(window > grace, f"the liveness probe fails the pod after {window} s, within the {grace:g} s drain "
                          f"(the health service answers NOT_SERVING while draining)")

    # The user, and a read-only root: the image writes only under writable volumes.
    uid, _, gid = image.user.partition(":")
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    check(uid.isdigit() and uid != "0", f"the image's USER {image.user} is a numeric non-root uid")
    check(security.get("runAsNonRoot") is True, "runAsNonRoot is set")
    check(str(security.get("runAsUser")) == uid, f"runAsUser {security.get('runAsUser')} is not the image's {uid}")
    if gid:
        check(str(security.get("runAsGroup")) == gid, f"runAsGroup {security.get('runAsGroup')} is not the image's {gid}")
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}

    def mount_of(path: str) -> dict | None:
        holders = [m for p, m in mounts.items() if PurePosixPath(path).is_relative_to(p)]
        return max(holders, key=lambda m: len(m["mountPath"]), default=None)

    if security.get("readOnlyRootFilesystem"):
        for key in ("HOME", "TMPDIR", "SC2DEPLOY_CACHE_DIR"):
            path = image.env.get(key)
            mount = mount_of(path) if path else None
            check(mount is not None and not mount.get("readOnly") and "emptyDir" in volumes.get(mount["name"], {}),
                  f"{key}={path} is not on a writable emptyDir volume, and the root file system is read-only")

    # The artifact and the API key file are mounted where the server reads them.
    artifact = flag(entrypoint, "--artifact")
    check(artifact in mounts, f"nothing is mounted at the ENTRYPOINT's --artifact {artifact}")
    keys = flag(args, "--api-key-file")
    if keys:
        mount = mount_of(keys)
        check(mount is not None and "secret" in volumes.get(mount["name"], {}),
              f"--api-key-file {keys} is not on a Secret volume")

    # Services: their target ports are the container's, by name or number.
    for service in by_kind(objects, "Service"):
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            number = named.get(target) if isinstance(target, str) else target
            check(number in served.values() and number == port["port"],
                  f"Service {service['metadata']['name']} port {port.get('name')} ({port['port']} -> {target}) "
                  f"is not a container port of the same number")
    annotations = deployments[0]["spec"]["template"].get("metadata", {}).get("annotations", {})
    if "prometheus.io/port" in annotations:
        check(int(annotations["prometheus.io/port"]) == served.get("metrics"),
              f"prometheus.io/port {annotations['prometheus.io/port']} is not --metrics-port {served.get('metrics')}")
    return found


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def image() -> Image:
    return image_of(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return rendered()


def test_manifests_render(objects):
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["Deployment", "Service", "Service"], kinds


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_matches_the_resources():
    """Where kubectl is missing the tests read the resources directly: the same objects as kubectl's rendering."""
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(kubectl_kustomize(K8S), key=key) == sorted(kustomize_subset(K8S), key=key)


def test_manifests_agree_with_the_image(image, objects):
    assert problems(image, objects) == []


def _deployment(objects):
    return by_kind(objects, "Deployment")[0]["spec"]["template"]


def _container(objects):
    return _deployment(objects)["spec"]["containers"][0]


def _set_flag(argv, name, value):
    argv[argv.index(name) + 1] = value


MUTATIONS = {
    "EXPOSE differs": (lambda im, ob: im.exposed.discard(8080), "EXPOSE"),
    "probe port": (lambda im, ob: _container(ob)["readinessProbe"]["grpc"].update(port=50052), "readinessProbe"),
    "container port": (lambda im, ob: _container(ob)["ports"][0].update(containerPort=50052), "container's ports"),
    "entrypoint port": (lambda im, ob: _set_flag(im.entrypoint, "--http-port", "8081"), "HEALTHCHECK"),
    "grace in args": (lambda im, ob: _set_flag(_container(ob)["args"], "--grace", "30"), "--grace 30"),
    "grace period": (lambda im, ob: _deployment(ob)["spec"].update(terminationGracePeriodSeconds=20),
                     "terminationGracePeriodSeconds"),
    "liveness window": (lambda im, ob: _container(ob)["livenessProbe"].update(failureThreshold=1), "liveness"),
    "args drop --grace": (lambda im, ob: _container(ob).update(args=["--max-batch", "16", "--max-queue", "64"]),
                          "drop the image's CMD flag --grace"),
    "user": (lambda im, ob: _deployment(ob)["spec"]["securityContext"].update(runAsUser=1000), "runAsUser"),
    "no /tmp volume": (lambda im, ob: _container(ob).update(
        volumeMounts=[m for m in _container(ob)["volumeMounts"] if m["mountPath"] != "/tmp"]), "HOME=/tmp"),
    "artifact path": (lambda im, ob: _set_flag(im.entrypoint, "--artifact", "/models/other"), "--artifact"),
    "service port": (lambda im, ob: by_kind(ob, "Service")[0]["spec"]["ports"][0].update(targetPort=9999),
                     "Service sc2deploy port grpc"),
    "metrics annotation": (lambda im, ob: _deployment(ob)["metadata"]["annotations"].update(
        {"prometheus.io/port": "9091"}), "prometheus.io/port"),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_a_disagreement_is_found(name, image, objects):
    mutate, expected = MUTATIONS[name]
    image, objects = copy.deepcopy(image), copy.deepcopy(objects)
    mutate(image, objects)
    found = problems(image, objects)
    assert any(expected in p for p in found), found


def test_dockerfile_build_inputs():
    """What users behind a proxy choose at build time, and what the runtime stage leaves out."""
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    assert global_args.get("BASE_IMAGE") == "python:3.11-slim"
    wheels, build, runtime = stages
    assert (wheels.base, wheels.name) == ("scratch", "wheels") and not wheels.instructions
    assert build.base == runtime.base == "${BASE_IMAGE}"
    args = dict(a.partition("=")[::2] for a in build.all("ARG"))
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu", args
    assert "TORCH_VERSION" in args and "PIP_INDEX_URL" in args and args.get("EXPORT_SIZE") == '""'
    runs = " ".join(build.all("RUN"))
    assert "--mount=type=secret,id=ca" in runs and "--mount=type=bind,from=wheels" in runs
    assert env_of(build).get("PIP_NO_CACHE_DIR") == "1"
    # The CA bundle is only ever a secret mount: no COPY or ADD of certificates, no ENV pointing at one.
    for stage in stages:
        for instruction, text in stage.instructions:
            if instruction in ("COPY", "ADD", "ENV"):
                assert not re.search(r"\.(pem|crt)\b|PIP_CERT|SSL_CERT", text), (instruction, text)
    # The runtime stage installs nothing: it copies the build stage's virtual environment and artifact.
    assert not any("pip" in r or "apt-get" in r for r in runtime.all("RUN")), runtime.all("RUN")
    assert {c.split()[-1] for c in runtime.all("COPY")} == {"/opt/sc2deploy", "/models"}


def test_container_check_script_help():
    """The container check needs buildah and root to run; its --help and its syntax need neither."""
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: scripts/container-check.sh" in result.stdout, result.stderr
    result = subprocess.run(["bash", str(SCRIPT), "--no-such-flag"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("container-check: error:")
