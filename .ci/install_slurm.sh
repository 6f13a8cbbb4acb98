#!/usr/bin/env bash
# Install the Debian packages of a one-machine Slurm (22.05 on Debian 12) if they are missing.
# Idempotent: does nothing when slurmctld, slurmd, sbatch and munged are already installed.
# Needs root (CI runs as root). Nothing is started here: tests/slurm_cluster.py starts the daemons.
#   usage: .ci/install_slurm.sh
set -euo pipefail

need=()
for pkg in slurmctld slurmd slurm-client munge; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        need+=("$pkg")
    fi
done
if [ "${#need[@]}" -eq 0 ]; then
    echo "install_slurm: slurmctld slurmd slurm-client munge already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "error: install_slurm: need root to apt-get install ${need[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists may be absent on a fresh image; refresh them once, then install.
if ! apt-get install -y --no-install-recommends "${need[@]}"; then
    apt-get update
    apt-get install -y --no-install-recommends "${need[@]}"
fi
# The munge package's postinst creates /etc/munge/munge.key; make sure it exists and is private.
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
echo "install_slurm: installed ${need[*]}"
