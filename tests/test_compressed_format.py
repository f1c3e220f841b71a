"""Saving a compressed model to one safetensors file + sealed manifest, loading it into a dense skeleton, and
every corruption of the folder failing with a ValueError that names the layer or field."""
import copy
import hashlib
import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from structured_compress import load_compressed, save_compressed
from structured_compress.io.shards import SINGLE_FILE as WEIGHTS_FILE
from structured_compress.io.manifest import FORMAT_VERSION, MANIFEST_FILE, read_manifest
from structured_compress.io.manifest import SEAL_KEY, canonical_json, sealed_part
from structured_compress.layers.quant import pack_ternary, unpack_ternary
from structured_compress.layers.tsvd import TernarySVDLinear
from structured_compress.surgery import compress_

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
    assert manifest["version"] == FORMAT_VERSION == 4 and len(manifest["weights"]["sha256"]) == 64
    assert manifest["weights"]["bytes"] == (path / WEIGHTS_FILE).stat().st_size
    recorded = {entry["name"]: entry for entry in manifest["layers"]}
    assert {name: entry["type"] for name, entry in recorded.items()} == LAYERS
    assert recorded["conv"]["conv"]["kernel_size"] == [3, 3]
    assert recorded["a"]["config"]["bits"] == 4 and recorded["a"]["out_features"] == 48
    assert manifest["tensors"]["a.u_packed"]["codec"] == "raw" and manifest["tensors"]["a.u_packed"]["dtype"] == "uint8"
    assert manifest["tensors"]["norm.weight"] == {"dtype": "float32", "shape": [24], "codec": "cast",
                                                  "stored_dtype": "float16"}
    with safe_open(path / WEIGHTS_FILE, "pt") as stored:
        assert json.loads(stored.metadata()[SEAL_KEY]) == sealed_part(manifest)


def test_ternary_factors_are_stored_at_two_bits(saved):
    """tsvd's int8 {-1, 0, 1} factors go to disk four per byte and come back as the same int8 values."""
    model, path = saved
    manifest = read_manifest(path)
    assert {k: v for k, v in manifest["tensors"].items() if v["codec"] == "ternary2"} == {
        "c.u": {"dtype": "int8", "shape": list(model.c.u.shape), "codec": "ternary2"},
        "c.v": {"dtype": "int8", "shape": list(model.c.v.shape), "codec": "ternary2"}}
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
    (path / "model.safetensors").write_bytes(data)
    manifest = read_manifest(saved[1])
    manifest.update(version=1, aliases={}, weights={"file": "model.safetensors", "bytes": len(data),
                                                    "sha256": hashlib.sha256(data).hexdigest()})
    for key in ("tensors", "embeddings", "source", "storage"):
        del manifest[key]
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
    with pytest.raises(ValueError, match="cannot save(.|\\n)*layer 'c' \\(tsvd\\): tensor 'latent_weight'"):
        save_compressed(model, tmp_path / "qat")


def test_half_precision_roundtrip_keeps_dtypes(saved, tmp_path):
    model = copy.deepcopy(saved[0]).to(torch.bfloat16)
    loaded = load_compressed(save_compressed(model, tmp_path / "bf16"), skeleton())
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert loaded.head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_identical_inputs_give_byte_identical_folders(saved, tmp_path):
    """Repeated saves of the same model write the same bytes (one safetensors metadata key, sorted JSON keys;
    before, the metadata order changed between saves)."""
    reports = [{"b": 1, "a": [2, 3]}, {"a": [2, 3], "b": 1}] * 2
    folders = [save_compressed(copy.deepcopy(saved[0]), tmp_path / str(i), report=r) for i, r in enumerate(reports)]
    assert sorted(p.name for p in folders[0].iterdir()) == sorted([MANIFEST_FILE, WEIGHTS_FILE])
    for folder in folders[1:]:
        for name in (WEIGHTS_FILE, MANIFEST_FILE):
            assert (folder / name).read_bytes() == (folders[0] / name).read_bytes()


def rewrite(path, edit_manifest=None, edit_tensors=None, reseal=False):
    """Corrupt a saved folder the way a careful forger would: edit the manifest and/or the file tensors, then
    re-hash (bytes and sha256 always match the new file); ``reseal`` also rewrites the sealed copy."""
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    with safe_open(path / WEIGHTS_FILE, "pt") as stored:
        metadata, tensors = stored.metadata(), {k: stored.get_tensor(k) for k in stored.keys()}
    if edit_manifest:
        edit_manifest(manifest)
    if edit_tensors:
        edit_tensors(tensors, metadata)
    if reseal:
        metadata = {SEAL_KEY: canonical_json(sealed_part(manifest))}
    data = safetensors.torch.save(tensors, metadata=metadata)
    (path / WEIGHTS_FILE).write_bytes(data)
    if isinstance(manifest.get("weights"), dict) and "sha256" in manifest["weights"]:
        manifest["weights"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def edit_only_manifest(path, edit):
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    edit(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def layer(manifest, name):
    return next(entry for entry in manifest["layers"] if entry["name"] == name)


def set_in(path_keys, value):
    def edit(manifest):
        target = manifest
        for key in path_keys[:-1]:
            target = next(e for e in target if e["name"] == key) if isinstance(target, list) else target[key]
        target[path_keys[-1]] = value
    return edit


def retype_tensor(key, dtype):
    def edit(tensors, metadata):
        tensors[key] = (tensors[key].view(dtype) if tensors[key].element_size() == dtype.itemsize
                        else tensors[key].to(dtype))
    return edit


def drop_tensor(key):
    return lambda tensors, metadata: tensors.pop(key)


# (id, manifest edit without re-hash | None, (manifest edit, tensor edit, reseal) | None, message regex)
CORRUPTIONS = [
    ("hyper-codebook-size", set_in(["layers", "b", "config", "codebook_size"], 900), None,
     r"layers\[b\]\.config\.codebook_size: 900 != sealed"),
    ("hyper-classes", set_in(["layers", "b", "config", "classes"], 3), None, r"layers\[b\]\.config\.classes"),
    ("layer-type", set_in(["layers", "a", "type"], "lowrank"), None, r"layers\[a\]\.type: 'lowrank'"),
    ("storage-dtype-edited", set_in(["tensors", "norm.weight", "stored_dtype"], "bfloat16"), None,
     r"tensors\.norm\.weight\.stored_dtype"),
    ("weights-file-escapes", set_in(["weights", "file"], "../x.safetensors"), None,
     r"weights\.file must be a file name"),
    ("weights-sha-missing", lambda m: m["weights"].pop("sha256"), None, r"weights\.sha256 is missing"),
    ("packed-dtype-rehashed", None, (None, retype_tensor("a.u_packed", torch.int8), False),
     r"'a\.u_packed' \(layer 'a'\) is stored as int8 .*implies uint8"),
    ("rest-dtype-rehashed", None, (None, retype_tensor("norm.weight", torch.float32), False),
     r"'norm\.weight' is stored as float32 .*implies float16"),
    ("tensor-removed", None, (None, drop_tensor("c.s"), False), r"'c\.s' \(layer 'c'\) is missing"),
    ("tensor-added", None, (None, lambda t, m: t.update(extra=torch.zeros(3)), False),
     r"'extra' in the weights file is not in the manifest"),
    ("hyper-codes-truncated", None, (None, lambda t, m: t.update({"b.codes": t["b.codes"][:-5].clone()}), False),
     r"'b\.codes' \(layer 'b'\) is stored as uint8"),
    ("seal-removed", None, (None, lambda t, m: m.clear(), False), r"carries no sealed manifest"),
    ("forged-rank", None, (set_in(["layers", "a", "config", "rank"], 3), None, True),
     r"layer 'a' \(svdq\): tensor 'u_packed' has shape \[\d+\], its config implies"),
    ("forged-config-key", None, (set_in(["layers", "b", "config", "colour"], 1), None, True),
     r"layer 'b' \(hyper\): its config .* does not build"),
    ("forged-dtype", None, (set_in(["tensors", "a.u_scales", "dtype"], "float16"),
                            retype_tensor("a.u_scales", torch.float16), True),
     r"layer 'a' \(svdq\): tensor 'u_scales' has dtype float16, its config implies int16"),
    ("forged-missing-config", None, (lambda m: layer(m, "b").pop("config"), None, True),
     r"manifest field layers\[b\]\.config is missing"),
    ("forged-alias", None, (set_in(["aliases", "ghost"], "nowhere"), None, True), r"alias 'ghost' -> 'nowhere'"),
    ("forged-codec", None, (set_in(["tensors", "norm.weight", "codec"], "zip"), None, True),
     r"tensors\[norm\.weight\]\.codec must be one of"),
    ("forged-layers-type", None, (set_in(["layers"], {"a": 1}), None, True), r"manifest field layers must be list"),
    ("forged-unknown-layer-type", None, (set_in(["layers", "d", "type"], "nope"), None, True),
     r"layer 'd' \(nope\): its config .* does not build.*unknown layer type"),
]


@pytest.mark.parametrize("case", CORRUPTIONS, ids=[case[0] for case in CORRUPTIONS])
def test_corrupted_folder_fails_naming_the_layer_or_field(saved, tmp_path, case):
    _, manifest_edit, forgery, message = case
    path = copy_of(saved[1], tmp_path)
    if manifest_edit:
        edit_only_manifest(path, manifest_edit)
    else:
        rewrite(path, *forgery)
    with pytest.raises(ValueError, match=message):
        load_compressed(path, skeleton())


def test_every_inconsistency_is_listed(saved, tmp_path):
    path = copy_of(saved[1], tmp_path)
    rewrite(path, None, lambda t, m: (t.pop("c.s"), t.pop("b.side")))
    with pytest.raises(ValueError, match=r"2 problem\(s\)(.|\n)*'b\.side'(.|\n)*'c\.s'"):
        load_compressed(path, skeleton())


def test_missing_source_needs_a_skeleton(saved):
    with pytest.raises(ValueError, match="records no source .* load_compressed\\(path, model_skeleton\\)"):
        load_compressed(saved[1])
