#!/usr/bin/env bash
# Installs the peers and load tools (Debian packages) and builds the Go relay.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    haproxy nginx-light libnginx-mod-stream socat golang-go iperf3 wrk >/dev/null
fi
mkdir -p work
GOCACHE="$PWD/work/gocache" go build -o work/gorelay relay.go
echo "setup done: $(go version), $(haproxy -v | head -1)"
