#!/usr/bin/env bash
# A real FedGen federation with one edge client on arm64 (Debian bookworm, emulated with
# qemu-user through binfmt_misc) and one native client, against a host coordinator.
#
#   bash tools/arm64_edge_run.sh                 # as root; steps already done are skipped
#   ROUNDS=3 ARM64_ROOT=/var/tmp/fedgen-arm64 bash tools/arm64_edge_run.sh
#
# Steps (each prints what it does and skips itself when its marker file exists):
#   1. apt-get install qemu-user-static binfmt-support debootstrap time; make sure binfmt_misc
#      is mounted and qemu-aarch64 registered (with the F flag, so a chroot needs no qemu copy)
#   2. debootstrap a Debian bookworm arm64 root in $ARM64_ROOT (outside the repository) with
#      python3, python3-venv, python3-pip, time
#   3. in it: a venv at /opt/venv, the edge client's dependencies for aarch64 from PyPI, then the
#      project from a copy of the repository with its BASE install (`pip install .`, no extras)
#   4-6. tools/arm64_edge_run.py (host venv): shards, coordinator, a native client and the
#      arm64 client, then benchmarks/results/arm64_run.{json,md}
# Needs root (apt, debootstrap, chroot, mounts). Nothing is written in the repository except
# benchmarks/results/arm64_run.{json,md}.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${ARM64_ROOT:-/var/tmp/fedgen-arm64}"
WORK="${ARM64_WORK:-/var/tmp/fedgen-arm64-run}"
HOST_VENV="${HOST_VENV:-$REPO/.venv}"
MNIST="${MNIST_DIR:-$(cd "$REPO/.." && pwd)/shared/data/mnist}"
# The Debian mirror this machine's apt already uses (the first URIs / deb line), unless given.
host_mirror() {
    { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
      grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}'; } | grep -v security | head -n1
}
MIRROR="${DEBIAN_MIRROR:-$(host_mirror)}"
[ -n "$MIRROR" ] || { echo "no Debian mirror found in /etc/apt; set DEBIAN_MIRROR" >&2; exit 2; }
ROUNDS="${ROUNDS:-3}"
TORCH_SPEC="${ARM64_TORCH:-torch==2.9.1}"
# The base install's dependencies, read from pyproject.toml ([project].dependencies) less torch,
# which goes in first as the pinned aarch64 CPU wheel; the ranges are pyproject's own.
mapfile -t DEPS < <("$HOST_VENV/bin/python" -c '
import re, sys, tomllib
for dep in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    if re.match(r"torch\b", dep) is None:
        print(dep)
' "$REPO/pyproject.toml")
((${#DEPS[@]})) || { echo "no dependencies read from pyproject.toml" >&2; exit 1; }

log() { printf '\n[arm64 %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[arm64] ERROR: %s\n' "$*" >&2; exit 1; }
# Bounded: every long step runs under `timeout`.
bounded() { local secs=$1; shift; timeout --kill-after=30 "$secs" "$@"; }
# Seconds each setup step took when it last ran, kept in the root (read into the report).
STEP_T0=0
step_start() { STEP_T0=$SECONDS; }
step_done() { mkdir -p "$ROOT"; sed -i "/^$1=/d" "$ROOT/.fedgen-setup-seconds" 2>/dev/null || true
    echo "$1=$((SECONDS - STEP_T0))" >> "$ROOT/.fedgen-setup-seconds"; }

[[ $(id -u) -eq 0 ]] || die "run as root (apt-get, debootstrap, chroot and mounts need it)"
[[ $(uname -m) == x86_64 ]] || log "host is $(uname -m), not x86_64: the script was written for an x86_64 host"
[[ -x "$HOST_VENV/bin/fedgen" ]] || die "no host venv with fedgen at $HOST_VENV (pip install -e '.[coordinator]' first)"
[[ -f "$MNIST/train-images-idx3-ubyte.gz" || -f "$MNIST/train-images-idx3-ubyte" ]] || die "no MNIST IDX files in $MNIST"
case "$ROOT" in "$REPO"|"$REPO"/*) die "ARM64_ROOT must be outside the repository";; esac

# ------------------------------------------------------------------ 1. host packages, binfmt
log "1. host packages: qemu-user-static binfmt-support debootstrap time"
need=()
for pkg in qemu-user-static binfmt-support debootstrap time; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    log "   installing ${need[*]}"
    bounded 600 apt-get update -q
    DEBIAN_FRONTEND=noninteractive bounded 900 apt-get install -y -q "${need[@]}"
else
    log "   already installed (skip)"
fi
if [[ ! -e /proc/sys/fs/binfmt_misc/status ]]; then
    log "   mounting binfmt_misc"
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
        || die "cannot mount binfmt_misc; without it a chroot cannot exec aarch64 binaries (pip, debootstrap's second stage). \
Fallback for the client alone: QEMU_LD_PREFIX=$ROOT qemu-aarch64-static $ROOT/opt/venv/bin/python ..."
fi
if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
    log "   registering qemu-aarch64 with binfmt_misc"
    update-binfmts --enable qemu-aarch64 || update-binfmts --import qemu-aarch64 || true
fi
[[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || die "qemu-aarch64 is not registered in /proc/sys/fs/binfmt_misc"
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "qemu-aarch64 binfmt entry is disabled"
sed 's/^/   binfmt: /' /proc/sys/fs/binfmt_misc/qemu-aarch64
qemu-aarch64-static --version | head -1 | sed 's/^/   /'

# ------------------------------------------------------------------ 2. arm64 root
mounted() { mountpoint -q "$1"; }
# /sys is deliberately NOT mounted in the root: under qemu-user 7.2 the guest reads the HOST's
# x86 /proc/cpuinfo (qemu 7.2 does not emulate it for aarch64), and onnxruntime's bundled cpuinfo
# library then dereferences NULL while matching it against /sys/devices/system/cpu (SIGSEGV at
# `import onnxruntime`). Without /sys its cpuinfo_initialize fails cleanly and onnxruntime runs.
# diagnose_sys() below reproduces the crash once per run, for the report.
mount_root() {
    mkdir -p "$ROOT/proc" "$ROOT/sys" "$ROOT/dev"
    mounted "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    mounted "$ROOT/sys" && umount -R "$ROOT/sys"
    mounted "$ROOT/dev" || mount --rbind /dev "$ROOT/dev"
    # DNS and the host's CA bundle (pip talks to PyPI from inside the root).
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
    cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/fedgen-host-ca.crt"
}
umount_root() {
    for m in "$ROOT/dev" "$ROOT/sys" "$ROOT/proc"; do
        mounted "$m" && umount -R "$m" 2>/dev/null || umount -lR "$m" 2>/dev/null || true
    done
}
trap umount_root EXIT
# A clean environment inside the root (the host's PIP_* settings point at host-only paths).
IN_ROOT=(chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin
    LANG=C.UTF-8 PIP_CERT=/etc/fedgen-host-ca.crt PIP_DEFAULT_TIMEOUT=180 PIP_DISABLE_PIP_VERSION_CHECK=1)
in_root() { "${IN_ROOT[@]}" "$@"; }

log "2. Debian bookworm arm64 root at $ROOT"
if [[ -f "$ROOT/.fedgen-debootstrap-done" ]]; then
    log "   already built (skip; rm -r $ROOT to rebuild)"
else
    if [[ -e "$ROOT" ]]; then
        log "   removing an unfinished root"
        umount_root
        rm -rf --one-file-system "$ROOT"
    fi
    mkdir -p "$ROOT"
    log "   debootstrap --arch=arm64 (both stages; the second runs under qemu-aarch64 via binfmt, a few minutes)"
    step_start
    bounded 3600 debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,time,ca-certificates \
        bookworm "$ROOT" "$MIRROR"
    touch "$ROOT/.fedgen-debootstrap-done"
    step_done debootstrap_s
fi
mount_root
log "   inside the root: uname -m / platform.machine()"
in_root uname -m | sed 's/^/   uname -m: /'
MACHINE="$(in_root python3 -c 'import platform; print(platform.machine())')"
echo "   platform.machine(): $MACHINE"
[[ "$MACHINE" == aarch64 ]] || die "the root's python reports $MACHINE, not aarch64"

# ------------------------------------------------------------------ 3. venv + packages
mkdir -p "$WORK"
log "3. venv /opt/venv in the root, edge-client dependencies for aarch64 from PyPI"
if [[ ! -x "$ROOT/opt/venv/bin/python" ]]; then
    in_root python3 -m venv /opt/venv
fi
DEPS_KEY="$TORCH_SPEC ${DEPS[*]}"
if [[ -f "$ROOT/opt/venv/.fedgen-deps-done" && "$(cat "$ROOT/opt/venv/.fedgen-deps-done")" != "$DEPS_KEY" ]]; then
    # pyproject's base dependencies changed: a fresh venv, so nothing the base no longer needs lingers.
    log "   base dependencies changed (was: $(cat "$ROOT/opt/venv/.fedgen-deps-done")): new venv"
    rm -rf "$ROOT/opt/venv"
    in_root python3 -m venv /opt/venv
fi
if [[ -f "$ROOT/opt/venv/.fedgen-deps-done" ]]; then
    log "   dependencies already installed: $DEPS_KEY (skip)"
else
    log "   pip install $TORCH_SPEC (CPU aarch64 wheel)"
    step_start
    bounded 2400 "${IN_ROOT[@]}" pip install --progress-bar off "$TORCH_SPEC"
    step_done pip_torch_s
    log "   pip install ${DEPS[*]}"
    step_start
    bounded 1800 "${IN_ROOT[@]}" pip install --progress-bar off "${DEPS[@]}"
    step_done pip_deps_s
    echo "$DEPS_KEY" > "$ROOT/opt/venv/.fedgen-deps-done"
    rm -f "$ROOT/opt/venv/.fedgen-src-digest"
fi
# The project: a copy of the working tree (tracked + untracked-not-ignored files), base install.
SRC_DIGEST="$(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 sha256sum 2>/dev/null | sha256sum | cut -c1-16)"
if [[ "$(cat "$ROOT/opt/venv/.fedgen-src-digest" 2>/dev/null)" == "$SRC_DIGEST" ]]; then
    log "   project already installed from this source (digest $SRC_DIGEST; skip)"
else
    log "   copying the repository to $ROOT/opt/fedgen-src and pip install . (base install, no extras)"
    rm -rf "$ROOT/opt/fedgen-src"
    mkdir -p "$ROOT/opt/fedgen-src"
    (cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -C "$ROOT/opt/fedgen-src" -xf -
    step_start
    bounded 1800 "${IN_ROOT[@]}" sh -c 'cd /opt/fedgen-src && pip install --progress-bar off .'
    step_done pip_project_s
    echo "$SRC_DIGEST" > "$ROOT/opt/venv/.fedgen-src-digest"
fi
# What a device gets from `pip install .` when torch is NOT installed first: resolve pyproject's
# torch range for aarch64 (metadata only, --dry-run --no-deps; the wheel is fetched once, then cached).
UNPINNED="$ROOT/.fedgen-unpinned-torch.json"
if [[ -s "$UNPINNED" ]]; then
    log "   unpinned torch resolution already recorded (skip; rm $UNPINNED to redo)"
else
    TORCH_RANGE="$("$HOST_VENV/bin/python" -c '
import re, sys, tomllib
print(next(d for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"] if re.match(r"torch\b", d)))
' "$REPO/pyproject.toml")"
    log "   what pip resolves for '$TORCH_RANGE' on aarch64 with nothing pinned (dry run)"
    bounded 900 "${IN_ROOT[@]}" pip install --dry-run --ignore-installed --no-deps --progress-bar off \
        --report /tmp/unpinned-torch.json "$TORCH_RANGE" >/dev/null 2>&1 \
        && cp "$ROOT/tmp/unpinned-torch.json" "$UNPINNED" || log "   (dry run failed; not recorded)"
fi
[[ -s "$UNPINNED" ]] && cp "$UNPINNED" "$WORK/unpinned-torch.json"
log "   check: base install lacks the coordinator extras, imports the client"
in_root python - <<'EOF'
import importlib.util, platform
missing = [m for m in ("pydantic", "onnx", "rich", "matplotlib", "grpc_health", "grpc_reflection") if importlib.util.find_spec(m) is None]
print("   coordinator-only packages absent from the arm64 venv:", ", ".join(missing))
import fedgen.edge.cli, torch, onnxruntime, grpc, google.protobuf, numpy, zstandard
print(f"   {platform.machine()} python {platform.python_version()} torch {torch.__version__} onnxruntime {onnxruntime.__version__}"
      f" grpcio {grpc.__version__} protobuf {google.protobuf.__version__} numpy {numpy.__version__}"
      f" zstandard {zstandard.__version__}")
EOF
mkdir -p "$WORK"
cp "$ROOT/.fedgen-setup-seconds" "$WORK/setup-seconds.txt" 2>/dev/null || true
du -sm "$ROOT/opt/venv" | cut -f1 > "$WORK/arm64-venv-mib.txt"
du -sm --one-file-system "$ROOT" | cut -f1 > "$WORK/arm64-root-mib.txt"
log "   arm64 venv $(cat "$WORK/arm64-venv-mib.txt") MiB, whole root $(cat "$WORK/arm64-root-mib.txt") MiB; setup seconds: $(tr '\n' ' ' < "$WORK/setup-seconds.txt" 2>/dev/null)"
in_root pip freeze > "$WORK/arm64-pip-freeze.txt" 2>/dev/null || true

# Reproduce the /sys crash (see mount_root) and record its exact error for the report.
diagnose_sys() {
    local out="$WORK/ort-import-with-sys.txt" rc=0
    log "   diagnosis: import onnxruntime in the root WITH the host's /sys mounted (expected to crash under qemu 7.2)"
    mount --rbind /sys "$ROOT/sys"
    bounded 300 "${IN_ROOT[@]}" python -X faulthandler -c 'import onnxruntime as o; print("import onnxruntime ok", o.__version__)' \
        > "$out.log" 2>&1 || rc=$?
    # qemu's own syscall trace of the same import: what the guest read last before the fault.
    bounded 300 "${IN_ROOT[@]}" QEMU_STRACE=1 python -c 'import onnxruntime' > "$out.strace" 2>&1 || true
    umount -R "$ROOT/sys" || umount -lR "$ROOT/sys"
    { echo "exit_code=$rc"
      grep -E "Fatal Python error|onnxruntime/capi/|qemu: uncaught|import onnxruntime ok" "$out.log" | sed 's/^ *//'
      echo "QEMU_STRACE=1, last lines:"
      grep -E 'openat\(AT_FDCWD,"/(proc|sys)/|prctl|SIGSEGV' "$out.strace" | grep -v ENOENT | tail -n 6 | cut -c1-160
    } > "$out"
    sed 's/^/      /' "$out"
    log "   same import WITHOUT /sys (how the client runs here)"
    "${IN_ROOT[@]}" python -c 'import onnxruntime as o; print("import onnxruntime ok", o.__version__, o.get_available_providers())' 2>&1 \
        | sed 's/^/      /' | tee "$WORK/ort-import-without-sys.txt"
}
diagnose_sys

# ------------------------------------------------------------------ 4-6. federation + report
mkdir -p "$ROOT/opt/fedgen-tools"
cp "$REPO/tools/arm64_edge_probe.py" "$ROOT/opt/fedgen-tools/"
log "4-6. federation: host coordinator + native client + arm64 client (tools/arm64_edge_run.py)"
bounded 3600 "$HOST_VENV/bin/python" "$REPO/tools/arm64_edge_run.py" \
    --root "$ROOT" --work "$WORK" --mnist "$MNIST" --rounds "$ROUNDS" \
    --pip-freeze "$WORK/arm64-pip-freeze.txt" --diag-dir "$WORK" --out "$REPO/benchmarks/results"
log "done"
