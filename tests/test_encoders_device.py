"""Tests of lposs.encoders.device: device checks and the choice of precision ("auto")."""

from __future__ import annotations

import pytest
import torch

from lposs.cli import main
from lposs.encoders import device as device_module
from lposs.encoders import load_clip, load_dino, resolve_device, resolve_precision
from lposs.errors import ConfigError


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set the CPU flags the precision choice sees: ``cpu_flags(frozenset | None)``."""

    def set_flags(flags):
        monkeypatch.setattr(device_module, "_cpu_flags", lambda: flags)

    return set_flags


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"}), "bf16"),
        (frozenset({"fpu", "avx2", "amx_tile", "amx_bf16"}), "bf16"),
        (frozenset({"fpu", "avx2", "avx512f"}), "fp32"),
        (frozenset(), "fp32"),
    ],
)
def test_auto_on_the_cpu_follows_native_bf16(cpu_flags, flags, expected):
    cpu_flags(flags)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", None) == expected  # None is the CPU
    assert resolve_precision("auto", torch.device("cpu")) == expected


def test_auto_on_accelerators(cpu_flags):
    cpu_flags(frozenset({"avx512_bf16"}))  # the CPU's flags do not matter off the CPU
    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("auto", torch.device("cuda", 1)) == "fp16"
    assert resolve_precision("auto", "mps") == "fp32"


def test_explicit_precisions_and_refusals():
    for name in ("fp32", "bf16"):
        assert resolve_precision(name, "cpu") == name
    for name in ("fp32", "fp16", "bf16"):
        assert resolve_precision(name, "cuda") == name
    with pytest.raises(ConfigError, match="fp16.*CPU.*bf16"):
        resolve_precision("fp16", "cpu")
    for bad in ("fp8", "FP32", "", None, 16):
        with pytest.raises(ConfigError, match="precision must be one of"):
            resolve_precision(bad, "cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(device_module, "_CPUINFO", cpuinfo)
    device_module._cpu_flags.cache_clear()
    try:
        cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16 avx2\n\n"
                           "processor\t: 1\nflags\t\t: fpu sse2 avx512_bf16 avx2\n")
        assert device_module.cpu_has_native_bf16()
        assert resolve_precision("auto", "cpu") == "bf16"
        device_module._cpu_flags.cache_clear()
        cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
        assert not device_module.cpu_has_native_bf16()
    finally:
        device_module._cpu_flags.cache_clear()


def test_encoders_say_which_precision_runs(cpu_flags, tiny_clip_kwargs, tiny_dino_kwargs):
    cpu_flags(frozenset({"avx512_bf16"}))
    dino = load_dino("dino_vitb16", pretrained=False, precision="auto", **tiny_dino_kwargs)
    assert dino.precision == "bf16"
    assert dino.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert dino.dense_features(torch.rand(1, 3, 32, 32)).dtype == torch.float32
    cpu_flags(frozenset({"avx2"}))
    clip = load_clip("ViT-B-16", pretrained=None, precision="auto", **tiny_clip_kwargs)
    assert clip.precision == "fp32"
    assert clip.model.visual.conv1.weight.dtype == torch.float32
    with pytest.raises(ConfigError, match="fp16"):
        load_dino("dino_vitb16", pretrained=False, precision="fp16", **tiny_dino_kwargs)


def test_bf16_on_a_cpu_without_native_bf16_warns_once(cpu_flags, tmp_path, tiny_model_files,
                                                    capsys):
    import warnings

    cpu_flags(frozenset({"avx2"}))
    with pytest.warns(UserWarning, match="bf16.*slower than fp32 on this CPU"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    cpu_flags(frozenset({"avx2", "avx512_bf16"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native bf16, or a GPU: no warning
        assert resolve_precision("bf16", "cpu") == resolve_precision("bf16", "cuda") == "bf16"
    cpu_flags(frozenset({"avx2"}))
    from PIL import Image

    clip_dir, dino_file = tiny_model_files
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "x.png")
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # as a plain `lposs` run has it
        code = main(["segment", str(tmp_path / "x.png"), "--classes", "a,b", "--out",
                     str(tmp_path / "o"), "--precision", "bf16", "--clip-model",
                     f"local-dir:{clip_dir}", "--dino-model", "vit_tiny_patch16_224",
                     "--dino-weights", str(dino_file), "--k", "30", "--r", "5"])
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert code == 0 and len(lines) == 1 and "slower than fp32" in lines[0]


def _one_line(err: ConfigError) -> str:
    message = str(err)
    assert "\n" not in message and len(message) < 300
    return message


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_absent_mps_is_one_short_line():
    with pytest.raises(ConfigError) as err:
        resolve_device("mps")
    assert "not available on this machine" in _one_line(err.value)


def test_cuda_index_out_of_range_or_absent():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError) as err:
        resolve_device(f"cuda:{count}")
    message = _one_line(err.value)
    assert (f"out of range, this machine has {count}" in message if count
            else "no CUDA GPU" in message)
    if count == 0:
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_valid_and_invalid_device_names():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError) as err:
        resolve_device("not-a-device")
    assert "not a valid torch device" in _one_line(err.value)
    with pytest.raises(TypeError):
        resolve_device(3)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_cli_absent_device_and_cpu_fp16_are_one_line_errors(tmp_path, tiny_model_files, capsys):
    clip_dir, dino_file = tiny_model_files
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    args = ["segment", str(image), "--classes", "a,b", "--out", str(tmp_path / "o"),
            "--clip-model", f"local-dir:{clip_dir}", "--dino-model", "vit_tiny_patch16_224",
            "--dino-weights", str(dino_file)]
    for extra, expected in ((["--device", "mps"], "mps"), (["--precision", "fp16"], "bf16")):
        code = main([*args, *extra])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("lposs: error:")]
        assert code == 1 and len(errors) == 1 and "Traceback" not in err
        assert expected in errors[0] and len(err) < 500
