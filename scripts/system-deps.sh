#!/usr/bin/env bash
# Install the real DICOM peers and validators the tests run against (Debian packages), the
# headless browser the dashboard and viewer tests drive, npm (fetches the OHIF viewer), and
# SQLite's headers, for the node's compiled catalogue lookup (setup.py).
set -euo pipefail
packages=(dcmtk orthanc orthanc-dicomweb dicom3tools pixelmed-apps openssl chromium chromium-driver
  libsqlite3-dev)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# npm comes with NodeSource's nodejs, or as Debian's own npm package
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
