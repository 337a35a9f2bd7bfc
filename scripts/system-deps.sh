#!/usr/bin/env bash
# Install the real DICOM peers and validators the tests run against (Debian packages), and the
# headless browser the dashboard test drives.
set -euo pipefail
packages=(dcmtk orthanc orthanc-dicomweb dicom3tools pixelmed-apps openssl chromium chromium-driver)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
