#!/usr/bin/env python3
"""Prints the README's configuration table from gateway/src/config.rs
(field docs and defaults), so the two never drift apart:
    python3 scripts/config-table.py
"""
import re
from pathlib import Path

src = (Path(__file__).resolve().parent.parent / "gateway/src/config.rs").read_text()
struct = src.split("pub struct Config {")[1].split("\n}\n")[0]
defaults = src.split("impl Default for Config")[1].split("Self {", 1)[1]
values = {}
for m in re.finditer(r"^\s*(\w+): (.+?),\s*$", defaults, re.M):
    values.setdefault(m.group(1), m.group(2))
subst = [("SocketAddr::from(([127, 0, 0, 1], 8080))", "127.0.0.1:8080"), (".into()", ""),
         ("String::new()", "(empty)"), ("Vec::new()", "(none)"), ("AllowedOrigins::default()", "(empty)"), ("None", "(unset)"), ("24 * 3600 * 1000", "86400000 (24 h)"), ("5 * 60 * 1000", "300000 (5 min)"), ("7 * 24 * 3600", "604800 (7 days)"),
         ("64 * 1024", "65536"), ("256 * 1024 * 1024", "268435456 (256 MiB)"), ("1024 * 1024", "1048576"), ("16 * 1024", "16384"), ("_", "")]
docs, rows = [], []
for line in struct.split("\n"):
    line = line.strip()
    if line.startswith("///"):
        docs.append(line[3:].strip())
    m = re.match(r"pub (\w+): (.+),", line)
    if m:
        name, default = m.group(1), values.get(m.group(1), "")
        for a, b in subst:
            default = default.replace(a, b)
        env = "(config file only)" if default == "(none)" else f"`GATEWAY_{name.upper()}`"
        rows.append(f"| `{name}` | {env} | {default} | {' '.join(docs)} |")
        docs = []
print("| key (file) | environment | default | meaning |\n|---|---|---|---|")
print("\n".join(rows))
