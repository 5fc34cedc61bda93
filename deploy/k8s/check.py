#!/usr/bin/env python3
"""Checks the Kubernetes manifests of deploy/k8s: schema validation with kubernetes-validate
(PyPI; strict: unknown fields are errors) when it is installed, and, always, the properties the
deployment relies on (probe paths, drain period, PDB, Service, Redis, backplane args).

    pip install kubernetes-validate && python3 deploy/k8s/check.py
Exits non-zero on any failure; prints what it checked.
"""
import os
import shutil
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ["relay.yaml", "service.yaml", "pdb.yaml", "redis.yaml"]
K8S_VERSION = "1.31.0"


def fail(msg):
    print(f"k8s check: FAIL: {msg}")
    sys.exit(1)


def main():
    paths = [os.path.join(HERE, f) for f in FILES]
    docs = []
    for p in paths:
        with open(p) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}

    # 1. Schema: the kubernetes-validate CLI (or module) if present.
    cli = shutil.which("kubernetes-validate")
    cmd = [cli] if cli else None
    if cmd is None:
        try:
            import kubernetes_validate  # noqa: F401

            cmd = [sys.executable, "-m", "kubernetes_validate"]
        except ImportError:
            cmd = None
    if cmd is None:
        if os.environ.get("CI"):
            fail("kubernetes-validate is not installed (pip install kubernetes-validate)")
        print("k8s check: kubernetes-validate not installed: schema validation SKIPPED")
    else:
        r = subprocess.run(cmd + ["--strict", "-k", K8S_VERSION] + paths, capture_output=True, text=True, timeout=120)
        out = (r.stdout + r.stderr).strip()
        print(out)
        if r.returncode != 0 or "ERROR" in out:
            fail("schema validation failed")
        print(f"k8s check: schema valid for Kubernetes {K8S_VERSION} ({len(docs)} resources)")

    # 2. What the deployment relies on.
    dep = by.get(("Deployment", "relay")) or fail("no Deployment relay")
    spec = dep["spec"]["template"]["spec"]
    c = next((c for c in spec["containers"] if c["name"] == "relay"), None) or fail("no relay container")
    if c["readinessProbe"]["httpGet"]["path"] != "/readyz":
        fail("readiness probe must be GET /readyz")
    if c["livenessProbe"]["httpGet"]["path"] != "/healthz":
        fail("liveness probe must be GET /healthz")
    def seconds(flag):
        arg = next((a for a in c["args"] if a.startswith(flag + "=")), None) or fail(f"relay args lack {flag}=")
        return int(arg.split("=")[1].rstrip("s"))
    drain = seconds("--drain-period")
    if drain <= 0:
        fail("--drain-period must keep serving a while after SIGTERM, until endpoints drop the pod")
    # relay drains itself; a preStop sleep would only add to it.
    pre = c.get("lifecycle", {}).get("preStop", {})
    sleep = pre.get("sleep", {}).get("seconds", 0)
    args = " ".join(c["args"])
    for want in ["--backplane redis", "--redis-url redis://redis:6379", "--listen=0.0.0.0:8080"]:
        if want not in args:
            fail(f"relay args lack {want!r}: {args}")
    grace = spec["terminationGracePeriodSeconds"]
    if int(sleep) + drain + seconds("--shutdown-timeout") > grace:
        fail("terminationGracePeriodSeconds must cover --drain-period and --shutdown-timeout")
    labels = dep["spec"]["selector"]["matchLabels"]
    pdb = by.get(("PodDisruptionBudget", "relay")) or fail("no PodDisruptionBudget relay")
    if pdb["spec"]["selector"]["matchLabels"] != labels:
        fail("the PDB does not select the relay pods")
    svc = by.get(("Service", "relay")) or fail("no Service relay")
    if svc["spec"]["selector"] != labels:
        fail("the Service does not select the relay pods")
    if not by.get(("Deployment", "redis")) or not by.get(("Service", "redis")):
        fail("no Redis Deployment + Service")
    print("k8s check: probes /readyz + /healthz, drain period, PDB, Service, Redis: ok")


if __name__ == "__main__":
    main()
