#!/usr/bin/env bash
# Debian packages the tests drive: Chromium (the dashboard's browser test; Playwright cannot download
# its own browser here) and real RDP software (xrdp + sesman servers with Xvnc desktops, FreeRDP and
# rdesktop clients under Xvfb, nmap's RDP scripts) to check the proxy against reality. Installs only
# what is missing, as root or through sudo.
set -euo pipefail
declare -A wanted=([chromium]=chromium [xrdp]=xrdp [xrdp-sesman]=xrdp [Xvnc]=tigervnc-standalone-server
  [xfreerdp]=freerdp2-x11 [rdesktop]=rdesktop [xvfb-run]=xvfb [xauth]=xauth [nmap]=nmap)
declare -A needed=()  # a package once, however many of its tools are missing
for tool in "${!wanted[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || needed[${wanted[$tool]}]=1
done
missing=("${!needed[@]}")
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: no apt-get; please install: ${missing[*]}" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_system_deps: not root and no sudo; please install: ${missing[*]}" >&2
    exit 0
  fi
fi
echo "installing Debian packages: ${missing[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
