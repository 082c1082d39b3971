#!/usr/bin/env bash
# Builds, without pulling anything from a registry, the two local base images that
# tests/container.rs (and anyone offline) builds dnsfence's image with:
#
#   dnsfence-local/builder:rust-<version>  a Debian bookworm root filesystem (debootstrap, minbase,
#                                          gcc and libc6-dev for linking) plus this machine's own
#                                          Rust toolchain (rustc and cargo, no docs) in /usr/local/rust
#   dnsfence-local/busybox:<version>       FROM scratch with Debian's static busybox, for test
#                                          agents, upstreams and targets
#
# Each image is built only when its tag is missing, so a second run costs nothing. Print the
# tags with `docker/local-images.sh --print`. Needs root, docker (docker.io), debootstrap and
# busybox-static; the Debian mirror is the one debootstrap uses by default.
set -euo pipefail

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "local-images.sh: $1 not found; install the Debian package $2" >&2; exit 3; }
}
need docker docker.io
need rustc "a Rust toolchain (rustup)"

sysroot="$(rustc --print sysroot)"
rust_version="$(rustc --version | awk '{print $2}')"
builder_tag="dnsfence-local/builder:rust-${rust_version}"
busybox_path="$(command -v busybox || true)"
busybox_tag="dnsfence-local/busybox:latest"

if [ "${1:-}" = "--print" ]; then
    echo "BUILDER_IMAGE=${builder_tag}"
    echo "BUSYBOX_IMAGE=${busybox_tag}"
    exit 0
fi

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

work="$(mktemp -d /tmp/dnsfence-images.XXXXXX)"
trap 'rm -rf "$work"' EXIT

if ! have_image "$busybox_tag"; then
    need busybox busybox-static
    # Debian's busybox package is dynamic; busybox-static's is not. Only a static one runs in scratch.
    if ! file -L "$busybox_path" 2>/dev/null | grep -q 'statically linked'; then
        if [ -x /bin/busybox ] && file -L /bin/busybox | grep -q 'statically linked'; then
            busybox_path=/bin/busybox
        else
            echo "local-images.sh: $busybox_path is not statically linked; install the Debian package busybox-static" >&2
            exit 3
        fi
    fi
    mkdir -p "$work/busybox/bin"
    cp "$busybox_path" "$work/busybox/bin/busybox"
    for applet in sh nc nslookup wget ping ip sleep cat echo true false httpd udhcpc timeout; do
        ln -s busybox "$work/busybox/bin/$applet"
    done
    printf 'FROM scratch\nCOPY bin /bin\nENV PATH=/bin\nCMD ["/bin/sh"]\n' > "$work/busybox/Dockerfile"
    DOCKER_BUILDKIT=0 docker build -q -t "$busybox_tag" "$work/busybox" >/dev/null
    echo "built $busybox_tag"
fi

if ! have_image "$builder_tag"; then
    need debootstrap debootstrap
    started=$(date +%s)
    rootfs="$work/rootfs"
    debootstrap --variant=minbase --include=gcc,libc6-dev bookworm "$rootfs" >"$work/debootstrap.log" 2>&1 || {
        tail -20 "$work/debootstrap.log" >&2
        echo "local-images.sh: debootstrap failed (log above)" >&2
        exit 1
    }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    mkdir -p "$rootfs/usr/local/rust"
    # The toolchain without its documentation: bin (rustc, cargo), lib (std, the driver), libexec.
    for part in bin lib libexec; do
        [ -e "$sysroot/$part" ] && cp -a "$sysroot/$part" "$rootfs/usr/local/rust/"
    done
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'WORKDIR /' \
        - "$builder_tag" >/dev/null
    echo "built $builder_tag in $(( $(date +%s) - started )) s"
fi
