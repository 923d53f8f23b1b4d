#!/usr/bin/env bash
# Install what bench/run.py needs (Debian 12, as root or through sudo):
#   apt: curl, fio (sequential reads), nginx-light (static peer server), rclone and httpdirfs
#        (peer FUSE mounts), fuse3 (fusermount3);
#   pip: the `bench` extra of mlregfs (safetensors, numpy, matplotlib) into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    fuse3 curl fio nginx-light rclone httpdirfs procps >/dev/null
# nginx-light's package starts a system nginx on :80; the bench runs its own instance.
if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
    $SUDO systemctl stop nginx || true
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# safetensors numpy matplotlib (+ py-spy for profiling), as the `bench` extra lists them;
# installed directly too so this works before the extra is in pyproject.toml.
.venv/bin/pip install -q -e '.[bench]' 2>/dev/null || true
.venv/bin/pip install -q 'safetensors>=0.4' 'numpy>=1.26' 'matplotlib>=3.8' 'py-spy>=0.3'

echo "bench setup done: $(rclone version 2>/dev/null | head -1), \
$(httpdirfs --version 2>&1 | head -1), $(nginx -v 2>&1)"
