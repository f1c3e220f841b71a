"""Saving a compressed model to one safetensors file + manifest and loading it into a dense skeleton."""
import copy
import hashlib
import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from src import load_compressed, save_compressed
from src.io.compressed_format import MANIFEST_FILE, WEIGHTS_FILE, read_manifest
from src.layers.quant import pack_ternary, unpack_ternary
from src.layers.tsvd import TernarySVDLinear
from src.surgery import compress_

LAYERS = {"conv": "lowrank", "a": "svdq", "b": "hyper", "c": "tsvd", "d": "svdq"}
OPTIONS = {"svdq": {"bits": 4, "group_size": 16}, "tsvd": {"tolerance": 0.2},
           "hyper": {"codebook_sizes": [225, 1600], "loss_max": 0.1}}


class Tiny(nn.Module):
    def __init__(self, width: int = 48):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.a = nn.Linear(128, width)
        self.b = nn.Linear(width, 40)
        self.c = nn.Linear(40, 36)
        self.d = nn.Linear(36, 24, bias=False)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        h = self.conv(x.view(-1, 2, 4, 4)).flatten(1)
        return self.head(self.norm(self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(h)))))))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = Tiny().eval()
    compress_(model, LAYERS, budget=0.5, options=OPTIONS)
    return model, save_compressed(model, tmp_path_factory.mktemp("tiny") / "ckpt")


def skeleton(seed: int = 1, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny(**kwargs).eval()


def copy_of(path, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for name in (WEIGHTS_FILE, MANIFEST_FILE):
        (target / name).write_bytes((path / name).read_bytes())
    return target


def test_roundtrip_outputs_are_bit_identical(saved):
    model, path = saved
    loaded = load_compressed(path, skeleton())
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for name in LAYERS:
        assert type(getattr(loaded, name)) is type(getattr(model, name))
    assert isinstance(loaded.c, TernarySVDLinear) and loaded.c.rank == model.c.rank
    assert loaded.a.u_packed.dtype == torch.uint8 and loaded.b.codes.dtype == torch.uint8


def test_manifest_records_layers_and_hash(saved):
    _, path = saved
    manifest = read_manifest(path)
    assert manifest["version"] == 2 and len(manifest["weights"]["sha256"]) == 64
    assert manifest["weights"]["bytes"] == (path / WEIGHTS_FILE).stat().st_size
    recorded = {entry["name"]: entry for entry in manifest["layers"]}
    assert {name: entry["type"] for name, entry in recorded.items()} == LAYERS
    assert recorded["conv"]["conv"]["kernel_size"] == [3, 3]
    assert recorded["a"]["config"]["bits"] == 4 and recorded["a"]["out_features"] == 48


def test_ternary_factors_are_stored_at_two_bits(saved):
    """tsvd's int8 {-1, 0, 1} factors go to disk four per byte and come back as the same int8 values."""
    model, path = saved
    manifest = read_manifest(path)
    assert manifest["ternary_packed"] == {"c.u": list(model.c.u.shape), "c.v": list(model.c.v.shape)}
    with safe_open(path / WEIGHTS_FILE, "pt") as stored:
        assert stored.get_tensor("c.u").numel() == (model.c.u.numel() + 3) // 4
    loaded = load_compressed(path, skeleton())
    assert loaded.c.u.dtype == torch.int8 and torch.equal(loaded.c.u, model.c.u) and torch.equal(loaded.c.v, model.c.v)
    assert model.c.storage_bytes() < model.c.u.numel() + model.c.v.numel()


@pytest.mark.parametrize("numel", [1, 4, 5, 7, 1001])
def test_ternary_pack_roundtrip(numel):
    values = torch.randint(-1, 2, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.int8)
    packed = pack_ternary(values)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 3) // 4
    assert torch.equal(unpack_ternary(packed, (numel,)), values)
    with pytest.raises(ValueError, match="ternary"):
        pack_ternary(torch.tensor([2], dtype=torch.int8))


def test_version_1_saves_still_load(saved, tmp_path):
    """A version-1 manifest (before ternary packing) with int8 factors in the file loads unchanged."""
    model, _ = saved
    path = tmp_path / "v1"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    data = safetensors.torch.save(tensors)
    (path).mkdir()
    (path / WEIGHTS_FILE).write_bytes(data)
    manifest = read_manifest(saved[1])
    manifest.update(version=1, aliases={}, weights={"file": WEIGHTS_FILE, "bytes": len(data),
                                                    "sha256": hashlib.sha256(data).hexdigest()})
    del manifest["ternary_packed"]
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(load_compressed(path, skeleton())(x), model(x))


def test_truncated_file_is_rejected(saved, tmp_path):
    path = copy_of(saved[1], tmp_path)
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_compressed(path, skeleton())


def test_flipped_byte_fails_the_hash(saved, tmp_path):
    path = copy_of(saved[1], tmp_path)
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[len(data) - 100] ^= 0x01
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_compressed(path, skeleton())


def test_wrong_version_is_rejected(saved, tmp_path):
    path = copy_of(saved[1], tmp_path)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["version"] = 99
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 99"):
        load_compressed(path, skeleton())


def test_truncated_manifest_is_rejected(saved, tmp_path):
    path = copy_of(saved[1], tmp_path)
    text = (path / MANIFEST_FILE).read_text()
    (path / MANIFEST_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        load_compressed(path, skeleton())


def test_missing_layer_is_named(saved):
    model = skeleton()
    del model.c
    with pytest.raises(ValueError, match="layer 'c' .* missing from the model skeleton"):
        load_compressed(saved[1], model)


def test_shape_mismatch_is_named(saved):
    with pytest.raises(ValueError, match="shape mismatch for layer 'a'.*48x128.*64x128"):
        load_compressed(saved[1], skeleton(width=64))


def test_missing_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="manifest.json is missing"):
        load_compressed(tmp_path / "nothing", skeleton())


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.mid = nn.Linear(8, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.mid(self.emb(ids)))

    torch.manual_seed(0)
    model = Tied()
    compress_(model, "lowrank", 0.5, include=["mid"])
    path = save_compressed(model, tmp_path / "tied")
    assert read_manifest(path)["aliases"] == {"out.weight": "emb.weight"}
    loaded = load_compressed(path, Tied())
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids), model(ids))
    assert loaded.out.weight.data_ptr() == loaded.emb.weight.data_ptr()


def test_layer_in_qat_mode_is_not_saved(saved, tmp_path):
    model = copy.deepcopy(saved[0])
    model.c.enable_qat()
    with pytest.raises(ValueError, match="cannot save layer 'c'"):
        save_compressed(model, tmp_path / "qat")


def test_half_precision_roundtrip_keeps_dtypes(saved, tmp_path):
    model = copy.deepcopy(saved[0]).to(torch.bfloat16)
    loaded = load_compressed(save_compressed(model, tmp_path / "bf16"), skeleton())
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert loaded.head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
