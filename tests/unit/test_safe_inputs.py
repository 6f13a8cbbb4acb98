"""Inputs cannot run code, and bad inputs fail early in one line (issue 10, items 7-8).

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_safe_inputs.py.
"""

from __future__ import annotations

import ast
import copy
import io
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.manifest import DataError
from pipeline.eval import run as ER
from pipeline.eval import sets as ES
from pipeline.eval import verify as V
from pipeline.eval.checkpoint import load_model
from pipeline.eval.cli import main as eval_main
from pipeline.eval.lowres import evaluate_lowres_bin
from pipeline.export import main as export_main
from pipeline.faces import io as B
from tests.helpers import REPO
from tests.support.safe_inputs import _crafted, _dotted, _one_error_line, _System


def _png(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- fixtures


def _copy_ckpt(ck: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("config.yaml", "model.pt"):
        (dst / name).write_bytes((ck / name).read_bytes())
    return dst


# --------------------------------------------------------------------------- .bin: what loads


def test_shared_bin_loads_identically_to_pickle(lfw_bin):
    with open(lfw_bin, "rb") as f:
        raw_bins, raw_same = pickle.load(f, encoding="bytes")
    with open(lfw_bin, "rb") as f:
        safe_bins, safe_same = B.BinUnpickler(f).load()
    assert safe_bins == raw_bins and list(safe_same) == list(raw_same)
    bins, issame = B.read_bin(lfw_bin)
    assert bins == [bytes(b) for b in raw_bins] and issame == [bool(x) for x in raw_same]
    assert len(issame) == 1000 and sum(issame) == 500


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
@pytest.mark.parametrize("layout", ["numpy_issame", "numpy_bool_list", "numpy_bins", "object_array", "cv2_bins"])
def test_numpy_layouts_load(tmp_path, protocol, layout):
    data = [_png(i) for i in range(4)]
    same = [True, False]
    u8 = [np.frombuffer(d, np.uint8) for d in data]
    obj = {
        "numpy_issame": (data, np.array(same)),
        "numpy_bool_list": (data, [np.bool_(s) for s in same]),
        "numpy_bins": (u8, same),
        "object_array": (np.array(data, dtype=object), np.array(same)),
        "cv2_bins": ([a.reshape(-1, 1) for a in u8], np.array(same, dtype=np.uint8)),  # cv2.imencode's (N, 1)
    }[layout]
    p = tmp_path / f"{layout}.bin"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    assert B.read_bin(p) == (data, same)


def test_bytearray_and_protocol2_bytes_load(tmp_path):
    data = [_png(i) for i in range(2)] + [b"", b"\x00\xff"]  # b"" pickles as builtins.bytes() at protocol 2
    for protocol in (0, 2, 3, 4, 5):
        p = tmp_path / f"b{protocol}.bin"
        p.write_bytes(pickle.dumps(([bytearray(d) for d in data], [True, False]), protocol=protocol))
        assert B.read_bin(p) == (data, [True, False])
        p.write_bytes(pickle.dumps((data, [True, False]), protocol=protocol))
        assert B.read_bin(p) == (data, [True, False])


def _short_binstring(s: bytes) -> bytes:
    return b"U" + bytes([len(s)]) + s


def test_python2_pickle_with_numpy_core_names_loads(tmp_path):
    """What Python 2 insightface + numpy 1 wrote: str bins (SHORT_BINSTRING), issame a numpy bool array
    named through ``numpy.core.multiarray`` (numpy 2 calls the module ``numpy._core``)."""
    u = _short_binstring
    issame = (
        b"cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00\x85" + u(b"b") + b"\x87Rq\x02"
        b"(K\x01K\x02\x85cnumpy\ndtype\n" + u(b"b1") + b"K\x00K\x01\x87R(K\x03" + u(b"|") + b"NNN"
        b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + u(b"\x01\x00") + b"tb"
    )
    a, b, c, d = (b"\xff\xd8jpeg" + bytes([i]) for i in range(4))
    p = tmp_path / "py2.bin"
    p.write_bytes(b"\x80\x02](" + u(a) + u(b) + u(c) + u(d) + b"e" + issame + b"\x86.")
    assert pickle.loads(p.read_bytes(), encoding="bytes")[1].tolist() == [True, False]  # a valid pickle
    assert B.read_bin(p) == ([a, b, c, d], [True, False])


# --------------------------------------------------------------------------- .bin: what is refused


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        import builtins

        return (builtins.eval, (self.code,))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_crafted_bin_is_refused_before_running(tmp_path, protocol):
    marker = tmp_path / "MARKER"
    cases = [
        ("os.system" if os.name != "nt" else "nt.system", _System(f"touch {marker}"), False),
        ("builtins.eval", _Eval(f"open({str(marker)!r}, 'w')"), True),
    ]
    for qual, payload, nested in cases:
        p = _crafted(tmp_path / "lfw.bin", payload, protocol, nested)
        with pytest.raises(DataError) as ei:
            B.read_bin(p)
        msg = str(ei.value)
        assert "\n" not in msg
        assert msg.startswith(f"{p}: refused pickle global ")
        assert qual.split(".")[-1] in msg and "(a .bin holds only bytes, bools and numpy arrays)" in msg
        assert not marker.exists()
    # verify.load_bin goes through the same reader
    with pytest.raises(DataError, match="refused pickle global"):
        ES.load_bin(tmp_path / "lfw.bin")
    assert not marker.exists()


def test_refused_names_and_arguments(tmp_path):
    """Globals near the admitted ones are refused too, and admitted ones only take data arguments."""
    import _codecs
    import builtins

    class Reduce:
        def __init__(self, fn, args):
            self.fn, self.args = fn, args

        def __reduce__(self):
            return (self.fn, self.args)

    refused = {
        "numpy.load": Reduce(np.load, ("x.npy",)),
        "numpy.frombuffer": Reduce(np.frombuffer, (b"ab",)),
        "builtins.getattr": Reduce(getattr, (1, "real")),
        "_codecs.encode": Reduce(_codecs.encode, ("abc", "rot13")),  # admitted name, non-latin-1 codec
        "builtins.bytes": Reduce(builtins.bytes, (10**12,)),  # admitted name, a size (not data)
        "subprocess.Popen": Reduce(subprocess.Popen, (["true"],)),
    }
    for qual, payload in refused.items():
        p = _crafted(tmp_path / "x.bin", payload, protocol=4, nested=True)
        with pytest.raises(DataError, match=r"x\.bin: refused pickle global '" + qual.replace(".", r"\.") + "'"):
            B.read_bin(p)
    p = _crafted(tmp_path / "x.bin", refused["builtins.getattr"], protocol=2, nested=True)
    with pytest.raises(DataError, match=r"x\.bin: refused pickle global '__builtin__\.getattr'"):  # Python 2 names
        B.read_bin(p)
    p = _crafted(tmp_path / "x.bin", refused["_codecs.encode"], protocol=4, nested=True)
    with pytest.raises(DataError, match=r"refused pickle global '_codecs\.encode' called with \('abc', 'rot13'\)"):
        B.read_bin(p)


def test_crafted_file_really_runs_code_with_plain_pickle(tmp_path):
    """The control: the same crafted file does execute under a plain ``pickle.load``."""
    marker = tmp_path / "MARKER"
    p = _crafted(tmp_path / "lfw.bin", _System(f"touch {marker}"))
    with open(p, "rb") as f:
        pickle.load(f, encoding="bytes")
    assert marker.exists()


_SOURCE_DIRS = ("pipeline", "data_prep", "scripts", "benchmarks")
_BIN_READER = Path("pipeline/faces/io.py")


def _sources() -> list[Path]:
    files = [p for d in _SOURCE_DIRS for p in (REPO / d).rglob("*.py")] + list(REPO.glob("*.py"))
    assert len(files) > 20
    return sorted(files)


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def test_no_loader_in_the_source_tree_can_run_code():
    """Outside tests/: every torch.load has weights_only=True; pickle is unpickled only by the .bin
    reader; no np.load(allow_pickle=True), yaml.load / unsafe_load, marshal/dill/cloudpickle loads."""
    bad = []
    for path in _sources():
        rel = path.relative_to(REPO)
        tree = ast.parse(path.read_text(), str(rel))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "_pickle", "dill", "cloudpickle"):
                names = {a.name for a in node.names} & {"load", "loads", "Unpickler", "*"}
                if names and rel != _BIN_READER:
                    bad.append(f"{rel}:{node.lineno}: from {node.module} import {', '.join(sorted(names))}")
            if not isinstance(node, ast.Call):
                continue
            fn = _dotted(node.func)
            where = f"{rel}:{node.lineno}: {fn}("
            if fn == "torch.load" and not _kw_true(node, "weights_only"):
                bad.append(where + "...) without weights_only=True")
            elif fn in ("pickle.load", "pickle.loads", "pickle.Unpickler") and rel != _BIN_READER:
                bad.append(where + ") outside the .bin reader")
            elif fn in ("np.load", "numpy.load") and _kw_true(node, "allow_pickle"):
                bad.append(where + "allow_pickle=True)")
            elif fn in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                bad.append(where + ") (use yaml.safe_load)")
            elif fn.split(".")[0] in ("marshal", "dill", "cloudpickle", "shelve", "joblib") and fn.endswith(
                ("load", "loads", "open")
            ):
                bad.append(where + ")")
    assert not bad, "loaders that can run code:\n" + "\n".join(bad)


def test_the_bin_reader_unpickles_only_through_the_restricted_unpickler():
    tree = ast.parse((REPO / _BIN_READER).read_text())
    calls = [_dotted(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert "pickle.load" not in calls and "pickle.loads" not in calls and "pickle.Unpickler" not in calls
    assert "BinUnpickler" in calls


# --------------------------------------------------------------------------- pipeline.export


def _export(ck, out, capsys, *extra) -> tuple[int, str]:
    rc = export_main(["--checkpoint", str(ck), "--out", str(out), "--no-check", *extra])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "damage, expect",
    [
        ("truncated", "model.pt: not a PyTorch state dict"),
        ("empty", "model.pt: not a PyTorch state dict"),
        ("binary_config", "config.yaml: not a YAML text file"),
        ("nul_config", "config.yaml: not valid YAML"),
        ("list_config", "config.yaml: top level must be a mapping"),
    ],
)
def test_export_bad_checkpoint_is_one_line(tiny, tmp_path, capsys, damage, expect):
    ck = _copy_ckpt(tiny[0], tmp_path / "ck")
    if damage == "truncated":
        (ck / "model.pt").write_bytes((ck / "model.pt").read_bytes()[:1000])
    elif damage == "empty":
        (ck / "model.pt").write_bytes(b"")
    elif damage == "binary_config":
        (ck / "config.yaml").write_bytes(bytes(range(256)) * 4)
    elif damage == "nul_config":
        (ck / "config.yaml").write_bytes(b"model: [unclosed\n\x00\x01")
    else:
        (ck / "config.yaml").write_text("- 1\n- 2\n")
    out = tmp_path / "out" / "m.onnx"
    rc, err = _export(ck, out, capsys)
    assert rc == 2 and f"{ck}/{expect}" in _one_error_line(err)
    assert not out.exists()


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory no file can be created in: read-only for a normal user; as root (who ignores
    permission bits) sysfs, which refuses new files to everyone."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() != 0:
        return ro
    if Path("/sys/kernel").is_dir():
        return Path("/sys")
    pytest.skip("running as root without /sys: no directory refuses files")


def test_export_unwritable_out_is_one_line(tiny, tmp_path, capsys):
    ck, _ = tiny
    afile = tmp_path / "afile"
    afile.write_text("x")
    ro = _unwritable_dir(tmp_path)
    cases = [
        (afile / "m.onnx", f"--out: cannot write {afile}/m.onnx: {afile} is a file, not a directory"),
        (afile / "sub" / "m.onnx", f"{afile} is a file, not a directory"),
        (tmp_path, f"--out: {tmp_path} is a directory"),
        (ro / "m.onnx", f"--out: cannot write {ro}/m.onnx: {ro} is not writable"),
        (ro / "sub" / "m.onnx", f"{ro} is not writable"),
    ]
    try:
        for out, expect in cases:
            rc, err = _export(ck, out, capsys)
            assert rc == 2 and expect in _one_error_line(err), (out, err)
        rc, err = _export(ck, tmp_path / "ok.onnx", capsys, "--fold", "--save-folded", str(afile / "f.pt"))
        assert rc == 2 and f"--save-folded: cannot write {afile}/f.pt" in _one_error_line(err)
        assert not (tmp_path / "ok.onnx").exists()  # failed before exporting anything
    finally:
        (tmp_path / "ro").chmod(0o755)
    # and a writable place (parents created) still works
    rc, err = _export(ck, tmp_path / "new" / "dir" / "m.onnx", capsys)
    assert rc == 0 and (tmp_path / "new" / "dir" / "m.onnx").stat().st_size > 1000


def test_export_write_failure_after_checks_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """An OSError while writing (disk full, the place vanished) is still one line."""
    import pipeline.export as E

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "m.onnx"))

    monkeypatch.setattr(E.torch.onnx, "export", full)
    rc, err = _export(tiny[0], tmp_path / "m.onnx", capsys)
    assert rc == 2 and f"--out: cannot write {tmp_path}/m.onnx (No space left on device)" in _one_error_line(err)


# --------------------------------------------------------------------------- non-finite embeddings


def _nan_rows(rows: list[int]):
    def embed(x: torch.Tensor) -> torch.Tensor:
        e = x.flatten(1)[:, :8].clone() + 0.1
        # rows are global indices; embed_images calls with batches of 8 (plain then flipped)
        embed.calls += 1
        start = 8 * ((embed.calls - 1) // 2)
        for r in rows:
            if start <= r < start + len(x):
                e[r - start, 3] = float("nan") if r % 2 else float("inf")
        return e

    embed.calls = 0
    return embed


def test_non_finite_embeddings_are_one_line(small_bin):
    images, issame = ES.load_bin(small_bin, 16)
    with pytest.raises(DataError) as ei:
        V.evaluate_images(_nan_rows([3, 4, 17]), images, issame, "lfw_small", batch_size=8)
    assert str(ei.value) == "lfw_small: 3 of 40 embeddings are not finite (NaN/inf: a diverged model?)"
    with pytest.raises(DataError, match=r"^lfw_small: 40 of 40 embeddings are not finite"):
        ER.evaluate_bin(lambda x: torch.full((len(x), 8), float("nan")), small_bin, image_size=16)
    with pytest.raises(DataError, match=r"^lfw_small \[clean\]: [12] of 40 embeddings are not finite"):
        evaluate_lowres_bin(_nan_rows([0]), small_bin, sizes=(7,), batch_size=8, image_size=16)
    # finite embeddings: unchanged behaviour
    r = V.evaluate_images(_nan_rows([]), images, issame, "lfw_small", batch_size=8)
    assert 0 <= r["accuracy"] <= 1


def test_cli_nan_checkpoint_is_one_line(tiny, tmp_path, small_bin, capsys):
    ck = _copy_ckpt(tiny[0], tmp_path / "nan_ck")
    state = torch.load(ck / "model.pt", weights_only=True)
    state["head.fc.bias"][0] = float("nan")
    torch.save(state, ck / "model.pt")
    rc = eval_main(["verify", "--checkpoint", str(ck), "--bin", str(small_bin), "--no-progress"])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "lfw_small: 40 of 40 embeddings are not finite" in err
    rc = eval_main(["lowres", "--checkpoint", str(ck), "--bin", str(small_bin), "--sizes", "7", "--no-progress"])
    assert rc == 2 and "lfw_small [clean]: 40 of 40 embeddings are not finite" in _one_error_line(
        capsys.readouterr().err
    )


# --------------------------------------------------------------------------- state-dict files


_TINY_ARGS = ["--backbone", "iresnet18", "--width", "0.0625", "--embedding-size", "16", "--input-size", "48"]


def _flat(net) -> dict:
    names = net.published_names()
    return {names[k]: v for k, v in net.state_dict().items()}


def _check_loads(path: Path, net, small_bin, capsys, cli: bool = True) -> None:
    m, info = load_model(path, "iresnet18", width=0.0625, embedding_size=16, input_size=48)
    x = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(m(x), net.embed(x))
    if not cli:
        return
    rc = eval_main(["verify", "--checkpoint", str(path), *_TINY_ARGS, "--bin", str(small_bin), "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0 and "lfw_small: accuracy " in out.out, out.err


def test_state_dict_files_plain_wrapped_and_ddp(tiny, tmp_path, small_bin, capsys):
    _, net = tiny
    flat = _flat(net)
    for name, obj in {
        "backbone.pth": flat,
        "wrapped.pt": {"state_dict": flat, "epoch": 3},
        "ddp.pt": {f"module.{k}": v for k, v in flat.items()},
    }.items():
        torch.save(obj, tmp_path / name)
        _check_loads(tmp_path / name, net, small_bin, capsys, cli=name == "wrapped.pt")


def _arcface_torch_checkpoint(net, path: Path) -> None:
    """What insightface arcface_torch's train.py saves every epoch as ``checkpoint_gpu_{rank}.pt``."""
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # momentum buffers in the optimizer state
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=100, power=2)
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "state_dict_backbone": _flat(net),
            "state_dict_softmax_fc": {"weight_activated": torch.randn(10, 16)},
            "state_optimizer": opt.state_dict(),
            "state_lr_scheduler": sched.state_dict(),
        },
        path,
    )


def test_arcface_torch_training_checkpoint(tiny, tmp_path, small_bin, capsys):
    net = copy.deepcopy(tiny[1])  # the optimizer step below moves its weights (weight decay)
    pt = tmp_path / "checkpoint_gpu_0.pt"
    _arcface_torch_checkpoint(net, pt)
    torch.load(pt, weights_only=True)  # the whole file is plain data: weights_only loads it
    _check_loads(pt, net.eval(), small_bin, capsys)


def test_image_decode_errors_say_what_is_wrong():
    """Issue 22: a 0-byte file says '0 bytes' (not an object address); 1×1 and 8000×8000 px are refused, not resized."""
    import io

    import numpy as np
    from PIL import Image

    from data_prep.bin import decode_image
    from data_prep.manifest import DataError

    def png(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    cases = [
        (b"", "face.jpg: cannot decode image (the file is 0 bytes)"),
        (
            b"GIF00 not really",
            "face.jpg: cannot decode image (not an image: unknown format or truncated header)",
        ),
        (b"\xff\xd8\xff\xe0garbage", "face.jpg: cannot decode image (OSError: Truncated File Read)"),
        (png(1, 1), "face.jpg: a 1×1 px image is not a face crop"),
        (png(8000, 8000), "face.jpg: a 8000×8000 px image is not a face crop"),
    ]
    for data, message in cases:
        with pytest.raises(DataError) as err:
            decode_image(data, "face.jpg")
        assert str(err.value).startswith(message) and "0x" not in str(err.value)
    assert decode_image(png(112, 96), "ok").shape == (96, 112, 3)
