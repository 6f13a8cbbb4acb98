"""Config layering, overrides and one-line errors; schedules stated in epochs.

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_config.py.
"""

from __future__ import annotations

import math

import pytest

from pipeline import schedule
from pipeline.config import ConfigError, ScheduleConfig, check, load_config
from tests.helpers import REPO
from tests.support.config import write


def test_layers_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "optim: {lr: 0.1, momentum: 0.9}\nmodel: {backbone: iresnet18}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\noptim: {lr: 0.05}\n")
    top = write(tmp_path, "top.yaml", "data: {batch_size: 7}\n")
    cfg = load_config([child, top], ["optim.weight_decay=1e-4", "data.val=[a.bin, b.bin]"])
    assert cfg.optim.lr == 0.05 and cfg.optim.momentum == 0.9  # child wins, base fills in
    assert cfg.model.backbone == "iresnet18" and cfg.data.batch_size == 7
    assert cfg.optim.weight_decay == pytest.approx(1e-4)
    assert cfg.data.val == ["a.bin", "b.bin"]
    # later --config layers win over earlier ones
    assert load_config([top, write(tmp_path, "t2.yaml", "data: {batch_size: 9}\n")]).data.batch_size == 9


@pytest.mark.parametrize(
    "text,override,fragment",
    [
        ("optim: {lrr: 0.1}\n", None, "unknown key 'optim.lrr'"),
        ("optim: {lr: fast}\n", None, "key 'optim.lr' expects a number"),
        ("data: {batch_size: 1.5}\n", None, "key 'data.batch_size' expects an integer"),
        ("recipe: nosuch\n", None, "unknown recipe 'nosuch'"),
        ("{}\n", "model.nosuch=1", "command line: unknown key 'model.nosuch'"),
        ("{}\n", "method.nosuch=1", "unknown key 'method.nosuch'"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, override, fragment):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config([path], [override] if override else [])
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg
    if override is None and "recipe" not in fragment:
        assert str(path) in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([write(tmp_path, "x.yaml", "a: [1,\n")])


LAYERS = {"throughput.yaml"}  # stacked on a recipe, not a config on its own


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config([REPO / "configs" / "base.yaml", path] if path.name in LAYERS else [path])


def test_step_schedule_in_epochs():
    cfg = ScheduleConfig(kind="step", epochs=30, milestones=[16, 24, 28], gamma=0.1)
    assert schedule.lr_factor(cfg, 0.0) == 1.0
    assert schedule.lr_factor(cfg, 15.99) == 1.0
    assert schedule.lr_factor(cfg, 16.0) == pytest.approx(0.1)
    assert schedule.lr_factor(cfg, 25.0) == pytest.approx(0.01)
    assert schedule.lr_factor(cfg, 29.0) == pytest.approx(0.001)


def test_step_schedule_with_per_milestone_factors_cqa_ms1mv2():
    """CQA-Face on MS1MV2 (spec B.5): 0.03, ÷10 at epoch 12 and 18 (0-based), then 3e-4 → 1e-4 at 22."""
    cfg = ScheduleConfig(kind="step", epochs=24, warmup_epochs=2, milestones=[12, 18, 22], factors=[0.1, 0.1, 1 / 3])
    lrs = {e: 0.03 * schedule.lr_factor(cfg, e) for e in (1.0, 2.0, 11.9, 12.0, 18.0, 22.0, 23.9)}
    assert lrs[1.0] == pytest.approx(0.015)  # half-way through the 2 warm-up epochs
    assert (lrs[2.0], lrs[11.9]) == (pytest.approx(0.03), pytest.approx(0.03))
    assert (lrs[12.0], lrs[18.0]) == (pytest.approx(3e-3), pytest.approx(3e-4))
    assert lrs[22.0] == pytest.approx(1e-4) and lrs[23.9] == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="schedule.factors: needs one factor per milestone"):
        check(ScheduleConfig(milestones=[1, 2], factors=[0.1]), "schedule.")


def test_warmup_poly_cosine():
    warm = ScheduleConfig(kind="poly", epochs=10, warmup_epochs=2, power=2.0)
    assert schedule.lr_factor(warm, 1.0) == pytest.approx(0.5)
    assert schedule.lr_factor(warm, 6.0) == pytest.approx((1 - 4 / 8) ** 2)
    cos = ScheduleConfig(kind="cosine", epochs=10)
    assert schedule.lr_factor(cos, 5.0) == pytest.approx(0.5)
    assert schedule.lr_factor(cos, 2.5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert schedule.total_steps(ScheduleConfig(epochs=2.5), 10) == 25
    assert schedule.total_steps(ScheduleConfig(epochs=2.5, max_steps=7), 10) == 7
    with pytest.raises(ConfigError, match="key 'schedule.kind' unknown schedule 'linear'"):
        load_config([], ["schedule.kind=linear"])


# --------------------------------------------------------------------------- a part's kind changing (issue 23)


def test_kind_change_keeps_the_options_written_for_the_part():
    """The bug: model.head.kind=lgaf after model.head.embedding_size=128 silently gave a 512-d head."""
    cfg = load_config([REPO / "configs/arcface_r50.yaml"], ["model.head.embedding_size=128", "model.head.kind=lgaf"])
    assert cfg.model.head.kind == "lgaf" and cfg.model.head.embedding_size == 128
    cfg = load_config([REPO / "configs/arcface_r50.yaml"], ["model.head.embedding_size=96", "model.head.kind=cqa"])
    assert cfg.model.head.kind == "cqa" and cfg.model.head.embedding_size == 96


def test_kind_change_to_a_kind_without_the_option_names_both_layers(tmp_path):
    first = write(tmp_path, "first.yaml", f"base: {REPO / 'configs/lgaf_r100.yaml'}\n")
    second = write(tmp_path, "second.yaml", "model: {head: {kind: cqa}}\n")
    with pytest.raises(ConfigError) as err:
        load_config([first, second])
    msg = str(err.value)
    assert "\n" not in msg
    assert "lgaf_r100.yaml" in msg and str(second) in msg  # the layer that set the option, the one that changed kind
    assert "model.head.dropout" in msg or "model.head.heads" in msg
    assert "model.head={kind: cqa" in msg  # how to start afresh


def test_whole_block_override_replaces_the_block():
    cfg = load_config([REPO / "configs/lgaf_r100.yaml"], ["model.head={kind: cqa, embedding_size: 64}"])
    assert cfg.model.head.kind == "cqa" and cfg.model.head.embedding_size == 64
    cfg = load_config([REPO / "configs/scan_r18_casia.yaml"], ["model.conv=plain"])
    assert cfg.model.conv.kind == "plain"
    with pytest.raises(ConfigError, match="model.conv.sac"):  # scan's options do not fit plain
        load_config([REPO / "configs/scan_r18_casia.yaml"], ["model.conv.kind=plain"])


def test_same_kind_layer_merges_and_errors_keep_their_file(tmp_path):
    top = write(tmp_path, "top.yaml", "model: {head: {kind: fc, embedding_size: 32}}\n")
    cfg = load_config([REPO / "configs/lcd_r50.yaml", top])
    assert cfg.model.head.embedding_size == 32 and cfg.model.head.dropout == 0.0
    bad = write(tmp_path, "bad.yaml", "model: {head: {fusion: add}}\n")  # an lgaf option on an fc head, one layer
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key 'model.head.fusion'"):
        load_config([bad])


@pytest.mark.parametrize(
    "recipe,layers",
    [
        ("cqa_r100.yaml", "cqa"),
        ("lgaf_r100.yaml", "lgaf"),
        ("lcd_r50.yaml", "lcd"),
        ("lrfr_r34_casia.yaml", "lrfr"),
    ],
)
def test_every_method_layer_loads_on_its_recipe(recipe, layers):
    """configs/<method>/*.yaml are layers over the method's recipe; each resolves and keeps what it writes."""
    import yaml

    for layer in sorted((REPO / "configs" / layers).glob("*.yaml")):
        cfg = load_config([REPO / "configs" / recipe, layer])
        head = yaml.safe_load(layer.read_text()).get("model", {}).get("head", {})
        for key, value in head.items():
            assert getattr(cfg.model.head, key) == value, (layer, key)


def test_precision_auto_resolves_per_device_and_cuda_gets_its_fast_settings(monkeypatch):
    """deepspeed.precision: auto (base.yaml) is fp32 on the CPU and bf16 on a CUDA device with bf16; an explicit
    precision is kept; on CUDA cudnn.benchmark is switched on (and TF32 matmuls for classifier.logits: tf32)."""
    import torch

    from pipeline.train.build import configure_backends, resolve_precision

    assert load_config([REPO / "configs/arcface_r50.yaml"]).deepspeed.precision == "auto"
    assert load_config([REPO / "configs/lgaf_r100.yaml"]).deepspeed.precision == "fp16"  # the recipe's own
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    precision_before = torch.get_float32_matmul_precision()
    cfg = load_config([REPO / "configs/arcface_r50.yaml"], ["classifier.logits=tf32"])
    configure_backends(cfg, torch.device("cuda"))
    assert cfg.deepspeed.precision == "bf16" and torch.backends.cudnn.benchmark is True
    assert torch.get_float32_matmul_precision() == "high"
    torch.set_float32_matmul_precision(precision_before)
    cpu = load_config([REPO / "configs/arcface_r50.yaml"])
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_backends(cpu, torch.device("cpu"))
    assert cpu.deepspeed.precision == "fp32" and torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize(
    "recipe,paper_batch",
    [
        ("arcface_r50.yaml", 1024),
        ("cqa_r100.yaml", 256),
        ("iresnet_r100_ms1mv2.yaml", 128),
        ("lgaf_r100.yaml", 512),
        ("lrfr_r50_ms1m.yaml", 256),
        ("scan_r50_ms1mv2.yaml", 128),
        ("scan_r101_ms1mv2.yaml", 128),
    ],
)
def test_recipes_keep_the_paper_and_the_throughput_layer_scales_it(recipe, paper_batch):
    """Each GPU recipe states the global batch its lr is for (the paper's, = data.batch_size × 8 GPUs) and trains
    with it as written; configs/throughput.yaml (not from the papers) trains 256/GPU with the lr scaled linearly."""
    from pipeline.train.build import scaled_lr

    paper = load_config([REPO / "configs" / recipe])
    assert paper.optim.reference_batch == paper_batch == paper.data.batch_size * 8
    assert not paper.optim.scale_lr and scaled_lr(paper.optim, 8 * paper.data.batch_size) == paper.optim.lr
    fast = load_config([REPO / "configs" / recipe, REPO / "configs" / "throughput.yaml"])
    assert fast.data.batch_size == 256 and fast.optim.scale_lr and fast.classifier.logits == "bf16"
    assert fast.deepspeed.precision == "auto"
    assert scaled_lr(fast.optim, 256 * 8) == pytest.approx(paper.optim.lr * 256 * 8 / paper_batch)
    with pytest.raises(ConfigError, match="optim.scale_lr"):
        load_config([REPO / "configs" / recipe], ["optim.scale_lr=true", "optim.reference_batch=0"])


def test_image_batches_are_channels_last_on_cuda_only():
    """Issue 21: the trainer feeds NHWC image batches on CUDA and keeps NCHW on the CPU (where a channels-last
    backward aborted torch 2.13); labels and other entries are untouched; the dtype follows the precision."""
    import torch

    from pipeline.train.build import batch_to_device, input_memory_format

    assert input_memory_format(torch.device("cuda")) == torch.channels_last
    assert input_memory_format(torch.device("cpu")) == torch.contiguous_format
    images = torch.rand(2, 3, 8, 8)
    on_cpu = batch_to_device(images, torch.device("cpu"), torch.bfloat16)
    assert on_cpu.dtype == torch.bfloat16 and on_cpu.is_contiguous()
    labels = torch.arange(2)
    assert batch_to_device(labels, torch.device("cpu"), torch.bfloat16).dtype == torch.int64
    assert batch_to_device("x", torch.device("cpu"), torch.float32) == "x"
    # what the CUDA path does to a batch, shown on the CPU: the same values, NHWC strides
    nhwc = images.contiguous(memory_format=input_memory_format(torch.device("cuda")))
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc, images)
