#!/usr/bin/env bash
# Install Fashion-MNIST from Debian's `dataset-fashion-mnist` package (no internet beyond the Debian archive).
#   as root:     apt-get install -y dataset-fashion-mnist  -> /usr/share/datasets/fashion-mnist/
#   without root: apt-get download + dpkg-deb -x          -> ./data/fashion-mnist/usr/share/datasets/fashion-mnist/
# Idempotent: does nothing when either location already holds the four files.
# usage: bash scripts/get_fashion_mnist.sh [extract_dir]   (default ./data/fashion-mnist)
set -euo pipefail

PKG=dataset-fashion-mnist
SYSTEM_DIR=/usr/share/datasets/fashion-mnist
EXTRACT_DIR=${1:-./data/fashion-mnist}
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

complete() {
    local d=$1 f
    for f in $FILES; do [ -s "$d/$f" ] || return 1; done
}

if complete "$SYSTEM_DIR"; then
    echo "Fashion-MNIST already installed in $SYSTEM_DIR"
    exit 0
fi
if complete "$EXTRACT_DIR/usr/share/datasets/fashion-mnist"; then
    echo "Fashion-MNIST already extracted in $EXTRACT_DIR/usr/share/datasets/fashion-mnist"
    exit 0
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! apt-get install -y "$PKG"; then
        apt-get update
        apt-get install -y "$PKG"
    fi
    complete "$SYSTEM_DIR" && { echo "Fashion-MNIST installed in $SYSTEM_DIR"; exit 0; }
    echo "apt-get installed $PKG but $SYSTEM_DIR is incomplete" >&2
    exit 1
fi

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    echo "need apt-get and dpkg-deb (Debian/Ubuntu), or place the four *-ubyte.gz files in ./data/fashion-mnist" >&2
    exit 1
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download "$PKG") || {
    echo "apt-get download $PKG failed; run 'apt-get update' (as root) or check the package sources" >&2
    exit 1
}
mkdir -p "$EXTRACT_DIR"
dpkg-deb -x "$tmp"/${PKG}_*.deb "$EXTRACT_DIR"
complete "$EXTRACT_DIR/usr/share/datasets/fashion-mnist" || {
    echo "extracted $PKG but the files are missing under $EXTRACT_DIR/usr/share/datasets/fashion-mnist" >&2
    exit 1
}
echo "Fashion-MNIST extracted to $EXTRACT_DIR/usr/share/datasets/fashion-mnist"
