#!/usr/bin/env bash
# Installs what the project needs on Debian 12 (as root) and builds the venv.
# Idempotent: a second run only checks what is there and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  redis-server python3-venv
  kamailio kamailio-python3-modules kamailio-redis-modules kamailio-tls-modules
  sip-tester nginx nghttp2-client tshark linphone-cli
  mariadb-server kamailio-mysql-modules patch
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The venv must be built from Debian's interpreter: app_python3 embeds /usr/bin/python3.
VENV=.venv
STAMP="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "install-deps: building the venv"
  /usr/bin/python3 -m venv "$VENV"
  log="$VENV/install.log"
  # pip and setuptools are chatty; keep their output in a log and show it only on failure.
  if ! { "$VENV/bin/pip" install --upgrade pip && "$VENV/bin/pip" install -e '.[dev,sandbox]'; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "install-deps: pip failed (full log: $log)" >&2
    exit 1
  fi
  touch "$STAMP"
fi
