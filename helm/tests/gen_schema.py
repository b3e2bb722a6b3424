#!/usr/bin/env python3
"""Writes helm/gateway/values.schema.json. The `config` section lists every
gateway setting of gateway/src/config.rs (its type and doc) except those the
chart sets itself, so a typo or an unknown key fails before rendering, as the
gateway's own config file would at start. Run it after adding a setting:
    python3 helm/tests/gen_schema.py
(helm/tests/run.py fails when the checked-in schema is stale.)
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "helm/gateway/values.schema.json"

# Settings the chart writes itself, from other values (addresses, node id,
# secrets, URLs, drain, logs) or never wants (dev mode).
MANAGED = {
    "addr", "admin_addr", "node_id", "dev", "jwt_secret", "jwt_public_key_file",
    "jwt_algorithm", "api_keys", "resume_secret", "redis_url", "nats_url",
    "redis_cluster_urls", "redis_sentinels", "redis_master_name", "redis_password",
    "redis_username", "redis_sentinel_password", "redis_sentinel_username",
    "drain_prestop_delay_ms", "drain_batch_fraction", "drain_batch_interval_ms",
    "drain_timeout_ms", "drain_close_grace_ms", "shutdown_timeout_ms",
    "reconnect_min_delay_ms", "reconnect_max_delay_ms", "log", "log_format",
    "worker_threads",
}


def config_fields():
    """(name, rust type, doc) of every `Config` field."""
    src = (ROOT / "gateway/src/config.rs").read_text()
    struct = src.split("pub struct Config {")[1].split("\n}\n")[0]
    docs, out = [], []
    for line in struct.split("\n"):
        line = line.strip()
        if line.startswith("///"):
            docs.append(line[3:].strip())
            continue
        m = re.match(r"pub (\w+): (.+),", line)
        if m:
            out.append((m.group(1), m.group(2), " ".join(docs)))
            docs = []
    return out


def config_props():
    props = {}
    for name, ty, doc in config_fields():
        if name in MANAGED:
            continue
        if ty.startswith("Option<"):  # unset: the key is left out
            ty = ty[len("Option<"):-1]
        if ty in ("u64", "usize", "u32"):
            t = {"type": "integer", "minimum": 0}
        elif ty == "f64":
            t = {"type": "number"}
        elif ty == "bool":
            t = {"type": "boolean"}
        elif ty.startswith("Vec<") and "NamespaceConfig" in ty:
            # [[namespace]] blocks: a list of tables (namespace.rs).
            t = {"type": "array", "items": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                    "replay_window_ms": {"type": "integer", "minimum": 1},
                    "replay_max_messages": {"type": "integer", "minimum": 1},
                    "publish": {"type": "boolean"}, "anonymous": {"type": "boolean"},
                    "history": {"type": "boolean"}, "presence": {"type": "boolean"},
                    "join_leave": {"type": "boolean"}}}}
        else:
            t = {"type": "string"}
        t["description"] = doc
        props[name] = t
    return props


def obj(props, required=None, extra=False):
    o = {"type": "object", "additionalProperties": extra, "properties": props}
    if required:
        o["required"] = required
    return o


INT = {"type": "integer", "minimum": 0}
POS = {"type": "integer", "minimum": 1}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
MAP = {"type": "object", "additionalProperties": {"type": "string"}}
ANYMAP = {"type": "object"}
LIST = {"type": "array"}
INT_OR_PCT = {"anyOf": [INT, {"type": "string", "pattern": "^[0-9]+%$"}]}
RESOURCES = obj({"requests": ANYMAP, "limits": ANYMAP, "claims": LIST})
PROBE = obj({"periodSeconds": POS, "failureThreshold": POS, "timeoutSeconds": POS},
            ["periodSeconds", "failureThreshold", "timeoutSeconds"])
BUNDLED = obj({"enabled": BOOL, "image": {"type": "string", "minLength": 1},
               "resources": RESOURCES}, ["enabled", "image"])


def schema():
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "gateway chart values",
        **obj({
            "replicaCount": POS,
            "image": obj({"repository": {"type": "string", "minLength": 1}, "tag": STR,
                          "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}},
                         ["repository"]),
            "imagePullSecrets": LIST,
            "nameOverride": STR,
            "fullnameOverride": STR,
            "ports": obj({"client": PORT, "ops": PORT}, ["client", "ops"]),
            "drain": obj({
                "prestopDelayMs": INT,
                "batchFraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "batchIntervalMs": POS,
                "timeoutMs": POS,
                "closeGraceMs": INT,
                "shutdownTimeoutMs": INT,
                "reconnectMinDelayMs": INT,
                "reconnectMaxDelayMs": INT,
                "marginSeconds": INT,
            }, ["prestopDelayMs", "batchFraction", "batchIntervalMs", "timeoutMs",
                "closeGraceMs", "shutdownTimeoutMs", "reconnectMinDelayMs",
                "reconnectMaxDelayMs", "marginSeconds"]),
            "terminationGracePeriodSeconds": {"type": ["integer", "null"], "minimum": 1},
            "minReadySeconds": INT,
            "rollingUpdate": obj({"maxSurge": INT_OR_PCT, "maxUnavailable": INT_OR_PCT},
                                 ["maxSurge", "maxUnavailable"]),
            "revisionHistoryLimit": INT,
            "auth": obj({"algorithm": {"enum": ["HS256", "RS256", "ES256"]}}, ["algorithm"]),
            "secrets": obj({
                "existingSecret": STR,
                "jwtSecret": {"type": "string", "anyOf": [{"maxLength": 0}, {"minLength": 16}]},
                "jwtPublicKey": STR,
                "apiKeys": {"type": "array", "items": {"type": "string", "minLength": 1,
                                                       "pattern": "^[^,]+$"}},
                "resumeSecret": {"type": "string", "anyOf": [{"maxLength": 0}, {"minLength": 16}]},
                "keys": obj({k: {"type": "string", "minLength": 1} for k in
                             ["jwtSecret", "jwtPublicKey", "apiKeys", "resumeSecret",
                              "redisUrl", "natsUrl"]}),
            }),
            "redis": obj({"url": {"type": "string", "pattern": "^$|^rediss?://"},
                          "clusterUrls": {"type": "string",
                                          "pattern": "^$|^redis://[^,]+(,\\s*redis://[^,]+)*$"},
                          "sentinel": obj({
                              "addresses": {"type": "string",
                                            "pattern": "^$|^[^,\\s]+:[0-9]+(,\\s*[^,\\s]+:[0-9]+)*$"},
                              "masterName": STR}, ["addresses", "masterName"]),
                          "auth": obj({k: STR for k in [
                              "existingSecret", "passwordKey", "username",
                              "sentinelPasswordKey", "sentinelUsername"]}),
                          "bundled": BUNDLED}),
            "nats": obj({"url": {"type": "string", "pattern": "^$|^(nats|tls)://"},
                         "bundled": BUNDLED}),
            "logFormat": {"enum": ["json", "text"]},
            "logLevel": {"type": "string", "minLength": 1},
            "config": obj(config_props()),
            "service": obj({
                "type": {"enum": ["LoadBalancer", "NodePort", "ClusterIP"]},
                "port": PORT,
                "externalTrafficPolicy": {"enum": ["Local", "Cluster"]},
                "annotations": MAP,
                "loadBalancerSourceRanges": {"type": "array", "items": {
                    "type": "string", "pattern": "^[0-9a-fA-F:.]+/[0-9]{1,3}$"}},
                "loadBalancerIP": STR,
                "loadBalancerClass": STR,
            }, ["type", "port"]),
            "apiService": obj({"port": PORT, "annotations": MAP}),
            "commonLabels": MAP,
            "podAnnotations": MAP,
            "podLabels": MAP,
            "resources": RESOURCES,
            "podSecurityContext": ANYMAP,
            "securityContext": ANYMAP,
            "probes": obj({"readiness": PROBE, "liveness": PROBE, "startup": PROBE}),
            "topologySpread": obj({"zones": BOOL, "nodes": BOOL, "maxSkew": POS,
                                   "whenUnsatisfiable": {"enum": ["ScheduleAnyway",
                                                                  "DoNotSchedule"]}}),
            "nodeSelector": MAP,
            "tolerations": LIST,
            "affinity": ANYMAP,
            "priorityClassName": STR,
            "podDisruptionBudget": obj({"enabled": BOOL, "maxUnavailable": INT_OR_PCT}),
            "autoscaling": obj({
                "enabled": BOOL, "minReplicas": POS, "maxReplicas": POS,
                "targetCPUUtilizationPercentage": {"type": "integer", "minimum": 0,
                                                   "maximum": 1000},
                "targetConnectionsPerPod": INT,
                "connectionsMetric": {"type": "string", "minLength": 1},
                "scaleDownStabilizationSeconds": INT,
            }),
            "metrics": obj({
                "serviceMonitor": obj({"enabled": BOOL, "interval": {
                    "type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}, "labels": MAP}),
                "prometheusRule": obj({"enabled": BOOL, "labels": MAP}),
                "grafanaDashboard": obj({"enabled": BOOL, "labels": MAP}),
            }),
            "networkPolicy": obj({"enabled": BOOL, "clientFrom": LIST, "opsFrom": LIST}),
            # Helm passes this to every chart (subchart values); allowed.
            "global": ANYMAP,
        }),
    }


def render():
    return json.dumps(schema(), indent=2) + "\n"


def check():
    """Compares the checked-in schema's `config` keys and types with
    config.rs. A key the gateway does not know (or of another type) fails:
    the chart would render a file the gateway refuses. A setting of
    config.rs the schema lacks only warns: `config:` cannot set it until the
    schema is regenerated, but nothing breaks."""
    have = json.loads(SCHEMA.read_text())["properties"]["config"]["properties"]
    want = config_props()
    strip = lambda props: {k: {a: b for a, b in v.items() if a != "description"}
                           for k, v in props.items()}
    have, want = strip(have), strip(want)
    wrong = sorted(k for k in have if have[k] != want.get(k))
    missing = sorted(set(want) - set(have))
    if missing:
        print(f"gen_schema.py: warning: settings not in values.schema.json yet: "
              f"{', '.join(missing)} (run python3 helm/tests/gen_schema.py)")
    if wrong:
        print(f"gen_schema.py: values.schema.json allows settings the gateway does not "
              f"know or types it does not take: {', '.join(wrong)} "
              f"(run python3 helm/tests/gen_schema.py)")
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(check())
    SCHEMA.write_text(render())
    print(f"wrote {SCHEMA.relative_to(ROOT)}")
