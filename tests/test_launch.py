"""The local Ray cluster that selfclust.launch starts for a run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# In a fresh process with its own Ray temp dir: a stale cluster address file (what a killed
# `ray start` leaves), then selfclust's local cluster, then the state API from inside one of
# the cluster's workers, as Ray Train's placement-group cleaner calls it (no address given).
PROBE = textwrap.dedent(
    """
    import os, sys
    os.makedirs(os.path.join(sys.argv[1], "ray"), exist_ok=True)
    with open(os.path.join(sys.argv[1], "ray", "ray_current_cluster"), "w") as f:
        f.write("127.0.0.1:6399\\n")  # nothing listens there
    import ray
    from selfclust.config import build_config
    from selfclust.launch import _init_ray

    _init_ray(build_config({"trainer": {"num_workers": 1}}))

    @ray.remote
    class Marker:
        def ping(self):
            return 1

    @ray.remote
    def actors_seen(name):
        from ray.util.state import list_actors
        return [a.class_name for a in list_actors(filters=[("class_name", "=", name)])]

    marker = Marker.remote()
    ray.get(marker.ping.remote())
    print("SEEN", ray.get(actors_seen.remote("Marker"), timeout=60))
    ray.shutdown()
    """
)


@pytest.mark.slow
def test_workers_find_their_own_cluster_despite_a_stale_address_file() -> None:
    """Without the address selfclust gives its cluster's processes, the state API inside a
    worker reads the stale file, waits ~40 s on the dead address and fails; Ray Train's
    placement-group cleaner then stops guarding the run and each fit() waits 12 s at its end."""
    tmp = tempfile.mkdtemp(prefix="sc-", dir="/tmp")  # Ray's socket paths: at most 107 bytes
    env = {"RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    try:
        r = subprocess.run(
            [sys.executable, "-c", PROBE, tmp],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "SEEN ['Marker']" in r.stdout, r.stdout[-2000:]
