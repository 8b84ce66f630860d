#!/usr/bin/env bash
# Build the x86 CPU fleet image WITHOUT a Docker daemon or a registry: `make image`.
#
# The fleet's CI builds `Dockerfile` from python:3.11-slim-bookworm. Where no registry can be reached (this
# build machine reaches only Debian's mirror and PyPI), this script makes the same image by hand with
# Debian's tools, laid out exactly as the Dockerfile lays it out:
#
#   1. debootstrap a minimal Debian bookworm root filesystem (python3, venv, GStreamer tools + plugins),
#      kept under build/image/rootfs and committed once as the base image `localhost/appliance-base`;
#   2. the wheels of the appliance's dependencies are downloaded here (pip download), never in the image;
#   3. on top of the base: the source tree at /opt/appliance/src (package, protos + generated stubs,
#      models, pipelines, firmware configs), a venv at /opt/appliance/venv with an offline install
#      (--no-index), `appliance models verify`, user 10001, volumes, env, HEALTHCHECK (gRPC health) and the
#      entrypoint `appliance run`; committed in Docker format (HEALTHCHECK is a Docker-format field);
#   4. a smoke test of the committed image (config check, doctor, the ranker up and healthy), and its size
#      written to bench/results/image-x86-cpu.{json,md}.
#
# Needs root (debootstrap, chroot isolation), buildah and debootstrap (apt-get install buildah debootstrap).
# Storage is vfs under build/image/containers (no overlay or fuse needed); nothing leaves the machine.
# Not part of `make test` / CI: it takes minutes. CI lints both Dockerfiles with hadolint.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../../.." && pwd)
WORK=${IMAGE_WORK:-$REPO/build/image}
PY=${PY:-$REPO/.venv/bin/python}
VERSION=$("$PY" -c 'import appliance; print(appliance.__version__)')
TAG=${IMAGE_TAG:-localhost/edge-affect-appliance:$VERSION-x86-cpu}
BASE=localhost/appliance-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
RESULTS=${IMAGE_RESULTS:-$REPO/bench/results}
BASE_PKGS=python3,python3-venv
# as the Dockerfile's final stage: GStreamer for the capture pipelines (apt resolves the virtual packages
# that plugins-good needs, which debootstrap's own resolver cannot)
RUNTIME_PKGS="gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good"
B=(buildah --root "$WORK/containers" --runroot "$WORK/runroot" --storage-driver vfs)

say() { printf '== %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "build-x86.sh: needs root (debootstrap, buildah chroot isolation)" >&2; exit 1; }
for tool in buildah debootstrap tar; do
  command -v "$tool" >/dev/null || { echo "build-x86.sh: $tool missing (apt-get install buildah debootstrap)" >&2; exit 1; }
done
[ -f "$REPO/appliance/v1/ranker_pb2.py" ] || { echo "build-x86.sh: generated stubs missing: run make setup" >&2; exit 1; }
mkdir -p "$WORK" "$RESULTS"
export BUILDAH_ISOLATION=chroot
T0=$(date +%s)

# -- 1. base: a debootstrapped Debian bookworm -----------------------------------------------------------
if ! "${B[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  if [ ! -f "$WORK/rootfs.ok" ]; then
    say "debootstrap bookworm (minbase + $BASE_PKGS)"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include="$BASE_PKGS" bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log"
    touch "$WORK/rootfs.ok"
  fi
  say "base image $BASE from the root filesystem"
  # apt lists, caches and docs go: the image never runs apt; /dev, /proc, /sys are provided by the runtime
  tar -C "$WORK/rootfs" --numeric-owner \
      --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* --exclude=./run/* --exclude=./tmp/* \
      --exclude=./var/cache/apt/* --exclude=./var/lib/apt/lists/* --exclude=./var/log/* \
      --exclude=./usr/share/doc/* --exclude=./usr/share/man/* --exclude=./usr/share/info/* \
      --exclude=./usr/share/locale/* --exclude=./debootstrap \
      -cf "$WORK/rootfs.tar" .
  ctr=$("${B[@]}" from --format docker scratch)
  "${B[@]}" add "$ctr" "$WORK/rootfs.tar" /
  "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
      --label org.opencontainers.image.base.name=debian:bookworm-minbase "$ctr"
  "${B[@]}" commit --rm --format docker "$ctr" "$BASE" >/dev/null
  rm -f "$WORK/rootfs.tar"
fi

# -- 2. wheels, downloaded here ---------------------------------------------------------------------------
say "wheels (pip download)"
"$PY" -m pip download -q -d "$WORK/wheels" "$REPO" "setuptools>=69" wheel >"$WORK/pip-download.log" 2>&1 \
  || { cat "$WORK/pip-download.log" >&2; exit 1; }

# -- 3. the appliance on top (the Dockerfile's final stage) -----------------------------------------------
say "source tree"
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' --exclude=models/cache --exclude='*.engine' \
    --exclude='*.plan' -cf "$WORK/src.tar" pyproject.toml README.md proto appliance models pipelines firmware_configs
ctr=$("${B[@]}" from --format docker "$BASE")
trap '"${B[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
run() { "${B[@]}" run --isolation chroot "$ctr" -- "$@"; }
say "runtime packages: $RUNTIME_PKGS"
run sh -c "apt-get -o APT::Sandbox::User=root update -qq && DEBIAN_FRONTEND=noninteractive apt-get \
  -o APT::Sandbox::User=root install -y -qq --no-install-recommends $RUNTIME_PKGS >/dev/null \
  && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /var/log/apt /var/log/dpkg.log"
run useradd --system --uid 10001 --groups video --create-home appliance
run install -d -o appliance -g appliance /var/lib/appliance /run/appliance
"${B[@]}" add "$ctr" "$WORK/src.tar" /opt/appliance/src
"${B[@]}" copy "$ctr" "$WORK/wheels" /tmp/wheels
say "venv + offline install"
run python3 -m venv /opt/appliance/venv
run /opt/appliance/venv/bin/pip install -q --no-cache-dir --no-index --find-links /tmp/wheels -e /opt/appliance/src
run rm -rf /tmp/wheels /opt/appliance/src/build
run /opt/appliance/venv/bin/appliance models verify
"${B[@]}" config \
    --env PATH=/opt/appliance/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env APPLIANCE_DATA_DIR=/var/lib/appliance --env APPLIANCE_RUN_DIR=/run/appliance \
    --env APPLIANCE_CONFIG=/opt/appliance/src/firmware_configs/cpu-only.yaml \
    --volume /var/lib/appliance --volume /run/appliance \
    --user 10001 --workingdir /var/lib/appliance \
    --healthcheck 'CMD appliance health' --healthcheck-interval 15s --healthcheck-timeout 3s \
    --healthcheck-start-period 60s --healthcheck-retries 3 \
    --entrypoint '["appliance", "run"]' \
    --label org.opencontainers.image.title=edge-affect-appliance \
    --label org.opencontainers.image.version="$VERSION" "$ctr"
say "commit $TAG"
"${B[@]}" commit --rm --format docker "$ctr" "$TAG" >/dev/null
trap - EXIT
BUILD_S=$(( $(date +%s) - T0 ))

# -- 4. smoke test of the committed image, then its size ---------------------------------------------------
say "smoke test"
smoke=$("${B[@]}" from --format docker "$TAG")
trap '"${B[@]}" rm "$smoke" >/dev/null 2>&1 || true' EXIT
in_image() { "${B[@]}" run --isolation chroot --user 10001 "$smoke" -- "$@"; }
in_image appliance config check /opt/appliance/src/firmware_configs/cpu-only.yaml >&2
in_image id -u | grep -qx 10001
# the ranker alone (no camera here), health through gRPC over its Unix socket, then SIGTERM
in_image sh -c '
cfg=/tmp/box.json
echo "{\"data_dir\": \"/tmp/d\", \"run_dir\": \"/tmp/r\", \"metrics\": {\"enabled\": false}}" > $cfg
appliance worker ranker --config-json $cfg & pid=$!
i=0; ok=1
while [ $i -lt 120 ]; do
  if appliance health -c $cfg --timeout 1 >/dev/null 2>&1; then ok=0; break; fi
  sleep 0.5; i=$((i + 1))
done
kill -TERM $pid; wait $pid; echo "health in image: $([ $ok = 0 ] && echo SERVING || echo FAILED)"; exit $ok' >&2

"${B[@]}" rmi --prune >/dev/null 2>&1 || true   # earlier builds' untagged images
"${B[@]}" images --json > "$WORK/images.json"
# what a fleet box downloads: the layers gzip-compressed, as a registry would hold them
rm -rf "$WORK/oci"
"${B[@]}" push -q --compression-format gzip "$TAG" "oci:$WORK/oci:latest" >/dev/null
"${B[@]}" inspect --type image "$TAG" > "$WORK/inspect.json"
VENV_H=$(du -sh "$("${B[@]}" mount "$smoke")/opt/appliance/venv" | cut -f1)
"${B[@]}" umount "$smoke" >/dev/null
# (a quoted heredoc: nothing in it is expanded by the shell; values come in through the environment)
TAG="$TAG" BASE="$BASE" WORK="$WORK" BASE_PKGS="$BASE_PKGS" RUNTIME_PKGS="$RUNTIME_PKGS" VENV_H="$VENV_H" \
BUILD_S="$BUILD_S" BUILDER="$(buildah --version)" "$PY" - "$RESULTS" <<'PYEOF'
import json, os, platform, sys, time
from pathlib import Path
e = os.environ
out, work = Path(sys.argv[1]), Path(e["WORK"])
images = {n: i for i in json.loads((work / "images.json").read_text()) for n in i.get("names") or []}
app, base = images[e["TAG"]], images[e["BASE"]]
cfg = json.loads((work / "inspect.json").read_text())["Docker"]["config"]
mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
oci = work / "oci"
blob = lambda d: oci / "blobs" / d.replace(":", "/")  # noqa: E731
index = json.loads((oci / "index.json").read_text())
manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
gz = [layer["size"] for layer in manifest["layers"]]
rec = {"image": e["TAG"], "image_id": app["id"][:12],
       "base": f"{e['BASE']} (debootstrap bookworm minbase + {e['BASE_PKGS']}; then apt: {e['RUNTIME_PKGS']})",
       "size": app["size"], "base_size": base["size"],
       "compressed_size": mib(sum(gz)), "compressed_bytes": sum(gz), "compressed_layers": [mib(x) for x in gz],
       "venv_size": e["VENV_H"],
       "user": cfg.get("User"), "entrypoint": cfg.get("Entrypoint"), "cmd": cfg.get("Cmd"),
       "healthcheck": (cfg.get("Healthcheck") or {}).get("Test"),
       "build_seconds": int(e["BUILD_S"]), "builder": e["BUILDER"], "storage_driver": "vfs",
       "isolation": "chroot", "health_in_image": "SERVING", "machine": platform.machine(),
       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
(out / "image-x86-cpu.json").write_text(json.dumps(rec, indent=2) + "\n")
(out / "image-x86-cpu.md").write_text(
    "# x86 CPU image, built without a daemon (buildah, vfs, chroot isolation)\n\n"
    "| | |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rec.items())
    + "\nBuilt by `make image` (appliance/ops/image/build-x86.sh). Same layout as `Dockerfile` (venv in "
      "/opt/appliance/venv, source + models in /opt/appliance/src, uid 10001, gRPC HEALTHCHECK, entrypoint "
      "`appliance run`), but the base is debootstrapped Debian bookworm instead of python:3.11-slim-bookworm "
      "(no registry here). The smoke test started the ranker inside the image as uid 10001 and saw gRPC "
      "health SERVING.\n")
print(json.dumps(rec, indent=2))
PYEOF
