"""Divergences the randomized differential run found, each kept as a fixed case (both tools, same input)."""

from __future__ import annotations

import pytest

from tests.oracle.twin import Twin


@pytest.fixture
def twin(tmp_path, qemu_img):
    return Twin(tmp_path)


def test_parallels_fragmented_clusters_restart_after_a_hole(twin):
    # seed 71: qemu-img counts a cluster as fragmented only when the guest cluster before it is allocated
    twin.build("qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size=4096", "p.img", "3M")
    twin.build("qemu-io", "-f", "parallels", "-c", "write -P 153 2148352 512", "-c", "write -P 178 101376 65536",
          "-c", "write -P 34 1916928 65536", "-c", "write -P 90 699392 512", "-c", "write -P 1 8192 4096",
          "-c", "write -P 2 4096 4096", "p.img")
    twin.both("check", "--output=json", "p.img")
    twin.both("check", "p.img")


@pytest.mark.parametrize("cmd", [["info"], ["map", "--output=json"], ["check"], ["convert", "-O", "raw"]])
def test_qed_single_cluster_table_refused(twin, cmd):
    # seed 100170: qemu-img creates a qed image with table_size=1 and then refuses to open it
    twin.build("qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=1", "t.qed", "16M")
    out = ["o.raw"] if cmd[0] == "convert" else []
    twin.both(*cmd, "t.qed", *out)


def test_map_offset_of_unallocated_subclusters_past_a_short_backing_file(twin):
    # seed 100092: an allocated extended-L2 cluster beyond the end of the backing file keeps its offset
    twin.build("qemu-img", "create", "-q", "-f", "raw", "b.raw", "64k")
    twin.build("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "b.raw", "-F", "raw",
               "o.qcow2", "1M")
    twin.build("qemu-io", "-f", "qcow2", "-c", "write -P 1 69632 4096", "-c", "write -P 1 4096 4096", "o.qcow2")
    twin.both("map", "--output=json", "o.qcow2")
    twin.both("map", "o.qcow2")


@pytest.mark.parametrize("seed", [
    400018,  # a truncated parallels image: a cluster starting right at the end of the file is not "outside"
])
def test_differential_seed_regressions(seed, qemu_img, tmp_path):
    import json

    from tests.oracle import differential

    rec = differential.run_one(seed, keep=tmp_path)
    assert "skipped" not in rec, rec
    assert rec["divergences"] == [], json.dumps(rec, indent=1)[:6000]


def test_parallels_truncated_at_a_cluster_boundary_repair(twin):
    twin.build("qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size=4096", "p.img", "4M")
    twin.build("qemu-io", "-f", "parallels", "-c", "write -P 231 196608 131072", "-c", "write -P 1 1M 64k", "p.img")
    twin.each(lambda d: __import__("os").truncate(d / "p.img", 1347584 // 4096 * 4096 - 4096 * 8))
    twin.both("check", "p.img", allocation=False)
    twin.both("check", "-r", "all", "p.img", allocation=False)
    twin.same_file("p.img")


@pytest.mark.parametrize("objects", [
    ["secret,id=a,data=x", "secret,id=a,data=y"],   # seed 500064: the same id twice
    ["secret,id=a,data=x", "secret,id=a"],          # the duplicate is found before the second's own error
    ["secret,id=a,data=x", "secret,id=b,data=y"],
    ["qom-type=secret,id=a,data=x", "secret,id=a,data=y"],
])
def test_duplicate_object_ids(twin, objects):
    twin.build("qemu-img", "create", "-q", "-f", "qcow2", "m.qcow2", "1M")
    args = [a for o in objects for a in ("--object", o)]
    twin.both("info", *args, "m.qcow2")
