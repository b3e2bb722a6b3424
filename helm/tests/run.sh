#!/usr/bin/env bash
# The chart's tests (helm/tests/run.py): renders helm/gateway with the real
# Helm engine and validates every object offline against the Kubernetes API
# schemas. Installs what it needs when missing, quietly: the PyPI package
# helm-python-sdk (Helm v4's library; no helm binary) into target/helm-venv,
# and the npm packages kubernetes-models, @kubernetes-models/prometheus-operator
# and typescript into helm/tests/node_modules (package-lock.json).
# The rollout simulation (cargo test -p harness --test gateway kubernetes)
# renders through the same venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=target/helm-venv
if ! "$VENV/bin/python" -c "import helm_python" >/dev/null 2>&1; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "helm-python-sdk==0.2.2"
fi
if [ ! -f helm/tests/node_modules/.package-lock.json ] ||
  [ helm/tests/package-lock.json -nt helm/tests/node_modules/.package-lock.json ]; then
  (cd helm/tests && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
exec "$VENV/bin/python" helm/tests/run.py
