#!/usr/bin/env bash
# Build the torchpool CPU image with podman, with no network inside the build:
# the way CI builds it (tests/test_container.py runs this), and one way to
# build it on an air-gapped host.
#
#   deploy/build-image.sh            # prints the image name on the last line
#
# 1. Base image: a Debian root file system made by debootstrap (python3 and
#    venv, nothing else) and imported as $TORCHPOOL_BASE_IMAGE, unless podman
#    already has that image. Needs root and the Debian mirror apt uses.
# 2. Wheels: every dependency of '.[worker]' (torch pinned by constraints.txt)
#    built or fetched by the host's pip into a folder kept under
#    $TORCHPOOL_CACHE_DIR, keyed on pyproject.toml, constraints.txt and the
#    Python version. The host's Python must be the image's (3.11 on bookworm).
# 3. Image: `podman build` of deploy/Dockerfile with that base and that folder
#    as the `wheels` build context (pip install --no-index), in docker format
#    so that HEALTHCHECK is kept.
#
# Settings (environment):
#   TORCHPOOL_IMAGE        the image to build      (localhost/torchpool:0.1.0)
#   TORCHPOOL_BASE_IMAGE   the Debian base         (localhost/torchpool-base:bookworm)
#   TORCHPOOL_CACHE_DIR    where wheels are kept   (~/.cache/torchpool-container)
#   DEBIAN_SUITE           the base's release      (bookworm)
#   DEBIAN_MIRROR          the base's mirror       (the first Debian mirror in apt's sources)
#   PYTHON                 the host Python whose pip builds the wheels (python3)
#
# Exit status: 0 built; 1 a step failed; 3 a tool is missing (podman, runc,
# debootstrap: Debian packages of those names).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${TORCHPOOL_IMAGE:-localhost/torchpool:0.1.0}
BASE=${TORCHPOOL_BASE_IMAGE:-localhost/torchpool-base:bookworm}
CACHE=${TORCHPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torchpool-container}
SUITE=${DEBIAN_SUITE:-bookworm}
PYTHON=${PYTHON:-python3}
# podman's default runtime (crun) fails on hosts with hybrid cgroups; runc works
# everywhere. podman's default ulimits may exceed what the host lets a
# container set: use this shell's open-files limit, and at most 32768
# processes (more is refused on CI's machines even under a higher hard limit).
limit() { local v=$1 cap=${2:-}; [[ $v == unlimited ]] && v=${cap:--1}; [[ -n $cap && $v -gt $cap ]] && v=$cap; echo "$v"; }
RUNTIME=(--runtime=runc
    --ulimit "nofile=$(limit "$(ulimit -Sn)"):$(limit "$(ulimit -Hn)")"
    --ulimit "nproc=$(limit "$(ulimit -Su)" 32768):$(limit "$(ulimit -Hu)" 32768)")

say() { echo "build-image: $*" >&2; }
elapsed() { echo "$((SECONDS - $1))s"; }

for tool in podman runc; do
    if ! command -v "$tool" >/dev/null; then
        say "$tool is not installed (Debian: apt-get install podman runc debootstrap)"
        exit 3
    fi
done

debian_mirror() {
    # The first Debian archive apt already uses (deb822 .sources files, then sources.list).
    local uri
    uri=$(
        {
            grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
            grep -hs '^deb ' /etc/apt/sources.list | awk '{print ($2 ~ /^\[/) ? $3 : $2}'
        } | grep -E '/debian/?$' | head -n 1
    ) || true
    echo "${uri:-http://deb.debian.org/debian}"
}

ensure_base() {
    if podman image exists "$BASE"; then
        say "base $BASE: cached"
        return
    fi
    if ! command -v debootstrap >/dev/null; then
        say "debootstrap is not installed (Debian: apt-get install debootstrap)"
        exit 3
    fi
    local started=$SECONDS mirror rootfs
    mirror=${DEBIAN_MIRROR:-$(debian_mirror)}
    rootfs=$(mktemp -d)
    say "base $BASE: debootstrap $SUITE from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv \
        "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
        tail -n 20 "$rootfs.log" >&2
        exit 1
    }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
    say "base $BASE: built in $(elapsed "$started")"
}

ensure_wheels() {
    local started=$SECONDS key tag
    tag=$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    key=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
    WHEELS="$CACHE/wheels-$tag-$key"
    if [[ -f "$WHEELS/.complete" ]]; then
        say "wheels $WHEELS: cached"
        return
    fi
    say "wheels $WHEELS: pip wheel '.[worker]' with $("$PYTHON" --version)"
    rm -rf "$WHEELS.part"
    mkdir -p "$CACHE"
    # setuptools and wheel too: the image builds torchpool itself from source,
    # and pip's isolated build environment then comes from this folder.
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check -c constraints.txt \
        -w "$WHEELS.part" '.[worker]' 'setuptools>=68' wheel
    # torchpool itself is built in the image from the sources it is given.
    rm -f "$WHEELS.part"/torchpool-*.whl
    touch "$WHEELS.part/.complete"
    rm -rf "$WHEELS"
    mv "$WHEELS.part" "$WHEELS"
    say "wheels: $(du -sh "$WHEELS" | cut -f1) in $(elapsed "$started")"
}

check_python_matches() {
    local host image
    host=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    image=$(podman run --rm "${RUNTIME[@]}" --network=none "$BASE" \
        python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ "$host" != "$image" ]]; then
        say "the wheels would be for Python $host but $BASE has Python $image: set PYTHON"
        exit 1
    fi
}

ensure_base
check_python_matches
ensure_wheels
started=$SECONDS
say "image $IMAGE: podman build (offline, from $BASE)"
podman build "${RUNTIME[@]}" --network=none --format=docker \
    --ignorefile deploy/Dockerfile.dockerignore \
    --build-arg "PYTHON_IMAGE=$BASE" \
    --build-context "wheels=$WHEELS" \
    -f deploy/Dockerfile -t "$IMAGE" . >&2
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "image $IMAGE: built in $(elapsed "$started"), $((size / 1000000)) MB"
echo "$IMAGE"
