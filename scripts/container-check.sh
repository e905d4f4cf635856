#!/usr/bin/env bash
# The container check (README: "The container check"): build docker/Dockerfile.cpu with buildah, without a
# Docker engine, then run the image's server the way a user does and probe it. --help says what is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PROG=container-check

usage() {
    cat <<'EOF'
usage: scripts/container-check.sh [options]

Build docker/Dockerfile.cpu with buildah (--isolation chroot, EXPORT_SIZE=tiny: a random-weight artifact baked
in) and run the image's ENTRYPOINT and CMD as its own non-root user with `buildah run`, in a private network
namespace, so the image's ports (50051, 8080, 9090) collide with nothing on the host. Each run is a new
container from the image, as `docker run` makes one:

  A  baked artifact, --api-key-file from a mounted secret folder: the server runs as the image's uid;
     gRPC health says SERVING; reflection lists the services; a call without the key is refused; one
     streamed completion; HTTP GET /health answers 200; the image's HEALTHCHECK command passes inside the
     container; then SIGTERM during streamed completions: /health answers 503 while draining, the streams
     finish, the server exits 0.
  B  read-only root file system with a /tmp volume (as Kubernetes' readOnlyRootFilesystem and an
     emptyDir), artifact mounted from the host and owned by another uid (4242, world-readable): health,
     a streamed completion, HEALTHCHECK, a write to / refused, SIGTERM and exit 0.
  C  artifact owned by another uid and not readable by the image's user (the folder, then only the files):
     exit 2 and one line on stderr that names the permission problem and the remedy (readable, chmod,
     fsGroup or --user).
  D  no artifact mounted: exit 2 and one line on stderr naming /models/artifact and the remedy (mount
     or export).

It prints a line per check on stderr, the image size and the build time, and ends with exit status 0 when
every check passed, 1 when one failed, 2 for bad usage or a missing tool. Needs root, buildah, ip (iproute2),
nsenter (util-linux), debootstrap (only to make the stand-in base), and .venv (scripts/setup.sh) for the
probes, which run on the host: grpc health and reflection, `sc2deploy complete --stream`, urllib.

options:
  --base-image IMAGE  base image of both stages (default: $BASE_IMAGE, else python:3.11-slim); where
                      python:3.11-slim can be neither found nor pulled, a stand-in is made with debootstrap
                      (Debian bookworm minbase + Python 3.11) and kept as localhost/sc2deploy-base:bookworm-py3.11
  --rebuild-base      make the debootstrap stand-in again
  --ca FILE           CA bundle given to pip as the build secret `ca` (default: $CA_BUNDLE, else $PIP_CERT,
                      pip's `cert` setting, $SSL_CERT_FILE, /etc/ssl/certs/ca-certificates.crt; `none`: none)
  --wheels DIR        local wheel folder, given as --build-context wheels=DIR (default: $WHEELS, else pip's
                      find-links folder when it holds a torch wheel; `none`: torch comes from TORCH_INDEX);
                      buildah's layer cache does not notice a change of wheels: add --no-cache then
  --torch-index URL   TORCH_INDEX build argument (default: the Dockerfile's, PyTorch's CPU wheel index)
  --image NAME        tag of the built image (default localhost/sc2deploy-cpu:check)
  --no-cache          build every layer again (default: buildah's layer cache is used and kept)
  --keep              keep the work folder (logs, server output) after a passing run
  --json              print one JSON object on stdout at the end (the figures and every check)
  -h, --help          this text

environment: BASE_IMAGE, CA_BUNDLE, WHEELS, TORCH_INDEX, PIP_INDEX_URL (else pip's index-url setting, when
http(s)), DEBIAN_MIRROR (default http://deb.debian.org/debian), STORAGE_DRIVER (buildah's; default its own).
The built image, its layers and the stand-in base stay in buildah's storage (`buildah rmi --prune` frees the
space of old layers, and the layer cache with it); containers, mounts, the network namespace and the work
folder are removed.
EOF
}

say() { echo "$PROG: $*" >&2; }
usage_error() { say "error: $*"; exit 2; }
fatal() { say "error: $*"; exit 1; }
# fatal_log MESSAGE LOG: the last lines of LOG, then one error line.
fatal_log() { tail -n 15 "$2" | sed 's/^/  | /' >&2; fatal "$1 (log: $2)"; }
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

BASE_IMAGE=${BASE_IMAGE:-}
CA_BUNDLE=${CA_BUNDLE:-}
WHEELS=${WHEELS:-}
TORCH_INDEX=${TORCH_INDEX:-}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMAGE=localhost/sc2deploy-cpu:check
STAND_IN=localhost/sc2deploy-base:bookworm-py3.11
REBUILD_BASE=0 NO_CACHE=0 KEEP=0 JSON=0
while [ $# -gt 0 ]; do
    case $1 in
        --base-image | --ca | --wheels | --torch-index | --image)
            [ $# -ge 2 ] || usage_error "$1 needs a value"
            case $1 in
                --base-image) BASE_IMAGE=$2 ;; --ca) CA_BUNDLE=$2 ;; --wheels) WHEELS=$2 ;;
                --torch-index) TORCH_INDEX=$2 ;; --image) IMAGE=$2 ;;
            esac
            shift 2 ;;
        --rebuild-base) REBUILD_BASE=1; shift ;;
        --no-cache) NO_CACHE=1; shift ;;
        --keep) KEEP=1; shift ;;
        --json) JSON=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage_error "unknown argument $1 (see --help)" ;;
    esac
done

# ---- preflight ----
[ "$(id -u)" = 0 ] || usage_error "run as root: buildah's chroot isolation, bind mounts and network namespaces need it"
for tool in buildah ip nsenter mount; do
    command -v "$tool" >/dev/null || usage_error "$tool is missing: apt-get install buildah iproute2 util-linux mount"
done
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] && "$PY" -c 'import grpc_health, grpc_reflection, sc2deploy' 2>/dev/null \
    || usage_error "the probes need the project's .venv with the serve extra: run scripts/setup.sh first"
BUILDAH=(buildah)
[ -z "${STORAGE_DRIVER:-}" ] || BUILDAH+=(--storage-driver "$STORAGE_DRIVER")

pip_setting() { "$PY" -m pip config get "global.$1" 2>/dev/null || true; }
if [ -z "$CA_BUNDLE" ]; then
    for candidate in "${PIP_CERT:-}" "$(pip_setting cert)" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
        [ -n "$candidate" ] && [ -f "$candidate" ] && { CA_BUNDLE=$candidate; break; }
    done
fi
[ "$CA_BUNDLE" = none ] && CA_BUNDLE=
[ -z "$CA_BUNDLE" ] || [ -r "$CA_BUNDLE" ] || usage_error "--ca $CA_BUNDLE: no such readable file"
if [ -z "$WHEELS" ]; then
    for candidate in ${PIP_FIND_LINKS:-} $(pip_setting find-links); do
        compgen -G "$candidate/torch-*.whl" >/dev/null && { WHEELS=$candidate; break; }
    done
fi
[ "$WHEELS" = none ] && WHEELS=
[ -z "$WHEELS" ] || [ -d "$WHEELS" ] || usage_error "--wheels $WHEELS: no such folder"
PIP_INDEX=${PIP_INDEX_URL:-$(pip_setting index-url)}
case $PIP_INDEX in http://* | https://*) ;; *) PIP_INDEX= ;; esac  # a file:// index is not in the build

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sc2deploy-container-check.XXXXXX")
NETNS=sc2deploy-check-$$
CONTAINERS=()   # working containers made here
RO_BINDS=()     # read-only bind mounts made here (host mount namespace)
RUNNING=()      # `buildah run` processes of servers not yet reaped
FAILED=0
CHECKS=()       # "ok|FAIL<TAB>name<TAB>detail"

kill_tree() {  # kill_tree PID: the process and its descendants (buildah run, its runtime and the server)
    local child
    for child in $(ps -o pid= --ppid "$1"); do kill_tree "$child"; done
    kill -KILL "$1" 2>/dev/null || true
}
cleanup() {
    local rc=$? entry
    for entry in "${RUNNING[@]}"; do
        kill_tree "$entry"
        wait "$entry" 2>/dev/null || true
    done
    for entry in "${RO_BINDS[@]}"; do umount "$entry" 2>/dev/null || true; done
    for entry in "${CONTAINERS[@]}"; do "${BUILDAH[@]}" rm "$entry" >/dev/null 2>&1 || true; done
    ip netns delete "$NETNS" 2>/dev/null || true
    if [ "$rc" = 0 ] && [ "$KEEP" = 0 ]; then rm -rf "$WORK"; else say "work folder kept: $WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

record() {  # record ok|FAIL NAME DETAIL
    CHECKS+=("$1	$2	$3")
    if [ "$1" = ok ]; then say "  ok    $2: $3"; else say "  FAIL  $2: $3"; FAILED=$((FAILED + 1)); fi
}
expect() {  # expect NAME DETAIL COMMAND...: ok when COMMAND succeeds
    local name=$1 detail=$2; shift 2
    if "$@"; then record ok "$name" "$detail"; else record FAIL "$name" "$detail"; fi
}

# The probes run on the host, in the check's network namespace, with the project's Python.
cat >"$WORK/probe.py" <<'EOF'
"""Probes of scripts/container-check.sh (run on the host in the check's network namespace)."""
import json
import sys
import time
import urllib.error
import urllib.request


def health(port):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def reflection(port, key_file):
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    key = open(key_file).readline().strip()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=[("authorization", f"Bearer {key}")], timeout=5)
        return " ".join(sorted(s.name for r in replies for s in r.list_services_response.service))


def http_health(port):
    try:
        return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status)
    except urllib.error.HTTPError as e:
        return str(e.code)


def watch(port, seconds):
    """What GET /health answers from now until the port closes, in order, without repeats."""
    seen, end = [], time.monotonic() + float(seconds)
    while time.monotonic() < end and seen[-1:] != ["closed"]:
        try:
            status = http_health(port)
        except OSError:
            status = "closed"
        if seen[-1:] != [status]:
            seen.append(status)
        time.sleep(0.05)
    return " ".join(seen)


def stream(path):
    """finish_reason, completion_tokens and the number of chunks of a `complete --stream --json` output."""
    lines = [json.loads(line) for line in open(path) if line.strip()]
    last = lines[-1] if lines else {}
    return f"{last.get('finish_reason')} {last.get('usage', {}).get('completion_tokens')} {len(lines) - 1}"


def server(path):
    """port http_port context pid of the server's --json line."""
    info = json.loads(open(path).readline())
    return f"{info['port']} {info['http_port']} {info['context']} {info['pid']}"


def config(inspect_json, out):
    """The image's user, ports, entrypoint, cmd, env and healthcheck, as files for the shell (NUL-separated lists)."""
    c = json.load(open(inspect_json))["Docker"]["config"]
    test = (c.get("Healthcheck") or {}).get("Test") or []
    test = test[1:] if test[:1] == ["CMD"] else ["/bin/sh", "-c", test[1]] if test[:1] == ["CMD-SHELL"] else []
    for name, items in (("entrypoint", c.get("Entrypoint") or []), ("cmd", c.get("Cmd") or []),
                        ("env", c.get("Env") or []), ("healthcheck", test)):
        open(f"{out}/{name}", "w").write("".join(f"{item}\0" for item in items))
    return f"{c.get('User') or 'root'} {' '.join(sorted(c.get('ExposedPorts') or {}))}"


if __name__ == "__main__":
    try:
        print(globals()[sys.argv[1]](*sys.argv[2:]))
    except Exception as e:  # one line for the check's report
        print(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        sys.exit(1)
EOF
probe() { ip netns exec "$NETNS" "$PY" "$WORK/probe.py" "$@"; }
in_netns() { ip netns exec "$NETNS" "$@"; }

START=$(now)
# ---- 1. the base image ----
image_exists() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }
make_stand_in() {
    command -v debootstrap >/dev/null || usage_error "debootstrap is missing (it makes the stand-in base): apt-get install debootstrap"
    local t0 rootfs=$WORK/rootfs ctr mnt
    t0=$(now)
    say "base: making $STAND_IN with debootstrap (bookworm minbase + python3.11, from $DEBIAN_MIRROR) ..."
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || fatal_log "debootstrap could not make the stand-in base" "$WORK/debootstrap.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
    ctr=$("${BUILDAH[@]}" from --name "sc2deploy-check-$$-base" scratch)
    CONTAINERS+=("$ctr")
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    tar -C "$rootfs" -cf - . | tar -C "$mnt" -xf -
    "${BUILDAH[@]}" umount "$ctr" >/dev/null
    "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
        --cmd python3 --label org.opencontainers.image.description="sc2deploy container check: stand-in for python:3.11-slim" "$ctr"
    "${BUILDAH[@]}" commit -q "$ctr" "$STAND_IN" >/dev/null
    rm -rf "$rootfs"
    BASE_SECONDS=$(since "$t0")
    say "base: $STAND_IN made in $BASE_SECONDS s"
}
BASE_SECONDS=null
BASE=${BASE_IMAGE:-python:3.11-slim}
if [ "$BASE" = python:3.11-slim ] && ! image_exists "$BASE" && ! "${BUILDAH[@]}" pull -q "$BASE" >"$WORK/pull.log" 2>&1; then
    say "base: $BASE cannot be pulled here ($(tail -n 1 "$WORK/pull.log" | cut -c1-120)); using the stand-in"
    BASE=$STAND_IN
    if [ "$REBUILD_BASE" = 1 ] || ! image_exists "$STAND_IN"; then make_stand_in; else say "base: $STAND_IN (cached)"; fi
elif ! image_exists "$BASE" && ! "${BUILDAH[@]}" pull -q "$BASE" >"$WORK/pull.log" 2>&1; then
    fatal_log "base image $BASE: not in buildah's storage and cannot be pulled" "$WORK/pull.log"
else
    say "base: $BASE"
fi

# ---- 2. the build ----
build_args=(--build-arg "BASE_IMAGE=$BASE" --build-arg EXPORT_SIZE=tiny)
[ -z "$TORCH_INDEX" ] || build_args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
[ -z "$PIP_INDEX" ] || build_args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX")
[ -z "$CA_BUNDLE" ] || build_args+=(--secret "id=ca,src=$CA_BUNDLE")
[ -z "$WHEELS" ] || build_args+=(--build-context "wheels=$WHEELS")
if [ "$NO_CACHE" = 1 ]; then build_args+=(--no-cache); else build_args+=(--layers); fi
say "build: docker/Dockerfile.cpu as $IMAGE (CA bundle: ${CA_BUNDLE:-none}; wheels: ${WHEELS:-none, torch from TORCH_INDEX}; index: ${PIP_INDEX:-the Dockerfile default}) ..."
T0=$(now)
"${BUILDAH[@]}" bud --isolation chroot --format docker --pull=false --force-rm -f docker/Dockerfile.cpu \
    --ignorefile docker/Dockerfile.cpu.dockerignore "${build_args[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
    || fatal_log "buildah could not build docker/Dockerfile.cpu" "$WORK/build.log"
BUILD_SECONDS=$(since "$T0")
"${BUILDAH[@]}" inspect --type image "$IMAGE" >"$WORK/image.json"
read -r IMAGE_USER EXPOSED < <("$PY" "$WORK/probe.py" config "$WORK/image.json" "$WORK")
[ -s "$WORK/entrypoint" ] || fatal "the image $IMAGE has no ENTRYPOINT ($WORK/image.json)"
mapfile -d '' ENTRYPOINT <"$WORK/entrypoint"
mapfile -d '' CMD <"$WORK/cmd"
mapfile -d '' IMAGE_ENV <"$WORK/env"
mapfile -d '' HEALTHCHECK <"$WORK/healthcheck"

new_container() {  # new_container NAME: a working container from the image, as `docker run` makes; sets CTR
    CTR=$("${BUILDAH[@]}" from --pull=false --name "sc2deploy-check-$$-$1" "$IMAGE")
    CONTAINERS+=("$CTR")
}
new_container a
CTR_A=$CTR
MNT_A=$("${BUILDAH[@]}" mount "$CTR_A")
IMAGE_BYTES=$(du -sb "$MNT_A" | cut -f1)
IMAGE_SIZE=$(awk -v b="$IMAGE_BYTES" 'BEGIN { printf "%.2f GB", b / 1e9 }')
say "build: done in $BUILD_SECONDS s; image $IMAGE_SIZE ($IMAGE_BYTES bytes, uncompressed root file system)"
record ok "build" "$BUILD_SECONDS s from base $BASE; image $IMAGE_SIZE"

IMAGE_UID=${IMAGE_USER%%:*}
IMAGE_GID=${IMAGE_USER#*:}; [ "$IMAGE_GID" != "$IMAGE_USER" ] || IMAGE_GID=$IMAGE_UID
if [[ $IMAGE_UID =~ ^[0-9]+$ ]] && [ "$IMAGE_UID" != 0 ]; then
    record ok "image user" "USER $IMAGE_USER (numeric, not root); ports $EXPOSED"
else
    record FAIL "image user" "USER is '$IMAGE_USER': want a numeric non-root uid (Kubernetes' runAsNonRoot checks it)"
fi
[ ${#HEALTHCHECK[@]} -gt 0 ] || record FAIL "healthcheck" "the image has no HEALTHCHECK (build with --format docker)"

ip netns add "$NETNS"
ip -n "$NETNS" link set lo up

# ---- running the image ----
# buildah run does not apply ENTRYPOINT and CMD: they come from the image's config, as a container engine's do.
# start_server NAME CONTAINER [buildah run options] -- [arguments after CMD]; sets RUN_PID, SERVER_PID and the
# server's ports; returns 1 (after recording why) when the server exits or does not listen within 3 minutes.
start_server() {
    local name=$1 ctr=$2 t0 opts=()
    shift 2
    while [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift
    t0=$(now)
    # A simple command, so that $! is `ip`, which becomes buildah (the read-only run needs its mount namespace).
    ip netns exec "$NETNS" "${BUILDAH[@]}" run --isolation chroot --user "$IMAGE_USER" "${opts[@]}" "$ctr" -- \
        "${ENTRYPOINT[@]}" "${CMD[@]}" "$@" --json >"$WORK/$name.out" 2>"$WORK/$name.err" &
    RUN_PID=$!
    RUNNING+=("$RUN_PID")
    local deadline=$((SECONDS + 180))
    until grep -q '}' "$WORK/$name.out" 2>/dev/null; do
        if ! kill -0 "$RUN_PID" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            record FAIL "$name: start" "no listening server within 3 minutes; last stderr line: $(server_lines "$WORK/$name.err" | tail -n 1)"
            kill_tree "$RUN_PID"
            wait "$RUN_PID" || true
            RUNNING=("${RUNNING[@]:0:${#RUNNING[@]}-1}")
            return 1
        fi
        sleep 0.2
    done
    read -r GRPC_PORT HTTP_PORT CONTEXT SERVER_PID < <("$PY" "$WORK/probe.py" server "$WORK/$name.out")
    local uid
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$SERVER_PID/status")
    if [ "$uid" = "$IMAGE_UID" ]; then
        record ok "$name: start" "listening in $(since "$t0") s as uid $uid (gRPC $GRPC_PORT, HTTP $HTTP_PORT)"
    else
        record FAIL "$name: start" "the server runs as uid $uid, not the image's $IMAGE_UID"
    fi
}
# The server's own stderr: buildah adds its "subprocess exited with status N" and "Error: exit status N" lines.
server_lines() { grep -v -E '^(subprocess exited with status [0-9]+|Error: exit status [0-9]+)$' "$1" | grep -v '^\s*$' || true; }
# stop_server NAME [signalled]: SIGTERM to the server (unless already sent: a second one ends it at once);
# records whether it stops and exits 0 within --grace + 30 s.
stop_server() {
    local name=$1 deadline=$((SECONDS + 50)) rc=0
    [ "${2:-}" = signalled ] || kill -TERM "$SERVER_PID"
    while kill -0 "$RUN_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -0 "$RUN_PID" 2>/dev/null && kill_tree "$RUN_PID"
    wait "$RUN_PID" || rc=$?
    RUNNING=("${RUNNING[@]:0:${#RUNNING[@]}-1}")
    if [ "$rc" = 0 ] && grep -q 'sc2deploy serve: stopped' "$WORK/$name.err"; then
        record ok "$name: SIGTERM" "the server stopped and exited 0"
    else
        record FAIL "$name: SIGTERM" "exit status $rc; last stderr line: $(server_lines "$WORK/$name.err" | tail -n 1)"
    fi
}
# healthcheck PID: the image's HEALTHCHECK command, run as `docker` runs it: inside the running container (its
# root, mounts and network), as the image's user, with the image's environment.
healthcheck() {
    timeout 30 nsenter -t "$1" -m -n --root --wd -S "$IMAGE_UID" -G "$IMAGE_GID" -- \
        /usr/bin/env -i "${IMAGE_ENV[@]}" "${HEALTHCHECK[@]}" >"$WORK/healthcheck.log" 2>&1
}
check_health() {  # check_health NAME
    local answer
    answer=$(probe health "$GRPC_PORT" || true)
    expect "$1: gRPC health" "$answer" test "$answer" = SERVING
    answer=$(probe http_health "$HTTP_PORT" || true)
    expect "$1: HTTP /health" "$answer" test "$answer" = 200
    if healthcheck "$SERVER_PID"; then
        record ok "$1: HEALTHCHECK" "exit 0 inside the container (${HEALTHCHECK[*]:0:2} ...)"
    else
        record FAIL "$1: HEALTHCHECK" "the image's HEALTHCHECK failed inside the container: $(tail -n 1 "$WORK/healthcheck.log")"
    fi
}
stream_call() {  # stream_call OUT [complete options...]: a streamed completion on the host, in the namespace
    local out=$1; shift
    in_netns "$PY" -m sc2deploy.cli complete --server "127.0.0.1:$GRPC_PORT" --stream --json "$@" >"$out" 2>"$out.err"
}
check_stream() {  # check_stream NAME OUT TOKENS
    local result
    result=$(probe stream "$2" 2>/dev/null || true)
    expect "$1" "finish_reason, tokens, chunks: $result" test "${result% *}" = "length $3"
}

# ---- A: the baked artifact, an API key from a mounted secret ----
say "run A: the baked artifact (EXPORT_SIZE=tiny), --api-key-file from a mounted secret"
mkdir -m 755 "$WORK/secret"
printf '%s\n' "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$WORK/secret/api-keys"
chmod 644 "$WORK/secret/api-keys"
if start_server A "$CTR_A" -v "$WORK/secret:/etc/sc2deploy/keys:ro" -- --api-key-file /etc/sc2deploy/keys/api-keys; then
    check_health A
    services=$(probe reflection "$GRPC_PORT" "$WORK/secret/api-keys" || true)
    expect "A: reflection" "$services" grep -q 'sc2deploy.v1.CompletionService' <<<"$services"
    if stream_call "$WORK/nokey.out" --max-tokens 4 'x'; then
        record FAIL "A: API key" "a call without the key was answered"
    else
        expect "A: API key" "a call without the key is refused: $(cut -c1-100 "$WORK/nokey.out.err")" \
            grep -q UNAUTHENTICATED "$WORK/nokey.out.err"
    fi
    stream_call "$WORK/stream.out" --api-key-file "$WORK/secret/api-keys" --max-tokens 16 'def fib(n):' || true
    check_stream "A: streamed completion" "$WORK/stream.out" 16

    # The drain: three long streams in flight, then SIGTERM.
    tokens=$((CONTEXT - 24))
    clients=()
    for i in 1 2 3; do
        stream_call "$WORK/drain$i.out" --api-key-file "$WORK/secret/api-keys" --max-tokens "$tokens" 'def fib(n):' &
        clients+=($!)
    done
    # SIGTERM once every stream has its first chunk: calls that arrive after it are refused, by design.
    deadline=$((SECONDS + 60))
    for i in 1 2 3; do
        until [ -s "$WORK/drain$i.out" ] || ! kill -0 "${clients[i - 1]}" 2>/dev/null || [ $SECONDS -ge $deadline ]; do
            sleep 0.02
        done
    done
    kill -TERM "$SERVER_PID"
    seen=$(probe watch "$HTTP_PORT" 60 || true)
    for pid in "${clients[@]}"; do wait "$pid" || true; done
    for i in 1 2 3; do check_stream "A: drain, stream $i finishes" "$WORK/drain$i.out" "$tokens"; done
    expect "A: drain, /health" "answers after SIGTERM: $seen" grep -q 503 <<<"$seen"
    last_call=$(grep -n 'CompleteStream OK' "$WORK/A.err" | tail -n 1 | cut -d: -f1)
    shutdown=$(grep -n 'shutting down' "$WORK/A.err" | head -n 1 | cut -d: -f1)
    expect "A: drain, order" "'shutting down' at line ${shutdown:-none}, the last stream ends at line ${last_call:-none}" \
        test "${shutdown:-999999}" -lt "${last_call:-0}"
    stop_server A signalled
fi

# ---- B: read-only root file system, a /tmp volume, an artifact owned by another uid ----
say "run B: read-only root file system, /tmp volume, artifact mounted from the host (owner uid 4242, world-readable)"
new_container b
CTR_B=$CTR
MNT_B=$("${BUILDAH[@]}" mount "$CTR_B")
cp -a "$MNT_B/models/artifact" "$WORK/artifact-4242"
chown -R 4242:4242 "$WORK/artifact-4242"
chmod -R u=rwX,go=rX "$WORK/artifact-4242"
mkdir -m 1777 "$WORK/tmp-b"
volumes=(-v "$WORK/tmp-b:/tmp" -v "$WORK/artifact-4242:/models/artifact:ro")
# buildah writes its mount points (/etc/hosts, /run/.containerenv, the volumes') into the root file system when
# a run starts: make them first, then bind the root read-only (the container's mount namespace copies it).
in_netns "${BUILDAH[@]}" run --isolation chroot "${volumes[@]}" "$CTR_B" -- true
touch "$MNT_B/run/.containerenv"
mount --bind "$MNT_B" "$MNT_B"
RO_BINDS+=("$MNT_B")
mount -o remount,bind,ro "$MNT_B"
if start_server B "$CTR_B" "${volumes[@]}" --; then
    # buildah removes /run/.containerenv after the run: give the read-only bind back in its mount namespace and
    # the host's. The container keeps its own read-only copy, as the next check shows.
    nsenter -t "$RUN_PID" -m umount "$MNT_B" || record FAIL "B: clean-up" "could not drop the read-only bind in buildah's mount namespace"
    umount "$MNT_B"
    RO_BINDS=()
    if nsenter -t "$SERVER_PID" -m --root touch /.sc2deploy-check 2>"$WORK/rootwrite.log"; then
        record FAIL "B: read-only root" "root could write / inside the container: the emulation is not in force"
    else
        expect "B: read-only root" "a write to / fails inside the container: $(cut -c1-80 "$WORK/rootwrite.log")" \
            grep -q 'Read-only file system' "$WORK/rootwrite.log"
    fi
    check_health B
    stream_call "$WORK/stream-b.out" --max-tokens 16 'def fib(n):' || true
    check_stream "B: streamed completion" "$WORK/stream-b.out" 16
    stop_server B
    say "  the server wrote, in the /tmp volume: $(cd "$WORK/tmp-b" && find . -mindepth 1 -maxdepth 1 | sort | tr '\n' ' ')"
fi

# ---- C and D: the artifact cannot be read, or is not there ----
# expect_refusal KEY NAME PROBLEM REMEDY CONTAINER [buildah run options]: exit 2 and one stderr line that
# names the PROBLEM and says what to do (REMEDY); both are extended regular expressions, case-insensitive.
expect_refusal() {
    local err=$WORK/$1.err name=$2 problem=$3 remedy=$4 ctr=$5 rc=0 lines last
    shift 5
    in_netns timeout -k 5 180 "${BUILDAH[@]}" run --isolation chroot --user "$IMAGE_USER" "$@" "$ctr" -- \
        "${ENTRYPOINT[@]}" "${CMD[@]}" >/dev/null 2>"$err" || rc=$?
    lines=$(server_lines "$err" | wc -l)
    last=$(server_lines "$err" | tail -n 1 | cut -c1-200)
    if [ "$rc" = 2 ] && [ "$lines" = 1 ] && grep -q -i -E "$problem" <<<"$last" && grep -q -i -E "$remedy" <<<"$last"; then
        record ok "$name" "exit 2: $last"
    else
        record FAIL "$name" "want exit 2 and one line naming the problem ($problem) and the remedy ($remedy), got exit $rc and $lines line(s); last: $last"
    fi
}
say "run C: artifact owned by uid 4242 and not readable by uid $IMAGE_UID (folder 0700; then files 0600)"
cp -a "$WORK/artifact-4242" "$WORK/artifact-private"
chmod -R go-rwx "$WORK/artifact-private"
new_container c
expect_refusal C1 "C: unreadable artifact folder" 'permission' 'readable|chmod|fsGroup|--user' "$CTR" -v "$WORK/artifact-private:/models/artifact:ro"
chmod go+rx "$WORK/artifact-private"
expect_refusal C2 "C: unreadable artifact files" 'permission' 'readable|chmod|fsGroup|--user' "$CTR" -v "$WORK/artifact-private:/models/artifact:ro"
say "run D: no artifact mounted (an empty /models hides the baked one)"
mkdir -m 755 "$WORK/empty"
new_container d
expect_refusal D "D: missing artifact" '/models/artifact' 'mount|export' "$CTR" -v "$WORK/empty:/models:ro"

CHECK_SECONDS=$(since "$START")
PASSED=$((${#CHECKS[@]} - FAILED))
say "image $IMAGE: $IMAGE_SIZE, built in $BUILD_SECONDS s; the whole check took $CHECK_SECONDS s"
say "$PASSED passed, $FAILED failed"
if [ "$JSON" = 1 ]; then
    printf '%s\n' "${CHECKS[@]}" | "$PY" -c '
import json, sys
checks = [dict(zip(("ok", "name", "detail"), line.rstrip("\n").split("\t", 2))) for line in sys.stdin if line.strip()]
for c in checks:
    c["ok"] = c["ok"] == "ok"
figures = dict(zip(("image", "base_image", "base_seconds", "build_seconds", "image_size_bytes", "check_seconds"), sys.argv[1:]))
for key in ("base_seconds", "build_seconds", "image_size_bytes", "check_seconds"):
    figures[key] = json.loads(figures[key])
print(json.dumps({"ok": all(c["ok"] for c in checks), **figures, "checks": checks}))
' "$IMAGE" "$BASE" "$BASE_SECONDS" "$BUILD_SECONDS" "$IMAGE_BYTES" "$CHECK_SECONDS"
fi
[ "$FAILED" = 0 ] || exit 1
