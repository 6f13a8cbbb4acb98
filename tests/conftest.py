"""Shared fixtures. Tests that need ../shared/data fail (never skip) when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO, restore_environ

# The fixtures a topic's unit and integration halves share (tests/support/<topic>.py), visible to every test as
# conftest's are: a fixture another support fixture needs is then found too. tests/unit/test_test_layout.py keeps
# every fixture name defined once, so none shadows another.
pytest_plugins = sorted(
    f"tests.support.{p.stem}" for p in (REPO / "tests" / "support").glob("*.py") if p.stem != "__init__"
)

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


def _shared_root() -> Path:
    env = os.environ.get("LOWQ_SHARED")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = _shared_root() / "data"
    if not (root / "lfw_view1_112" / "train_112").is_dir():
        pytest.fail(f"{root}: the shared face data is missing (expected ../shared/data beside the repo)")
    return root


@pytest.fixture(scope="session")
def lfw_train(shared_data) -> Path:
    return shared_data / "lfw_view1_112" / "train_112"


@pytest.fixture(scope="session")
def lfw_bin(shared_data) -> Path:
    return shared_data / "lfw_view1_112" / "lfw_devtest_112.bin"


@pytest.fixture(scope="session")
def devtest(shared_data):
    """The LFW View-1 dev-test images as a labelled set (1,549 images of 963 people)."""
    from pipeline.eval.sets import read_image_set

    return read_image_set(shared_data / "lfw_view1_112" / "devtest_112")


@pytest.fixture(scope="session")
def lfw_shards(shared_data, tmp_path_factory) -> Path:
    """WebDataset shards of the real LFW View-1 training faces (111 identities, 1,814 images),
    made once per session with the real ``data_prep.folder2wds``, in this process (one worker)."""
    import contextlib
    import io

    from data_prep import folder2wds

    out = tmp_path_factory.mktemp("lfw_shards") / "shards"
    argv = ["--list", str(shared_data / "lfw_view1_112" / "train_list.txt"), "--out", str(out)]
    argv += ["--shard-size", "300", "--workers", "1", "--verify", "header", "--no-progress"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = folder2wds.main(argv)
    assert code == 0, f"data_prep.folder2wds {' '.join(argv)} failed ({code}):\n{printed.getvalue()}"
    return out


@pytest.fixture(scope="module")
def small_bin(tmp_path_factory, lfw_bin):
    """The first 10 matched and 10 mismatched pairs of the real LFW dev-test .bin (40 images)."""
    from pipeline.faces import io as B

    bins, issame = B.read_bin(lfw_bin)
    idx = list(range(0, 10)) + list(range(50, 60))
    path = tmp_path_factory.mktemp("small_bin") / "lfw_small.bin"
    B.write_bin(path, [bins[j] for i in idx for j in (2 * i, 2 * i + 1)], [issame[i] for i in idx])
    return path


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """A random-init checkpoint directory (config.yaml + model.pt) of a tiny iresnet18 at 56 px."""
    import torch

    from pipeline import registry
    from pipeline.config import dump_config, load_config

    overrides = ["model.backbone=iresnet18", "model.width=0.0625", "model.head.embedding_size=32"]
    cfg = load_config([], overrides + ["model.input_size=56"])
    ck = tmp_path_factory.mktemp("random_ckpt") / "ckpt"
    ck.mkdir()
    dump_config(cfg, ck / "config.yaml")
    torch.manual_seed(1)
    torch.save(registry.build_recipe(cfg).net.state_dict(), ck / "model.pt")
    return ck


@pytest.fixture(scope="module")
def one_rank_group():
    """This pytest process as a world of one gloo rank, for a module whose tests build the real Trainer in-process.
    One group for the module, destroyed at its end, so no later test finds a process group (DeepSpeed keeps the
    group it saw at its first initialize: one module per session may build Trainers in-process, or a group destroyed
    and made again would leave DeepSpeed pointing at a dead one). ``distributed.init`` exports RANK, WORLD_SIZE,
    MASTER_PORT…: the environment is put back at once, so the trainers later tests start as subprocesses do not
    inherit them (each in-process Trainer exports them again; ``restore_environ`` puts them back after its test)."""
    from pipeline import distributed

    with restore_environ():
        info = distributed.init("cpu")
    yield info
    distributed.cleanup()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, shared_data) -> Path:
    """12 dev-test images in <identity>/ folders: 2 of each of 4 people, 1 of each of 4 others."""
    import shutil

    src = shared_data / "lfw_view1_112" / "devtest_112"
    people = sorted(d for d in src.iterdir() if d.is_dir())
    twice = [d for d in people if len(list(d.glob("*.jpg"))) >= 2][:4]
    once = [d for d in people if d not in twice][:4]
    out = tmp_path_factory.mktemp("tiny") / "devtest_tiny"
    for d in twice + once:
        (out / d.name).mkdir(parents=True)
        for f in sorted(d.glob("*.jpg"))[: 2 if d in twice else 1]:
            shutil.copyfile(f, out / d.name / f.name)  # a tmp copy, never into the repo
    return out
