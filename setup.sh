#!/usr/bin/env bash
# Set up this checkout: a virtual environment in .venv with the pinned dependencies
# (requirements.txt) and the dptq package. Downloads no data and no weights.
#   ./setup.sh          to run the pipeline
#   ./setup.sh --test   also installs the Debian packages the tests use (headless Chromium for
#                       the report, SLURM and munge for the cluster test); skipped when present
set -euo pipefail
cd "$(dirname "$0")"

if [ "${1:-}" = "--test" ]; then
  packages=(chromium slurm-wlm slurmctld slurmd slurm-client munge)
  installed=$(dpkg-query -W -f='${Status}\n' "${packages[@]}" 2>/dev/null | grep -c "install ok installed" || true)
  if [ "$installed" -ne "${#packages[@]}" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
  fi
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/pip install -r requirements.txt
.venv/bin/pip install -e .
