"""The storage policy of saved models (dtype of untouched tensors, int8/int4 embeddings) and the size figures
computed from a saved folder."""
import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from src import load_compressed, save_compressed
from src.compress import dense_bytes
from src.io import StoragePolicy, folder_sizes, read_manifest
from src.io.compressed_format import WEIGHTS_FILE, structured_layers
from src.layers.quant import dequantize, quantize
from src.surgery import compress_


class TinyLM(nn.Module):
    """Embedding -> structured middle -> norm -> LM head (tied to the embedding unless ``tied=False``)."""

    def __init__(self, vocab: int = 40, width: int = 24, tied: bool = True):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        return self.head(self.norm(torch.relu(self.mid(self.emb(ids)))))


def compressed_lm(seed: int = 0, **kwargs) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM(**kwargs).eval()
    compress_(model, "lowrank", 0.5, include=["mid"])
    return model


IDS = torch.tensor([[1, 5, 7, 39], [0, 2, 3, 4]])


def roundtrip(model: nn.Module, path, **save_kwargs) -> nn.Module:
    save_compressed(model, path, **save_kwargs)
    torch.manual_seed(123)
    return load_compressed(path, TinyLM(tied=model.head.weight is model.emb.weight).eval())


def test_default_stores_untouched_fp32_tensors_as_fp16_and_restores_fp32(tmp_path):
    model = compressed_lm()
    before = copy.deepcopy(model)
    loaded = roundtrip(model, tmp_path / "m")
    tensors = read_manifest(tmp_path / "m")["tensors"]
    assert tensors["norm.weight"]["stored_dtype"] == "float16" and tensors["emb.weight"]["codec"] == "cast"
    assert tensors["mid.left"]["codec"] == "raw"  # a structured layer's tensors are stored as the layer holds them
    assert loaded.norm.weight.dtype == torch.float32
    assert torch.equal(loaded.emb.weight, before.emb.weight.half().float())
    assert torch.equal(loaded.mid.left, before.mid.left)
    with torch.no_grad():  # saving rounded the model in memory to exactly what is on disk
        assert torch.equal(loaded(IDS), model(IDS))


def test_fp32_only_when_asked(tmp_path):
    model = compressed_lm()
    before = copy.deepcopy(model)
    loaded = roundtrip(model, tmp_path / "m", storage={"dtype": "fp32"})
    assert {e["codec"] for e in read_manifest(tmp_path / "m")["tensors"].values()} == {"raw"}
    with torch.no_grad():
        assert torch.equal(loaded(IDS), before(IDS))


def test_half_precision_model_keeps_its_own_dtype_by_default(tmp_path):
    model = compressed_lm().to(torch.bfloat16)
    save_compressed(model, tmp_path / "m")
    manifest = read_manifest(tmp_path / "m")
    assert manifest["storage"]["dtype"] == "bfloat16"
    assert all(e["codec"] == "raw" for e in manifest["tensors"].values())


def test_values_beyond_fp16_range_fail_with_the_fix(tmp_path):
    model = compressed_lm()
    with torch.no_grad():
        model.norm.bias[0] = 1e6
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="'norm.bias' has values beyond float16's range.*storage.dtype=bf16"):
        save_compressed(model, tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
    assert not (tmp_path / "m").exists()  # a failed save rounds nothing and writes nothing
    save_compressed(model, tmp_path / "bf16", storage={"dtype": "bf16"})  # bf16 has the range


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 8), (4, None)])
def test_tied_embedding_quantized_once_and_stays_tied(tmp_path, bits, group_size):
    model = compressed_lm()
    weight = model.emb.weight.detach().clone()
    loaded = roundtrip(model, tmp_path / "m", storage={"embeddings": f"int{bits}", "group_size": group_size})
    manifest = read_manifest(tmp_path / "m")
    assert manifest["embeddings"] == ["emb.weight"] and manifest["aliases"] == {"head.weight": "emb.weight"}
    assert manifest["tensors"]["emb.weight"]["codec"] == f"int{bits}"
    codes, scales = quantize(weight, bits, group_size)
    assert torch.equal(loaded.emb.weight, dequantize(codes, scales, group_size))
    assert loaded.head.weight.data_ptr() == loaded.emb.weight.data_ptr()
    with safe_open(tmp_path / "m" / WEIGHTS_FILE, "pt") as stored:
        assert stored.get_tensor("emb.weight").numel() == weight.numel() * bits // 8
        assert stored.get_tensor("emb.weight#scales").shape == scales.shape
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


def test_untied_lm_head_is_an_embedding_too(tmp_path):
    model = compressed_lm(tied=False)
    roundtrip(model, tmp_path / "m", storage={"embeddings": "int8"})
    manifest = read_manifest(tmp_path / "m")
    assert manifest["embeddings"] == ["emb.weight", "head.weight"]
    assert manifest["tensors"]["head.weight"]["codec"] == "int8"


@pytest.mark.parametrize("config, message", [
    ({"dtipe": "fp16"}, r"storage has no key\(s\) \['dtipe'\]"),
    ({"dtype": "fp8"}, r"storage.dtype must be one of"),
    ({"embeddings": "int2"}, r"storage.embeddings must be one of"),
    ({"embeddings": "int4", "group_size": 0}, r"group_size must be a positive integer"),
    ("fp16", r"storage must be a dict"),
])
def test_bad_storage_config_names_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        StoragePolicy.from_config(config)


@pytest.mark.parametrize("storage, embedding_bytes", [
    (None, 2 * 40 * 24 * 2),  # embedding and head in fp16
    ({"dtype": "fp32"}, 2 * 40 * 24 * 4),
    ({"embeddings": "int4", "group_size": 8}, 2 * (40 * 24 // 2 + 40 * 3 * 2)),  # int4 codes, fp16 scale per 8
])
def test_folder_sizes_match_the_dense_model_and_the_files(tmp_path, storage, embedding_bytes):
    torch.manual_seed(0)
    dense = TinyLM(tied=False).eval()
    dense.register_buffer("steps", torch.tensor([3]))  # a non-float tensor counts at its own size
    model = copy.deepcopy(dense)
    compress_(model, "lowrank", 0.5, include=["mid"])
    save_compressed(model, tmp_path / "m", storage=storage)
    sizes = folder_sizes(tmp_path / "m")
    assert (sizes["dense_fp32_bytes"], sizes["dense_fp16_bytes"]) == (dense_bytes(dense, 4), dense_bytes(dense, 2))
    assert sizes["bytes_on_disk"] == sum(f.stat().st_size for f in (tmp_path / "m").iterdir())
    assert sizes["bytes_on_disk"] == sizes["metadata_bytes"] + sum(sizes[f"{p}_bytes"] for p in
                                                                    ("replaced", "embeddings", "rest"))
    assert sizes["replaced_bytes"] == sum(layer.storage_bytes() for layer in structured_layers(model).values())
    assert sizes["replaced_fp32_bytes"] == (24 * 24 + 24) * 4
    assert sizes["embeddings_bytes"] == embedding_bytes
    assert sizes["ratio_vs_fp16"] == round(sizes["dense_fp16_bytes"] / sizes["bytes_on_disk"], 3)
