#!/usr/bin/env bash
# Runs the three client examples (Python, PHP, Rust) against a running BEDS
# node that serves the `usr` sample domain, and says per example "ok" or
# "FAILED". Exits 1 if any example failed (or could not be set up), 2 on
# missing settings.
#
#   BEDS_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F \
#   BEDS_PREFIX=beds \
#   CARGO_TARGET_DIR=/var/tmp/beds-target \
#       examples/run_all.sh
#
# BEDS_EXAMPLES_NOTE=1 also runs the MongoDB `note` steps (the node must
# serve `note`). Installs what is missing, idempotently: php-cli and
# php-amqplib from Debian's packages, pika into the repository's .venv.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EX="$ROOT/examples"
VENV="$ROOT/.venv"
STEP_TIMEOUT=${BEDS_EXAMPLES_TIMEOUT:-180}

say() { printf '[examples] %s\n' "$*" >&2; }

missing=()
[ -n "${BEDS_AMQP_URL:-}" ] || missing+=(BEDS_AMQP_URL)
[ -n "${BEDS_PREFIX:-}" ] || missing+=(BEDS_PREFIX)
if [ "${#missing[@]}" -gt 0 ]; then
  say "error: set ${missing[*]} (e.g. BEDS_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F BEDS_PREFIX=beds)"
  exit 2
fi
export BEDS_AMQP_URL BEDS_PREFIX
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/beds-target}"

if [ "${BEDS_EXAMPLES_NOTE:-}" = 1 ]; then
  echo "==== note steps: ON (BEDS_EXAMPLES_NOTE=1): the node must serve the MongoDB note domain ===="
else
  echo "==== note steps: skipped (BEDS_EXAMPLES_NOTE unset) ===="
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null || { say "apt-get not found: install $* yourself"; return 1; }
  if [ "$APT_UPDATED" = 0 ]; then
    say "apt-get update"
    $SUDO apt-get update -qq || return 1
    APT_UPDATED=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

setup_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$VENV"; } || return 1
  fi
  if ! "$VENV/bin/python" -c 'import pika' 2>/dev/null; then
    say "pip install pika into $VENV"
    "$VENV/bin/pip" install -q 'pika>=1.3,<2' || return 1
  fi
  "$VENV/bin/python" -c 'import pika'
}

php_ready() {
  command -v php >/dev/null && php -r 'require_once "PhpAmqpLib/autoload.php";' >/dev/null 2>&1
}

setup_php() {
  php_ready && return 0
  apt_install php-cli php-amqplib || return 1
  php_ready
}

setup_rust() {
  command -v cargo >/dev/null || { say "cargo not found"; return 1; }
  say "cargo build --example rust_client (CARGO_TARGET_DIR=$CARGO_TARGET_DIR; waits if another build holds the lock)"
  (cd "$ROOT" && cargo build --quiet --example rust_client)
}

failed=()
passed=()

# run NAME SETUP_FN COMMAND...
run() {
  local name=$1 setup=$2 rc
  shift 2
  printf '\n==== %s ====\n' "$name"
  if ! "$setup"; then
    printf '==== %s: FAILED (setup: could not install or build it) ====\n' "$name"
    failed+=("$name")
    return
  fi
  timeout "$STEP_TIMEOUT" "$@"
  rc=$?
  if [ "$rc" = 0 ]; then
    printf '==== %s: ok ====\n' "$name"
    passed+=("$name")
  else
    [ "$rc" = 124 ] && say "$name: timed out after ${STEP_TIMEOUT} s"
    printf '==== %s: FAILED (exit %s) ====\n' "$name" "$rc"
    failed+=("$name")
  fi
}

run python setup_python "$VENV/bin/python" "$EX/python/beds_client.py"
run php setup_php php "$EX/php/beds_client.php"
run rust setup_rust "$CARGO_TARGET_DIR/debug/examples/rust_client"

echo
if [ "${#failed[@]}" -gt 0 ]; then
  echo "examples FAILED: ${failed[*]} (ok: ${passed[*]:-none})"
  exit 1
fi
echo "examples ok: ${passed[*]}"
