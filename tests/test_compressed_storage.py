"""The storage policy of saved models (dtype of untouched tensors, int8/int4 embeddings) and the size figures
computed from a saved folder."""
import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from structured_compress import load_compressed, save_compressed
from structured_compress.compress import dense_bytes
from structured_compress.io import StoragePolicy, folder_sizes, read_manifest
from structured_compress.io.shards import SINGLE_FILE as WEIGHTS_FILE
from structured_compress.io.structure import structured_layers
from structured_compress.layers.quant import dequantize, quantize, quantize_grid
from structured_compress.surgery import collect_output_embedding_gram, compress_


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
    assert tensors["mid.left"]["stored_dtype"] == "float16"  # a structured layer's float factors too
    assert loaded.norm.weight.dtype == loaded.mid.left.dtype == torch.float32
    assert torch.equal(loaded.emb.weight, before.emb.weight.half().float())
    assert torch.equal(loaded.mid.left, before.mid.left.half().float())
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


def embedding_after_save(tmp_path, storage, gram=None) -> torch.Tensor:
    """The (tied) embedding weight ``compressed_lm(vocab=200, width=64)`` loads back with ``storage``."""
    model = compressed_lm(vocab=200, width=64)
    save_compressed(model, tmp_path / "m", storage=storage, calibration=None if gram is None else {"head.weight": gram})
    return load_compressed(tmp_path / "m", TinyLM(vocab=200, width=64).eval()).emb.weight.detach()


def test_gptq_embedding_with_identity_gram_is_round_to_nearest(tmp_path):
    weight = compressed_lm(vocab=200, width=64).emb.weight.detach()
    storage = {"embeddings": "int4", "group_size": 16, "zero_point": True, "embeddings_rounding": "gptq"}
    loaded = embedding_after_save(tmp_path, storage, torch.eye(64, dtype=torch.float64))
    codes, scales, zeros = quantize_grid(weight, 4, 16, symmetric=False)
    assert torch.equal(loaded, dequantize(codes, scales, 16, zeros))
    assert read_manifest(tmp_path / "m")["tensors"]["emb.weight"]["rounding"] == "gptq"


def test_gptq_embedding_keeps_logits_better_than_nearest_on_correlated_inputs(tmp_path):
    weight = compressed_lm(vocab=200, width=64).emb.weight.detach()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(512, 8, generator=generator) @ torch.randn(8, 64, generator=generator) \
        + 0.1 * torch.randn(512, 64, generator=generator)  # head inputs on a low-dimensional subspace
    storage = {"embeddings": "int4", "group_size": 16, "zero_point": True}
    errors = {}
    for rounding in ("nearest", "gptq"):
        loaded = embedding_after_save(tmp_path / rounding, {**storage, "embeddings_rounding": rounding},
                                      inputs.double().T @ inputs.double())
        errors[rounding] = ((loaded - weight) @ inputs.T).norm()
    assert errors["gptq"] < 0.9 * errors["nearest"]


def test_gptq_embedding_gram_comes_from_the_head_inputs(tmp_path):
    model = compressed_lm()
    captured = []
    model.head.register_forward_pre_hook(lambda module, args: captured.append(args[0].reshape(-1, 24)))
    grams = collect_output_embedding_gram(model, [IDS, IDS[:1]])
    inputs = torch.cat(captured).double()
    assert list(grams) == ["head.weight"] and torch.allclose(grams["head.weight"], inputs.T @ inputs)
    with pytest.raises(ValueError, match="embeddings_rounding=gptq needs the Gram matrix of the LM head's inputs"):
        save_compressed(model, tmp_path / "m", storage={"embeddings": "int8", "embeddings_rounding": "gptq"})


class DepthwiseNet(nn.Module):
    """A depthwise conv and a batch norm: tensors no codec replaces."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("zero_point", [False, True])
def test_rest_int8_stores_convs_per_output_channel(tmp_path, zero_point):
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    weight = model.conv.weight.detach().clone()
    save_compressed(model, tmp_path / "m", storage={"rest": "int8", "zero_point": zero_point})
    loaded = load_compressed(tmp_path / "m", DepthwiseNet().eval())
    codes, scales, zeros = quantize_grid(weight.reshape(4, 9), 8, None, symmetric=not zero_point)
    assert torch.equal(loaded.conv.weight, dequantize(codes, scales, None, zeros).reshape(4, 1, 3, 3))
    assert read_manifest(tmp_path / "m")["tensors"]["bn.weight"]["codec"] == "cast"  # 1-D tensors: fp16
    per_channel = 9 + 2 + (1 if zero_point else 0)  # int8 codes, fp16 scale (, int8 zero code)
    batch_norm = 4 * 4 * 2 + 8  # weight, bias, running mean and variance in fp16; the int64 step count
    assert folder_sizes(tmp_path / "m")["rest_bytes"] == 4 * per_channel + batch_norm
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_untied_lm_head_is_an_embedding_too(tmp_path):
    model = compressed_lm(tied=False)
    roundtrip(model, tmp_path / "m", storage={"embeddings": "int8"})
    manifest = read_manifest(tmp_path / "m")
    assert manifest["embeddings"] == ["emb.weight", "head.weight"]
    assert manifest["tensors"]["head.weight"]["codec"] == "int8"


@pytest.mark.parametrize("config, message", [
    ({"dtipe": "fp16"}, r"^dtipe=fp16: storage has no such option .*did you mean dtype\?"),
    ({"dtype": "fp8"}, r"^dtype=fp8: expected one of fp16, .* or null"),
    ({"embeddings": "int2"}, r"^embeddings=int2: expected one of none, int8, int4"),
    ({"embeddings": "int4", "group_size": 0}, r"^group_size=0: must be >= 1"),
    ({"embeddings_rounding": "hessian"}, r"^embeddings_rounding=hessian: expected one of nearest, gptq"),
    ({"rest": "int4"}, r"^rest=int4: expected one of none, int8"),
    ({"zero_point": "yes"}, r"^zero_point=yes: expected true or false"),
    ("fp16", r"storage=fp16: must be a mapping"),
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
    float_bytes = 4 if storage == {"dtype": "fp32"} else 2
    assert sizes["replaced_bytes"] == sum(layer.storage_bytes(float_bytes)
                                          for layer in structured_layers(model).values())
    assert sizes["replaced_fp32_bytes"] == (24 * 24 + 24) * 4
    assert sizes["embeddings_bytes"] == embedding_bytes
    assert sizes["ratio_vs_fp16"] == round(sizes["dense_fp16_bytes"] / sizes["bytes_on_disk"], 3)


@pytest.mark.parametrize("layer", ["lowrank", "monarch", "blockdiag", "gaudi", "tsvd", "svdq"])
def test_structured_layers_are_never_larger_than_fp16_and_keep_their_exact_tensors(layer, tmp_path):
    """Every float tensor of a structured layer is written in fp16 except its ``exact_tensors`` (Gaudi's
    interval parameters, verified scales), which reload bit-identical."""
    torch.manual_seed(0)
    model = TinyLM(tied=False)
    compress_(model, layer, 0.5, include=["mid"])
    before = copy.deepcopy(model)
    loaded = roundtrip(model, tmp_path / "m")
    tensors = read_manifest(tmp_path / "m")["tensors"]
    exact = type(before.mid).exact_tensors
    for name, tensor in before.mid.state_dict().items():
        entry = tensors[f"mid.{name}"]
        if not tensor.is_floating_point() or name in exact:
            assert entry["codec"] in ("raw", "ternary2"), (name, entry)
            assert torch.equal(loaded.mid.state_dict()[name], tensor)
        else:
            assert entry["stored_dtype"] == "float16", (name, entry)
            assert torch.equal(loaded.mid.state_dict()[name], tensor.half().float())
