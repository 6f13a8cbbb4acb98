"""CPU rehearsal of `make gpu-stage` / receive.sh / `make gpu-check` (docs/gpu-check.md).

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_gpu_check.py.
"""

from __future__ import annotations

import hashlib

from tests.support.gpu_check import PART, device


def test_split_parts_and_manifest(staged):
    st, man, wheels = staged
    assert man["n_parts"] == len(man["parts"]) >= 4
    assert (st / "manifest.json").is_file()
    for part in man["parts"]:
        files = {p.name for p in (st / part).iterdir()}
        assert {"manifest.json", f"{part}.sha256"} <= files
        data = sum(p.stat().st_size for p in (st / part).iterdir() if p.name not in {"manifest.json", f"{part}.sha256"})
        assert 0 < data <= PART
    names = [w["name"] for w in man["wheels"]]
    assert len(names) == len(set(names))
    for w in man["wheels"]:
        original = wheels[w["name"]].read_bytes()
        assert w["sha256"] == hashlib.sha256(original).hexdigest() and w["size"] == len(original)
        joined = b"".join((st / c["part"] / c["file"]).read_bytes() for c in w["chunks"])
        assert joined == original
        assert [c["offset"] for c in w["chunks"]] == [
            sum(c["size"] for c in w["chunks"][:i]) for i in range(len(w["chunks"]))
        ]
    big = next(w for w in man["wheels"] if w["name"] == "bigdali")
    assert len({c["part"] for c in big["chunks"]}) >= 3  # byte slicing across parts
    # call 1 carries the core wheels alone: DALI's chunks start in part_01
    by_part = {c["part"]: w["group"] for w in man["wheels"] for c in w["chunks"]}
    assert {g for p, g in by_part.items() if p == "part_00"} == {"core"}
    assert all(p != "part_00" for c in big["chunks"] for p in [c["part"]])
    cond = {w["name"]: w.get("if_image_lacks") for w in man["wheels"]}
    assert cond["tooold"] == ">=1.0" and cond["tinya"] is None
    # the probe imports what was staged and not skipped
    assert device.default_imports(st, ()) == ["deepspeed", "webdataset", "submitit", "nvidia.dali"]
    assert "nvidia.dali" not in device.default_imports(st, ("dali",))
