"""A packed file is trusted only as far as it is checked: the header is under the checksum
(format 2), every record is consistent and matches the module it loads into (format 1 too), the
file's codes are what the model computes with, and files written before these checks still load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from espnet_compress.quant.packed import MAGIC, PackedModelError, load_packed
from tests.test_nested import batch

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"


def _build(config: Path, model_file: Path):
    from espnet2.tasks.asr import ASRTask

    model, _ = ASRTask.build_model_from_file(config, model_file, "cpu")
    return model.eval()


def _encode(model):
    b = batch()
    with torch.no_grad():
        return model.encode(b["speech"], b["speech_lengths"])[0]


def _rewrite_header(src: Path, dst: Path, change) -> None:
    """Copy a packed file with its JSON header changed by ``change(header)`` (payload untouched)."""
    state = torch.load(src, weights_only=True)
    header = json.loads(state[MAGIC])
    change(header)
    state[MAGIC] = json.dumps(header)
    torch.save(state, dst)


@pytest.fixture(scope="module")
def packed_v2(tmp_path_factory):
    """The legacy 4-bit QAT model, repacked by the current code (format 2)."""
    from espnet_compress.export.packed_export import export_packed

    out = tmp_path_factory.mktemp("v2")
    model_dir = out / "qat4"
    model_dir.mkdir()
    legacy = _build(LEGACY / "qat4_packed" / "config.yaml", LEGACY / "qat4_packed" / "model.packed.pth")
    shutil.copy(LEGACY / "qat4_packed" / "config.yaml", model_dir / "config.yaml")
    # a float checkpoint holding exactly the packed weights: what export_packed starts from
    unfrozen = _build(LEGACY / "qat4_packed" / "config.yaml", None)
    unfrozen.load_state_dict(load_packed(LEGACY / "qat4_packed" / "model.packed.pth").tensors)
    torch.save(unfrozen.state_dict(), model_dir / "model.pth")
    result = export_packed(model_dir / "config.yaml", model_dir / "model.pth", out / "packed")
    return result.packed_file, result.config_file, _encode(legacy)


# ---------------------------------------------------------------------------------- legacy files
@pytest.mark.parametrize("name,config,model_file,system", [
    ("nested_full", "nested/config.yaml", "nested/model.pth", "full"),
    ("nested_shallow", "nested/config.yaml", "nested/model.pth", "shallow"),
    ("int4_system", "int4_system/config.yaml", "int4_system/model.packed.pth", None),
    ("qat4_packed", "qat4_packed/config.yaml", "qat4_packed/model.packed.pth", None),
])
def test_files_written_before_the_checks_still_load_and_compute_the_same(name, config, model_file, system):
    """Old multi-system checkpoints have one set of norm statistics (every system starts from it)
    and no step counter; format-1 packed files have a header outside their checksum."""
    model = _build(LEGACY / config, LEGACY / model_file)
    if system:
        model.use_system(system)
    reference = torch.load(LEGACY / "reference_outputs.pth", weights_only=True)[name]
    torch.testing.assert_close(_encode(model), reference, rtol=1e-5, atol=1e-5)


def test_an_old_nested_checkpoint_resumes_strictly(asr_task):
    """ESPnet's --resume loads strictly: slots and the step counter are filled in, not missing."""
    model = _build(LEGACY / "nested" / "config.yaml", None)
    state = torch.load(LEGACY / "nested" / "model.pth", weights_only=True)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert int(model.num_steps) == 0


# ---------------------------------------------------------------------------------- format 2
def test_repacked_file_computes_what_the_legacy_file_computed(packed_v2):
    path, config, reference = packed_v2
    assert load_packed(path).header["version"] == 2
    torch.testing.assert_close(_encode(_build(config, path)), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", [
    lambda h: h["tensors"][3].update(offset=h["tensors"][4]["offset"]) or h["tensors"][4].update(
        offset=h["tensors"][3]["offset"]),
    lambda h: next(r for r in h["tensors"] if r["bits"]).update(bits=2),
    lambda h: h["tensors"][0].update(shape=[1]),
], ids=["offsets-swapped", "bits-changed", "shape-changed"])
def test_a_changed_header_is_refused_naming_the_file(packed_v2, tmp_path, change):
    path, config, _ = packed_v2
    bad = tmp_path / "bad.pth"
    _rewrite_header(path, bad, change)
    with pytest.raises(PackedModelError, match="checksum mismatch") as err:
        load_packed(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(PackedModelError, match=str(bad)):  # through ESPnet's loader, too
        _build(config, bad)


# ---------------------------------------------------------------------------------- format 1
def test_a_format_1_header_with_inconsistent_records_is_refused_by_tensor(tmp_path):
    src = LEGACY / "qat4_packed" / "model.packed.pth"
    bits = tmp_path / "bits.pth"
    _rewrite_header(src, bits, lambda h: next(r for r in h["tensors"] if r["bits"]).update(bits=2))
    with pytest.raises(PackedModelError, match=r"bits.pth: tensor 'encoder\.embed\.out\.0\.weight'.* bytes in the header"):
        load_packed(bits)
    swapped = tmp_path / "swapped.pth"

    def swap(h):
        a, b = h["tensors"][0], h["tensors"][1]
        a["offset"], b["offset"] = b["offset"], a["offset"]

    _rewrite_header(src, swapped, swap)
    with pytest.raises(PackedModelError, match=r"swapped.pth: tensor '.*': starts at byte"):
        load_packed(swapped)


# ---------------------------------------------------------------------------------- vs the model
def test_a_file_loaded_with_a_config_of_other_bits_is_refused(tmp_path):
    """The 4-bit file given to a 2-bit config: the codes are the file's, so it is an error."""
    conf = yaml.safe_load((LEGACY / "qat4_packed" / "config.yaml").read_text())
    conf["encoder_conf"]["quant_conf"]["bits"] = 2
    config = tmp_path / "config_2bit.yaml"
    config.write_text(yaml.safe_dump(conf))
    model_file = LEGACY / "qat4_packed" / "model.packed.pth"
    with pytest.raises(PackedModelError, match=rf"{model_file}: tensor 'encoder\.[^']+' is stored at 4-bit but "
                                               r"the config sets 2-bit"):
        _build(config, model_file)


def test_a_file_loaded_with_a_full_precision_config_is_refused(tmp_path):
    conf = yaml.safe_load((LEGACY / "qat4_packed" / "config.yaml").read_text())
    conf["encoder"] = "elastic_conformer"
    conf["encoder_conf"].pop("quant_conf")
    config = tmp_path / "config_fp.yaml"
    config.write_text(yaml.safe_dump(conf))
    with pytest.raises(PackedModelError, match=r"is stored quantized but the config builds it in full precision"):
        _build(config, LEGACY / "qat4_packed" / "model.packed.pth")
