#!/usr/bin/env python3
"""The chart's tests, with the real Helm engine (helm-python-sdk: Helm v4's
library) and the Kubernetes API schemas (npm kubernetes-models):

1. values.schema.json is current with gateway/src/config.rs;
2. `helm lint --strict`;
3. every value set in helm/tests/values/ passes the schema, renders, and
   every object it renders validates against the Kubernetes API schemas
   (helm/tests/validate.mjs), the objects do what the chart promises
   (probes on the ops port, the grace period derived from the drain, no
   secret outside a Secret, ...), and the real gateway binary takes the
   rendered config file and environment (target/debug/gateway, or
   GATEWAY_BIN);
4. bad values fail the schema, and a grace period shorter than the drain
   (and other impossible combinations) fail rendering with a message that
   says why.

    helm/tests/run.sh      (installs what it needs, then runs this)
Ends with `N passed, N failed`; exits 1 on any failure.
"""
import json
import math
import subprocess
import sys
import tempfile
import tomllib
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import gen_schema  # noqa: E402
import render as chart  # noqa: E402

import helm_python as helm  # noqa: E402

results = {"passed": 0, "failed": 0}


def check(name, fn):
    try:
        fn()
        print(f"ok   {name}")
        results["passed"] += 1
    except Exception as e:  # report every failure, not only the first
        print(f"FAIL {name}: {e}")
        if not isinstance(e, AssertionError):
            traceback.print_exc()
        results["failed"] += 1


def merged(values):
    with helm.Chart.load(chart.CHART) as c:
        return c.merge_values(values)


def find(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    return found


def one(objects, kind, name=None):
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------
# What every rendering must hold
# ---------------------------------------------------------------------------

SECRET_SETTINGS = {"jwt_secret", "api_keys", "resume_secret", "redis_url", "nats_url"}


def promises(objects, values):
    v = merged(values)
    full = "gw-gateway"
    dep = one(objects, "Deployment", full)
    pod = dep["spec"]["template"]["spec"]
    (c,) = [x for x in pod["containers"] if x["name"] == "gateway"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    # Service links off; no service account token.
    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False

    # Grace period: derived from the drain, or the explicit (longer) value.
    d = v["drain"]
    drain_s = math.ceil((d["prestopDelayMs"] + d["timeoutMs"] + d["shutdownTimeoutMs"]) / 1000)
    want = v.get("terminationGracePeriodSeconds") or drain_s + d["marginSeconds"]
    assert pod["terminationGracePeriodSeconds"] == want, (pod["terminationGracePeriodSeconds"], want)
    assert pod["terminationGracePeriodSeconds"] >= drain_s

    # Surge-first rollout.
    st = dep["spec"]["strategy"]
    assert st["type"] == "RollingUpdate" and st["rollingUpdate"]["maxUnavailable"] == 0
    assert st["rollingUpdate"]["maxSurge"] not in (0, "0%")
    assert dep["spec"]["minReadySeconds"] == v["minReadySeconds"]
    assert ("replicas" in dep["spec"]) != v["autoscaling"]["enabled"]

    # Probes: all on the ops port.
    for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/livez"),
                        ("startupProbe", "/livez")]:
        assert c[probe]["httpGet"] == {"path": path, "port": "ops"}, c[probe]
    assert ports["ops"] == v["ports"]["ops"] and ports["http"] == v["ports"]["client"]
    assert ports["ops"] != ports["http"]

    # Spread over zones and nodes.
    keys = {t["topologyKey"] for t in pod["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, keys

    # Non-root, read-only, no capabilities; resources set.
    sc = c["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and sc["runAsNonRoot"]
    assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]

    # Node id from the pod name; every other variable from a Secret or the
    # pod spec, never a literal.
    env = {e["name"]: e for e in c["env"]}
    assert env["GATEWAY_NODE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    for e in c["env"]:
        assert "value" not in e, f"literal env {e['name']}"
    for name in ["GATEWAY_API_KEYS", "GATEWAY_RESUME_SECRET"]:
        assert "secretKeyRef" in env[name]["valueFrom"], name
    secret_name = v["secrets"]["existingSecret"] or full
    assert env["GATEWAY_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == secret_name

    # The config file: valid TOML, only settings the gateway knows, no secret,
    # client listener on 0.0.0.0, ops listener on its own port.
    cm = one(objects, "ConfigMap", full)
    toml = tomllib.loads(cm["data"]["gateway.toml"])
    fields = {name for name, _, _ in gen_schema.config_fields()}
    assert set(toml) <= fields, set(toml) - fields
    assert not (set(toml) & SECRET_SETTINGS), set(toml) & SECRET_SETTINGS
    assert toml["addr"] == f"0.0.0.0:{ports['http']}"
    assert toml["admin_addr"] == f"0.0.0.0:{ports['ops']}"
    for k, want in [("drain_prestop_delay_ms", d["prestopDelayMs"]),
                    ("drain_timeout_ms", d["timeoutMs"]),
                    ("shutdown_timeout_ms", d["shutdownTimeoutMs"])]:
        assert toml[k] == want and isinstance(toml[k], int), (k, toml[k])
    for k, val in v["config"].items():
        assert toml[k] == val, (k, toml[k], val)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert c["args"] == ["--config", "/etc/gateway/gateway.toml"]
    assert mounts["/etc/gateway/gateway.toml"]["subPath"] == "gateway.toml"

    # Services: the public one is L4 with the client port only; the API one
    # is ClusterIP; the ops port is on no public Service.
    lb = one(objects, "Service", full)
    assert lb["spec"]["type"] == v["service"]["type"]
    assert [p["targetPort"] for p in lb["spec"]["ports"]] == ["http"]
    if lb["spec"]["type"] == "LoadBalancer":
        assert lb["spec"]["externalTrafficPolicy"] == v["service"]["externalTrafficPolicy"]
        assert lb["spec"].get("loadBalancerSourceRanges", []) == v["service"]["loadBalancerSourceRanges"]
        assert lb["metadata"].get("annotations", {}) == v["service"]["annotations"]
    api = one(objects, "Service", f"{full}-api")
    assert api["spec"]["type"] == "ClusterIP"
    for s in find(objects, "Service"):
        if s["spec"]["type"] != "ClusterIP":
            assert all(p["targetPort"] != "ops" and p["port"] != ports["ops"]
                       for p in s["spec"]["ports"]), s["metadata"]["name"]

    # No secret material in any ConfigMap, and Secrets only as data.
    for s in find(objects, "Secret"):
        assert set(s) <= {"apiVersion", "kind", "metadata", "type", "data"}, s.keys()
    secrets = set()
    for s in find(objects, "Secret"):
        import base64
        secrets |= {base64.b64decode(x).decode() for x in s.get("data", {}).values()}
    text = json.dumps([o for o in objects if o["kind"] != "Secret"])
    for s in secrets:
        assert s not in text, "a secret value outside a Secret"

    # PDB; HPA when asked.
    if v["podDisruptionBudget"]["enabled"]:
        pdb = one(objects, "PodDisruptionBudget", full)
        assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert len(find(objects, "HorizontalPodAutoscaler")) == int(v["autoscaling"]["enabled"])


def expect_hpa_and_monitoring(objects):
    hpa = one(objects, "HorizontalPodAutoscaler")
    kinds = {m["type"] for m in hpa["spec"]["metrics"]}
    assert kinds == {"Resource", "Pods"}, kinds
    pods = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"][0]["pods"]
    assert pods["metric"]["name"] == "gateway_connections"
    assert pods["target"] == {"type": "AverageValue", "averageValue": "25000"}
    sm = one(objects, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "ops"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    ops = one(objects, "Service", "gw-gateway-ops")
    sel = sm["spec"]["selector"]["matchLabels"]
    assert all(ops["metadata"]["labels"].get(k) == val for k, val in sel.items())
    for s in find(objects, "Service"):
        if s["metadata"]["name"] != "gw-gateway-ops":
            assert not all(s["metadata"]["labels"].get(k) == val for k, val in sel.items())
    rule = one(objects, "PrometheusRule")
    shipped = helm.values_from_yaml((chart.CHART / "files/alerts.yaml").read_text())
    assert rule["spec"]["groups"] == (shipped.get("groups") or []), "PrometheusRule != files/alerts.yaml"
    assert rule["spec"]["groups"], "files/alerts.yaml holds no rules"
    dash = one(objects, "ConfigMap", "gw-gateway-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((chart.CHART / "files/dashboard.json").read_text())
    assert json.loads(dash["data"]["gateway.json"]) == shipped, "dashboard ConfigMap != files/dashboard.json"


def expect_existing_secret(objects):
    assert not find(objects, "Secret", "gw-gateway"), "the chart made a Secret besides existingSecret"
    urls = one(objects, "Secret", "gw-gateway-urls")
    assert set(urls["data"]) == {"redis-url"}
    dep = one(objects, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert "GATEWAY_JWT_SECRET" not in env
    for name in ["GATEWAY_API_KEYS", "GATEWAY_RESUME_SECRET"]:
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "gateway-credentials"
    assert env["GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "gw-gateway-urls"
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["jwt-public-key"]["secret"]["secretName"] == "gateway-credentials"
    toml = tomllib.loads(one(objects, "ConfigMap")["data"]["gateway.toml"])
    assert toml["jwt_algorithm"] == "RS256"
    assert toml["jwt_public_key_file"] == "/etc/gateway/secrets/jwt-public-key.pem"


def expect_nats(objects):
    c = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"] for e in c["env"]}
    assert {"GATEWAY_REDIS_URL", "GATEWAY_NATS_URL"} <= env
    assert one(objects, "Deployment")["spec"]["replicas"] == 4


def expect_bundled(objects):
    names = {o["metadata"]["name"] for o in find(objects, "Deployment")}
    assert names == {"gw-gateway", "gw-gateway-redis", "gw-gateway-nats"}, names
    np = one(objects, "NetworkPolicy")
    ports = [r["ports"][0]["port"] for r in np["spec"]["ingress"]]
    assert ports == ["http", "ops"], ports
    assert "from" in np["spec"]["ingress"][1]
    import base64
    data = one(objects, "Secret", "gw-gateway")["data"]
    assert base64.b64decode(data["redis-url"]).decode() == "redis://gw-gateway-redis:6379/0"
    assert base64.b64decode(data["nats-url"]).decode() == "nats://gw-gateway-nats:4222"


def expect_redis_cluster(objects):
    import base64
    c = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert "GATEWAY_REDIS_URL" not in env, "redis.url must give way to redis.clusterUrls"
    ref = env["GATEWAY_REDIS_CLUSTER_URLS"]["valueFrom"]["secretKeyRef"]
    data = one(objects, "Secret", ref["name"])["data"]
    assert base64.b64decode(data[ref["key"]]).decode() == \
        "redis://redis-0.redis:6379,redis://redis-1.redis:6379,redis://redis-2.redis:6379"


def expect_sentinel(objects):
    c = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert "GATEWAY_REDIS_URL" not in env and "GATEWAY_REDIS_CLUSTER_URLS" not in env, \
        "redis.url must give way to redis.sentinel"
    for name, key in [("GATEWAY_REDIS_PASSWORD", "redis-password"),
                      ("GATEWAY_REDIS_SENTINEL_PASSWORD", "sentinel-password")]:
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": key}, env[name]
    for o in find(objects, "Secret"):
        assert "redis-url" not in o.get("data", {}), o["metadata"]["name"]
    toml = tomllib.loads(one(objects, "ConfigMap", "gw-gateway")["data"]["gateway.toml"])
    assert toml["redis_sentinels"] == \
        "redis-node-0.redis-headless:26379,redis-node-1.redis-headless:26379,redis-node-2.redis-headless:26379"
    assert toml["redis_master_name"] == "mymaster"
    assert toml["redis_username"] == "gateway" and toml["redis_db"] == 2
    assert not any("password" in k for k in toml), "a password in the ConfigMap"


def expect_single(objects):
    c = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "GATEWAY_REDIS_URL" not in {e["name"] for e in c["env"]}
    assert not find(objects, "PodDisruptionBudget")


def expect_fast_drain(objects):
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    # ceil((800 + 20000 + 5000) / 1000) + 5
    assert pod["terminationGracePeriodSeconds"] == 31, pod["terminationGracePeriodSeconds"]


def gateway_accepts(objects):
    """The real gateway binary takes the rendered config file and env: it
    gets past its strict configuration check (exit 2 is a refused setting)
    and fails only at connecting to the (unreachable) Redis, or serves."""
    import base64
    import os
    import re
    import signal
    binary = Path(os.environ.get("GATEWAY_BIN") or ROOT / "target/debug/gateway")
    assert binary.exists(), f"{binary} not built (cargo build --workspace --bins)"
    dep = one(objects, "Deployment", "gw-gateway")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    secrets = {o["metadata"]["name"]: o.get("data", {}) for o in find(objects, "Secret")}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        toml = one(objects, "ConfigMap", "gw-gateway")["data"]["gateway.toml"]
        # The pod's listeners on free loopback ports; its key file here.
        toml = re.sub(r'"0\.0\.0\.0:\d+"', '"127.0.0.1:0"', toml)
        # Sentinels nobody listens for: the node stops at its first lookup.
        toml = re.sub(r'^redis_sentinels = .*$', 'redis_sentinels = "127.0.0.1:1"', toml, flags=re.M)
        if "jwt_public_key_file" in toml:
            key = d / "key.pem"
            key.write_text("-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n")
            toml = toml.replace("/etc/gateway/secrets/jwt-public-key.pem", str(key))
        (d / "gateway.toml").write_text(toml)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        for e in c["env"]:
            ref = e.get("valueFrom", {})
            if "fieldRef" in ref:
                env[e["name"]] = "gw-gateway-7d9f8c6b5-x2x4z"
            elif "resourceFieldRef" in ref:
                env[e["name"]] = "2"
            elif "secretKeyRef" in ref:
                r = ref["secretKeyRef"]
                data = secrets.get(r["name"])
                # existingSecret: the user's Secret, not rendered: stand-ins.
                v = base64.b64decode(data[r["key"]]).decode() if data is not None else \
                    "existing-secret-value-0123456789"
                if e["name"] in ("GATEWAY_REDIS_URL", "GATEWAY_NATS_URL"):
                    v = re.sub(r"(@?)[^/@:]+:\d+", r"\g<1>127.0.0.1:1", v.split("//", 1)[1], count=1)
                    v = ("redis://" if "REDIS" in e["name"] else "nats://") + v
                if e["name"] == "GATEWAY_REDIS_CLUSTER_URLS":
                    v = ",".join("redis://127.0.0.1:1" for _ in v.split(","))
                env[e["name"]] = v
        args = [a.replace("/etc/gateway/gateway.toml", str(d / "gateway.toml")) for a in c["args"]]
        p = subprocess.Popen([str(binary), *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            # Serving (the embedded node): the config was taken.
            p.send_signal(signal.SIGKILL)
            out, err = p.communicate()
            assert "listening on" in out, err[-2000:]
            return
        assert p.returncode != 2 and "configuration" not in err.split("\n")[0], \
            f"the gateway refused the rendered config (exit {p.returncode}): {err[:600]}"
        assert "Redis" in err or "redis" in err, f"exit {p.returncode}: {err[:600]}"


EXTRA = {
    "hpa-servicemonitor": expect_hpa_and_monitoring,
    "existing-secret": expect_existing_secret,
    "nats": expect_nats,
    "bundled-netpol": expect_bundled,
    "single-embedded": expect_single,
    "redis-cluster": expect_redis_cluster,
    "redis-sentinel": expect_sentinel,
    "fast-drain": expect_fast_drain,
}

# Values the schema refuses: (what, values, words the message must hold).
BAD_SCHEMA = [
    ("replicaCount 0", {"replicaCount": 0}, "replicaCount"),
    ("an unknown top-level key", {"replicas": 3}, "replicas"),
    ("an unknown gateway setting", {"config": {"max_conections": 10}}, "max_conections"),
    ("a setting of the wrong type", {"config": {"max_connections": "many"}}, "max_connections"),
    ("a setting the chart manages", {"config": {"drain_timeout_ms": 1000}}, "drain_timeout_ms"),
    ("drain.batchFraction above 1", {"drain": {"batchFraction": 1.5}}, "batchFraction"),
    ("a short jwtSecret", {"secrets": {"jwtSecret": "short"}}, "jwtSecret"),
    ("service.type Ingress", {"service": {"type": "Ingress"}}, "type"),
    ("a Redis URL without scheme", {"redis": {"url": "localhost:6379"}}, "url"),
    ("Redis Cluster seeds without scheme", {"redis": {"clusterUrls": "redis://a:1,b:2"}},
     "clusterUrls"),
    ("Sentinel addresses without a port", {"redis": {"url": "", "sentinel": {"addresses": "s-0,s-1"}}},
     "addresses"),
    ("an unknown Redis auth key", {"redis": {"auth": {"password": "x"}}}, "password"),
    ("a port out of range", {"ports": {"ops": 70000}}, "ops"),
    ("maxUnavailable as a word", {"rollingUpdate": {"maxUnavailable": "none"}}, "maxUnavailable"),
    ("a source range that is no CIDR", {"service": {"loadBalancerSourceRanges": ["anywhere"]}},
     "loadBalancerSourceRanges"),
]

# Values the schema takes but rendering refuses: (what, values, words).
BAD_RENDER = [
    ("a grace period shorter than the drain (Kubernetes' default 30 s)",
     {"terminationGracePeriodSeconds": 30},
     ["terminationGracePeriodSeconds (30) is shorter than the drain", "125 s", "SIGKILL"]),
    ("a grace period one second short", {"terminationGracePeriodSeconds": 124},
     ["shorter than the drain"]),
    ("several pods without Redis", {"redis": {"url": ""}}, ["needs Redis"]),
    ("NATS without Redis", {"replicaCount": 1, "redis": {"url": ""},
                            "nats": {"url": "nats://n:4222"}}, ["nats needs redis"]),
    ("a Redis Cluster and the bundled Redis",
     {"redis": {"clusterUrls": "redis://a:7000", "bundled": {"enabled": True}}},
     ["redis.clusterUrls and redis.bundled.enabled exclude each other"]),
    ("Sentinel and redis.url", {"redis": {"sentinel": {"addresses": "s:26379"}}},
     ["redis.sentinel.addresses excludes redis.url", 'set redis.url to ""']),
    ("Sentinel and a Redis Cluster",
     {"redis": {"url": "", "clusterUrls": "redis://a:7000", "sentinel": {"addresses": "s:26379"}}},
     ["redis.sentinel.addresses excludes"]),
    ("Sentinel without a master name",
     {"redis": {"url": "", "sentinel": {"addresses": "s:26379", "masterName": ""}}},
     ["needs redis.sentinel.masterName"]),
    ("a Redis password key without its Secret", {"redis": {"auth": {"passwordKey": "pw"}}},
     ["redis.auth.existingSecret"]),
    ("a sentinel password without Sentinel",
     {"redis": {"auth": {"existingSecret": "s", "sentinelPasswordKey": "pw"}}},
     ["need redis.sentinel.addresses"]),
    ("RS256 without a public key", {"auth": {"algorithm": "RS256"}}, ["jwtPublicKey"]),
    ("an HPA with no target", {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0,
                                               "targetConnectionsPerPod": 0}}, ["target"]),
]


def main():
    def schema_current():
        r = subprocess.run([sys.executable, str(HERE / "gen_schema.py"), "--check"],
                           capture_output=True, text=True)
        sys.stdout.write(r.stdout)
        assert r.returncode == 0, "values.schema.json is stale (above)"
    check("values.schema.json allows only settings gateway/src/config.rs has", schema_current)

    def lint():
        report = helm.lint(str(chart.CHART), strict=True)
        errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not errors, errors
    check("helm lint --strict", lint)

    def every_value_is_commented():
        # A value is described by the comment right above its key, or by a
        # `# --` comment on a parent whose whole block is its default
        # (resources: {requests: ...}); a section of described values needs
        # none of its own.
        lines = (chart.CHART / "values.yaml").read_text().splitlines()
        keys = []  # (line number, indent, key, comment above)
        for i, line in enumerate(lines):
            s = line.strip()
            if not s or s.startswith("#") or s.startswith("- ") or ":" not in s:
                continue
            above, j = "", i - 1
            while j >= 0 and lines[j].strip().startswith("#"):
                above = lines[j].strip() + " " + above
                j -= 1
            keys.append((i, len(line) - len(line.lstrip()), s.split(":")[0], above))
        undocumented = []
        for n, (i, indent, key, above) in enumerate(keys):
            if above.startswith("#"):
                continue
            ancestors, level = [], indent
            for j, ind, _, ab in reversed(keys[:n]):
                if ind < level:
                    ancestors.append(ab)
                    level = ind
            if any(a.startswith("# --") for a in ancestors):
                continue
            children = [k for k in keys[n + 1:]]
            block = []
            for k in children:
                if k[1] <= indent:
                    break
                block.append(k)
            if block:  # a section: its values carry the comments
                continue
            undocumented.append(f"line {i + 1}: {key}")
        assert not undocumented, undocumented
    check("every value in values.yaml is commented", every_value_is_commented)

    rendered = {}
    for path in sorted((HERE / "values").glob("*.json")):
        name = path.stem
        values = json.loads(path.read_text())

        def run(values=values, name=name):
            objects, notes = chart.render(values)
            assert objects and notes
            rendered[name] = objects
            promises(objects, values)
            gateway_accepts(objects)
            if name in EXTRA:
                EXTRA[name](objects)
        check(f"values/{path.name}: schema, render, chart promises", run)

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(rendered, f)
    r = subprocess.run(["node", str(HERE / "validate.mjs"), f.name], capture_output=True, text=True)
    Path(f.name).unlink()
    sys.stdout.write("".join("     " + l + "\n" for l in r.stdout.splitlines()))
    sys.stderr.write(r.stderr)

    def validated():
        assert r.returncode == 0, "objects failed the Kubernetes API schemas (above)"
        n = sum(len(o) for o in rendered.values())
        assert n > 0 and f"validate: {n + 1} passed, 0 failed" in r.stdout, r.stdout[-300:]
    check(f"every rendered object ({', '.join(sorted(rendered))}) validates against the Kubernetes API schemas",
          validated)

    with helm.Chart.load(chart.CHART) as c:
        for what, values, word in BAD_SCHEMA:
            def refused(values=values, word=word):
                try:
                    c.validate_schema(values)
                except helm.HelmValuesError as e:
                    assert word in str(e), f"message does not name {word}: {e}"
                else:
                    raise AssertionError("the schema accepted it")
                try:
                    c.render(values, name="gw")
                except helm.HelmError:
                    pass
                else:
                    raise AssertionError("rendering accepted it")
            check(f"schema refuses {what}", refused)
        for what, values, words in BAD_RENDER:
            def fails(values=values, words=words):
                c.validate_schema(values)
                try:
                    c.render(values, name="gw")
                except helm.HelmRenderError as e:
                    for w in words:
                        assert w in str(e), f"message lacks {w!r}: {e}"
                else:
                    raise AssertionError("rendering accepted it")
            check(f"rendering fails: {what}", fails)

    print(f"helm chart: {results['passed']} passed, {results['failed']} failed")
    sys.exit(1 if results["failed"] else 0)


if __name__ == "__main__":
    main()
