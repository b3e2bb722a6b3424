#!/usr/bin/env python3
"""Renders helm/gateway with the real Helm engine (Helm v4's library through
the PyPI package helm-python-sdk: no helm binary, no cluster) and prints the
rendered objects as one JSON array:
    python3 helm/tests/render.py [VALUES.json|-] [--name RELEASE] [--namespace NS]
Values come from a JSON file or stdin (`-`), merged over values.yaml as an
install would. A schema violation or a template `fail` exits 1 with Helm's
message on stderr. Used by helm/tests/run.py and by the rollout simulation
(tests/tests/gateway/kubernetes.rs).
"""
import argparse
import json
import sys
from pathlib import Path

CHART = Path(__file__).resolve().parents[1] / "gateway"


def helm():
    try:
        import helm_python
    except ImportError:
        sys.exit("render.py: the PyPI package helm-python-sdk is missing "
                 "(scripts/test.sh installs it into target/helm-venv)")
    return helm_python


def render(values, name="gw", namespace="gateway"):
    """(objects, notes): every rendered object, in template order."""
    h = helm()
    with h.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        out = chart.render(values, name=name, namespace=namespace, is_install=True)
    objects, notes = [], ""
    for path in sorted(out):
        text = out[path]
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in split_docs(text):
            obj = h.values_from_yaml(doc)
            if obj:
                objects.append(obj)
    return objects, notes


def split_docs(text):
    docs, cur = [], []
    for line in text.splitlines():
        if line.strip() == "---":
            docs.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur))
    return [d for d in docs if d.strip() and any(
        l.strip() and not l.lstrip().startswith("#") for l in d.splitlines())]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("values", nargs="?", default=None)
    p.add_argument("--name", default="gw")
    p.add_argument("--namespace", default="gateway")
    a = p.parse_args()
    if a.values is None:
        values = {}
    elif a.values == "-":
        values = json.load(sys.stdin)
    else:
        values = json.loads(Path(a.values).read_text())
    try:
        objects, _ = render(values, a.name, a.namespace)
    except Exception as e:  # Helm's errors carry the message that matters
        print(f"render.py: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    json.dump(objects, sys.stdout)
    print()


if __name__ == "__main__":
    main()
