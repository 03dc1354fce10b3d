#!/usr/bin/env bash
# Throwaway services for the tests: PostgreSQL 15 and a SeaweedFS S3 server.
#
#   scripts/services.sh start STATE_DIR   start both, write STATE_DIR/env (export lines)
#   scripts/services.sh stop  STATE_DIR   stop both; safe twice, and after a partial start
#   scripts/services.sh env   STATE_DIR   print STATE_DIR/env
#
# Everything lives in STATE_DIR; ports are free ones picked at start, so several
# runs can share a machine. Settings are the durable defaults on purpose: the
# benchmarks and the crash tests measure the real thing (ARCHITECTURE.md §4).
# `start` on a STATE_DIR that already has services stops them and starts afresh.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO_ROOT}/.venv"
WEED="${VENV}/bin/weed"
# Debian's versioned binaries, not the pg_wrapper symlinks in /usr/bin or any in /usr/local/bin.
PG_BIN="${TRANSCODE_PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_DB="transcode_test"
S3_BUCKET="transcode-test"
S3_REGION="us-east-1"
READY_TIMEOUT_S="${TRANSCODE_SERVICES_READY_TIMEOUT:-60}"
# weed mini takes about 4 s to stop on SIGTERM; give it ample room before SIGKILL.
WEED_STOP_TIMEOUT_S=30

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  printf 'usage: %s start|stop|env STATE_DIR\n' "$(basename "$0")" >&2
  exit 2
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

python_bin() {
  if [[ -x ${VENV}/bin/python ]]; then
    printf '%s\n' "${VENV}/bin/python"
  else
    command -v python3
  fi
}

# Print N distinct free TCP ports on 127.0.0.1. All sockets stay bound until every
# port is chosen, so the N are distinct. With PAIRS=1 the last port P is chosen so
# that P+10000 is free too and P+10000 is printed after it (weed mini's built-in
# worker dials the admin gRPC port as admin.port+10000, whatever admin.port.grpc
# says). Another process could still take a port before the service binds it; the
# start functions retry with fresh ports.
free_ports() {
  "$(python_bin)" - "$1" "${2:-0}" <<'PY'
import socket, sys
n, pair = int(sys.argv[1]), sys.argv[2] == "1"
socks = []
def bind(port=0):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", port))
    socks.append(s)
    return s.getsockname()[1]
ports = [bind() for _ in range(n - 1 if pair else n)]
if pair:
    for _ in range(200):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        if p + 10000 > 65535:
            s.close()
            continue
        try:
            bind(p + 10000)
        except OSError:
            s.close()
            continue
        socks.append(s)
        ports += [p, p + 10000]
        break
    else:
        sys.exit("no free port pair P, P+10000 found")
print(" ".join(map(str, ports)))
for s in socks:
    s.close()
PY
}

# initdb and postgres refuse to run as root, so as root they run as the `postgres`
# OS user (created by Debian's postgresql package). As any other user they run as
# that user, which lets a developer use this script without root.
pg_os_user() {
  if [[ ${EUID} -eq 0 ]]; then printf 'postgres\n'; else id -un; fi
}

as_pg() {
  if [[ ${EUID} -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

tail_log() {
  local file="$1"
  if [[ -f ${file} ]]; then
    printf -- '----- last lines of %s -----\n' "${file}" >&2
    tail -n 40 "${file}" >&2 || true
    printf -- '-----\n' >&2
  fi
}

# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------

pg_start() {
  local pg="$1/pg" data="$1/pg/data" sock="$1/pg/sock" port="" attempt t0
  t0="$(now)"
  [[ -x ${PG_BIN}/initdb ]] || die "no initdb in ${PG_BIN} (run scripts/setup.sh)"

  mkdir -p "${pg}" "${sock}"
  if [[ ${EUID} -eq 0 ]]; then
    chown -R postgres: "${pg}"
  fi
  chmod 700 "${pg}"

  # --no-locale: the C locale exists on every machine and sorts the same on all.
  # Trust auth is fine: the server listens on loopback only (pg_hba's host lines
  # are 127.0.0.1/32 and ::1/128).
  as_pg "${PG_BIN}/initdb" -D "${data}" -U postgres --auth=trust \
    --encoding=UTF8 --no-locale >"${pg}/initdb.log" 2>&1 ||
    { tail_log "${pg}/initdb.log"; die "initdb failed"; }

  for attempt in 1 2 3; do
    port="$(free_ports 1)"
    [[ -n ${port} ]] || die "could not pick a free port"
    # Settings go in postgresql.conf, not on the pg_ctl command line, so a test
    # that runs `pg_ctl restart` or `stop` + `start` gets the same server back.
    # fsync/synchronous_commit/full_page_writes are spelled out as ON so nobody
    # "speeds up" the tests by weakening durability.
    as_pg tee -a "${data}/postgresql.conf" >/dev/null <<EOF

# --- written by scripts/services.sh (attempt ${attempt}) ---
listen_addresses = '127.0.0.1'
port = ${port}
unix_socket_directories = '${sock}'
fsync = on
synchronous_commit = on
full_page_writes = on
max_connections = 200
logging_collector = on
log_directory = 'log'
log_filename = 'postgresql.log'
EOF
    if as_pg "${PG_BIN}/pg_ctl" start -D "${data}" -l "${pg}/startup.log" -w -t "${READY_TIMEOUT_S}" >/dev/null 2>&1; then
      break
    fi
    log "postgres did not start on port ${port} (attempt ${attempt})"
    tail_log "${pg}/startup.log"
    tail_log "${data}/log/postgresql.log"
    # A half-started server would keep the data dir locked for the next attempt.
    as_pg "${PG_BIN}/pg_ctl" stop -D "${data}" -m immediate -w >/dev/null 2>&1 || true
    [[ ${attempt} -lt 3 ]] || die "postgres failed to start"
  done

  as_pg "${PG_BIN}/createdb" -h 127.0.0.1 -p "${port}" -U postgres "${PG_DB}" ||
    die "createdb ${PG_DB} failed"
  # Prove the URL that tests will use works, over TCP as they will connect.
  as_pg "${PG_BIN}/psql" -X -q -At -v ON_ERROR_STOP=1 \
    "postgresql://postgres@127.0.0.1:${port}/${PG_DB}" -c 'SELECT 1' >/dev/null ||
    die "postgres is up but ${PG_DB} is not reachable on 127.0.0.1:${port}"

  PG_PORT="${port}"
  PG_DATA="${data}"
  log "postgres ready on 127.0.0.1:${port} in $(elapsed "${t0}")s"
}

pg_stop() {
  local data="$1/pg/data" t0
  t0="$(now)"
  # No postmaster.pid: never started, already stopped, or initdb failed. Nothing to do.
  [[ -f ${data}/postmaster.pid ]] || return 0
  if as_pg "${PG_BIN}/pg_ctl" stop -D "${data}" -m fast -w -t 60 >/dev/null 2>&1; then
    log "postgres stopped in $(elapsed "${t0}")s"
    return 0
  fi
  # pg_ctl stop also fails when the pid file is stale (server died); check first.
  if as_pg "${PG_BIN}/pg_ctl" status -D "${data}" >/dev/null 2>&1; then
    log "postgres did not stop with -m fast; using -m immediate"
    as_pg "${PG_BIN}/pg_ctl" stop -D "${data}" -m immediate -w -t 30 >/dev/null 2>&1 ||
      log "WARNING: postgres in ${data} could not be stopped"
  fi
}

# ---------------------------------------------------------------------------
# SeaweedFS (weed mini: master, volume, filer and S3 in one process)
# ---------------------------------------------------------------------------

# Is PID a live weed process serving this STATE_DIR? Guards against pid reuse.
# A zombie (exited, not yet reaped by whoever inherited it) has an empty cmdline,
# so it counts as gone: it holds no ports any more.
weed_alive() {
  local pid="$1" state="$2"
  [[ ${pid} =~ ^[0-9]+$ ]] || return 1
  kill -0 "${pid}" 2>/dev/null || return 1
  tr '\0' '\n' <"/proc/${pid}/cmdline" 2>/dev/null | grep -qxF -- "-dir=${state}/s3/data"
}

# Generate credentials the way AWS does: 20 upper-case alphanumerics, 40-char secret.
gen_credentials() {
  "$(python_bin)" - <<'PY'
import secrets, string
alnum = string.ascii_uppercase + string.digits
key = "AKTT" + "".join(secrets.choice(alnum) for _ in range(16))
secret = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
print(key, secret)
PY
}

# Signed boto3 round trip against the bucket, plus a check that auth is enforced:
# an unsigned request and a wrongly signed one must both get 403. Exit 0 = ready,
# 1 = not ready yet, 2 = up but auth is NOT enforced (fatal).
S3_PROBE='
import sys, urllib.request, urllib.error
import boto3, botocore
from botocore.config import Config
endpoint, bucket, key, secret, region = sys.argv[1:6]
cfg = Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)
def client(k, s):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=k,
                        aws_secret_access_key=s, region_name=region, config=cfg)
try:
    c = client(key, secret)
    c.list_objects_v2(Bucket=bucket, MaxKeys=1)
    c.put_object(Bucket=bucket, Key=".services-probe", Body=b"ok")
    assert c.get_object(Bucket=bucket, Key=".services-probe")["Body"].read() == b"ok"
    c.delete_object(Bucket=bucket, Key=".services-probe")
except Exception as e:
    print(f"not ready: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
for method, url, body in (("PUT", f"{endpoint}/{bucket}/.services-probe-anon", b"x"),
                          ("GET", f"{endpoint}/{bucket}?list-type=2", None)):
    try:
        urllib.request.urlopen(urllib.request.Request(url, data=body, method=method), timeout=5)
        print(f"AUTH NOT ENFORCED: an unsigned {method} was accepted", file=sys.stderr)
        sys.exit(2)
    except urllib.error.HTTPError as e:
        if e.code != 403:
            print(f"unsigned {method} got HTTP {e.code}, expected 403", file=sys.stderr)
            sys.exit(2)
try:
    client(key, secret + "x").list_objects_v2(Bucket=bucket, MaxKeys=1)
    print("AUTH NOT ENFORCED: a wrong secret was accepted", file=sys.stderr)
    sys.exit(2)
except botocore.exceptions.ClientError as e:
    if e.response["ResponseMetadata"]["HTTPStatusCode"] != 403:
        print(f"wrong secret got {e.response}, expected 403", file=sys.stderr)
        sys.exit(2)
'

s3_start() {
  local state="$1" dir="$1/s3" t0 attempt pid rc deadline sock_dir
  local p_master p_master_grpc p_volume p_volume_grpc p_filer p_filer_grpc p_s3 p_s3_grpc p_admin p_admin_grpc
  t0="$(now)"
  [[ -x ${WEED} ]] || die "${WEED} not found (run scripts/setup.sh)"
  mkdir -p "${dir}/data"
  chmod 700 "${dir}"

  read -r S3_ACCESS_KEY S3_SECRET_KEY < <(gen_credentials)
  [[ -n ${S3_ACCESS_KEY} && -n ${S3_SECRET_KEY} ]] || die "could not generate S3 credentials"
  # The identities file is what makes SeaweedFS enforce SigV4 auth: with one or
  # more identities configured, requests without a valid signature get 403.
  (
    umask 077
    cat >"${dir}/s3-identities.json" <<EOF
{
  "identities": [
    {
      "name": "transcode-test",
      "credentials": [{"accessKey": "${S3_ACCESS_KEY}", "secretKey": "${S3_SECRET_KEY}"}],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    }
  ]
}
EOF
  )

  # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them in STATE_DIR
  # when the path fits in sun_path (108 bytes), so nothing is left in /tmp.
  sock_dir="${dir}"
  [[ ${#sock_dir} -lt 80 ]] || sock_dir=""

  for attempt in 1 2 3; do
    # weed mini binds ten ports (HTTP + gRPC for master, volume, filer, S3, and the
    # admin server, which mini always starts); all are set explicitly so nothing
    # lands on a fixed default port.
    read -r p_master p_master_grpc p_volume p_volume_grpc p_filer p_filer_grpc \
      p_s3 p_s3_grpc p_admin p_admin_grpc < <(free_ports 9 1)
    [[ -n ${p_admin_grpc} ]] || die "could not pick free ports"
    # Remembered so stop can remove the gRPC unix sockets weed leaves in /tmp.
    printf '%s\n' "${p_master_grpc}" "${p_volume_grpc}" "${p_filer_grpc}" "${p_s3}" \
      "${p_s3_grpc}" "${p_admin_grpc}" "${p_filer}" >"${dir}/ports"
    local args=(
      # glog writes to /tmp/weed.* files by default; keep all logs in weed.log.
      -logtostderr
      mini
      "-dir=${dir}/data"
      -ip=127.0.0.1 -ip.bind=127.0.0.1
      -master.telemetry=false
      "-master.port=${p_master}" "-master.port.grpc=${p_master_grpc}"
      "-volume.port=${p_volume}" "-volume.port.grpc=${p_volume_grpc}"
      "-filer.port=${p_filer}" "-filer.port.grpc=${p_filer_grpc}"
      "-s3.port=${p_s3}" "-s3.port.grpc=${p_s3_grpc}"
      "-admin.port=${p_admin}" "-admin.port.grpc=${p_admin_grpc}"
      -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0
      "-s3.config=${dir}/s3-identities.json"
      "-bucket=${S3_BUCKET}"
    )
    if [[ -n ${sock_dir} ]]; then
      args+=("-filer.localSocket=${sock_dir}/filer.sock" "-s3.localSocket=${sock_dir}/s3.sock")
    fi
    printf '%s\n' "${args[*]}" >"${dir}/weed.cmdline"

    # setsid: Ctrl-C in a developer's terminal must not hit weed directly; stop
    # does an orderly SIGTERM + wait. The inner shell writes its own pid and then
    # execs weed, so the pid file holds weed's pid even if setsid had to fork.
    # AWS_*/S3_BUCKET are unset because weed mini turns them into identities/buckets.
    # shellcheck disable=SC2016 # $$ and $@ are for the inner shell
    setsid env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u S3_BUCKET \
      bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "${dir}/weed.pid" "${WEED}" "${args[@]}" \
      </dev/null >"${dir}/weed.log" 2>&1 &
    # Wait for the pid file (written before exec, so this is immediate).
    for _ in $(seq 1 50); do [[ -s ${dir}/weed.pid ]] && break; sleep 0.1; done
    pid="$(cat "${dir}/weed.pid" 2>/dev/null || true)"

    S3_ENDPOINT="http://127.0.0.1:${p_s3}"
    deadline=$(($(date +%s) + READY_TIMEOUT_S))
    rc=1
    while :; do
      if ! kill -0 "${pid}" 2>/dev/null; then
        log "weed exited during start-up (attempt ${attempt})"
        rc=1
        break
      fi
      rc=0
      "${VENV}/bin/python" -c "${S3_PROBE}" "${S3_ENDPOINT}" "${S3_BUCKET}" \
        "${S3_ACCESS_KEY}" "${S3_SECRET_KEY}" "${S3_REGION}" 2>"${dir}/probe.err" || rc=$?
      [[ ${rc} -eq 1 ]] || break
      if [[ $(date +%s) -ge ${deadline} ]]; then
        log "S3 not ready after ${READY_TIMEOUT_S}s; last probe error: $(tail -n 1 "${dir}/probe.err")"
        break
      fi
      sleep 0.2
    done

    if [[ ${rc} -eq 0 ]]; then
      log "s3 ready on ${S3_ENDPOINT} (bucket ${S3_BUCKET}, auth enforced) in $(elapsed "${t0}")s"
      return 0
    fi
    cat "${dir}/probe.err" >&2 || true
    tail_log "${dir}/weed.log"
    s3_stop "${state}"
    if [[ ${rc} -eq 2 ]]; then
      die "SeaweedFS started without enforcing S3 auth; refusing to continue"
    fi
    [[ ${attempt} -lt 3 ]] || die "SeaweedFS S3 failed to start"
    # A crash on a taken port is the likely cause: retry with fresh ports and data.
    rm -rf "${dir}/data" && mkdir -p "${dir}/data"
  done
}

s3_stop() {
  local state="$1" pidfile="$1/s3/weed.pid" pid t0 deadline
  t0="$(now)"
  [[ -f ${pidfile} ]] || return 0
  pid="$(cat "${pidfile}" 2>/dev/null || true)"
  if weed_alive "${pid}" "${state}"; then
    kill -TERM "${pid}" 2>/dev/null || true
    # weed stops slowly (volume and filer flush); its ports stay bound until it
    # exits, so wait for the process itself, not just for the signal to land.
    deadline=$(($(date +%s) + WEED_STOP_TIMEOUT_S))
    while weed_alive "${pid}" "${state}" && [[ $(date +%s) -lt ${deadline} ]]; do
      sleep 0.1
    done
    if weed_alive "${pid}" "${state}"; then
      log "weed (pid ${pid}) still running after ${WEED_STOP_TIMEOUT_S}s; sending SIGKILL"
      kill -KILL "${pid}" 2>/dev/null || true
      deadline=$(($(date +%s) + 10))
      while weed_alive "${pid}" "${state}" && [[ $(date +%s) -lt ${deadline} ]]; do
        sleep 0.1
      done
    fi
    log "s3 (weed pid ${pid}) stopped in $(elapsed "${t0}")s"
  fi
  rm -f "${pidfile}"
  # weed leaves /tmp/seaweedfs-<component>-<port>.sock behind; remove ours.
  if [[ -f ${state}/s3/ports ]]; then
    local port
    while read -r port; do
      [[ ${port} =~ ^[0-9]+$ ]] && rm -f /tmp/seaweedfs-*-"${port}".sock
    done <"${state}/s3/ports"
    rm -f "${state}/s3/ports"
  fi
}

# ---------------------------------------------------------------------------

write_env() {
  local state="$1" tmp="$1/env.tmp" name
  local -a vars=(
    "TRANSCODE_TEST_PG_URL=postgres://postgres@127.0.0.1:${PG_PORT}/${PG_DB}"
    "TRANSCODE_TEST_PG_DATA=${PG_DATA}"
    "TRANSCODE_TEST_PG_BIN=${PG_BIN}"
    "TRANSCODE_TEST_PG_OS_USER=$(pg_os_user)"
    "TRANSCODE_TEST_S3_ENDPOINT=${S3_ENDPOINT}"
    "TRANSCODE_TEST_S3_BUCKET=${S3_BUCKET}"
    "AWS_ACCESS_KEY_ID=${S3_ACCESS_KEY}"
    "AWS_SECRET_ACCESS_KEY=${S3_SECRET_KEY}"
    "AWS_REGION=${S3_REGION}"
    "AWS_ALLOW_HTTP=true"
    "TRANSCODE_REQUIRE_SERVICES=1"
    "TRANSCODE_TEST_VENV=${VENV}"
  )
  {
    printf '# Written by scripts/services.sh start; source it: . %s\n' "${state}/env"
    for name in "${vars[@]}"; do
      # %q quotes the value so the file is safe to source whatever it holds.
      printf 'export %s=%q\n' "${name%%=*}" "${name#*=}"
    done
  } >"${tmp}"
  chmod 600 "${tmp}" # it holds the S3 secret
  mv -f "${tmp}" "${state}/env"
}

cmd_stop() {
  local state="$1"
  [[ -d ${state} ]] || return 0
  # Stop S3 and Postgres independently: a failure in one must not leak the other.
  s3_stop "${state}" || log "WARNING: stopping s3 failed"
  pg_stop "${state}" || log "WARNING: stopping postgres failed"
  rm -f "${state}/env"
}

on_start_exit() {
  local rc=$?
  if [[ ${rc} -ne 0 ]]; then
    log "start failed; stopping what was started"
    cmd_stop "${START_STATE}"
  fi
  exit "${rc}"
}

cmd_start() {
  local state="$1" t0
  t0="$(now)"
  mkdir -p "${state}"
  # mktemp -d makes 0700 dirs; the postgres OS user must be able to reach its
  # data dir below this one.
  chmod 755 "${state}"
  if [[ ${EUID} -eq 0 ]] && ! runuser -u postgres -- test -x "${state}"; then
    die "the postgres OS user cannot reach ${state}; use a STATE_DIR under /tmp"
  fi

  # Throwaway services: whatever a previous start left here is stopped and wiped.
  cmd_stop "${state}"
  rm -rf "${state}/pg" "${state}/s3"

  # Undo a partial start on any failure, so a failed start leaks no process.
  START_STATE="${state}"
  trap on_start_exit EXIT

  pg_start "${state}"
  s3_start "${state}"
  write_env "${state}"
  trap - EXIT
  log "all services ready in $(elapsed "${t0}")s; env: ${state}/env"
}

[[ $# -eq 2 && -n $2 ]] || usage
action="$1"
state_dir="$2"
if [[ ${action} == start ]]; then
  mkdir -p "${state_dir}"
fi
if [[ -d ${state_dir} ]]; then
  # Absolute, so the env file and pg_ctl paths work from any directory.
  state_dir="$(cd "${state_dir}" && pwd)"
fi

case "${action}" in
  start) cmd_start "${state_dir}" ;;
  stop) cmd_stop "${state_dir}" ;;
  env)
    [[ -f ${state_dir}/env ]] || die "no ${state_dir}/env (services not started?)"
    cat "${state_dir}/env"
    ;;
  *) usage ;;
esac
